"""The ceiling: the least a pure-Python prefork HTTP server can do per request.

One epoll loop per worker (load/prefork.py forks them): the listener registered with
EPOLLEXCLUSIVE, so one sleeping worker wakes per new connection; bytes read until a blank line,
then one constant response sent, with keep-alive unless the head asks for ``Connection:
close``. No parsing, no WSGI, no timeouts, no limits. It is not a server anyone should run:
it is the benchmark's yardstick, so a figure reads as a fraction of what this interpreter on
this machine can do at all (issue 14).
"""

from __future__ import annotations

import select
import socket

BODY = b"Hello, World!"
_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n"
KEEP = _HEAD + b"\r\n" + BODY
CLOSE = _HEAD + b"Connection: close\r\n\r\n" + BODY
END = b"\r\n\r\n"
READ = 65536


def run_worker(listener: socket.socket) -> None:
    poller = select.epoll()
    listen_fd = listener.fileno()
    poller.register(listen_fd, select.EPOLLIN | select.EPOLLEXCLUSIVE)
    conns: dict[int, socket.socket] = {}
    pending: dict[int, bytes] = {}
    while True:
        for fd, _ in poller.poll():
            if fd == listen_fd:
                _accept(listener, poller, conns, pending)
                continue
            conn = conns[fd]
            try:
                data = conn.recv(READ)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                data = pending[fd] + data
                while END in data:
                    head, _, data = data.partition(END)
                    if b"onnection: close" in head or b"onnection: Close" in head:
                        conn.send(CLOSE)
                        data = b""
                        break
                    conn.send(KEEP)
                else:
                    pending[fd] = data
                    continue
            poller.unregister(fd)
            del conns[fd], pending[fd]
            conn.close()


def _accept(listener: socket.socket, poller: select.epoll, conns: dict[int, socket.socket],
            pending: dict[int, bytes]) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        fd = conn.fileno()
        conns[fd] = conn
        pending[fd] = b""
        poller.register(fd, select.EPOLLIN)
