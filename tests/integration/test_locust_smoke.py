"""A short locust run through load/run.py, gated on errors only (latency here is noise).

locust is only ever started as a subprocess of the driver: importing it would monkey-patch
this pytest process with gevent, and these tests fork and signal real servers. The driver's
helpers (``load.run``) import no locust, so the CSV and gate logic is tested in-process.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from load import run as driver

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "load" / "run.py"

# Every request name the scenarios use; each must have been exercised without a failure.
EXPECTED = {
    ("GET", "/hello"), ("POST", "/json"), ("GET", "/download"), ("POST", "/upload"),
    ("GET", "/hello (slow mix)"), ("GET", "/slow"), ("GET", "/hello (close)"),
}


def _run_driver(tmp_path: Path, *args: str, timeout: float = 120.0
                ) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(RUN), "--results-dir", str(tmp_path), *args],
                          cwd=ROOT, capture_output=True, text=True, check=False, timeout=timeout)
    if proc.returncode == driver.EXIT_NO_LOCUST:
        pytest.skip(f"locust is not available and could not be installed: {proc.stderr.strip()}")
    return proc


def test_every_scenario_runs_without_a_failed_request(tmp_path):
    # 12 users over 6 scenarios: two each, so every scenario gets load.
    proc = _run_driver(tmp_path, "--run-time", "8s", "--users", "12", "--spawn-rate", "12")
    output = proc.stdout + proc.stderr
    assert proc.returncode == driver.EXIT_OK, output[-4000:]

    rows = driver.read_stats(tmp_path / "locust_stats.csv")
    seen = {(row.method, row.name): row for row in rows}
    missing = EXPECTED - set(seen)
    assert not missing, f"scenarios that made no request: {missing}\n{output[-3000:]}"
    for key in EXPECTED:
        assert seen[key].requests > 0 and seen[key].failures == 0, seen[key]
    assert (tmp_path / "locust_report.html").stat().st_size > 1000
    server_log = (tmp_path / "locust_server.log").read_text()
    assert "workers ready" in server_log
    assert "load gate passed" in output  # the locustfile's own verdict agreed


def test_the_gate_fails_a_run_over_its_p95_limit(tmp_path):
    # One request in ten sleeps 200 ms, so p95 is at least 200 ms: a 50 ms limit must fail,
    # both in the locustfile's quitting listener and in the driver's reading of the CSV.
    proc = _run_driver(tmp_path, "--run-time", "3s", "--users", "2", "--spawn-rate", "2",
                       "--scenario", "SlowMixUser", "--max-p95-ms", "50")
    output = proc.stdout + proc.stderr
    assert proc.returncode == driver.EXIT_GATE, output[-4000:]
    assert "load gate FAILED" in output and "exceeds --max-p95-ms" in output, output[-3000:]


# --- the driver's helpers, without locust ---------------------------------------------------

@pytest.mark.parametrize("text, seconds", [("30", 30.0), ("30s", 30.0), ("2m", 120.0),
                                           ("1m30s", 90.0), ("1h", 3600.0), ("1.5", 1.5)])
def test_parse_duration(text, seconds):
    assert driver.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "s", "10x", "1s1m", "-5"])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError):
        driver.parse_duration(text)


CSV_HEAD = ("Type,Name,Request Count,Failure Count,Median Response Time,"
            "Average Response Time,Min Response Time,Max Response Time,Average Content Size,"
            "Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%\n")


def _stats(tmp_path: Path, *lines: str) -> list[driver.StatsRow]:
    path = tmp_path / "stats.csv"
    path.write_text(CSV_HEAD + "".join(line + "\n" for line in lines))
    return driver.read_stats(path)


def test_gate_passes_a_clean_run(tmp_path):
    rows = _stats(tmp_path,
                  "GET,/hello,100,0,2,2.5,1,9,13,50.0,0.0,2,3,3,4,5,6,8,9,9,9,9",
                  ",Aggregated,100,0,2,2.5,1,9,13,50.0,0.0,2,3,3,4,5,6,8,9,9,9,9")
    assert rows[-1].p95_ms == 6.0 and rows[0].requests == 100
    assert driver.gate(rows, None) == []
    assert driver.gate(rows, 6.0) == []


def test_gate_fails_on_failures_latency_and_empty_runs(tmp_path):
    failed = _stats(tmp_path, ",Aggregated,100,1,2,2.5,1,9,13,50.0,0.5,2,3,3,4,5,6,8,9,9,9,9")
    assert driver.gate(failed, None) == ["1 of 100 requests failed"]
    slow = _stats(tmp_path, ",Aggregated,100,0,2,2.5,1,9,13,50.0,0.0,2,3,3,4,5,60,8,9,9,9,9")
    assert driver.gate(slow, None) == []
    assert "exceeds --max-p95-ms" in driver.gate(slow, 50.0)[0]
    empty = _stats(tmp_path, ",Aggregated,0,0,0,0,0,0,0,0.0,0.0,"
                             "N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A")
    assert empty[0].p95_ms is None
    assert driver.gate(empty, 50.0) == ["no request was made"]
    assert driver.gate([], None) == ["the stats CSV has no Aggregated row"]
