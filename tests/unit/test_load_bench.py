"""The benchmark's own logic: ratios, targets, flag detection, wrk's report, the ceiling loop.

No competitor and no wrk run here; the ceiling server is started (one worker, a few requests)
because a yardstick that answers wrongly would make every ratio wrong.
"""

from __future__ import annotations

import dataclasses
import socket
import statistics
import sys
import tomllib
from pathlib import Path

import pytest

from load import bench, bench_env, bench_memory, bench_mixed, ceiling
from load.contenders import Contender, start_command
from load.wrk import parse_wrk


def _run(server: str, rps: float, mode: str = "keepalive", conc: int = 50, round_no: int = 0,
         cpu: float | None = 20.0, errors: int = 0) -> bench.Run:
    return bench.Run(server, mode, conc, round_no, int(rps * 2), rps, 1.0, 2.0, cpu,
                     {"connect": 0, "read": 0, "write": 0, "timeout": 0, "status": errors})


def test_cells_are_medians_with_ratios_to_forkserver_and_the_ceiling():
    runs = [_run("forkserver", rps, round_no=i) for i, rps in enumerate((40, 50, 90))]
    runs += [_run("ceiling", rps, round_no=i) for i, rps in enumerate((100, 200, 150))]
    runs += [_run("granian", 25, cpu=None), _run("granian", 75, cpu=None)]
    cells = {c.server: c for c in bench.summarize(runs, ["forkserver", "ceiling", "granian"])}
    assert cells["forkserver"].rps == 50 and cells["forkserver"].x_reference == 1.0
    assert cells["forkserver"].x_ceiling == pytest.approx(50 / 150)
    assert cells["ceiling"].x_reference == pytest.approx(3.0)
    assert cells["granian"].rps == 50 and cells["granian"].cpu_us is None
    assert [c.server for c in bench.summarize(runs, ["granian", "ceiling", "forkserver"])] \
        == ["granian", "ceiling", "forkserver"]


def test_a_row_without_forkserver_or_ceiling_in_its_mode_has_no_ratio():
    cells = bench.summarize([_run("gunicorn-gthread", 10, mode="tls")], ["gunicorn-gthread"])
    assert cells[0].x_reference is None and cells[0].x_ceiling is None
    table = "\n".join(bench._mode_table(cells, "tls", {"cpu": "X", "cores": "2",
                                                       "python": "3.11", "date": "today"}))
    assert "*X, 2 cores, Python 3.11, today.*" in table
    assert "| gunicorn-gthread | 50 | - | n/a | 10 | 20 |" in table
    assert "| ceiling | - | not applicable: it speaks no TLS |" in table


def test_targets_read_the_right_ratios_and_say_na_when_a_row_is_missing():
    runs = [_run("forkserver", 100), _run("ceiling", 180), _run("granian", 120),
            _run("forkserver", 30, mode="close"), _run("ceiling", 40, mode="close"),
            _run("forkserver", 20, mode="tls", errors=3), _run("gunicorn-gthread", 8, mode="tls"),
            _run("forkserver", 90, mode="browser", cpu=32.0)]
    verdicts = {t: (m, v) for t, m, v in bench.check_targets(bench.summarize(runs, []), {})}
    assert verdicts["keep-alive, c=50: >= 1.0x granian"] == ("0.83x", "NOT met")
    assert verdicts["keep-alive, c=50: >= 0.5x the ceiling"] == ("0.56x", "met")
    assert verdicts["Connection: close, c=50: >= 0.75x the ceiling"] == ("0.75x", "met")
    assert verdicts["TLS keep-alive, c=50: >= 2x gunicorn gthread"] == ("2.50x", "met")
    assert verdicts["keep-alive, c=50: >= 1.2x meinheld"] == ("n/a", "n/a")
    assert verdicts["CPU per request, browser-like vs wrk's request, c=50: <= 1.5x"] \
        == ("1.60x", "NOT met")
    assert verdicts["no failed request at any concurrency"] == ("3 errors", "NOT met")


def test_flask_rows_are_compared_with_meinheld_and_have_no_ceiling():
    runs = [_run("forkserver", 9_000, mode="flask"), _run("meinheld", 10_000, mode="flask"),
            _run("forkserver", 8_000, mode="flask-json"),
            _run("meinheld", 6_400, mode="flask-json"), _run("ceiling", 50_000)]
    cells = bench.summarize(runs, list(bench.KINDS))
    verdicts = {t: (m, v) for t, m, v in bench.check_targets(cells, {})}
    assert verdicts["Flask hello, keep-alive, c=50: >= 1.0x meinheld"] == ("0.90x", "NOT met")
    assert verdicts["Flask JSON, keep-alive, c=50: >= 1.0x meinheld"] == ("1.25x", "met")
    info = {"cpu": "X", "cores": "2", "python": "3.11", "date": "today"}
    table = "\n".join(bench._mode_table(cells, "flask-json", info))
    assert "## Flask JSON, keep-alive" in table and "path `/json`" in table
    assert "| meinheld | 50 | 0.80 | n/a | 6,400 |" in table
    assert "| ceiling | - | not applicable: it runs no app |" in table


def test_the_flask_app_answers_hello_and_a_small_json_object():
    from load import flaskapp

    client = flaskapp.app.test_client()
    assert client.get("/").data == b"Hello, World!"
    answer = client.get("/json")
    assert answer.mimetype == "application/json"
    assert answer.get_json() == {"message": "Hello, World!"}
    assert bench.MODE_PATH["flask-json"] == "/json"


def test_a_server_that_cannot_start_leaves_every_mode_it_was_in():
    a, b = object(), object()
    plan = bench.Plan({"keepalive": [a, b], "close": [a, b], "tls": [b]}, [])
    assert plan.distinct() == [a, b]
    plan.drop(b)
    assert plan.servers == {"keepalive": [a], "close": [a]}


def test_the_default_run_is_c50_with_three_rounds_and_full_adds_the_curve():
    parser = bench.build_parser()
    assert parser.parse_args([]).rounds is None  # resolved in main: 3, or 1 with --quick
    assert bench.CONCURRENCIES == (50,) and 50 in bench.FULL_CONCURRENCIES
    plan = bench.Plan({mode: ["s"] * 7 for mode in ("keepalive", "close", "browser")}, [])
    plan.servers.update({"flask": ["f"] * 4, "flask-json": ["f"] * 4, "tls": ["t"] * 2})
    assert bench.count_runs(plan, 3, [50]) == 3 * (7 * 3 + 4 * 2 + 2)
    assert bench.count_runs(plan, 3, [1, 10, 50, 200]) == 3 * (7 * 4 * 2 + 7 + 4 * 2 + 2)


def test_flag_detection_reads_whole_words_of_the_help():
    help_text = "usage: forkserver [--threads INT] [--preload | --no-preload]\n  --certfile FILE"
    assert bench_env.supports(help_text, "--threads")
    assert bench_env.supports(help_text, "--no-preload", "--certfile")
    assert not bench_env.supports(help_text, "--thread")
    assert not bench_env.supports(help_text, "--threads", "--handoff-delay")


def test_rows_name_the_forkserver_flags_they_need():
    assert Contender("a", "forkserver", 2, threads=4).needs_flags() == ("--threads",)
    assert Contender("b", "forkserver", 4, extra=("--handoff-delay", "0")).needs_flags() \
        == ("--handoff-delay",)
    assert Contender("c", "forkserver", 2).needs_flags() == ()


def test_parse_wrk_reads_the_json_line():
    out = ("Running 2s test\nBENCH_JSON {\"requests\": 1000, \"duration_us\": 2000000, "
           "\"bytes\": 5, \"p50_us\": 250, \"p99_us\": 4000, \"max_us\": 9000, \"connect\": 0, "
           "\"read\": 1, \"write\": 0, \"status\": 2, \"timeout\": 0}\n")
    result = parse_wrk(out)
    assert (result.rps, result.p50_ms, result.p99_ms, result.error_total) == (500, 0.25, 4, 3)
    with pytest.raises(ValueError):
        parse_wrk("no json here")


def _exchange(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(payload)
        received = b""
        while chunk := conn.recv(65536):  # the ceiling closes after "Connection: close"
            received += chunk
        return received


def test_the_ceiling_answers_pipelined_keep_alive_and_closes_on_request(tmp_path):
    server = start_command(Contender("ceiling", "ceiling", 1), Path(sys.executable),
                           "load.apps:hello", tmp_path / "ceiling.log", [])
    server.start(timeout=20)
    try:
        head = b"GET / HTTP/1.1\r\nHost: x\r\n"
        got = _exchange(server.port, head + b"\r\n" + head + b"Connection: close\r\n\r\n")
        assert got == ceiling.KEEP + ceiling.CLOSE
        assert len(server.worker_pids()) == 1
    finally:
        assert server.stop(timeout=10) == 0


# --- bench_mixed -----------------------------------------------------------------------------

def _outcome(row: str, rps: float, p99: float, scenario: str = "mixed") -> bench_mixed.Outcome:
    return bench_mixed.Outcome(row, scenario, 0, rps, 1.0, p99, 0,
                               38.0 if scenario == "mixed" else None)


def test_the_fast_clients_hold_their_first_request_and_are_counted_after_it():
    argv = bench_mixed.held_command("wrk", "http://127.0.0.1:9", 4.0)
    assert argv[-3:] == ["--", "1000", str(bench_mixed.FAST_CLIENTS)]
    assert "-d5s" in argv and str(bench_mixed.HELD_SCRIPT) in argv
    assert argv[argv.index("--") - 1] == "http://127.0.0.1:9/hello"
    result = parse_wrk('BENCH_JSON {"requests": 4000, "duration_us": 5000000, "bytes": 0, '
                       '"p50_us": 1, "p99_us": 1, "max_us": 1, "connect": 0, "read": 0, '
                       '"write": 0, "status": 0, "timeout": 0}')
    assert bench_mixed._after_hold(result, 4.0) == 1000.0


def test_mixed_targets_compare_the_rows_the_issues_name():
    m = bench_mixed
    summaries = m.summarize([
        _outcome(m.THREADED, 20_000, 10.0), _outcome(m.GTHREAD, 8_000, 16.0),
        _outcome(m.HANDOFF, 30_000, 9.0), _outcome(m.SYNC, 9_000, 8.0),
        _outcome(m.HANDOFF, 40_000, 2.0, "hello"), _outcome(m.NO_HANDOFF, 41_000, 2.0, "hello"),
    ])
    verdicts = {t.split(": ", 1)[1]: (value, verdict) for t, value, verdict
                in m.check_targets(summaries)}
    assert verdicts[f"{m.THREADED} fast rate >= 2x {m.GTHREAD}"] == ("2.50x", "met")
    assert verdicts[f"{m.THREADED} fast p99 <= {m.GTHREAD}"] == ("10.0 vs 16.0 ms", "met")
    assert verdicts[f"{m.HANDOFF} fast p99 <= {m.SYNC}"] == ("9.0 vs 8.0 ms", "NOT met")
    assert verdicts[f"{m.HANDOFF} within 5% of {m.NO_HANDOFF}"] == ("0.98x", "met")
    assert verdicts[f"{m.THREADED} >= 2x {m.GTHREAD}"] == ("n/a", "n/a")


def test_the_handoff_pair_is_judged_round_by_round():
    """The machine slows down between rounds: each round's pair is level, the rows' medians
    are not; the paired ratio says level, the other is shown beside it."""
    m = bench_mixed

    def hello(row: str, round_no: int, rps: float) -> bench_mixed.Outcome:
        return bench_mixed.Outcome(row, "hello", round_no, rps, 1.0, 2.0, 0, None)

    outcomes = [hello(m.HANDOFF, 0, 56_000), hello(m.NO_HANDOFF, 0, 54_000),
                hello(m.HANDOFF, 1, 64_000), hello(m.NO_HANDOFF, 1, 68_000),
                hello(m.HANDOFF, 2, 68_500), hello(m.NO_HANDOFF, 2, 68_600)]
    assert m.paired_ratio(outcomes, m.HANDOFF, m.NO_HANDOFF, "hello") == pytest.approx(
        68_500 / 68_600)
    target = f"hello: {m.HANDOFF} within 5% of {m.NO_HANDOFF}"
    paired = {t: (value, verdict) for t, value, verdict
              in m.check_targets(m.summarize(outcomes), outcomes)}[target]
    assert paired == ("1.00x paired by round (ratio of the rows' medians 0.94x)", "met")
    alone = {t: (value, verdict) for t, value, verdict
             in m.check_targets(m.summarize(outcomes))}[target]
    assert alone == ("0.94x", "NOT met")
    # A round missing one of the two rows (it failed) is left out, not paired across rounds.
    assert m.paired_ratio(outcomes[:-1], m.HANDOFF, m.NO_HANDOFF, "hello") == pytest.approx(
        statistics.median([56_000 / 54_000, 64_000 / 68_000]))


def test_a_mixed_row_that_fails_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    m = bench_mixed
    monkeypatch.setattr(m.bench_env, "ensure_wrk", lambda install: "wrk")
    monkeypatch.setattr(m.bench_env, "ensure_bench_venv",
                        lambda install, reinstall: (Path("python"), {}))
    monkeypatch.setattr(m.bench_env, "help_text", lambda python, module: "--threads")
    monkeypatch.setattr(m.bench_env, "machine_info",
                        lambda python, wrk: {"date": "d", "machine": "m", "cpu": "c",
                                             "cores": "2"})
    monkeypatch.setattr(m.signal, "signal", lambda *args: None)

    def measure_row(row, scenario, round_no, *rest):
        if row.label == m.THREADED:
            raise m.ServerError(f"{row.label}: exited with status 1 while probing")
        return _outcome(row.label, 1000.0, 5.0, scenario)

    monkeypatch.setattr(m, "measure_row", measure_row)
    assert m.main(["--results-dir", str(tmp_path), "--quick"]) == m.EXIT_FAILED
    report = (tmp_path / "bench-mixed.md").read_text()
    assert report.startswith("# forkserver head-of-line benchmark\n\n**Incomplete run (")
    assert f"| {m.THREADED} | did not run (see mixed_forkserver_w_2_threads_4.log) |" in report
    assert f"| {m.GTHREAD} | 1.00 | 1,000 |" in report
    assert f"| {m.NO_HANDOFF} | not supported by this build (no --handoff-delay) |" in report


def test_the_handoff_row_without_a_handoff_is_not_supported_and_metrics_are_read(tmp_path):
    import http.server
    import threading

    m = bench_mixed
    handoff = _outcome(m.HANDOFF, 30_000, 9.0)
    assert m.handoff_not_wired(dataclasses.replace(handoff, handoffs=0)) \
        .startswith("not supported by this build")
    assert m.handoff_not_wired(dataclasses.replace(handoff, handoffs=12)) == ""
    assert m.handoff_not_wired(handoff) == ""  # not read: nothing can be told
    assert m.handoff_not_wired(_outcome(m.NO_HANDOFF, 30_000, 9.0)) == ""

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = (b"# TYPE forkserver_handoffs_adopted_total counter\n"
                    b"forkserver_handoffs_sent_total 9\nforkserver_handoffs_adopted_total 7\n")
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Metrics)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        assert m.read_counter(port, m.HANDOFF_METRIC) == 7
        assert m.read_counter(port, "forkserver_missing_total") is None
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# --- bench_memory ----------------------------------------------------------------------------

def test_memory_rows_drop_an_off_setting_the_build_lacks_and_refuse_an_on_one(tmp_path,
                                                                              monkeypatch):
    monkeypatch.setattr(bench_memory, "forkserver_settings", lambda python: {"preload", "app"})
    plan, unsupported = bench_memory.plan_rows(Path("python"), None, tmp_path)
    labels = [row.label for row, _ in plan]
    assert labels == ["gunicorn", "gunicorn --preload", "forkserver",
                      "forkserver --preload, no freeze"]
    no_freeze = plan[3][1]
    assert no_freeze.extra[0] == "--config" and no_freeze.workers == 8
    assert Path(no_freeze.extra[1]).read_text() == "preload = true\n"
    assert "no gc_freeze" in unsupported["forkserver --preload + freeze"]
    assert "refork_after" in unsupported["forkserver --preload + freeze + refork"]


def test_memory_rows_with_every_setting_write_them_as_toml(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_memory, "forkserver_settings",
                        lambda python: {"preload", "gc_freeze", "refork_after"})
    plan, unsupported = bench_memory.plan_rows(Path("python"), ["refork"], tmp_path)
    assert not unsupported and len(plan) == 1
    text = Path(plan[0][1].extra[1]).read_text()
    assert tomllib.loads(text) == {"preload": True, "gc_freeze": True,
                                   "refork_after": bench_memory.REFORK_AFTER}


def _measurement(row: str, replaced: int) -> bench_memory.Measurement:
    return bench_memory.Measurement(row, 880, 0, 8, 9, 200 << 20, 20 << 20, {}, replaced)


def test_a_refork_row_in_which_no_worker_was_replaced_is_not_supported():
    refork, freeze = bench_memory.ROWS[-1], bench_memory.ROWS[-2]
    assert "refork_after" in refork.settings
    why = bench_memory.not_wired(refork, _measurement(refork.label, 0))
    assert why.startswith("not supported by this build") and "880 requests" in why
    assert bench_memory.not_wired(refork, _measurement(refork.label, 7)) == ""
    # Rows that refork nothing are never judged by it.
    assert bench_memory.not_wired(freeze, _measurement(freeze.label, 0)) == ""
    table = bench_memory.render_markdown(
        [_measurement(freeze.label, 0)], {refork.label: why},
        {"date": "d", "machine": "m", "cpu": "c", "cores": "2"}, 800, [])
    assert f"| {refork.label} | {why} |" in table
    assert "| preload + freeze + refork <= 0.75x gunicorn --preload | n/a | n/a |" in table


def test_the_warm_up_visits_every_kind_of_page():
    paths = [bench_memory.warmup_path(i) for i in range(len(bench_memory.PATHS))]
    assert paths[0] == "/" and "/admin/login/" in paths
    assert all("{" not in p for p in paths)


def test_a_ratio_just_off_its_target_is_shown_with_a_third_decimal():
    judged = bench_env.judged
    assert judged(0.7487, 0.75) == ("0.749x", "NOT met")
    assert judged(0.7539, 0.75, higher=False) == ("0.754x", "NOT met")
    assert judged(0.7461, 0.75, higher=False) == ("0.746x", "met")
    assert judged(0.75, 0.75) == ("0.75x", "met")
    assert judged(0.8312, 0.75) == ("0.83x", "met")
