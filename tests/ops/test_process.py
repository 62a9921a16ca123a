"""Process-level behaviour: respawn, graceful stop, boot failures, config errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import requests

from tests.conftest import ROOT, ResponseReader, Server


def run_cli(*args: str, cwd=ROOT, timeout: float = 30) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "forkserver", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_killed_worker_is_respawned_and_server_keeps_answering(server):
    before = server.worker_pids()
    assert len(before) == 2
    victim = before[0]
    os.kill(victim, signal.SIGKILL)
    server.wait_for_log(rf"worker {victim} killed by SIGKILL")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        after = server.worker_pids()
        if len(after) == 2 and victim not in after:
            break
        time.sleep(0.05)
    assert len(after) == 2 and victim not in after
    server.known_pids.update(after)
    for _ in range(10):
        assert requests.get(f"{server.url}/", timeout=10).status_code == 200


def test_term_lets_a_slow_request_finish_then_exits_zero(server):
    result = {}

    def slow_request():
        result["response"] = requests.get(f"{server.url}/slow?s=1.5", timeout=20)

    thread = threading.Thread(target=slow_request)
    thread.start()
    time.sleep(0.5)  # the request is now inside the app's 1.5 s sleep
    workers = server.worker_pids()
    code = server.stop(signal.SIGTERM)
    thread.join(20)
    assert code == 0
    assert result["response"].status_code == 200
    assert result["response"].text == "slept"
    for pid in workers:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_quick_shutdown_with_int(server):
    workers = server.worker_pids()
    assert server.stop(signal.SIGINT) == 0
    for pid in workers:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_bad_app_import_exits_non_zero_naming_the_module(tmp_path):
    server = Server(tmp_path, "tests.apps.bad_import:app", wait_ready=False)
    server.start()
    code = server.wait_exit(30)
    assert code != 0
    log = server.log()
    assert "module_that_does_not_exist_xyz" in log
    assert "Traceback" not in log
    assert not server._kill_leftovers()


def test_bad_app_with_preload_exits_with_one_line(tmp_path):
    result = run_cli("tests.apps.bad_import:app", "--preload", "--bind", "127.0.0.1:0")
    assert result.returncode != 0
    assert "module_that_does_not_exist_xyz" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_module_exits_non_zero(tmp_path):
    result = run_cli("no_such_module_abc:app", "--preload", "--bind", "127.0.0.1:0")
    assert result.returncode != 0
    assert "no_such_module_abc" in result.stderr


def test_unknown_config_key_names_the_key(tmp_path):
    config = tmp_path / "forkserver.toml"
    config.write_text('workers = 2\nwrokers_typo = 3\n')
    result = run_cli("--config", str(config), "--check-config")
    assert result.returncode != 0
    assert "wrokers_typo" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bind_failure_is_one_line(server):
    result = run_cli("tests.apps.basic:app", "--bind", f"127.0.0.1:{server.port}")
    assert result.returncode != 0
    assert str(server.port) in result.stderr
    assert "Traceback" not in result.stderr


def test_pidfile_written_and_removed(server_factory, tmp_path):
    pidfile = tmp_path / "fs.pid"
    server = server_factory("tests.apps.basic:app", "--pidfile", str(pidfile))
    assert pidfile.read_text().strip() == str(server.pid)
    server.stop()
    assert not pidfile.exists()


def test_process_titles(server):
    titles = [" ".join(psutil.Process(pid).cmdline()) for pid in server.worker_pids()]
    assert all("worker" in title and "tests.apps.basic:app" in title for title in titles), titles
    assert "master" in " ".join(psutil.Process(server.pid).cmdline())


def test_workers_exit_when_master_dies(server):
    workers = server.worker_pids()
    server.proc.kill()  # SIGKILL: the master cannot tell anyone
    server.proc.wait()
    _gone, alive = psutil.wait_procs([psutil.Process(pid) for pid in workers], timeout=10)
    assert not alive


def test_pipelined_requests_on_a_connection_survive_graceful_stop(server):
    with server.connect() as sock:
        sock.sendall(b"GET /slow?s=1 HTTP/1.1\r\nHost: t\r\n\r\n"
                     b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        time.sleep(0.3)
        server.send_signal(signal.SIGTERM)
        reader = ResponseReader(sock)
        first = reader.read()
        second = reader.read()
    assert first[2] == b"slept" and second[2] == b"Hello, world!"
    assert server.stop() == 0
