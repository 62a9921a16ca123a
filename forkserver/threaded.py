"""A threaded worker's side of its thread pool (issue 12): requests lent, connections taken back.

With ``threads > 1`` the worker's loop is a reactor. It reads heads and small bodies as before;
each complete request is lent, with its connection, to a pool thread (``forkserver.threadpool``),
which runs the app, sends the response and returns the connection's verdict. The reactor alone
touches epoll, the connection table, deadlines, the request count and the slot's state; a thread
touches only the connection it holds, its own scoreboard record and its own receive buffer.

While a connection is lent the reactor must not read it: on the first event it reports (the
client pipelined, or hung up) it leaves epoll, and it comes back when the thread gives it back.
A worker whose threads are all busy stops accepting, so the kernel hands new clients to workers
that can serve them.
"""

from __future__ import annotations

import faulthandler
import os
import select
import sys
import time
from typing import TYPE_CHECKING, Any

from forkserver import logs
from forkserver.scoreboard import Reason, ThreadWriter
from forkserver.threadpool import ThreadPool
from forkserver.wsgi import Verdict

if TYPE_CHECKING:
    from forkserver.http.parser import Request

# The worker's Connection and Worker (typed Any: this module is imported by worker.py).
Connection = Worker = Any

# A thread that computes holds the GIL for up to the switch interval each time the reactor
# wants it (5 ms by default); the threadpool helper measured a spinning thread cutting a
# reactor-like loop about 100-fold at 5 ms and about 3-fold at 1 ms. Threads are for apps that
# wait, where the shorter interval costs little.
SWITCH_INTERVAL = 0.001


class ThreadLocal:
    """What one pool thread keeps for itself: its scoreboard record and its receive buffer."""

    __slots__ = ("buffer", "record", "view")

    def __init__(self, record: ThreadWriter, size: int) -> None:
        self.record = record
        self.buffer = bytearray(size)
        self.view = memoryview(self.buffer)


class Lending:
    """The worker's thread pool and the rules for lending connections to it."""

    def __init__(self, worker: Worker, size: int, buffer_size: int) -> None:
        self.worker = worker
        log = worker.log
        writers = worker.slot.thread_writers(size)
        self.pool = ThreadPool(
            size, name=f"w{worker.spec.index}", failed=Verdict.ABORT,
            log_exception=lambda message: log.exception("%s", message),
            on_thread_start=lambda seat: ThreadLocal(writers[seat.index], buffer_size))
        self.stuck: Any = None  # the held request that outlived `timeout`, once there is one
        self.full_since = 0.0  # when the last free thread was taken (handoff's "busy for")
        self.pool.start()
        self.fd = self.pool.wakeup_fd
        worker.epoll.register(self.fd, select.EPOLLIN)
        sys.setswitchinterval(SWITCH_INTERVAL)

    @property
    def has_free_thread(self) -> bool:
        return self.pool.has_free_thread

    def lend(self, conn: Connection, request: Request, body: Any) -> None:
        """Hand a complete request and its connection to a thread (the connection is BUSY)."""
        worker = self.worker
        worker.requests.lend(conn, request, body)
        self.pool.submit(conn, worker.requests.run_lent)
        if not self.pool.has_free_thread:
            worker.listeners.off()  # the kernel gives new clients to workers with a free thread
            self.full_since = time.monotonic()
            if worker.handing is not None:
                worker.handing.sync()  # nor handed connections

    def mute(self, conn: Connection) -> None:
        """A lent connection reported an event: the thread owns its socket, so it leaves epoll
        until it is given back (level-triggered epoll would otherwise report it again and
        again)."""
        if conn.registered:
            self.worker.epoll.unregister(conn.fd)
            conn.registered = False

    def collect(self) -> None:
        """Take back every connection the threads have finished with, in completion order."""
        worker = self.worker
        for conn, verdict in self.pool.completed():
            worker.requests.finished()
            if worker.conns.get(conn.fd) is not conn:
                continue  # closed meanwhile (the worker is going)
            if not conn.registered:
                worker.epoll.register(conn.fd, select.EPOLLIN)
                conn.registered = True
            self._given_back(conn, verdict)
        if not worker.listeners.accepting and \
                len(worker.conns) < worker.settings.worker_connections:
            worker.listeners.on()  # (on() itself checks for a free thread and for stopping)
        if worker.handing is not None:
            worker.handing.sync()

    def _given_back(self, conn: Connection, verdict: Verdict) -> None:
        """Carry out the verdict of a thread's request, then serve what the client pipelined
        meanwhile (the same steps as the inline path in ``Worker._process``)."""
        worker = self.worker
        if verdict is not Verdict.KEEP:
            worker._end(conn, verdict)
            return
        conn.parser.start_next()
        worker._process(conn)

    def forget(self) -> None:
        """In a mold: the threads did not survive the fork; only the wakeup fd is left."""
        fd, self.pool.wakeup_fd = self.pool.wakeup_fd, -1
        if fd >= 0:
            os.close(fd)

    def check_stuck(self, now: float) -> None:
        """A request over ``timeout``: stop accepting and offering keep-alive, give the other
        threads up to graceful_timeout to finish theirs, then exit (``finish`` logs why). Only
        the stuck request is lost; the master's abort stays the backstop."""
        timeout = self.worker.settings.timeout
        if not timeout or self.stuck is not None:
            return
        for held in self.pool.held():
            if held.thread is not None and now - held.since > timeout:
                self.stuck = held
                request = held.conn.running
                self.worker.log.error(
                    "worker: %s has run for %.1fs on thread %s, over timeout=%gs; finishing "
                    "the other requests (up to graceful_timeout), then exiting",
                    request, now - held.since, self.pool.seats[held.thread].name, timeout)
                self.worker.begin_stop(Reason.TIMEOUT)
                return

    def only_stuck_left(self) -> bool:
        """Stopping after a stuck request: whether every other connection is done."""
        return self.stuck is not None and len(self.worker.conns) == 1 and \
            self.stuck.conn.fd in self.worker.conns

    def finish(self, quick: bool) -> None:
        """At exit: after a stuck request, or a graceful stop whose time ran out with requests
        still running, log each thread and its stack (a quick stop is asked to cut them)."""
        if self.stuck is None and (quick or not self.pool.held()):
            return
        log = self.worker.log
        for line in self.pool.describe():
            log.error("worker thread %s", line)
        for held in self.pool.held():
            log.error("worker exits with %s unfinished (%.1fs)", held.conn.running,
                      time.monotonic() - held.since)
        stream = logs.error_stream()
        try:
            faulthandler.dump_traceback(file=stream, all_threads=True)
        except (OSError, ValueError, RuntimeError):
            pass
