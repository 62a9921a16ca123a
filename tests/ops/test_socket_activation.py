"""Socket activation: the server adopts listeners passed as LISTEN_FDS instead of binding.

The first test plays systemd's part itself (binds, passes fd 3, sets LISTEN_PID to the child's
own PID); the second runs the server under the real `systemd-socket-activate`, with a TCP and a
unix listener at once. Both stop the server and check that its whole process tree is gone.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

from tests.conftest import READY_RE, ROOT, read_response

# Moves the passed listener to fd 3 (where sd_listen_fds() looks), announces it for this very
# process, and becomes the server: exec keeps the PID, so LISTEN_PID stays true.
LAUNCHER = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, "-m", "forkserver", *sys.argv[2:]])
"""


def clean_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("LISTEN_", "FORKSERVER_", "NOTIFY_SOCKET"))}
    env.pop("WEB_CONCURRENCY", None)
    env["PYTHONPATH"] = str(ROOT)
    return env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(path: Path, pattern: re.Pattern, proc: subprocess.Popen,
             timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if pattern.search(text):
            return text
        if proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before {pattern.pattern!r}:\n{text}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {pattern.pattern!r}:\n{text}")


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop_and_check(proc: subprocess.Popen, tree: list[psutil.Process], log: Path) -> int:
    """TERM the master, wait for it, and fail if any process it started is still alive."""
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(30)
    except subprocess.TimeoutExpired:
        for member in tree:
            try:
                member.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait()
        raise AssertionError(f"server did not stop:\n{log.read_text(errors='replace')}")
    _gone, alive = psutil.wait_procs(tree, timeout=5)
    left = []
    for member in alive:
        try:
            if member.status() != psutil.STATUS_ZOMBIE:
                left.append(member.pid)
                member.kill()
        except psutil.NoSuchProcess:
            pass
    assert not left, f"processes left behind: {left}\n{log.read_text(errors='replace')}"
    return code


def unix_get(path: str, target: str = "/") -> tuple[int, bytes]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(20)
        sock.connect(path)
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: local\r\nConnection: close\r\n\r\n".encode())
        status, _headers, body = read_response(sock)
    return status, body


@pytest.fixture
def started():
    """Processes a test started; killed (whole tree) if the test did not stop them itself."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            for member in reversed(process_tree(proc.pid)):
                try:
                    member.kill()
                except psutil.NoSuchProcess:
                    pass
            proc.wait(10)


def test_listener_passed_as_fd_3_is_served_and_bind_is_ignored(tmp_path, started):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    decoy = free_port()  # in --bind, which must be ignored when sockets are passed
    log = tmp_path / "error.log"
    with open(tmp_path / "output", "wb") as output:
        proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, str(listener.fileno()), "tests.apps.basic:app",
             "--workers", "2", "--error-log", str(log), "--bind", f"127.0.0.1:{decoy}"],
            pass_fds=(listener.fileno(),), env=clean_env(), cwd=ROOT,
            stdout=output, stderr=subprocess.STDOUT)
    started.append(proc)
    listener.close()  # from now on only the server holds it
    text = wait_for(log, READY_RE, proc)
    tree = process_tree(proc.pid)

    assert re.search(rf"Listening at: http://127\.0\.0\.1:{port} \({proc.pid}\)", text), text
    assert re.findall(r"Listening at: (\S+)", text) == [f"http://127.0.0.1:{port}"], text
    for _ in range(6):
        response = requests.get(f"http://127.0.0.1:{port}/", timeout=10)
        assert response.status_code == 200
        assert response.text == "Hello, world!"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", decoy), timeout=5).close()
    served_by = {int(requests.get(f"http://127.0.0.1:{port}/pid", timeout=10).text)
                 for _ in range(20)}
    assert served_by <= {p.pid for p in tree[1:]}  # workers answer, never the master

    assert stop_and_check(proc, tree, log) == 0
    with pytest.raises(ConnectionRefusedError):  # the server's copy was the last one
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_unix_listener_passed_as_fd_3(tmp_path, started):
    path = str(tmp_path / "passed.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(128)
    log = tmp_path / "error.log"
    proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(listener.fileno()), "tests.apps.basic:app",
         "--workers", "1", "--error-log", str(log)],
        pass_fds=(listener.fileno(),), env=clean_env(), cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started.append(proc)
    listener.close()
    text = wait_for(log, READY_RE, proc)
    assert f"Listening at: unix:{path}" in text
    tree = process_tree(proc.pid)
    assert unix_get(path) == (200, b"Hello, world!")
    assert stop_and_check(proc, tree, log) == 0


def test_under_systemd_socket_activate_tcp_and_unix(tmp_path, started):
    tool = shutil.which("systemd-socket-activate")
    if tool is None:
        pytest.skip("systemd-socket-activate not found (Debian package 'systemd')")
    port = free_port()
    path = str(tmp_path / "x.sock")
    log = tmp_path / "error.log"
    tool_output = tmp_path / "activate.out"
    # systemd-socket-activate hands the program a clean environment: forward what it needs.
    argv = [tool, "-l", f"127.0.0.1:{port}", "-l", path,
            "-E", f"PYTHONPATH={ROOT}", "-E", "PYTHONDONTWRITEBYTECODE=1",
            "--", sys.executable, "-m", "forkserver", "tests.apps.basic:app",
            "--workers", "2", "--error-log", str(log)]
    with open(tool_output, "wb") as output:
        proc = subprocess.Popen(argv, env=clean_env(), cwd=ROOT, stdout=output,
                                stderr=subprocess.STDOUT)
    started.append(proc)
    # It binds, then waits for the first connection before it execs the server.
    wait_for(tool_output, re.compile(r"as 4\."), proc, timeout=10)

    # This first request wakes it up; it waits in the backlog until a worker is ready.
    response = requests.get(f"http://127.0.0.1:{port}/", timeout=30)
    assert response.status_code == 200 and response.text == "Hello, world!"
    text = wait_for(log, READY_RE, proc)
    assert f"Listening at: http://127.0.0.1:{port} ({proc.pid})" in text  # exec kept the PID
    assert f"Listening at: unix:{path} ({proc.pid})" in text
    assert unix_get(path) == (200, b"Hello, world!")
    assert requests.get(f"http://127.0.0.1:{port}/", timeout=10).status_code == 200

    tree = process_tree(proc.pid)
    assert len(tree) == 3, [p.pid for p in tree]  # the master and its two workers
    assert stop_and_check(proc, tree, log) == 0
