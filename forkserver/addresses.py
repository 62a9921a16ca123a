"""Listen addresses, written the one way the settings, logs and metrics spell them.

A bind spec is ``HOST:PORT``, ``[IPv6]:PORT``, ``unix:/path`` or ``fd://N``. ``parse`` turns the
text into a ``BindSpec`` and is the only place that decides what is valid, so ``--check-config``,
a HUP reload and the binding itself can never disagree. ``str(BindSpec)`` and ``sockname`` write
the same notation back, from a spec or from a bound socket. Imports nothing of forkserver.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass

__all__ = ["FORMS", "AddressError", "BindSpec", "endpoint", "host_port", "parse", "sockname"]

FORMS = "expected HOST:PORT, [IPv6]:PORT, unix:/path or fd://N"
# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
UNIX_PATH_MAX = 107
_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?", re.ASCII)


class AddressError(ValueError):
    """A bind spec that is not valid. ``why`` says what is wrong without repeating the spec
    (the settings name it their own way); ``str()`` is one line that names it."""

    def __init__(self, spec: str, why: str) -> None:
        super().__init__(f"invalid bind {spec!r}: {why}")
        self.spec = spec
        self.why = why


@dataclass(frozen=True)
class BindSpec:
    """One parsed bind address. Fields that do not apply to ``kind`` keep their defaults."""

    kind: str  # "tcp" | "unix" | "fd"
    host: str = ""  # an IPv6 host is kept without its brackets
    port: int = 0
    path: str = ""
    fd: int = -1

    def __str__(self) -> str:
        # The user's own notation, so messages name what they typed.
        if self.kind == "unix":
            return f"unix:{self.path}"
        if self.kind == "fd":
            return f"fd://{self.fd}"
        return host_port(self.host, self.port)


def host_port(host: str, port: int | str) -> str:
    """``HOST:PORT``, with brackets around an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _port(text: str, spec: str) -> int:
    # int() alone would accept "+80", " 80", "8_0" and other digits than ASCII ones.
    if not (text.isascii() and text.isdigit()) or int(text) > 65535:
        raise AddressError(spec, f"port {text!r} is not a number from 0 to 65535")
    return int(text)


def parse(spec: str) -> BindSpec:
    """Parse one bind spec; AddressError (a ValueError) with a one-line message otherwise."""
    if spec.startswith("unix:"):
        path = spec[len("unix:"):]
        if not path or "\0" in path:
            raise AddressError(spec, "unix: needs a socket path")
        if len(os.fsencode(path)) > UNIX_PATH_MAX:
            raise AddressError(spec, f"unix socket path is longer than {UNIX_PATH_MAX} bytes")
        return BindSpec(kind="unix", path=path)
    if spec.startswith("fd://"):
        number = spec[len("fd://"):]
        if not (number.isascii() and number.isdigit()):
            raise AddressError(spec, "fd:// needs a file descriptor number")
        return BindSpec(kind="fd", fd=int(number))
    host, sep, port = spec.rpartition(":")
    if not sep or not host:
        raise AddressError(spec, FORMS)
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise AddressError(spec, f"{host} is not an IPv6 address") from None
        return BindSpec(kind="tcp", host=host[1:-1], port=_port(port, spec))
    if ":" in host or "[" in host or "]" in host:
        # A bare IPv6 address ("::1:8000") is ambiguous, hence the bracket rule.
        raise AddressError(spec, "an IPv6 address needs brackets: [ADDRESS]:PORT")
    if not _HOSTNAME.fullmatch(host):
        raise AddressError(spec, f"{host!r} is not a host name or IPv4 address")
    return BindSpec(kind="tcp", host=host, port=_port(port, spec))


def sockname(sock: socket.socket) -> str:
    """A bound socket's own address in the bind notation: HOST:PORT, [IPv6]:PORT, unix:PATH.

    An abstract unix socket (leading NUL) is shown as ``unix:@name``.
    """
    address = sock.getsockname()
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        return host_port(str(address[0]), address[1])
    if sock.family == socket.AF_UNIX:
        if isinstance(address, bytes):
            return "unix:@" + address[1:].decode("utf-8", "backslashreplace")
        return f"unix:{address}"
    return f"{sock.family.name}:{address}"


def endpoint(sock: socket.socket) -> tuple[str, str]:
    """(host, port) of a bound socket as WSGI's SERVER_NAME and SERVER_PORT want them: an IPv6
    host without brackets; for a unix socket its path (``@name`` if abstract) and no port."""
    address = sock.getsockname()
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        return str(address[0]), str(address[1])
    return sockname(sock).removeprefix("unix:"), ""
