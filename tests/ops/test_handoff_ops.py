"""Connection handoff under operations (issue 13, "Ops tests"): HUP, USR2, TTIN/TTOU and TERM
while a mixed load runs (fast keep-alive clients on ``/``, and a second later slower clients on
``/slow`` that hold workers), with zero failed requests and the handoffs counted in /metrics.

Two workers with one thread each and ``handoff_delay`` 2 ms: every slow request holds one of two
workers, so fast connections parked on it have requests waiting and are handed to the other.
The channel is the master's for its whole life: the same socket for every HUP generation and
across a USR2 exec (seen from /proc: the new image holds the very sockets the old one made).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path
from typing import Self

import psutil

from tests.conftest import ResponseReader, Server
from tests.ops.load_loop import LoadLoop, LoadResult

WORKERS = 2
SLOW_SECONDS = 0.2
SENT = re.compile(rb"^forkserver_handoffs_sent_total (\S+)$", re.MULTILINE)


def app(environ, start_response):
    """Reports the PID that answered; /slow holds the worker SLOW_SECONDS (or ?s=...)."""
    if environ["PATH_INFO"] == "/slow":
        query = environ.get("QUERY_STRING", "")
        time.sleep(float(query[2:]) if query.startswith("s=") else SLOW_SECONDS)
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]


# -- the server and what it says --------------------------------------------------------------
def start(server_factory, tmp_path: Path) -> tuple[Server, Path]:
    metrics = tmp_path / "metrics.sock"
    server = server_factory("tests.ops.test_handoff_ops:app", "--threads", "1",
                            "--handoff-delay", "2", "--keepalive", "30",
                            "--metrics-bind", f"unix:{metrics}", workers=WORKERS)
    return server, metrics


def handoffs_sent(metrics: Path, timeout: float = 10.0) -> float:
    """forkserver_handoffs_sent_total from the master's /metrics."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(5)
                sock.connect(str(metrics))
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
                status, _, body = ResponseReader(sock).read()
            found = SENT.search(body)
            assert status == 200 and found, body[:500]
            return float(found[1])
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def channel_sockets(pid: int) -> set[str]:
    """The master's unix datagram sockets as kernel objects ("socket:[inode]"): the channel."""
    found = set()
    for conn in psutil.Process(pid).net_connections(kind="unix"):
        if conn.type == socket.SOCK_DGRAM and conn.fd >= 0:
            found.add(os.readlink(f"/proc/{pid}/fd/{conn.fd}"))
    return found


def ask(sock: socket.socket, reader: ResponseReader, path: str) -> int:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    status, _, body = reader.read()
    assert status == 200
    return int(body)


def handed_while_busy(server: Server) -> None:
    """A request on a connection parked on a busy worker is answered by the other one (and
    quickly): the worker side is there. A second to find out, not a whole scenario."""
    clients = [server.connect() for _ in range(8)]
    try:
        readers = [ResponseReader(sock) for sock in clients]
        by_pid: dict[int, list[int]] = {}
        for i, (sock, reader) in enumerate(zip(clients, readers, strict=True)):
            by_pid.setdefault(ask(sock, reader, "/"), []).append(i)
        busy, held = max(by_pid.items(), key=lambda item: len(item[1]))
        clients[held[0]].sendall(b"GET /slow?s=1 HTTP/1.1\r\nHost: t\r\n\r\n")
        time.sleep(0.05)
        began = time.monotonic()
        answered_by = ask(clients[held[1]], readers[held[1]], "/")
        waited = time.monotonic() - began
        assert answered_by != busy and waited < 0.5, \
            f"no handoff: worker {answered_by} answered after {waited:.3f}s (busy: {busy})"
        assert readers[held[0]].read()[0] == 200
    finally:
        for sock in clients:
            sock.close()


class MixedLoad:
    """Fast keep-alive clients first, slow ones a second later (so slow requests land on
    workers that already hold fast connections, as in production)."""

    def __init__(self, port: int, seconds: float) -> None:
        self.fast = LoadLoop(port, "/", threads=4, max_seconds=seconds)
        self.slow = LoadLoop(port, "/slow", threads=2, max_seconds=seconds)

    def __enter__(self) -> Self:
        self.fast.__enter__()
        self.fast.wait_for(100)
        time.sleep(1.0)
        self.slow.__enter__()
        self.slow.wait_for(4)
        return self

    def __exit__(self, *exc) -> None:
        self.slow.stop()
        self.fast.stop()

    def flowing(self, fast: int = 200, slow: int = 4) -> None:
        self.fast.wait_for(fast, timeout=20)
        self.slow.wait_for(slow, timeout=20)

    def results(self) -> list[LoadResult]:
        return [self.fast.result, self.slow.result]


def no_failure(name: str, load: MixedLoad) -> None:
    for kind, result in zip(("fast", "slow"), load.results(), strict=True):
        print(f"\nSCENARIO {name} ({kind}): sent={result.sent} failed={result.failed} "
              f"retried={result.retried} refused-after-stop={result.refused}")
        assert result.sent > 0
        assert result.failed == 0, result.errors


# -- the scenarios --------------------------------------------------------------------------
def test_hup_under_mixed_load_keeps_the_channel_and_loses_nothing(server_factory, tmp_path):
    server, metrics = start(server_factory, tmp_path)
    handed_while_busy(server)
    channel = channel_sockets(server.pid)
    assert len(channel) == 2
    with MixedLoad(server.port, 60) as load:
        load.flowing()
        server.send_signal(signal.SIGHUP)
        server.wait_for_log(rf"{WORKERS} workers ready \(generation 2\)", timeout=30)
        server.wait_for_log(r"generation 2 ready; retiring", timeout=30)
        load.flowing()
    no_failure("HUP", load)
    assert channel_sockets(server.pid) == channel
    handed_while_busy(server)  # generation 2 hands off too
    assert handoffs_sent(metrics) > 0


def test_usr2_under_mixed_load_passes_the_channel_to_the_new_image(server_factory, tmp_path):
    server, metrics = start(server_factory, tmp_path)
    master = server.pid
    handed_while_busy(server)
    channel = channel_sockets(master)
    with MixedLoad(server.port, 60) as load:
        load.flowing()
        server.send_signal(signal.SIGUSR2)
        server.wait_for_log(r"upgraded in place", timeout=30)
        server.wait_for_log(rf"generation 1 ready; retiring {WORKERS} old workers", timeout=30)
        load.flowing()
    no_failure("USR2", load)
    assert server.proc.poll() is None and server.pid == master
    assert channel_sockets(master) == channel  # the same sockets, not a new pair
    handed_while_busy(server)  # the new image's workers hand off on it
    assert handoffs_sent(metrics) > 0


def test_ttin_and_ttou_under_mixed_load(server_factory, tmp_path):
    server, metrics = start(server_factory, tmp_path)
    handed_while_busy(server)
    with MixedLoad(server.port, 60) as load:
        load.flowing()
        server.send_signal(signal.SIGTTIN)
        server.wait_for_log(rf"TTIN: {WORKERS + 1} workers")
        server.wait_for_log(r"booting worker \d+ \(slot \d+, generation 1[,)]",
                            count=WORKERS + 1)
        load.flowing()
        server.send_signal(signal.SIGTTOU)
        server.wait_for_log(rf"TTOU: {WORKERS} workers")
        server.wait_for_log(r"worker \d+ exited with code 0 \(scale", timeout=30)
        load.flowing()
    no_failure("TTIN/TTOU", load)
    assert handoffs_sent(metrics) > 0


def test_term_under_mixed_load_answers_every_request_it_took(server_factory, tmp_path):
    server, metrics = start(server_factory, tmp_path)
    handed_while_busy(server)
    with MixedLoad(server.port, 60) as load:
        load.flowing()
        sent = handoffs_sent(metrics)
        code = server.stop(signal.SIGTERM)  # checks that no process is left
    no_failure("TERM", load)
    assert code == 0
    assert sent > 0
