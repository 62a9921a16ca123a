"""Hooks, recycling, hung and stopped workers, log reopening and the smaller operational
settings."""

from __future__ import annotations

import os
import signal
import socket
import stat
import time

import psutil
import requests

from tests.conftest import ROOT, ResponseReader, Server

HOOKS = '''
import os

LOG = os.environ["HOOK_LOG"]


def _note(text):
    with open(LOG, "a") as handle:
        handle.write(text + "\\n")


def on_starting(settings):
    _note(f"on_starting {settings.workers}")


def when_ready(settings):
    _note("when_ready")


def pre_fork(settings, index):
    _note(f"pre_fork {index}")


def post_fork(pid):
    _note(f"post_fork {pid}")


def post_worker_init(pid):
    _note(f"post_worker_init {pid}")


def pre_request(environ):
    _note(f"pre_request {environ['PATH_INFO']}")


def post_request(environ, status):
    _note(f"post_request {environ['PATH_INFO']} {status}")


def worker_exit(pid):
    _note(f"worker_exit {pid}")


def on_exit(settings):
    _note("on_exit")


def broken_post_fork(pid):
    raise RuntimeError("post_fork hook breaks on purpose")
'''


def test_hooks_run_in_order(server_factory, tmp_path):
    (tmp_path / "myhooks.py").write_text(HOOKS)
    log = tmp_path / "hooks.log"
    args = []
    for name in ("on_starting", "when_ready", "pre_fork", "post_fork", "post_worker_init",
                 "pre_request", "post_request", "worker_exit", "on_exit"):
        args += [f"--{name.replace('_', '-')}", f"myhooks:{name}"]
    server = server_factory("tests.apps.basic:app", *args, workers=1,
                            env={"HOOK_LOG": str(log),
                                 "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"})
    assert requests.get(f"{server.url}/pid", timeout=10).status_code == 200
    assert server.stop() == 0
    lines = log.read_text().splitlines()
    names = [line.split()[0] for line in lines]
    assert names[0] == "on_starting"
    assert names.index("pre_fork") < names.index("post_fork") < names.index("post_worker_init")
    assert "when_ready" in names
    assert "pre_request /pid" in lines and "post_request /pid 200" in lines
    assert names.index("worker_exit") < names.index("on_exit") == len(names) - 1


def test_a_raising_worker_hook_fails_boot_cleanly(server_factory, tmp_path):
    (tmp_path / "myhooks.py").write_text(HOOKS)
    from tests.conftest import Server
    server = Server(tmp_path, "tests.apps.basic:app", "--post-fork", "myhooks:broken_post_fork",
                    env={"HOOK_LOG": str(tmp_path / "h.log"),
                         "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}, wait_ready=False)
    server.start()
    code = server.wait_exit(30)
    assert code != 0
    assert "post_fork hook breaks on purpose" in server.log()
    assert not server._kill_leftovers()


def test_max_worker_lifetime_replaces_before_retiring(server_factory):
    server = server_factory("tests.apps.basic:app", "--max-worker-lifetime", "1", workers=1)
    first = server.worker_pids()[0]
    server.wait_for_log(rf"recycling worker {first} \(lifetime\)")
    server.wait_for_log(rf"worker {first} exited with code 0 \(lifetime")
    log = server.log()
    # The replacement was booted before the old worker was told to go.
    assert log.index("booting worker", log.index(f"booting worker {first}") + 1) < \
        log.index(f"recycling worker {first}")
    assert requests.get(server.url, timeout=10).status_code == 200
    server.known_pids.update(server.worker_pids())


def test_usr1_reopens_logs_in_master_and_workers(server_factory, tmp_path):
    server = server_factory("tests.apps.basic:app", "--max-requests", "1", workers=1)
    moved = tmp_path / "moved.log"
    os.rename(server.log_path, moved)
    server.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not server.log_path.exists():
        time.sleep(0.05)
    server.wait_for_log(r"USR1: log files reopened")
    # A worker line (it asks to be recycled after one request) lands in the new file too.
    worker = server.worker_pids()[0]
    requests.get(f"{server.url}/", timeout=10)
    server.wait_for_log(rf"\[{worker}\] \[INFO\] worker {worker} served 1 requests")
    assert "USR1" not in moved.read_text()
    server.known_pids.update(server.worker_pids())


def test_umask_applies_to_unix_socket(server_factory, tmp_path):
    path = tmp_path / "s.sock"
    server_factory("tests.apps.basic:app", "--umask", "0o077", binds=(f"unix:{path}",))
    mode = stat.S_IMODE(os.stat(path).st_mode)
    assert mode & 0o077 == 0


def test_reuse_port_lets_two_servers_share_a_port(server_factory):
    first = server_factory("tests.apps.basic:app", "--reuse-port", workers=1)
    second = server_factory("tests.apps.basic:app", "--reuse-port", workers=1,
                            binds=(f"127.0.0.1:{first.port}",))
    assert second.port == first.port
    pids = set()
    for _ in range(40):
        with socket.create_connection(("127.0.0.1", first.port), timeout=10) as sock:
            sock.sendall(b"GET /pid HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
        pids.add(data.rsplit(b"\r\n\r\n", 1)[1])
    assert len(pids) == 2  # the kernel spread connections over both servers


def _keepalive_per_worker(server: Server, count: int) -> dict[int, socket.socket]:
    """One open keep-alive connection on each of ``count`` workers, keyed by worker pid."""
    conns: dict[int, socket.socket] = {}
    deadline = time.monotonic() + 20
    while len(conns) < count:
        assert time.monotonic() < deadline, f"connections reached only {sorted(conns)}"
        sock = server.connect()
        sock.sendall(b"GET /pid HTTP/1.1\r\nHost: t\r\n\r\n")
        status, _, body = ResponseReader(sock).read()
        assert status == 200
        pid = int(body)
        if pid in conns:
            sock.close()
        else:
            conns[pid] = sock
    return conns


def test_a_stopped_idle_worker_is_aborted_and_its_clients_released(server_factory):
    server = server_factory("tests.apps.basic:app", "--timeout", "2", workers=2)
    conns = _keepalive_per_worker(server, 2)
    victim, other = sorted(conns)
    os.kill(victim, signal.SIGSTOP)  # idle, with a parked keep-alive client: it never beats
    stopped_at = time.monotonic()
    try:
        sock = conns[victim]
        sock.settimeout(30)
        sock.sendall(b"GET /pid HTTP/1.1\r\nHost: t\r\n\r\n")
        try:
            answer = sock.recv(65536)  # the worker dies: the connection closes or resets
        except ConnectionResetError:
            answer = b""
        released_after = time.monotonic() - stopped_at
        assert answer == b"", answer
        # Silent for max(timeout, a few heartbeats) = 3 s, then SIGABRT: generous margin.
        assert released_after < 15, released_after
        server.wait_for_log(rf"worker {victim} gave no sign of life for .* while "
                            rf"(idle|keepalive) \(hung or stopped\); aborting")
        server.wait_for_log(rf"worker {victim} killed by SIGABRT after \d+ requests \(timeout\)")
    finally:
        if psutil.pid_exists(victim):
            os.kill(victim, signal.SIGCONT)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        pids = server.worker_pids()
        if len(pids) == 2 and victim not in pids:
            break
        time.sleep(0.05)
    assert len(pids) == 2 and victim not in pids and other in pids
    server.known_pids.update(pids)
    # The healthy worker and its parked client were left alone; new clients are served.
    conns[other].sendall(b"GET /pid HTTP/1.1\r\nHost: t\r\n\r\n")
    assert ResponseReader(conns[other]).read()[2] == str(other).encode()
    for sock in conns.values():
        sock.close()
    for _ in range(4):
        assert requests.get(f"{server.url}/", timeout=10).status_code == 200


def test_an_idle_worker_within_its_heartbeat_is_left_alone(server_factory):
    """The silence rule must not take an idle worker's quiet for a hang: idle past the timeout
    (with keep-alive clients parked), the workers keep their pids."""
    server = server_factory("tests.apps.basic:app", "--timeout", "1", "--keepalive", "30",
                            workers=2)
    conns = _keepalive_per_worker(server, 2)
    time.sleep(5)  # five times the timeout, past the 3 s floor of the silence rule
    assert sorted(server.worker_pids()) == sorted(conns)
    for pid, sock in conns.items():
        sock.sendall(b"GET /pid HTTP/1.1\r\nHost: t\r\n\r\n")
        assert ResponseReader(sock).read()[2] == str(pid).encode()
        sock.close()
    assert "aborting" not in server.log()
