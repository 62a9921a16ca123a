"""A short locust run through load/run.py, gated on errors only (latency here is noise).

Run by ``make load`` (``pytest load/test_locust_smoke.py``), not by ``make test``: the driver
may pip-install locust on first use and each run takes seconds of load, which is no unit of
the suite. The driver's argument and gate logic is tested fast in tests/unit/test_load_run.py.

locust is only ever started as a subprocess of the driver: importing it would monkey-patch
this pytest process with gevent, and these tests fork and signal real servers.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from load import run as driver

ROOT = Path(__file__).resolve().parents[1]
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
