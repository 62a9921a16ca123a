"""Connection handoff with real keep-alive clients: while a slow request holds one worker, a
request on another of that worker's connections is answered by the other worker (issue 13)."""

from __future__ import annotations

import os
import socket
import time
from collections import defaultdict

from tests.conftest import ResponseReader

SLOW_SECONDS = 1.5


def app(environ, start_response):
    """Reports the PID that answered; /slow takes SLOW_SECONDS first."""
    if environ["PATH_INFO"] == "/slow":
        time.sleep(SLOW_SECONDS)
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]


def ask(sock: socket.socket, reader: ResponseReader, path: str) -> int:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    status, _, body = reader.read()
    assert status == 200
    return int(body)


def test_busy_workers_waiting_connection_is_answered_by_the_other(server_factory):
    server = server_factory("tests.integration.test_handoff:app", "--threads", "1",
                            "--handoff-delay", "5", "--keepalive", "30", workers=2)
    clients = [server.connect() for _ in range(8)]
    try:
        readers = [ResponseReader(sock) for sock in clients]
        by_pid: dict[int, list[int]] = defaultdict(list)
        for i, (sock, reader) in enumerate(zip(clients, readers, strict=True)):
            by_pid[ask(sock, reader, "/")].append(i)
        busy_pid, held = max(by_pid.items(), key=lambda item: len(item[1]))
        assert len(held) >= 2, f"keep-alive connections not spread: {dict(by_pid)}"
        slow, waiting = held[0], held[1]
        clients[slow].sendall(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
        time.sleep(0.05)  # the slow request is in the app now
        began = time.monotonic()
        answered_by = ask(clients[waiting], readers[waiting], "/")
        waited = time.monotonic() - began
        assert answered_by != busy_pid
        assert answered_by in server.worker_pids()
        assert waited < 0.5, f"waited {waited:.3f}s behind the slow request"
        # The handed connection stays usable and in order on its new worker.
        assert ask(clients[waiting], readers[waiting], "/") == answered_by
        status, _, body = readers[slow].read()
        assert (status, int(body)) == (200, busy_pid)
    finally:
        for sock in clients:
            sock.close()
        server.stop()
