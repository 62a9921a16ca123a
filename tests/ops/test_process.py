"""The master process's own life: respawn, stops, boot failures, config errors, pidfile, titles.

Stopping with requests in flight under a live load is in test_operations.py; timeouts, hooks
and log reopening in test_supervision.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
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


def test_quick_shutdown_with_int(server):
    workers = server.worker_pids()
    assert server.stop(signal.SIGINT) == 0
    for pid in workers:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


BROKEN_HOOK = "def post_fork(pid):\n    raise RuntimeError('post_fork hook breaks on purpose')\n"


@pytest.mark.parametrize("app, args, culprit", [
    ("tests.apps.bad_import:app", (), "module_that_does_not_exist_xyz"),
    ("tests.apps.basic:app", ("--post-fork", "brokenhook:post_fork"),
     "post_fork hook breaks on purpose"),
], ids=["app import", "worker hook"])
def test_a_first_generation_that_cannot_boot_stops_the_master(tmp_path, app, args, culprit):
    """No fork loop: the master exits non-zero, the log names the cause, nothing is left."""
    (tmp_path / "brokenhook.py").write_text(BROKEN_HOOK)
    server = Server(tmp_path, app, *args, wait_ready=False,
                    env={"PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"})
    server.start()
    code = server.wait_exit(30)
    assert code != 0
    log = server.log()
    assert culprit in log
    assert "Traceback" not in log
    assert "failed to boot in the first generation; shutting down" in log
    assert not server._kill_leftovers()


@pytest.mark.parametrize("app, culprit", [
    ("tests.apps.bad_import:app", "module_that_does_not_exist_xyz"),
    ("no_such_module_abc:app", "no_such_module_abc"),
], ids=["missing import inside the app", "missing app module"])
def test_a_preloaded_app_that_cannot_load_is_named_without_a_traceback(app, culprit):
    result = run_cli(app, "--preload", "--bind", "127.0.0.1:0")
    assert result.returncode != 0
    assert culprit in result.stderr
    assert "Traceback" not in result.stderr


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
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


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


# -- freeze before fork (issue 17 item 1) -----------------------------------------------------
FREEZE_APP = """\
import gc

# Built at import: with preload, in the master, before the workers are forked.
CACHE = [[n] for n in range(1000)]


def app(environ, start_response):
    tracked = any(obj is CACHE for obj in gc.get_objects())  # frozen objects are not listed
    body = f"{gc.get_freeze_count()} {int(tracked)}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
"""


@pytest.mark.parametrize(("args", "frozen"), [
    (("--preload",), True),
    (("--preload", "--no-gc-freeze"), False),
    ((), False),  # without preload the master holds nothing of the app to share
])
def test_a_preloaded_app_is_frozen_before_the_fork(server_factory, tmp_path, args, frozen):
    appdir = tmp_path / "app"
    appdir.mkdir()
    (appdir / "freeze_app.py").write_text(FREEZE_APP)
    server = server_factory("freeze_app:app", *args, workers=2,
                            env={"PYTHONPATH": f"{ROOT}{os.pathsep}{appdir}"})
    for _ in range(4):
        count, tracked = map(int, requests.get(server.url, timeout=10).text.split())
        # Frozen: the app's objects sit in the permanent generation, which the worker's
        # collections never walk (so never write to, so never unshare).
        assert (count > 0, tracked == 0) == (frozen, frozen)
