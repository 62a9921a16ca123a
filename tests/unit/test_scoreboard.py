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
    seq = scoreboard._SEQ.unpack_from(board._mm, 0)[0]
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
    seq = scoreboard._SEQ.unpack_from(board._mm, 0)[0]
    scoreboard._SEQ.pack_into(board._mm, 0, seq + 1)
    start = time.monotonic()
    v = board.read(0)
    assert time.monotonic() - start < 1.0
    assert v.pid == 1 and v.state is State.BOOTING
    # The master's next claim repairs the slot.
    board.claim(0, 2, 2)
    assert scoreboard._SEQ.unpack_from(board._mm, 0)[0] % 2 == 0


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
