"""A worker's side of connection handoff (issue 13): it gives its waiting keep-alive connections
away while it is busy, takes in the ones other workers hand over while it can take work, and
offers its idle ones when it leaves.

The wire, the policy and the watcher thread are ``forkserver.handoff``'s; this module only ties
them to the worker's loop. With ``threads = 1`` the watcher gives connections away while the one
thread runs the app; with a thread pool the reactor itself does, for a connection that becomes
readable when no thread has been free for ``handoff_delay``.
"""

from __future__ import annotations

import select
import ssl
import time
from typing import Any

from forkserver import handoff
from forkserver.phases import Phase

# The worker's Connection and Worker (typed Any: this module is imported by worker.py).
Connection = Worker = Any


class Handing:
    """One worker's use of the handoff channel."""

    def __init__(self, worker: Worker, channel: handoff.Channel, delay: float) -> None:
        self.worker = worker
        self.channel = channel
        self.fd = channel.fileno()
        self.delay = delay                # handoff_delay, in seconds (> 0)
        self.receiving = False            # the channel is in the worker's epoll
        self.watcher: handoff.Watcher | None = None

    def open(self) -> None:
        """Start: the watcher (single-threaded workers), and listening on the channel."""
        worker = self.worker
        if worker.lending is None:
            idle = worker.idle
            # It reads what the worker's inline dispatch records of each request (Inline).
            self.watcher = handoff.Watcher(self.delay, worker.requests,
                                           lambda: list(idle.values()), self.give, _fileno)
            worker.requests.watcher = self.watcher
            self.watcher.start()
        self.sync()

    def sync(self) -> None:
        """Listen on the channel exactly while this worker can take work: a free thread, room
        for a connection, and not leaving (nothing is handed into a retiring worker)."""
        worker = self.worker
        lending = worker.lending
        free = 1 if lending is None or lending.has_free_thread else 0
        want = handoff.receiving(self.delay, free, worker.stopping, worker.requests.retiring) \
            and len(worker.conns) < worker.settings.worker_connections
        if want and not self.receiving:
            worker.epoll.register(self.fd, select.EPOLLIN | select.EPOLLEXCLUSIVE)
        elif not want and self.receiving:
            worker.epoll.unregister(self.fd)
        self.receiving = want

    # -- giving ---------------------------------------------------------------------------
    def give(self, conn: Connection, seen_at: float) -> bool:
        """Offer a parked connection with a request waiting to another worker; True if it is
        the channel's now (the caller forgets it: close the descriptor, never shut it down).
        Called by the watcher thread while the app runs, or by a threaded worker's reactor."""
        if not handoff.eligible(candidate(conn, waiting=True), handoff.Why.BUSY):
            return False
        if not handoff.send(self.channel, conn.sock, conn.parser.unparsed(), conn.remote,
                            conn.hops, seen_at, requests=conn.requests):
            return False
        self.worker.slot.handoff_sent()
        handoff.settle(self.channel, handoff.SETTLE_SLOW)
        return True

    def give_waiting(self, conn: Connection, now: float) -> bool:
        """A threaded worker's reactor: ``conn`` was idle and has just been read (its bytes are
        fed, not parsed). True if it was handed off because no thread has been free for
        ``handoff_delay`` (the worker has forgotten it then)."""
        lending = self.worker.lending
        busy_for = now - lending.full_since if not lending.has_free_thread else 0.0
        why = handoff.give_away(self.delay, 1 if lending.has_free_thread else 0, busy_for,
                                True, False)
        if why is None or not self.give(conn, now):
            return False
        self.worker.close(conn)
        return True

    def leave(self) -> None:
        """The worker begins to stop: stop taking connections, and offer the idle ones (those
        with a request waiting first) to the other workers. What nobody takes stays, with the
        usual short grace."""
        self.sync()
        worker = self.worker
        idle = list(worker.idle.values())
        waiting = handoff.readable(conn.fd for conn in idle)
        chosen = handoff.choose(((conn, candidate(conn, conn.fd in waiting)) for conn in idle),
                                handoff.Why.EXIT)
        now = time.monotonic()
        for conn in chosen:
            outcome = handoff.offer(self.channel, conn.sock, conn.parser.unparsed(),
                                    conn.remote, conn.hops, now, requests=conn.requests,
                                    wait=handoff.SETTLE_EXIT)
            if outcome is handoff.Outcome.KEPT:
                continue
            worker.slot.handoff_sent()
            worker.close(conn)

    # -- taking ---------------------------------------------------------------------------
    def take(self) -> None:
        """The channel is readable: adopt one handed connection (level-triggered epoll reports
        the channel again while more wait)."""
        if not self.receiving:
            return  # unregistered since epoll reported it: leave it to a worker that takes work
        handed = handoff.receive(self.channel)
        if handed is not None:
            self.adopt(handed)
        self.sync()

    def rescue(self, now: float, deadline: float) -> bool:
        """Before a stopping worker exits (its graceful time not over): serve what no other
        worker took from the channel, so that a shutdown never strands a handed connection.
        True if it adopted any."""
        if now >= deadline:
            return False
        rescued = handoff.rescue(self.channel)
        for handed in rescued:
            self.adopt(handed)
        return bool(rescued)

    def adopt(self, handed: handoff.Handed) -> None:
        worker = self.worker
        worker.slot.handoff_adopted(max(0.0, time.monotonic() - handed.ready_at))
        worker.adopt(handed.sock, handed.remote, handed=handed)

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
            self._unwatch()

    def forget(self) -> None:
        """In a mold: the watcher thread does not exist after a fork; the channel stays (the
        workers the mold forks use it)."""
        self._unwatch()
        self.receiving = False

    def _unwatch(self) -> None:
        """No watcher from now on: nothing for the reactor to wake or collect."""
        requests = self.worker.requests
        self.watcher = requests.watcher = None
        requests.dozing = requests.giving = False


def candidate(conn: Connection, waiting: bool) -> handoff.Candidate:
    """What the handoff policy needs to know about one connection. Only an IDLE one is
    settled: between requests its parser holds nothing it has consumed (a partial head may
    have been, and would be lost)."""
    phase = conn.phase
    return handoff.Candidate(
        waiting=waiting, dispatched=phase is Phase.BUSY,
        tls=isinstance(conn.sock, ssl.SSLSocket), hops=conn.hops,
        pending=conn.parser.buffered, settled=phase is Phase.IDLE)


def _fileno(conn: Connection) -> int:
    return conn.fd
