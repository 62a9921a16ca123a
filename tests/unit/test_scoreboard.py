"""The shared scoreboard: slot lifecycle, counters, and torn-read freedom across a real fork."""

from __future__ import annotations

import os
import struct
import time

import pytest

from forkserver import scoreboard
from forkserver.scoreboard import Reason, Scoreboard, State


def test_new_board_is_all_empty(board):
    assert board.capacity == 4
    assert board.slots() == []
    assert board.free_index() == 0
    view = board.read(3)
    assert view.state is State.EMPTY and view.pid == 0 and view.request_line == ""


@pytest.mark.parametrize("capacity", [0, -1, 1.5, True])
def test_bad_capacity_is_rejected(capacity):
    with pytest.raises(ValueError):
        Scoreboard(capacity)


def test_out_of_range_index_raises(board):
    for index in (-1, 4):
        with pytest.raises(IndexError):
            board.read(index)
        with pytest.raises(IndexError):
            board.claim(index, 1, 1)


def test_claim_free_index_release_cycle(board):
    before = time.monotonic()
    for expected in range(4):
        index = board.free_index()
        assert index == expected
        board.claim(index, 1000 + index, 7)
    assert board.free_index() is None
    views = board.slots()
    assert [v.index for v in views] == [0, 1, 2, 3]
    first = views[0]
    assert (first.pid, first.generation, first.state, first.reason) == (1000, 7, State.BOOTING,
                                                                       Reason.NONE)
    assert first.booted_at >= before and first.heartbeat == first.booted_at

    board.release(2)
    assert board.free_index() == 2
    assert [v.index for v in board.slots()] == [0, 1, 3]
    assert board.read(2).pid == 0 and board.read(2).state is State.EMPTY


def test_claim_resets_everything_the_previous_worker_left(board):
    board.claim(0, 11, 1)
    w = board.writer(0)
    w.set_connections(3)
    w.request_started(b"GET /slow")
    w.request_finished(500, 99, State.KEEPALIVE)
    w.request_started(b"GET /stuck")
    w.set_state(State.EXITING, Reason.TIMEOUT)
    board.release(0)
    board.claim(0, 12, 2)
    v = board.read(0)
    assert (v.pid, v.generation, v.state, v.reason) == (12, 2, State.BOOTING, Reason.NONE)
    assert (v.requests, v.bytes_sent, v.connections, v.request_start) == (0, 0, 0, 0.0)
    assert v.request_line == "" and v.status_counts == (0, 0, 0, 0, 0)
    # A writer created for the new occupant starts from zero too.
    w2 = board.writer(0)
    w2.request_finished(200, 5, State.IDLE)
    assert board.read(0).requests == 1 and board.read(0).bytes_sent == 5


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("reason", [Reason.NONE, Reason.MEMORY, Reason.SCALE])
def test_state_and_reason_round_trip(board, state, reason):
    board.claim(1, 5, 1)
    w = board.writer(1)
    before = time.monotonic()
    w.set_state(state, reason)
    v = board.read(1)
    assert v.state is state and v.reason is reason
    assert v.heartbeat >= before


def test_every_reason_round_trips(board):
    board.claim(0, 5, 1)
    w = board.writer(0)
    for reason in Reason:
        w.set_state(State.EXITING, reason)
        assert board.read(0).reason is reason


def test_heartbeat_pid_and_connections(board):
    board.claim(0, 0, 3)  # the master does not know the pid before fork
    w = board.writer(0)
    w.set_pid(4242)
    w.set_connections(17)
    hb = board.read(0).heartbeat
    time.sleep(0.002)
    w.heartbeat()
    v = board.read(0)
    assert v.pid == 4242 and v.connections == 17 and v.generation == 3
    assert v.heartbeat > hb
    assert v.state is State.BOOTING  # a heartbeat touches nothing else


def test_request_counters(board):
    board.claim(0, 1, 1)
    w = board.writer(0)
    w.set_state(State.IDLE)
    w.set_connections(2)

    before = time.monotonic()
    w.request_started(b"GET /hello?x=1")
    v = board.read(0)
    assert v.state is State.BUSY
    assert v.request_line == "GET /hello?x=1"
    assert v.request_start >= before and v.heartbeat == v.request_start
    assert v.requests == 0

    w.request_finished(200, 120, State.KEEPALIVE)
    v = board.read(0)
    assert v.state is State.KEEPALIVE
    assert (v.requests, v.bytes_sent, v.request_start, v.request_line) == (1, 120, 0.0, "")
    assert v.status_counts == (0, 1, 0, 0, 0)
    assert v.connections == 2  # untouched by request updates

    for status, sent in [(101, 0), (304, 10), (404, 20), (503, 30), (204, 0), (599, 1)]:
        w.request_started(b"POST /x")
        w.request_finished(status, sent, State.IDLE)
    v = board.read(0)
    assert v.requests == 7 and v.bytes_sent == 181
    assert v.status_counts == (1, 2, 1, 1, 2)
    assert v.state is State.IDLE


def test_request_updates_take_the_callers_clock_reading(board):
    """The worker already read the clock; the writer uses that reading instead of its own,
    and takes plain ints for the state as well as State members."""
    board.claim(0, 1, 1)
    w = board.writer(0)
    w.request_started(b"GET /clock", 1234.5)
    v = board.read(0)
    assert (v.state, v.request_start, v.heartbeat) == (State.BUSY, 1234.5, 1234.5)
    w.request_finished(404, 7, int(State.KEEPALIVE), 0.2, 1240.0)
    v = board.read(0)
    assert (v.state, v.heartbeat, v.requests, v.bytes_sent) == (State.KEEPALIVE, 1240.0, 1, 7)
    assert v.status_counts == (0, 0, 0, 1, 0) and v.duration_sum == pytest.approx(0.2)


def test_request_finished_refuses_a_nan_duration(board):
    board.claim(0, 1, 1)
    w = board.writer(0)
    with pytest.raises(ValueError):
        w.request_finished(200, 1, State.IDLE, float("nan"))
    assert board.read(0).requests == 0  # nothing was counted


def test_odd_status_counts_request_but_no_class(board):
    board.claim(0, 1, 1)
    w = board.writer(0)
    w.request_finished(42, 1, State.IDLE)
    w.request_finished(600, 1, State.IDLE)
    v = board.read(0)
    assert v.requests == 2 and v.status_counts == (0, 0, 0, 0, 0)


def test_negative_bytes_rejected_without_damage(board):
    board.claim(0, 1, 1)
    w = board.writer(0)
    w.request_finished(200, 10, State.IDLE)
    with pytest.raises(ValueError):
        w.request_finished(200, -1, State.IDLE)
    v = board.read(0)
    assert v.requests == 1 and v.bytes_sent == 10


def test_bad_argument_mid_update_leaves_slot_readable(board):
    board.claim(0, 1, 1)
    w = board.writer(0)
    with pytest.raises(struct.error):
        w.set_connections(-5)  # fails inside the bracketed write
    seq = struct.unpack_from("=Q", board._mm, 0)[0]
    assert seq % 2 == 0
    w.set_connections(5)
    assert board.read(0).connections == 5


def test_long_request_line_is_truncated(board):
    board.claim(0, 1, 1)
    w = board.writer(0)
    line = b"GET /" + b"a" * 200
    w.request_started(line)
    assert board.read(0).request_line == line[: scoreboard.LINE_MAX].decode()
    w.request_finished(200, 0, State.IDLE)
    w.request_started(b"GET /b")  # shorter line after a long one leaves no residue
    assert board.read(0).request_line == "GET /b"


def test_slots_are_independent(board):
    for i in range(4):
        board.claim(i, 100 + i, 1)
    writers = [board.writer(i) for i in range(4)]
    for i, w in enumerate(writers):
        for _ in range(i):
            w.request_finished(200, 1, State.IDLE)
        w.set_connections(i * 10)
    for i, v in enumerate(board.slots()):
        assert (v.pid, v.requests, v.connections) == (100 + i, i, i * 10)


def test_read_does_not_hang_on_a_writer_stuck_mid_update(board):
    board.claim(0, 1, 1)
    # Simulate a worker killed or stopped between "seq odd" and "seq even".
    seq = struct.unpack_from("=Q", board._mm, 0)[0]
    struct.pack_into("=Q", board._mm, 0, seq + 1)
    start = time.monotonic()
    v = board.read(0)
    assert time.monotonic() - start < 1.0
    assert v.pid == 1 and v.state is State.BOOTING
    # The master's next claim repairs the slot.
    board.claim(0, 2, 2)
    assert struct.unpack_from("=Q", board._mm, 0)[0] % 2 == 0


def test_writes_in_a_forked_child_are_seen_by_the_parent(board):
    board.claim(2, 0, 9)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            w = board.writer(2)
            w.set_pid(os.getpid())
            w.set_state(State.IDLE)
            w.request_started(b"GET /child")
            w.request_finished(201, 33, State.KEEPALIVE)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    v = board.read(2)
    assert (v.pid, v.generation, v.state, v.requests, v.bytes_sent) == (
        pid, 9, State.KEEPALIVE, 1, 33)
    assert v.status_counts == (0, 1, 0, 0, 0)


HAMMER_DURATION = 0.25  # every request the child finishes lands in one histogram bucket
HAMMER_BUCKET = scoreboard.DURATION_BUCKETS.index(HAMMER_DURATION)


def _consistent(v) -> bool:
    """Invariants the hammering child keeps between every pair of its updates.

    The child loops: set_connections(n % 1000), request_started(line n), request_finished()
    with a 0.25 s duration, n being the requests done so far, so connections lags by one only
    after a finish, and every finish moves the request count, one histogram bucket and the
    duration sum together.
    """
    if v.state is State.BUSY:
        in_flight = v.request_line == f"GET /{v.requests:020d}" and v.request_start > 0
        connections_ok = v.connections == v.requests % 1000
    else:
        in_flight = v.request_line == "" and v.request_start == 0.0
        connections_ok = v.connections in (v.requests % 1000, (v.requests - 1) % 1000)
    return (
        in_flight
        and connections_ok
        and v.requests == v.bytes_sent
        and v.status_counts == (0, v.requests, 0, 0, 0)
        and v.duration_buckets[HAMMER_BUCKET] == v.requests == sum(v.duration_buckets)
        and v.duration_sum == pytest.approx(HAMMER_DURATION * v.requests)
    )


def test_parent_never_sees_a_torn_slot_while_child_writes():
    """The one torn-read harness: state, request line, counters and the duration histogram
    (what /metrics reads) all come from one consistent moment of the writer."""
    board = Scoreboard(2)
    board.claim(1, 0, 1)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(ready_r)
            w = board.writer(1)
            w.set_pid(os.getpid())
            os.write(ready_w, b"x")
            deadline = time.monotonic() + 2.0
            n = 0
            # Each update keeps _consistent() true, so any mix of two updates breaks it.
            while time.monotonic() < deadline:
                w.set_connections(n % 1000)
                w.request_started(f"GET /{n:020d}".encode())
                w.request_finished(200, 1, State.IDLE, HAMMER_DURATION)
                n += 1
            code = 0
        finally:
            os._exit(code)
    os.close(ready_w)
    try:
        os.read(ready_r, 1)
        os.close(ready_r)
        reads = 0
        torn = []
        progress = set()
        start = time.monotonic()
        while (reads < 20000 or len(progress) < 50) and time.monotonic() - start < 1.5:
            v = board.read(1)
            reads += 1
            if not _consistent(v):
                torn.append(v)
            progress.add(v.requests)
        assert not torn, torn[:3]
        assert reads >= 5000
        assert len(progress) >= 50, "the child made no visible progress"
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        board.close()


# --- threaded workers: one record per application thread --------------------------------------

def test_a_single_threaded_slot_has_no_thread_records(board):
    board.claim(0, 1, 1)
    w = board.writer(0)
    w.request_started(b"GET /a HTTP/1.1")
    v = board.read(0)
    assert v.threads == () and v.thread_count == 1 and v.busy_threads == 1
    w.request_finished(200, 5, State.IDLE)
    assert board.read(0).busy_threads == 0


def test_thread_records_are_summed_and_the_oldest_request_is_the_slots(board):
    board.claim(0, 1, 1)
    w = board.writer(0)
    w.set_state(State.KEEPALIVE)
    t = w.thread_writers(3)
    t[0].request_finished(200, 10, 0.001)
    t[1].request_finished(404, 20, 0.3)
    t[1].request_finished(500, 30, 20.0)
    t[2].request_started("POST", "/second?token=secret")
    time.sleep(0.002)
    t[0].request_started("GET", "/third")
    v = board.read(0)
    assert v.thread_count == 3 and v.busy_threads == 2
    assert (v.requests, v.bytes_sent, v.status_counts) == (3, 60, (0, 1, 0, 1, 1))
    assert v.duration_buckets[0] == 1 and v.duration_buckets[-1] == 1
    assert sum(v.duration_buckets) == 3 and v.duration_sum == pytest.approx(20.301)
    # The slot shows BUSY with the oldest running request, so timeouts need no thread logic.
    assert v.state is State.BUSY and v.request_line == "POST /second"
    assert v.request_start == v.threads[2].request_start < v.threads[0].request_start
    assert [(x.number, x.state, x.method, x.path, x.requests) for x in v.threads] == [
        (0, scoreboard.ThreadState.BUSY, "GET", "/third", 1),
        (1, scoreboard.ThreadState.IDLE, "", "", 2),
        (2, scoreboard.ThreadState.BUSY, "POST", "/second", 0),
    ]
    t[2].request_finished(200, 1, 0.0)
    t[0].request_finished(200, 1, 0.0)
    v = board.read(0)
    assert (v.state, v.request_line, v.request_start, v.busy_threads) == (
        State.KEEPALIVE, "", 0.0, 0)
    assert v.requests == 5


def test_thread_record_path_is_bounded(board):
    board.claim(0, 1, 1)
    (t,) = board.writer(0).thread_writers(1)
    t.request_started("GET", "/" + "x" * 200)
    v = board.read(0).threads[0]
    assert len(f"{v.method} {v.path}") == scoreboard.RECORD_LINE_MAX


def test_exiting_and_booting_states_are_kept_while_threads_run(board):
    board.claim(0, 1, 1)
    w = board.writer(0)
    (t,) = w.thread_writers(1)
    t.request_started("GET", "/")
    w.set_state(State.EXITING, Reason.SHUTDOWN)
    assert board.read(0).state is State.EXITING and board.read(0).busy_threads == 1


@pytest.mark.parametrize("n", [0, -1, scoreboard.THREADS_MAX + 1, True, 2.0])
def test_thread_count_out_of_range_is_refused(board, n):
    board.claim(0, 1, 1)
    with pytest.raises(ValueError):
        board.writer(0).thread_writers(n)
    assert board.read(0).threads == ()


def test_thread_writers_only_once_and_claim_forgets_them(board):
    board.claim(0, 1, 1)
    w = board.writer(0)
    t = w.thread_writers(scoreboard.THREADS_MAX)
    t[-1].request_finished(200, 1, 0.0)
    with pytest.raises(RuntimeError):
        w.thread_writers(2)
    assert board.read(0).requests == 1 and board.read(0).thread_count == scoreboard.THREADS_MAX
    board.claim(0, 2, 2)
    v = board.read(0)
    assert v.threads == () and v.requests == 0
    # The next worker's records start at zero, whatever the previous one left.
    t = board.writer(0).thread_writers(scoreboard.THREADS_MAX)
    assert board.read(0).requests == 0 and board.read(0).busy_threads == 0


def test_counters_stay_exact_with_threads_writing_at_once(board):
    import threading
    board.claim(0, 1, 1)
    writers = board.writer(0).thread_writers(8)
    per_thread = 3000

    def serve(t):
        for i in range(per_thread):
            t.request_started("GET", f"/{i}")
            t.request_finished(200 + 100 * (i % 4), 2, 0.02)

    threads = [threading.Thread(target=serve, args=(t,)) for t in writers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    v = board.read(0)
    total = 8 * per_thread
    assert (v.requests, v.bytes_sent) == (total, 2 * total)
    assert v.status_counts == (0, total // 4, total // 4, total // 4, total // 4)
    assert v.duration_buckets[2] == total and v.duration_sum == pytest.approx(0.02 * total)


def test_a_stuck_worker_with_many_threads_costs_one_give_up(board):
    board.claim(0, 1, 1)
    board.writer(0).thread_writers(scoreboard.THREADS_MAX)
    base = scoreboard._OFF_THREADS  # slot 0
    for n in range(scoreboard.THREADS_MAX):  # every record left mid-update, and the block
        off = base + n * scoreboard.RECORD_SIZE
        struct.pack_into("=Q", board._mm, off, struct.unpack_from("=Q", board._mm, off)[0] + 1)
    struct.pack_into("=Q", board._mm, 0, struct.unpack_from("=Q", board._mm, 0)[0] + 1)
    start = time.monotonic()
    v = board.read(0)
    assert time.monotonic() - start < 0.5
    assert v.thread_count == scoreboard.THREADS_MAX


# --- handoff counters -------------------------------------------------------------------------

def test_handoff_counters(board):
    board.claim(0, 1, 1)
    w = board.writer(0)
    w.handoff_sent()
    w.handoff_sent(2)
    w.handoff_adopted(0.0005)  # inclusive upper bound
    w.handoff_adopted(0.003)
    w.handoff_adopted(9.0)
    v = board.read(0)
    assert (v.handoffs_sent, v.handoffs_adopted) == (3, 3)
    bounds = scoreboard.HANDOFF_WAIT_BUCKETS
    assert v.handoff_wait_buckets[0] == 1
    assert v.handoff_wait_buckets[bounds.index(0.005)] == 1
    assert v.handoff_wait_buckets[-1] == 1 and sum(v.handoff_wait_buckets) == 3
    assert v.handoff_wait_sum == pytest.approx(9.0035)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError):
            w.handoff_adopted(bad)
    with pytest.raises(ValueError):
        w.handoff_sent(-1)
    assert board.read(0).handoffs_adopted == 3
    board.claim(0, 2, 2)
    v = board.read(0)
    assert (v.handoffs_sent, v.handoffs_adopted, sum(v.handoff_wait_buckets)) == (0, 0, 0)


def test_handoff_counters_are_exact_from_several_threads(board):
    import threading
    board.claim(0, 1, 1)
    w = board.writer(0)

    def work():
        for _ in range(2000):
            w.handoff_sent()
            w.handoff_adopted(0.001)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    v = board.read(0)
    assert (v.handoffs_sent, v.handoffs_adopted) == (8000, 8000)
    assert v.handoff_wait_buckets[1] == 8000


def _thread_consistent(t) -> bool:
    # The child's threads keep: requests == bytes_sent, and a running request names the count.
    if t.state is scoreboard.ThreadState.BUSY:
        return t.path == f"/{t.requests}" and t.request_start > 0
    return t.path == "" and t.request_start == 0.0


def test_parent_never_sees_a_torn_thread_record_while_child_threads_write():
    """Four threads in a forked child hammer their records; the parent checks each record and
    the sums (requests == bytes, every request in one bucket) on every read."""
    import threading
    board = Scoreboard(1)
    board.claim(0, 0, 1)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(ready_r)
            writers = board.writer(0).thread_writers(4)
            deadline = time.monotonic() + 2.0

            def hammer(t):
                n = 0
                while time.monotonic() < deadline:
                    t.request_started("GET", f"/{n}")
                    t.request_finished(200, 1, HAMMER_DURATION)
                    n += 1

            threads = [threading.Thread(target=hammer, args=(t,)) for t in writers]
            for thread in threads:
                thread.start()
            os.write(ready_w, b"x")
            for thread in threads:
                thread.join()
            code = 0
        finally:
            os._exit(code)
    os.close(ready_w)
    try:
        os.read(ready_r, 1)
        os.close(ready_r)
        torn, progress, reads = [], set(), 0
        start = time.monotonic()
        while (reads < 3000 or len(progress) < 50) and time.monotonic() - start < 1.5:
            v = board.read(0)
            reads += 1
            ok = (len(v.threads) == 4 and all(map(_thread_consistent, v.threads))
                  and v.requests == v.bytes_sent == v.status_counts[1]
                  and v.duration_buckets[HAMMER_BUCKET] == v.requests)
            if not ok:
                torn.append(v)
            progress.add(v.requests)
        assert not torn, torn[:2]
        assert len(progress) >= 50, "the child made no visible progress"
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        board.close()
