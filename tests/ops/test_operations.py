"""Zero-downtime operations: reload, upgrade, scaling, draining on TERM and recycling (requests,
memory, lifetime), under a live client load where it matters. Each load scenario asserts that
no request failed."""

from __future__ import annotations

import signal
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests

from tests.conftest import Server
from tests.ops.load_loop import LoadLoop

VERSIONED_APP = """
import os
VERSION = {version!r}

def app(environ, start_response):
    if environ["PATH_INFO"] == "/slow":
        import time
        time.sleep(float(environ["QUERY_STRING"] or 1))
    if environ["PATH_INFO"] == "/hang":
        import time
        while True:
            time.sleep(0.1)
    if environ["PATH_INFO"] == "/grow":
        global HOARD
        HOARD = bytearray(int(environ["QUERY_STRING"]) * 1024 * 1024)
        HOARD[::4096] = b"x" * len(HOARD[::4096])  # touch every page so it is resident
    body = f"{{VERSION}} {{os.getpid()}}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
"""


def write_app(directory: Path, version: str, broken: bool = False) -> None:
    source = VERSIONED_APP.format(version=version)
    if broken:
        source += "\ndef broken(:\n"
    (directory / "versioned.py").write_text(textwrap.dedent(source))


@pytest.fixture
def app_dir(tmp_path) -> Path:
    directory = tmp_path / "app"
    directory.mkdir()
    write_app(directory, "v1")
    return directory


def start(server_factory, app_dir: Path, *args: str, workers: int = 2) -> Server:
    # No bytecode cache: a rewritten module of the same size must not be served stale.
    return server_factory("versioned:app", *args, workers=workers, cwd=app_dir,
                          env={"PYTHONDONTWRITEBYTECODE": "1"})


def versions(result) -> set[str]:
    return {body.split()[0].decode() for body in result.bodies if body}


def report(name: str, result) -> None:
    print(f"\nSCENARIO {name}: sent={result.sent} failed={result.failed} "
          f"retried={result.retried} refused-after-stop={result.refused}")


@pytest.mark.parametrize("threads", ["1", "4"])  # the inline worker and the reactor with a pool
def test_hup_reload_under_load_serves_new_code_with_no_failure(server_factory, app_dir, threads):
    server = start(server_factory, app_dir, "--threads", threads)
    old_workers = set(server.worker_pids())
    with LoadLoop(server.port) as load:
        load.wait_for(200)
        write_app(app_dir, "v2")
        server.send_signal(signal.SIGHUP)
        server.wait_for_log(r"generation 2 ready; retiring 2 old workers")
        server.wait_for_log(r"2 workers ready \(generation 2\)")
        time.sleep(0.5)
        load.wait_for(200)
    result = load.result
    report("HUP reload", result)
    assert result.failed == 0, result.errors
    assert requests.get(server.url, timeout=10).text.startswith("v2")
    assert "v1" in versions(result) and "v2" in versions(result)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and set(server.worker_pids()) & old_workers:
        time.sleep(0.05)
    assert not set(server.worker_pids()) & old_workers
    server.known_pids.update(server.worker_pids())


def test_hup_with_syntax_error_keeps_old_workers_serving(server_factory, app_dir):
    server = start(server_factory, app_dir)
    old_workers = set(server.worker_pids())
    with LoadLoop(server.port) as load:
        load.wait_for(100)
        write_app(app_dir, "v2", broken=True)
        server.send_signal(signal.SIGHUP)
        server.wait_for_log(r"reload abandoned")
        load.wait_for(100)
    result = load.result
    report("HUP with a syntax error", result)
    assert result.failed == 0, result.errors
    assert versions(result) == {"v1"}
    assert set(server.worker_pids()) == old_workers
    # A later HUP with fixed code succeeds.
    write_app(app_dir, "v3")
    server.send_signal(signal.SIGHUP)
    server.wait_for_log(r"2 workers ready \(generation 3\)")
    assert requests.get(server.url, timeout=10).text.startswith("v3")
    server.known_pids.update(server.worker_pids())


@pytest.mark.parametrize("threads", ["1", "4"])  # the inline worker and the reactor with a pool
def test_usr2_upgrade_keeps_pid_and_serves_new_code(server_factory, app_dir, threads):
    server = start(server_factory, app_dir, "--threads", threads)
    master = server.pid
    with LoadLoop(server.port) as load:
        load.wait_for(200)
        write_app(app_dir, "v2")
        server.send_signal(signal.SIGUSR2)
        server.wait_for_log(r"upgraded in place")
        server.wait_for_log(r"generation 1 ready; retiring 2 old workers", timeout=30)
        time.sleep(0.5)
        load.wait_for(200)
    result = load.result
    report("USR2 upgrade", result)
    assert result.failed == 0, result.errors
    assert server.proc.poll() is None and server.pid == master
    assert requests.get(server.url, timeout=10).text.startswith("v2")
    server.known_pids.update(server.worker_pids())


def test_failed_usr2_check_keeps_the_old_master(server_factory, app_dir):
    server = start(server_factory, app_dir)
    workers = set(server.worker_pids())
    write_app(app_dir, "v2", broken=True)
    server.send_signal(signal.SIGUSR2)
    server.wait_for_log(r"upgrade check failed, keeping the running master")
    assert set(server.worker_pids()) == workers
    assert requests.get(server.url, timeout=10).text.startswith("v1")


@pytest.mark.parametrize("threads", ["1", "4"])  # the inline worker and the reactor with a pool
def test_ttin_then_ttou_under_load(server_factory, app_dir, threads):
    server = start(server_factory, app_dir, "--threads", threads)
    with LoadLoop(server.port) as load:
        load.wait_for(100)
        server.send_signal(signal.SIGTTIN)
        server.wait_for_log(r"TTIN: 3 workers")
        _wait_workers(server, 3)
        load.wait_for(100)
        server.send_signal(signal.SIGTTOU)
        server.wait_for_log(r"TTOU: 2 workers")
        _wait_workers(server, 2)
        load.wait_for(100)
    result = load.result
    report("TTIN then TTOU", result)
    assert result.failed == 0, result.errors


def _wait_workers(server: Server, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = server.worker_pids()
        server.known_pids.update(pids)
        if len(pids) == count:
            return
        time.sleep(0.05)
    raise AssertionError(f"expected {count} workers, have {server.worker_pids()}")


def test_term_with_slow_requests_in_flight_answers_all(server_factory, app_dir):
    server = start(server_factory, app_dir, workers=2)
    results: list[object] = []

    def slow() -> None:
        try:
            response = requests.get(f"{server.url}/slow?1.5", timeout=20)
            results.append((response.status_code, response.text.split()[0]))
        except Exception as error:  # noqa: BLE001
            results.append(error)

    with LoadLoop(server.port, threads=2, max_seconds=20) as load:
        load.wait_for(100)
        threads = [threading.Thread(target=slow) for _ in range(2)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        workers = server.worker_pids()
        code = server.stop(signal.SIGTERM)
        for thread in threads:
            thread.join(20)
    result = load.result
    report("TERM with slow requests in flight", result)
    assert code == 0
    assert results == [(200, "v1"), (200, "v1")]  # answered in full, not cut by the stop
    # Once the master stops listening, new connections are refused outright (counted apart:
    # never accepted). Nothing accepted may fail: no reset, no 5xx, no timeout.
    assert result.failed == 0, result.errors
    assert not [pid for pid in workers if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]


def test_max_requests_recycles_with_reason_logged(server_factory, app_dir):
    server = start(server_factory, app_dir, "--max-requests", "50", workers=1)
    first = server.worker_pids()
    with LoadLoop(server.port, threads=2) as load:
        load.wait_for(150)
    result = load.result
    report("max_requests recycling", result)
    assert result.failed == 0, result.errors
    server.wait_for_log(r"recycling worker \d+ \(requests\)")
    server.wait_for_log(r"exited with code 0 \(requests")
    assert server.worker_pids() != first
    server.known_pids.update(server.worker_pids())


def test_max_worker_memory_recycles(server_factory, app_dir):
    server = start(server_factory, app_dir, "--max-worker-memory", "60",
                   "--memory-check-interval", "0.5", workers=1)
    pid = server.worker_pids()[0]
    requests.get(f"{server.url}/grow?100", timeout=20)
    server.wait_for_log(rf"worker {pid} uses .* MiB of its own memory")
    server.wait_for_log(rf"recycling worker {pid} \(memory\)")
    server.wait_for_log(rf"worker {pid} exited with code 0 \(memory")
    _wait_workers(server, 1)
    assert server.worker_pids() != [pid]
    assert requests.get(server.url, timeout=10).status_code == 200


def test_max_worker_lifetime_replaces_before_retiring(server_factory, app_dir):
    server = start(server_factory, app_dir, "--max-worker-lifetime", "1", workers=1)
    first = server.worker_pids()[0]
    server.wait_for_log(rf"recycling worker {first} \(lifetime\)")
    server.wait_for_log(rf"worker {first} exited with code 0 \(lifetime")
    log = server.log()
    # The replacement was booted before the old worker was told to go.
    assert log.index("booting worker", log.index(f"booting worker {first}") + 1) < \
        log.index(f"recycling worker {first}")
    assert requests.get(server.url, timeout=10).status_code == 200
    server.known_pids.update(server.worker_pids())
