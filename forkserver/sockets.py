"""Listening sockets: bind the specs of ``forkserver.addresses``, or adopt inherited ones.

The master calls this before the first fork so every worker inherits the same listeners. All
sockets returned here are non-blocking (workers multiplex them with epoll) and close-on-exec:
a USR2 re-exec or a hook's subprocess must not inherit them by accident; the master marks the
ones it hands over explicitly.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Mapping

from forkserver import addresses
from forkserver.addresses import BindSpec

__all__ = [
    "BindError",
    "BindSpec",
    "bind",
    "cleanup",
    "describe",
    "inherited_names",
    "inherited_sockets",
    "parse_bind",
]

_SD_LISTEN_FDS_START = 3  # systemd passes sockets from fd 3 upwards (sd_listen_fds(3))

# Unix socket files this process created, by path, with their (device, inode). cleanup() removes
# a file only if it is still the one we made, never a newer server's socket at the same path.
_bound_unix: dict[str, tuple[int, int]] = {}


class BindError(Exception):
    """A listener could not be set up; the message is one line naming the address."""


def _why(exc: OSError) -> str:
    # Some socket errors carry only a message ("AF_UNIX path too long"), no strerror.
    return exc.strerror or str(exc)


def parse_bind(spec: str) -> BindSpec:
    """Parse one bind spec (see ``forkserver.addresses``); ValueError with one line otherwise."""
    return addresses.parse(spec)


def _listen(sock: socket.socket, backlog: int) -> socket.socket:
    sock.listen(backlog)
    sock.setblocking(False)
    sock.set_inheritable(False)
    return sock


DEFER_ACCEPT_SECONDS = 1


def _nodelay_for_accepted(sock: socket.socket) -> None:
    """TCP_NODELAY on a TCP listener: Linux copies it to every socket accepted from it, so the
    worker's accept path does not pay a setsockopt per connection (small responses and the
    pieces of a streamed one go out at once, never held back for an ACK)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _bind_tcp(spec: BindSpec, backlog: int, reuse_port: bool) -> socket.socket:
    try:
        infos = socket.getaddrinfo(spec.host, spec.port, socket.AF_UNSPEC, socket.SOCK_STREAM,
                                   0, socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BindError(f"cannot bind {spec}: {_why(exc)}") from None
    last: OSError | None = None
    # A name may resolve to several addresses; the first one that binds wins, as with most
    # servers. Bind several specs to listen on both families.
    for family, socktype, proto, _canon, sockaddr in infos:
        sock = socket.socket(family, socktype, proto)
        try:
            # Lets a restarted server bind while old connections sit in TIME_WAIT.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # "[::]:80" should mean IPv6 only, so a separate "0.0.0.0:80" can coexist.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            # Hand a connection to accept() only once its first bytes are in: the worker can
            # then read and answer at once, without a round through epoll, and a client that
            # connects and says nothing never takes a worker's attention.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT_SECONDS)
            _nodelay_for_accepted(sock)
            sock.bind(sockaddr)
            return _listen(sock, backlog)
        except OSError as exc:
            sock.close()
            last = exc
    reason = _why(last) if last is not None else "no usable address"
    raise BindError(f"cannot bind {spec}: {reason}")


def _remove_stale_unix(path: str) -> None:
    """Delete a leftover socket file from a server that died, but nothing else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise BindError(f"cannot bind unix:{path}: file exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)  # a live server with a full backlog answers EAGAIN, not a hang
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody accepts on it: a stale file
        return
    except BlockingIOError:
        pass  # a live listener whose backlog is full
    except FileNotFoundError:
        return
    except OSError as exc:
        raise BindError(f"cannot bind unix:{path}: {_why(exc)}") from None
    finally:
        probe.close()
    raise BindError(f"cannot bind unix:{path}: another process is listening on it")


def _bind_unix(spec: BindSpec, backlog: int) -> socket.socket:
    _remove_stale_unix(spec.path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(spec.path)  # permissions follow the umask, as for any file the server makes
        st = os.stat(spec.path)
        _bound_unix[spec.path] = (st.st_dev, st.st_ino)
        return _listen(sock, backlog)
    except OSError as exc:
        sock.close()
        raise BindError(f"cannot bind {spec}: {_why(exc)}") from None


def _adopt(fd: int, origin: str) -> socket.socket:
    """Wrap an inherited descriptor, which must be a listening stream socket."""
    try:
        sock = socket.socket(fileno=fd)  # family and type are read from the descriptor
    except OSError as exc:
        raise ValueError(f"{origin}: fd {fd} is not a socket ({_why(exc)})") from None
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError:
        listening = 0
    if sock.type != socket.SOCK_STREAM or not listening:
        sock.detach()  # leave the caller's descriptor open; it is not ours to close
        raise ValueError(f"{origin}: fd {fd} is not a listening stream socket")
    _nodelay_for_accepted(sock)  # (a listener from systemd or an exec: set here too)
    sock.setblocking(False)
    sock.set_inheritable(False)
    return sock


def adopt(fd: int, origin: str) -> socket.socket:
    """A listener inherited by descriptor number (USR2 re-exec); ValueError if it is not one."""
    return _adopt(fd, origin)


def bind(spec: BindSpec, backlog: int, reuse_port: bool = False) -> socket.socket:
    """A listening, non-blocking, close-on-exec socket for `spec`.

    Raises BindError (one line) when the address cannot be bound, and ValueError when an fd://
    descriptor is not a listening stream socket.
    """
    if spec.kind == "tcp":
        return _bind_tcp(spec, backlog, reuse_port)
    if spec.kind == "unix":
        return _bind_unix(spec, backlog)
    if spec.kind == "fd":
        return _adopt(spec.fd, f"bind {spec}")
    raise ValueError(f"unknown bind kind {spec.kind!r}")


def _listen_fds(environ: Mapping[str, str], pid: int) -> int:
    """How many sockets systemd passed to `pid` (0 when none or meant for another process)."""
    listen_pid = environ.get("LISTEN_PID", "")
    if not listen_pid.isascii() or not listen_pid.isdigit() or int(listen_pid) != pid:
        return 0  # absent, or inherited from a parent that was the real recipient
    text = environ.get("LISTEN_FDS", "")
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"LISTEN_FDS={text!r} is not a number of file descriptors")
    return int(text)


def inherited_sockets(environ: Mapping[str, str], pid: int) -> list[socket.socket]:
    """Listeners passed by systemd socket activation, in fd order; [] when not ours.

    The caller should remove LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES from its environment after
    this, so processes it starts do not look at them (the PID check makes that safe anyway).
    """
    count = _listen_fds(environ, pid)
    return [
        _adopt(fd, "LISTEN_FDS")
        for fd in range(_SD_LISTEN_FDS_START, _SD_LISTEN_FDS_START + count)
    ]


def inherited_names(environ: Mapping[str, str], pid: int) -> list[str]:
    """The LISTEN_FDNAMES entry for each inherited socket, in the same order ("" if unnamed)."""
    count = _listen_fds(environ, pid)
    names = environ.get("LISTEN_FDNAMES", "").split(":") if count else []
    return (names + [""] * count)[:count]


def describe(sock: socket.socket) -> str:
    """A human-readable address for logs: http://HOST:PORT, http://[V6]:PORT or unix:PATH."""
    name = addresses.sockname(sock)
    return f"http://{name}" if sock.family in (socket.AF_INET, socket.AF_INET6) else name


def cleanup(socks: list[socket.socket], specs: list[BindSpec]) -> None:
    """Close the listeners and remove the unix socket files this process bound.

    A socket file is removed only if one of `socks` is bound to it and, when this process created
    it, it is still the same file, so a successor server's socket at that path survives.
    """
    bound_paths: set[str] = set()
    for sock in socks:
        try:
            if sock.family == socket.AF_UNIX:
                name = sock.getsockname()
                if isinstance(name, str) and name:
                    bound_paths.add(name)
        except OSError:
            pass  # already closed
        sock.close()
    for spec in specs:
        if spec.kind != "unix" or spec.path not in bound_paths:
            continue
        try:
            st = os.lstat(spec.path)
        except FileNotFoundError:
            continue
        ours = _bound_unix.get(spec.path)
        if not stat.S_ISSOCK(st.st_mode) or (ours is not None and ours != (st.st_dev, st.st_ino)):
            continue
        # Best effort at shutdown: a file we cannot remove is only clutter.
        with contextlib.suppress(OSError):
            os.unlink(spec.path)
        _bound_unix.pop(spec.path, None)
