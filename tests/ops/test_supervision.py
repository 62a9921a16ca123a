"""What the master watches for and runs: hung requests and silent workers (timeouts), hooks,
log reopening, and the smaller operational settings. Recycling is in test_operations.py."""

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


def test_hanging_request_is_aborted_with_traceback(server_factory):
    server = server_factory("tests.apps.basic:app", "--timeout", "2")
    started = time.monotonic()
    try:
        status = requests.get(f"{server.url}/slow?s=60", timeout=20).status_code
    except requests.ConnectionError:
        status = None
    elapsed = time.monotonic() - started
    assert status is None or status >= 500
    assert elapsed < 2 + 2 + 1, elapsed
    server.wait_for_log(r"timed out after .* serving 'GET /slow\?s=60'; aborting")
    server.wait_for_log(r"File \".*basic.py\", line \d+ in app")  # faulthandler's trace
    server.wait_for_log(r"killed by SIGABRT after \d+ requests \(timeout\)")
    deadline = time.monotonic() + 10
    while len(server.worker_pids()) != 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    server.known_pids.update(server.worker_pids())
    assert requests.get(server.url, timeout=10).status_code == 200


def test_usr1_reopens_the_error_and_access_logs_in_master_and_every_worker(server_factory,
                                                                          tmp_path):
    """logrotate's move-then-USR1: afterwards every line of the master and of each worker lands
    in the new files, and nothing more in the moved ones."""
    access = tmp_path / "access.log"
    server = server_factory("tests.apps.basic:app", "--access-log", str(access),
                            "--access-log-format", "{path} {query} {status}", workers=2)
    conns = _keepalive_per_worker(server, 2)  # so each worker is reached, not just the first
    before = _wait_for_lines(access, 2)
    moved_error, moved_access = tmp_path / "error.moved", tmp_path / "access.moved"
    os.rename(server.log_path, moved_error)
    os.rename(access, moved_access)
    server.send_signal(signal.SIGUSR1)
    server.wait_for_log(r"USR1: log files reopened")  # the master's own line, in a new file
    # Each worker reopens when its loop sees its own USR1: probe each until it writes anew.
    for pid, sock in conns.items():
        deadline = time.monotonic() + 10
        for n in range(1000):
            sock.sendall(f"GET /pid?probe-{pid}-{n} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            assert ResponseReader(sock).read()[2] == str(pid).encode()
            if f"probe-{pid}-{n} 200" in _text(access):
                break
            assert time.monotonic() < deadline, f"worker {pid} never wrote to the new file"
            time.sleep(0.05)
        # Its error log was reopened by the same USR1: an app error lands in the new file.
        sock.sendall(b"GET /crash HTTP/1.1\r\nHost: t\r\n\r\n")
        assert ResponseReader(sock).read()[0] == 500
        server.wait_for_log(rf"\[{pid}\] \[ERROR\] error handling GET /crash")
        sock.close()
    after = [f"/after-{i}" for i in range(10)]
    for path in after:
        requests.get(f"{server.url}{path}", timeout=10, headers={"Connection": "close"})
    new_paths = [line.split()[0] for line in _wait_for_lines(access, len(after))]
    assert set(after) <= set(new_paths)
    old_paths = [line.split()[0] for line in moved_access.read_text().splitlines()]
    assert old_paths[:len(before)] == [line.split()[0] for line in before]
    assert not set(after) & set(old_paths)
    moved = moved_error.read_text()
    assert "USR1" not in moved and "crashes on purpose" not in moved


def _text(path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def _wait_for_lines(path, count: int, timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = _text(path).splitlines()
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


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
    # The client has its answer before the worker's send call returns and its slot says idle:
    # give it a moment to get back to its wait, or the stop lands mid-request.
    time.sleep(0.3)
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
