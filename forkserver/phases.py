"""The phases of a worker's client connection and every legal move between them."""

from __future__ import annotations

import enum


class Phase(enum.IntEnum):
    """Where a connection is; each phase but BUSY has a deadline of its own. (An IntEnum, so
    the transition check hashes in C: a plain Enum's __hash__ is Python code.)"""

    HEAD = 0       # reading a request head (header_timeout)
    BODY = 1       # reading a small body before the app runs (header_timeout)
    BUSY = 2       # the app runs; its reads and writes block under their own timeouts
    IDLE = 3       # keep-alive, between requests (keepalive)
    LINGER = 4     # answered and shut for writing; draining the client (linger_timeout)
    PROXY = 5      # reading a PROXY protocol header (header_timeout, from the accept)
    HANDSHAKE = 6  # the TLS handshake (header_timeout, from the accept)


# Every legal move, by the phase it starts from; any other raises.
NEXT: tuple[frozenset[Phase], ...] = (
    frozenset({Phase.BODY, Phase.BUSY, Phase.IDLE, Phase.LINGER}),              # HEAD
    frozenset({Phase.BUSY, Phase.LINGER}),                                      # BODY
    frozenset({Phase.HEAD, Phase.BODY, Phase.BUSY, Phase.IDLE, Phase.LINGER}),  # BUSY
    frozenset({Phase.HEAD, Phase.BODY, Phase.BUSY, Phase.LINGER}),              # IDLE
    frozenset(),                                                                # LINGER
    frozenset({Phase.HANDSHAKE, Phase.HEAD}),                                   # PROXY
    frozenset({Phase.HEAD, Phase.LINGER}),                                      # HANDSHAKE
)


def check_move(old: Phase, new: Phase) -> None:
    if new not in NEXT[old]:
        raise RuntimeError(f"connection cannot go from {old.name} to {new.name}")
