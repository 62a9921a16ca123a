"""sd_notify and the watchdog interval, with the standard library only (never libsystemd).

The notification protocol is one AF_UNIX datagram of newline-separated KEY=VALUE assignments
sent to the socket named by $NOTIFY_SOCKET. Outside systemd the variable is unset and every
call is a silent no-op, so the master can notify unconditionally.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

__all__ = ["notify", "watchdog_interval"]


def _address(value: str) -> str | None:
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]  # abstract namespace: "@" stands for the leading NUL
    return None  # other forms (e.g. vsock:) are not supported; treat as "not under systemd"


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send `state` (e.g. "READY=1\\nSTATUS=serving") to systemd; False if unset or failing.

    Never raises: a supervisor that went away must not take the server down with it.
    """
    env = os.environ if environ is None else environ
    address = _address(env.get("NOTIFY_SOCKET", ""))
    if address is None:
        return False
    try:
        data = state.encode("utf-8")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            # The send must not block the master's loop if systemd is slow to drain its queue.
            sock.setblocking(False)
            sock.sendto(data, address)
    except (OSError, UnicodeError):
        return False
    return True


def _number(text: str | None) -> int | None:
    # Plain ASCII digits only: str.isdigit() alone also accepts characters like "²".
    if text is None or not text.isascii() or not text.isdigit():
        return None
    return int(text)


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """How often to send WATCHDOG=1, in seconds: half of WATCHDOG_USEC, as systemd advises.

    None when the watchdog is off, malformed, or meant for another process (WATCHDOG_PID).
    """
    if "WATCHDOG_PID" in environ and _number(environ["WATCHDOG_PID"]) != pid:
        return None
    usec = _number(environ.get("WATCHDOG_USEC"))
    if not usec:
        return None
    return usec / 2 / 1_000_000
