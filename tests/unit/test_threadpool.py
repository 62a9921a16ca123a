"""The reactor/pool hand-off with real threads, a real eventfd, a real epoll and socketpairs.

Every wait is bounded (WAIT seconds); the only sleeps are inside jobs, to make them slow.
"""

from __future__ import annotations

import os
import random
import select
import socket
import threading
import time
import traceback

import pytest

from forkserver.threadpool import Held, PoolClosed, Seat, ThreadPool

WAIT = 10.0  # generous: other helpers load the same 2 cores


class Reactor:
    """A minimal stand-in for the worker's epoll loop: the wakeup fd in a real epoll."""

    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool
        self.epoll = select.epoll()
        self.epoll.register(pool.wakeup_fd, select.EPOLLIN)

    def collect(self, count: int) -> list[tuple[object, object]]:
        """Wait in epoll until ``count`` connections came back; fail after WAIT seconds."""
        got: list[tuple[object, object]] = []
        deadline = time.monotonic() + WAIT
        while len(got) < count:
            left = deadline - time.monotonic()
            assert left > 0, f"only {len(got)} of {count} connections came back"
            events = self.epoll.poll(left)
            if events:
                assert events == [(self.pool.wakeup_fd, select.EPOLLIN)]
                got.extend(self.pool.completed())
        return got

    def close(self) -> None:
        self.epoll.close()


class Errors:
    """A log_exception that keeps the message and the traceback being handled."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def __call__(self, message: str) -> None:
        self.lines.append((message, traceback.format_exc()))


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def make_pool():
    pools: list[ThreadPool] = []

    def make(size: int, **kwargs) -> ThreadPool:
        kwargs.setdefault("name", "w3")
        kwargs.setdefault("failed", "abort")
        kwargs.setdefault("log_exception", Errors())
        pool = ThreadPool(size, **kwargs)
        pool.start()
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        assert pool.stop(timeout=WAIT) == []
        assert pool.close()


def keep(conn, seat):
    return "keep"


def test_a_finished_job_wakes_a_real_epoll_and_comes_back(make_pool):
    pool = make_pool(2)
    reactor = Reactor(pool)
    assert reactor.epoll.poll(0) == []  # nothing to report before any job
    conn = object()
    pool.submit(conn, keep)
    assert reactor.collect(1) == [(conn, "keep")]
    assert pool.completed() == []
    assert reactor.epoll.poll(0) == []  # one read drained the counter
    assert pool.free == 2 and pool.busy == 0
    reactor.close()


def test_many_completions_are_drained_by_one_call_in_completion_order(make_pool):
    pool = make_pool(1)  # one thread: completion order is submission order
    reactor = Reactor(pool)
    conns = [object() for _ in range(50)]
    for conn in conns:
        pool.submit(conn, keep)
    got = reactor.collect(50)
    assert [conn for conn, _ in got] == conns
    reactor.close()


class Conn:
    """A connection: our end of a socketpair, and how many requests it has had."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.sock, self.client = socket.socketpair()
        self.sock.settimeout(WAIT)
        self.requests = 0


def respond(conn: Conn, seat: Seat) -> str:
    """Run "the app" (a short random wait) and send its response blocking."""
    time.sleep(random.uniform(0, 0.003))
    conn.sock.sendall(f"{conn.index}:{conn.requests};".encode())
    return "keep"


def test_pipelined_requests_of_one_connection_stay_in_order(make_pool):
    """Four connections, six requests each, four threads: each connection's next request is
    submitted only when the previous one came back, so its responses arrive in order."""
    pool = make_pool(4)
    reactor = Reactor(pool)
    conns = [Conn(i) for i in range(4)]
    for conn in conns:
        pool.submit(conn, respond)
    remaining = len(conns) * 6
    while remaining:
        for conn, verdict in reactor.collect(1):
            assert verdict == "keep"
            remaining -= 1
            conn.requests += 1
            if conn.requests < 6:
                pool.submit(conn, respond)
    for conn in conns:
        conn.sock.close()
        received = b""
        while chunk := conn.client.recv(4096):
            received += chunk
        expected = "".join(f"{conn.index}:{n};" for n in range(6))
        assert received.decode() == expected
        conn.client.close()
    reactor.close()


def test_a_connection_is_never_lent_twice(make_pool):
    pool = make_pool(2)
    reactor = Reactor(pool)
    release = threading.Event()
    conn = object()
    pool.submit(conn, lambda c, s: release.wait(WAIT))
    with pytest.raises(RuntimeError, match="already in the thread pool"):
        pool.submit(conn, keep)
    release.set()
    assert reactor.collect(1) == [(conn, True)]
    pool.submit(conn, keep)  # back from the pool: it may go again
    assert reactor.collect(1) == [(conn, "keep")]
    reactor.close()


def test_only_the_reactor_thread_submits_and_collects(make_pool):
    pool = make_pool(1)
    caught: list[BaseException] = []

    def intruder() -> None:
        for call in (lambda: pool.submit(object(), keep), pool.completed):
            try:
                call()
            except RuntimeError as error:
                caught.append(error)

    thread = threading.Thread(target=intruder)
    thread.start()
    thread.join(WAIT)
    assert len(caught) == 2
    assert pool.busy == 0


def test_a_job_that_raises_is_logged_aborted_and_the_thread_lives_on(make_pool):
    errors = Errors()
    pool = make_pool(1, log_exception=errors)
    reactor = Reactor(pool)
    seen: list[tuple[int, int]] = []

    def broken(conn, seat):
        seen.append((seat.index, threading.get_ident()))
        raise ValueError("the app's bug")

    def fine(conn, seat):
        seen.append((seat.index, threading.get_ident()))
        return "keep"

    first, second = object(), object()
    pool.submit(first, broken)
    assert reactor.collect(1) == [(first, "abort")]
    pool.submit(second, fine)
    assert reactor.collect(1) == [(second, "keep")]
    assert seen[0] == seen[1]  # the same thread served both
    [(message, trace)] = errors.lines
    assert message.startswith("w3.t0: job for")
    assert "ValueError: the app's bug" in trace
    reactor.close()


def test_a_broken_logger_does_not_kill_the_thread(make_pool):
    def bad_log(message: str) -> None:
        raise OSError("log disk full")

    pool = make_pool(1, log_exception=bad_log)
    reactor = Reactor(pool)
    pool.submit("a", lambda c, s: 1 / 0)
    assert reactor.collect(1) == [("a", "abort")]
    pool.submit("b", keep)
    assert reactor.collect(1) == [("b", "keep")]
    reactor.close()


def test_free_and_busy_follow_submissions_and_completions(make_pool):
    pool = make_pool(3)
    reactor = Reactor(pool)
    started = threading.Semaphore(0)
    gates = {name: threading.Event() for name in "abcd"}

    def blocked(conn, seat):
        started.release()
        assert gates[conn].wait(WAIT)
        return conn

    assert (pool.free, pool.busy, pool.has_free_thread) == (3, 0, True)
    for name in "abc":
        pool.submit(name, blocked)
    for _ in range(3):
        assert started.acquire(timeout=WAIT)
    assert (pool.free, pool.busy, pool.has_free_thread, pool.queued) == (0, 3, False, 0)
    pool.submit("d", blocked)  # beyond the threads: it waits its turn
    assert pool.queued == 1
    held = {h.conn: h for h in pool.held()}
    assert sorted(held) == ["a", "b", "c", "d"]
    assert held["d"].thread is None
    assert sorted(held[name].thread for name in "abc") == [0, 1, 2]
    gates["b"].set()
    assert reactor.collect(1) == [("b", "b")]
    assert started.acquire(timeout=WAIT)  # "d" got b's thread
    assert (pool.free, pool.busy, pool.queued) == (0, 3, 0)
    for name in "acd":
        gates[name].set()
    assert sorted(verdict for _, verdict in reactor.collect(3)) == ["a", "c", "d"]
    assert (pool.free, pool.busy, pool.has_free_thread) == (3, 0, True)
    reactor.close()


def test_busy_counts_stay_exact_under_a_burst(make_pool):
    """Many short jobs from many connections: the counts never leave [0, size]."""
    pool = make_pool(4)
    reactor = Reactor(pool)
    conns = list(range(200))
    waiting = list(conns)
    done = 0
    while done < len(conns):
        while waiting and pool.has_free_thread:
            pool.submit(waiting.pop(), keep)
        assert 0 <= pool.free <= 4 and pool.free + pool.busy == 4
        done += len(reactor.collect(1))
    assert (pool.free, pool.busy, pool.queued) == (4, 0, 0)
    reactor.close()


def test_drain_waits_for_the_innocent_and_returns_the_stuck(make_pool):
    pool = make_pool(3)
    reactor = Reactor(pool)
    stuck = threading.Event()
    pool.submit("stuck", lambda c, s: stuck.wait(WAIT))
    pool.submit("slow", lambda c, s: time.sleep(0.2) or "keep")
    pool.submit("quick", keep)
    started = time.monotonic()
    held = pool.drain(time.monotonic() + 1.5)
    waited = time.monotonic() - started
    assert [(h.conn, h.thread is not None) for h in held] == [("stuck", True)]
    assert 1.4 <= waited < WAIT
    with pytest.raises(PoolClosed):
        pool.submit("late", keep)
    # The innocent ones are back with their verdicts; the reactor still decides their fate.
    assert sorted(pool.completed()) == [("quick", "keep"), ("slow", "keep")]
    stuck.set()
    assert reactor.collect(1) == [("stuck", True)]
    reactor.close()


def test_drain_returns_at_once_when_nothing_runs(make_pool):
    pool = make_pool(2)
    started = time.monotonic()
    assert pool.drain(time.monotonic() + WAIT) == []
    assert time.monotonic() - started < 1.0


def test_stop_joins_every_thread_and_reports_a_stuck_one():
    before = open_fds()
    pool = ThreadPool(3, name="w7", failed="abort", log_exception=Errors())
    pool.start()
    names = {t.name for t in threading.enumerate()}
    assert {"w7.t0", "w7.t1", "w7.t2"} <= names
    release = threading.Event()
    pool.submit("stuck", lambda c, s: release.wait(WAIT))
    started = time.monotonic()
    alive = pool.stop(timeout=0.5)
    assert time.monotonic() - started < WAIT
    [stuck] = alive  # the one thread in a job; the idle two took their stop and left
    assert stuck in {"w7.t0", "w7.t1", "w7.t2"}
    assert pool.close() is False  # a live thread may still write the eventfd
    release.set()
    assert pool.stop(timeout=WAIT) == []
    assert not {"w7.t0", "w7.t1", "w7.t2"} & {t.name for t in threading.enumerate()}
    assert pool.close() is True
    assert pool.wakeup_fd == -1 and open_fds() == before


def test_no_descriptor_is_left_behind():
    before = open_fds()
    for _ in range(5):
        pool = ThreadPool(2, name="w0", failed="abort", log_exception=Errors())
        pool.start()
        reactor = Reactor(pool)
        pool.submit("c", keep)
        reactor.collect(1)
        reactor.close()
        assert pool.stop(timeout=WAIT) == []
        assert pool.close()
    assert open_fds() == before


def test_each_thread_has_its_index_its_name_and_its_own_state(make_pool):
    made: list[tuple[int, str, int]] = []

    def on_start(seat: Seat) -> dict:
        made.append((seat.index, seat.name, threading.get_ident()))
        return {"buffer": bytearray(16), "index": seat.index}

    pool = make_pool(3, name="w5", on_thread_start=on_start)
    assert sorted(made) == [(i, f"w5.t{i}", made_ident) for i, _, made_ident in sorted(made)]
    assert sorted(i for i, _, _ in made) == [0, 1, 2]
    reactor = Reactor(pool)
    gate = threading.Barrier(3, timeout=WAIT)  # three jobs at once: one on each thread

    def report(conn, seat):
        gate.wait()
        assert seat.name == threading.current_thread().name
        return (seat.index, seat.state["index"], threading.get_ident())

    for conn in "xyz":
        pool.submit(conn, report)
    verdicts = sorted(v for _, v in reactor.collect(3))
    assert [(i, s) for i, s, _ in verdicts] == [(0, 0), (1, 1), (2, 2)]
    assert {ident for _, _, ident in verdicts} == {ident for _, _, ident in made}
    lines = pool.describe()
    assert [line.split()[0] for line in lines] == ["w5.t0", "w5.t1", "w5.t2"]
    assert all(line.endswith("idle") for line in lines)
    reactor.close()


def test_a_thread_that_cannot_start_fails_the_pool():
    def on_start(seat: Seat) -> None:
        if seat.index == 1:
            raise OSError("no scoreboard record")

    pool = ThreadPool(3, name="w1", failed="abort", log_exception=Errors(),
                      on_thread_start=on_start)
    with pytest.raises(RuntimeError, match="failed to start") as caught:
        pool.start()
    assert isinstance(caught.value.__cause__, OSError)
    assert pool.stop(timeout=WAIT) == []
    assert pool.close()


def test_a_pool_needs_a_thread():
    with pytest.raises(ValueError, match="at least one thread"):
        ThreadPool(0, name="w0", failed="abort", log_exception=Errors())


def test_held_reports_when_each_job_started(make_pool):
    pool = make_pool(1)
    reactor = Reactor(pool)
    started = threading.Event()
    release = threading.Event()

    def blocked(conn, seat):
        started.set()
        release.wait(WAIT)
        return "keep"

    before = time.monotonic()
    pool.submit("c", blocked)
    assert started.wait(WAIT)
    [held] = pool.held()
    assert isinstance(held, Held) and held.thread == 0 and held.since >= before
    assert pool.describe()[0].split()[3] == "busy"
    release.set()
    reactor.collect(1)
    assert pool.held() == []
    reactor.close()


def test_a_client_that_vanishes_while_its_request_runs(make_pool):
    """The client closes mid-request: the job's blocking send fails, the connection comes back
    with the failed verdict through the eventfd, and the thread serves the next one."""
    errors = Errors()
    pool = make_pool(1, log_exception=errors)
    reactor = Reactor(pool)
    gone = Conn(0)
    running = threading.Event()
    vanished = threading.Event()

    def respond_late(conn, seat):
        running.set()
        assert vanished.wait(WAIT)
        conn.sock.sendall(b"x" * 1_000_000)  # the peer is closed: EPIPE or ECONNRESET
        return "keep"

    pool.submit(gone, respond_late)
    assert running.wait(WAIT)
    gone.client.close()
    vanished.set()
    assert reactor.collect(1) == [(gone, "abort")]
    [(_, trace)] = errors.lines
    assert "BrokenPipeError" in trace or "ConnectionResetError" in trace
    other = Conn(1)
    pool.submit(other, respond)
    assert reactor.collect(1) == [(other, "keep")]
    assert other.client.recv(64) == b"1:0;"
    for conn in (gone, other):
        conn.sock.close()
    other.client.close()
    reactor.close()
