-- bench.py runs wrk with this script only for its done() hook: it prints the run's summary
-- as one JSON line, so the benchmark reads exact numbers (microseconds, counts) instead of
-- parsing wrk's rounded human report. Defining no request()/response() keeps wrk on its fast
-- path, so the script costs nothing while the load runs.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %.0f, "duration_us": %.0f, "bytes": %.0f, ' ..
    '"p50_us": %.0f, "p99_us": %.0f, "max_us": %.0f, ' ..
    '"connect": %.0f, "read": %.0f, "write": %.0f, "status": %.0f, "timeout": %.0f}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(99), latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
