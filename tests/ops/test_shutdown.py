"""Stopping: the shutdown delay (issue 15 item 2) and Ctrl-C (item 4), against a real server.

With ``shutdown_delay``, TERM turns /readyz to 503 at once while the server keeps accepting and
serving for that long, so a load balancer's health check takes the instance out before anything
is refused; then the normal graceful drain. A second TERM, or INT/QUIT, cuts the delay short.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time

import pytest

from tests.conftest import ResponseReader, Server
from tests.ops.test_sd_notify import NotifySocket

METRICS_RE = re.compile(r"Metrics at: http://(\S+):(\d+)")


def probe(server: Server, path: str) -> tuple[int, bytes]:
    """GET ``path`` on a fresh connection; (status, body)."""
    host, port = METRICS_RE.search(server.log()).groups()
    port = port if path in ("/livez", "/readyz") else str(server.port)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        status, _, body = ResponseReader(sock).read()
    return status, body


def start(server_factory, *args: str, **kwargs) -> Server:
    server = server_factory("tests.apps.basic:app", "--metrics-bind", "127.0.0.1:0", *args,
                            **kwargs)
    assert probe(server, "/readyz") == (200, b"ready\n")
    server.known_pids.update(server.worker_pids())
    return server


def wait_not_ready(server: Server, within: float) -> float:
    """Seconds until /readyz says 503 shutting down; fails after ``within``."""
    start_at = time.monotonic()
    while time.monotonic() - start_at < within:
        if probe(server, "/readyz") == (503, b"shutting down\n"):
            return time.monotonic() - start_at
        time.sleep(0.02)
    raise AssertionError(f"/readyz still not 503 after {within}s:\n{server.log()}")


def wait_exit(server: Server, timeout: float) -> tuple[int, float]:
    """The master's exit code and how long it took; no process left behind."""
    start_at = time.monotonic()
    code = server.proc.wait(timeout)
    took = time.monotonic() - start_at
    assert server.stop() == code  # already gone: only checks that nothing is left
    return code, took


def test_term_with_a_delay_turns_readyz_503_while_the_server_still_serves(server_factory):
    server = start(server_factory, "--shutdown-delay", "3")
    server.send_signal(signal.SIGTERM)
    termed = time.monotonic()
    assert wait_not_ready(server, within=0.5) < 0.5
    served = 0
    while time.monotonic() - termed < 2.5:  # well inside the delay
        assert probe(server, "/") == (200, b"Hello, world!")
        served += 1
        time.sleep(0.05)
    assert served >= 10
    code, _ = wait_exit(server, timeout=30)
    assert code == 0
    assert time.monotonic() - termed >= 3.0  # the delay ran to its end
    log = server.log()
    assert "shutdown in 3s" in log and "graceful shutdown" in log
    assert "ERROR" not in log, log


def test_a_second_term_cuts_the_delay_short(server_factory):
    server = start(server_factory, "--shutdown-delay", "60")
    server.send_signal(signal.SIGTERM)
    wait_not_ready(server, within=0.5)
    assert probe(server, "/")[0] == 200
    server.send_signal(signal.SIGTERM)
    code, took = wait_exit(server, timeout=30)
    assert code == 0 and took < 20, took
    assert "graceful shutdown" in server.log()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGQUIT])
def test_int_or_quit_cuts_the_delay_short(server_factory, signum):
    server = start(server_factory, "--shutdown-delay", "60")
    server.send_signal(signal.SIGTERM)
    wait_not_ready(server, within=0.5)
    server.send_signal(signum)
    code, took = wait_exit(server, timeout=30)
    assert code == 0 and took < 20, took
    assert "quick shutdown" in server.log()


def test_without_a_delay_term_drains_at_once(server_factory):
    server = start(server_factory)
    server.send_signal(signal.SIGTERM)
    code, took = wait_exit(server, timeout=30)
    assert code == 0 and took < 10, took
    log = server.log()
    assert "shutdown in" not in log and "graceful shutdown" in log


def test_systemd_hears_what_the_delay_is_for(server_factory, tmp_path):
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    try:
        server = start(server_factory, "--shutdown-delay", "12",
                       env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
        notify.wait_for("READY=1")
        server.send_signal(signal.SIGTERM)
        message = notify.wait_for("STATUS=shutting down in")
        assert message.endswith("STATUS=shutting down in 12 s: draining from load balancers") \
            or "STATUS=shutting down in 12 s: draining from load balancers" in notify.messages
        assert any("STOPPING=1" in m for m in notify.messages)
        server.send_signal(signal.SIGTERM)
        wait_exit(server, timeout=30)
    finally:
        notify.close()


def test_every_response_in_the_delay_says_connection_close(server_factory):
    server = start(server_factory, "--shutdown-delay", "5", workers=1)
    kept = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    reader = ResponseReader(kept)
    kept.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert reader.read()[1].get("connection") != "close"
    server.send_signal(signal.SIGTERM)
    wait_not_ready(server, within=0.5)
    time.sleep(0.2)  # SIGWINCH reached the worker
    try:
        # A keep-alive connection from before TERM is told to go after its next response,
        kept.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert reader.read()[1].get("connection") == "close"
        # and so is every new one.
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            assert ResponseReader(sock).read()[1].get("connection") == "close"
    finally:
        kept.close()
        server.send_signal(signal.SIGQUIT)
        wait_exit(server, timeout=30)


# -- Ctrl-C -------------------------------------------------------------------------------------
def test_ctrl_c_to_the_process_group_is_a_stop_not_a_crash(tmp_path):
    """A terminal's Ctrl-C sends INT to the master and every worker at once."""
    server = Server(tmp_path, "tests.apps.basic:app", workers=3)
    server.proc = None
    server_proc = subprocess.Popen(server.argv, env=server.env, cwd=server.cwd,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    server.proc = server_proc
    server.known_pids.add(server_proc.pid)
    try:
        server.wait_for_log(r"3 workers ready")
        server.known_pids.update(server.worker_pids())
        os.killpg(server_proc.pid, signal.SIGINT)
        assert server_proc.wait(30) == 0
    finally:
        server.stop(signal.SIGKILL)
    log = server.log()
    assert "crash" not in log and "[ERROR]" not in log, log
    assert len(re.findall(r"worker \d+ .*\(shutdown", log)) == 3, log


def test_one_worker_is_counted_as_one(server_factory):
    server = server_factory("tests.apps.basic:app", workers=1)
    assert "1 worker ready (generation 1)" in server.log()
    assert "1 workers" not in server.log()
