"""A pool of N threads that run jobs for the worker's reactor and hand connections back.

The reactor (the worker's epoll loop, in the main thread) owns every connection. It lends one
to the pool with ``submit(conn, job)``; a pool thread calls ``job(conn, seat)``, which runs the
app for one request and sends the response, and returns a verdict for the connection (the
worker's own type; this module never looks inside it). The connection then goes back to the
reactor: the thread queues ``(conn, verdict)`` and bumps an eventfd that the reactor has
registered in its epoll (``wakeup_fd``). The reactor calls ``completed()`` to take every
finished connection, in completion order. Nothing polls: threads sleep in the queue, the
reactor sleeps in epoll, and one eventfd read covers any number of completions.

Rules the pool enforces rather than trusts:
- only the thread that created the pool submits and collects (no locks on the hot path);
- a connection is lent once at a time, so one connection's requests run in order;
- a job that raises is logged and its connection comes back with the ``failed`` verdict; the
  thread lives on;
- after ``drain`` nothing more is accepted.

Free and busy counts are the reactor's view: a thread is busy from ``submit`` until the
reactor has collected its connection. That is the count that decides whether the worker may
accept (issue 12: accept only with a free thread).
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from queue import Empty, SimpleQueue
from typing import Any

Job = Callable[[Any, "Seat"], Any]

_STOP = object()  # queued once per thread by stop()


class PoolClosed(RuntimeError):
    """``submit`` after ``drain`` or ``stop``."""


class Seat:
    """One pool thread's identity, visible to the jobs it runs.

    ``index`` is 0..N-1. ``state`` is whatever ``on_thread_start`` returned for this thread
    (the worker's per-thread scoreboard writer and receive buffer, say). ``conn`` and ``since``
    tell what the thread is doing now; the thread itself writes them.
    """

    __slots__ = ("conn", "ident", "index", "name", "native_id", "since", "state")

    def __init__(self, index: int, name: str) -> None:
        self.index = index
        self.name = name
        self.ident = 0
        self.native_id = 0
        self.state: Any = None
        self.conn: Any = None
        self.since = 0.0


@dataclass(frozen=True)
class Held:
    """A connection the pool has not given back: ``thread`` is None while its job waits."""

    conn: Any
    thread: int | None
    since: float


class ThreadPool:
    """``size`` threads named ``{name}.t{index}``; see the module docstring for the protocol."""

    def __init__(self, size: int, *, name: str, failed: Any,
                 log_exception: Callable[[str], Any],
                 on_thread_start: Callable[[Seat], Any] | None = None) -> None:
        if size < 1:
            raise ValueError(f"a thread pool needs at least one thread, not {size}")
        self.size = size
        self.name = name
        self.failed = failed
        self.log_exception = log_exception
        self.on_thread_start = on_thread_start
        self.seats = [Seat(index, f"{name}.t{index}") for index in range(size)]
        self.wakeup_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._jobs: SimpleQueue = SimpleQueue()
        self._done: SimpleQueue = SimpleQueue()
        self._held: dict[Any, float] = {}   # lent connection -> when it was submitted
        self._finished: list[tuple[Any, Any]] = []  # collected by drain(), not yet returned
        self._threads: list[threading.Thread] = []
        self._owner = threading.get_ident()
        self._open = False

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Start every thread and wait until each has run ``on_thread_start``; if one of them
        raised, stop the pool and raise that error here (a worker that cannot serve)."""
        ready = threading.Barrier(self.size + 1)
        errors: list[BaseException] = []
        for seat in self.seats:
            thread = threading.Thread(target=self._run, args=(seat, ready, errors),
                                      name=seat.name, daemon=True)
            try:
                thread.start()
            except RuntimeError:  # "can't start new thread": release the ones waiting
                ready.abort()
                raise
            self._threads.append(thread)
        ready.wait()
        self._open = True
        if errors:
            self.stop(timeout=1.0)
            raise RuntimeError(f"thread pool {self.name}: a thread failed to start") \
                from errors[0]

    def drain(self, deadline: float) -> list[Held]:
        """Accept nothing more; wait until every lent connection is finished or the monotonic
        ``deadline`` passes. Returns what is still held (running, or queued behind a stuck
        job). Finished connections stay for ``completed()``: the reactor still decides their
        fate (close, linger)."""
        self._check_owner()
        self._open = False
        poller = select.poll()
        poller.register(self.wakeup_fd, select.POLLIN)
        while len(self._take_done()) < len(self._held):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            poller.poll(int(left * 1000) + 1)
        return self.held()

    def stop(self, timeout: float = 5.0) -> list[str]:
        """Let each thread finish its current job and exit; join them for up to ``timeout``
        seconds in all. Returns the names of threads still alive (stuck in a job). Close the
        pool afterwards with ``close()``."""
        self._open = False
        for _ in self._threads:
            self._jobs.put((None, _STOP))
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [thread.name for thread in self._threads if thread.is_alive()]

    def close(self) -> bool:
        """Release the wakeup fd once every thread has exited (after ``stop``; the reactor
        unregisters it first). While a thread is stuck in a job the fd stays open, so that
        thread can never write into a reused descriptor number; returns whether it closed."""
        if any(thread.is_alive() for thread in self._threads):
            return False
        if self.wakeup_fd >= 0:
            os.close(self.wakeup_fd)
            self.wakeup_fd = -1
        return True

    # -- the reactor's side -----------------------------------------------------------------
    def submit(self, conn: Any, job: Job) -> None:
        """Lend ``conn`` to the pool: a thread will call ``job(conn, seat)``. Jobs beyond the
        free threads wait in order. The connection must not be lent already."""
        if threading.get_ident() != self._owner:
            raise RuntimeError("ThreadPool.submit is for the reactor thread only")
        if not self._open:
            raise PoolClosed(f"thread pool {self.name} takes no more jobs")
        held = self._held
        if conn in held:
            raise RuntimeError(f"connection {conn!r} is already in the thread pool")
        held[conn] = time.monotonic()
        self._jobs.put((conn, job))

    def completed(self) -> list[tuple[Any, Any]]:
        """Every connection given back since the last call, as ``(conn, verdict)`` in
        completion order. Call it when ``wakeup_fd`` is readable (a spurious call is cheap)."""
        self._check_owner()
        finished = self._finished
        self._take_done()
        if not finished:
            return []
        self._finished = []
        held = self._held
        for conn, _ in finished:
            del held[conn]
        return finished

    @property
    def busy(self) -> int:
        """Threads lent out (running, or finished but not yet collected), capped at size."""
        return min(self.size, len(self._held))

    @property
    def free(self) -> int:
        return self.size - self.busy

    @property
    def has_free_thread(self) -> bool:
        """Whether a job submitted now would start at once: the worker accepts only then."""
        return len(self._held) < self.size

    @property
    def queued(self) -> int:
        """Jobs submitted beyond the thread count, waiting for a thread."""
        return max(0, len(self._held) - self.size)

    def held(self) -> list[Held]:
        """The connections lent and not yet finished, oldest first."""
        running = {id(seat.conn): seat for seat in self.seats if seat.conn is not None}
        finished = {id(conn) for conn, _ in self._finished}
        result = []
        for conn, submitted in self._held.items():
            if id(conn) in finished:
                continue
            seat = running.get(id(conn))
            if seat is None:
                result.append(Held(conn, None, submitted))
            else:
                result.append(Held(conn, seat.index, seat.since))
        return result

    def describe(self) -> list[str]:
        """One line per thread (name, ident as faulthandler prints it, native id, what it
        runs), for the error log next to a traceback dump."""
        lines = []
        for seat in self.seats:
            doing = "idle" if seat.conn is None else \
                f"busy {time.monotonic() - seat.since:.3f}s"
            lines.append(f"{seat.name} 0x{seat.ident:016x} tid={seat.native_id} {doing}")
        return lines

    def _take_done(self) -> list[tuple[Any, Any]]:
        """Move finished connections from the threads' queue to ``_finished``."""
        try:
            os.eventfd_read(self.wakeup_fd)
        except BlockingIOError:
            pass
        done = self._done
        finished = self._finished
        while True:
            try:
                finished.append(done.get_nowait())
            except Empty:
                return finished

    def _check_owner(self) -> None:
        if threading.get_ident() != self._owner:
            raise RuntimeError("ThreadPool's reactor side is for the reactor thread only")

    # -- the threads' side ------------------------------------------------------------------
    def _run(self, seat: Seat, ready: threading.Barrier, errors: list[BaseException]) -> None:
        seat.ident = threading.get_ident()
        seat.native_id = threading.get_native_id()
        try:
            if self.on_thread_start is not None:
                seat.state = self.on_thread_start(seat)
        except BaseException as error:  # noqa: BLE001 - reported by start()
            errors.append(error)
        try:
            ready.wait()
        except threading.BrokenBarrierError:  # start() gave up on the pool
            return
        if errors:
            return
        jobs_get = self._jobs.get
        done_put = self._done.put
        wakeup_fd = self.wakeup_fd
        monotonic = time.monotonic
        while True:
            conn, job = jobs_get()
            if job is _STOP:
                return
            seat.since = monotonic()
            seat.conn = conn
            try:
                verdict = job(conn, seat)
            except BaseException:  # noqa: BLE001 - the job's failure is its connection's
                verdict = self.failed
                self._log_failure(seat, conn)
            seat.conn = None
            done_put((conn, verdict))
            os.eventfd_write(wakeup_fd, 1)

    def _log_failure(self, seat: Seat, conn: Any) -> None:
        try:
            self.log_exception(f"{seat.name}: job for {conn!r} raised; closing it")
        except BaseException:  # noqa: BLE001, S110 - a broken logger must not kill the thread
            pass
