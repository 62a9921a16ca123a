"""The shared scoreboard: one fixed-size slot per worker in an anonymous shared mmap.

Apache's scoreboard is the model. The master creates the mapping before the first fork, so every
worker inherits the same pages. The master claims a slot (identity, generation, BOOTING) before
forking; from then on only that worker writes the slot and the master only reads it, until the
worker has been reaped and the master releases the slot.

Worker writes sit on the per-request hot path, so they are plain stores into shared memory:
no syscalls, no locks, no pickling. Consistency comes from a per-slot sequence counter (a
seqlock): the writer makes it odd, writes the fields, then makes it even again; the reader copies
the slot only between two identical even readings. A writer that dies or is stopped in the middle
of an update would leave the counter odd forever, so the reader gives up after a bounded effort
and returns its last copy rather than hanging the master.

The sequence counter itself is read and written through a memoryview of native u64s, never with
struct: CPython's struct.pack_into zero-fills its target and then stores it a byte at a time, so
a reader could catch the counter at 0 (even) in the middle of a write and accept a torn slot. A
memoryview item is one aligned 8-byte load or store, which x86-64 performs atomically.

Ordering note: the protocol relies on stores becoming visible in program order, which x86-64
guarantees. Python offers no memory barriers, so on weakly ordered CPUs a read could in theory
mix two updates; the scoreboard only feeds monitoring and timeouts, where that is tolerable.

Layout of a slot (native byte order, explicit padding, 320 bytes = five cache lines, so two
workers never write the same line):

    off  field           written by
      0  seq      u64    whoever writes (seqlock counter)
      8  pid      i32    master (claim), worker (set_pid)
     12  generation u32  master (claim)
     16  booted_at f64   master (claim)
     24  connections u32 worker
     28  reason   u8     worker
     29  state    u8     worker  --.
     32  heartbeat f64   worker    |  the "dynamic block": everything a request
     40  requests u64    worker    |  start or finish changes, contiguous so that
     48  bytes_sent u64  worker    |  one pack_into writes it
     56  request_start f64 worker  |
     64  request_line 80s worker   |
    144  status_counts 5*u64 worker  |
    184  duration_sum f64 worker    |
    192  duration_buckets 12*u64 worker-'
    288  (padding)

The duration histogram keeps one plain (non-cumulative) counter per bucket of DURATION_BUCKETS;
the renderer accumulates them. Its counters are 64-bit like the others: at ten thousand requests
a second, a 32-bit bucket of one long-lived worker would wrap within a week.
"""

from __future__ import annotations

import bisect
import enum
import mmap
import struct
import time
from dataclasses import dataclass

__all__ = [
    "DURATION_BUCKETS",
    "LINE_MAX",
    "SLOT_SIZE",
    "Reason",
    "Scoreboard",
    "SlotView",
    "SlotWriter",
    "State",
]


class State(enum.IntEnum):
    """What a worker is doing; stored as one byte in its slot."""

    EMPTY = 0  # slot unused
    BOOTING = 1  # claimed by the master, worker not ready yet
    IDLE = 2  # ready, no open connection
    BUSY = 3  # running the application
    KEEPALIVE = 4  # only parked idle keep-alive connections
    EXITING = 5  # draining or shutting down


class Reason(enum.IntEnum):
    """Why a worker was retired; recorded alongside EXITING."""

    NONE = 0
    REQUESTS = 1
    MEMORY = 2
    LIFETIME = 3
    TIMEOUT = 4
    CRASH = 5
    OOM = 6
    RELOAD = 7
    SHUTDOWN = 8
    SCALE = 9


LINE_MAX = 80  # bytes of the request line kept for /status
_STATUS_CLASSES = 5

# Upper bounds (seconds, inclusive, as Prometheus' "le") of the request-duration histogram; a
# last, implicit bucket takes everything slower (+Inf). Fixed, because they are part of the slot
# layout shared between processes.
DURATION_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"),
)
_FINITE_BOUNDS = DURATION_BUCKETS[:-1]
_BUCKETS = len(DURATION_BUCKETS)

_SEQ = struct.Struct("=Q")  # only to lay out whole slots; the live counter goes through _seq_words
_PID = struct.Struct("=i")
_IDENT = struct.Struct("=iId")  # pid, generation, booted_at
_CONNECTIONS = struct.Struct("=I")
_STATE_REASON = struct.Struct("=BB2xd")  # reason, state, heartbeat (starts at the reason byte)
_HEARTBEAT = struct.Struct("=d")
# A request start changes only the block up to the request line; a finish changes all of it.
_STARTED = struct.Struct(f"=B2xdQQd{LINE_MAX}s")
_DYNAMIC = struct.Struct(f"=B2xdQQd{LINE_MAX}s{_STATUS_CLASSES}Qd{_BUCKETS}Q")
_SLOT = struct.Struct(f"=QiIdIBB2xdQQd{LINE_MAX}s{_STATUS_CLASSES}Qd{_BUCKETS}Q32x")

SLOT_SIZE = _SLOT.size

_OFF_SEQ = 0
_OFF_PID = 8
_OFF_IDENT = 8
_OFF_CONNECTIONS = 24
_OFF_REASON = 28
_OFF_STATE = 29
_OFF_HEARTBEAT = 32

# The layout above is a contract between processes; refuse to run with a mismatched one rather
# than corrupt neighbouring fields (checked once at import, not with assert, so -O keeps it).
# request_finished() also spells out the twelve buckets, for speed.
if SLOT_SIZE != 320 or _OFF_STATE + _DYNAMIC.size != 288 or _BUCKETS != 12:
    raise ImportError(f"scoreboard slot layout is inconsistent ({SLOT_SIZE} bytes)")

def _seq_words(mm: mmap.mmap) -> memoryview:
    """The mapping as native u64s; slot i's sequence counter is item i * SLOT_SIZE // 8."""
    raw = memoryview(mm)
    try:
        return raw.cast("Q")
    finally:
        raw.release()  # the cast view keeps the buffer; only it has to be released on close


# status_counts, duration_sum and duration_buckets of a fresh slot.
_ZERO_COUNTERS = (0,) * _STATUS_CLASSES + (0.0,) + (0,) * _BUCKETS

# Reader effort before concluding that a writer is stuck mid-update: a few plain spins (an update
# takes well under a microsecond), then short sleeps, so that a writer the scheduler preempted in
# the middle of an update (a busy machine can keep it off the CPU for milliseconds) gets to
# finish. Bounded so a SIGSTOPped or killed worker costs the master a moment, not a hang.
_FAST_SPINS = 64
_PAUSE = 0.0001
_STUCK_AFTER = 0.05


@dataclass(frozen=True)
class SlotView:
    """A consistent snapshot of one slot. Times are time.monotonic() values; 0 means none."""

    index: int
    pid: int
    generation: int
    state: State
    reason: Reason
    requests: int
    bytes_sent: int
    connections: int
    booted_at: float
    heartbeat: float
    request_start: float
    request_line: str
    status_counts: tuple[int, int, int, int, int]
    duration_buckets: tuple[int, ...] = (0,) * _BUCKETS  # per bucket of DURATION_BUCKETS
    duration_sum: float = 0.0  # seconds, over every request counted in duration_buckets


def _decode_line(raw: bytes) -> str:
    # The line is NUL-terminated rather than length-prefixed so that clearing it is part of the
    # same write as the other fields; request lines cannot contain NUL (the parser rejects it).
    return raw.partition(b"\0")[0].decode("latin-1")


def _view(index: int, raw: bytes) -> SlotView:
    fields = _SLOT.unpack(raw)
    (_seq, pid, generation, booted_at, connections, reason, state, heartbeat, requests,
     bytes_sent, request_start, line, c1, c2, c3, c4, c5, duration_sum) = fields[:18]
    return SlotView(
        index=index,
        pid=pid,
        generation=generation,
        state=State(state),
        reason=Reason(reason),
        requests=requests,
        bytes_sent=bytes_sent,
        connections=connections,
        booted_at=booted_at,
        heartbeat=heartbeat,
        request_start=request_start,
        request_line=_decode_line(line),
        status_counts=(c1, c2, c3, c4, c5),
        duration_buckets=fields[18:],
        duration_sum=duration_sum,
    )


class Scoreboard:
    """The master's handle on the shared slots; create it before the first fork."""

    def __init__(self, capacity: int) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise ValueError(f"scoreboard capacity must be a positive integer, not {capacity!r}")
        self.capacity = capacity
        # MAP_SHARED is what makes the pages common to the master and every forked worker;
        # an anonymous mapping starts zeroed, i.e. every slot EMPTY with an even sequence.
        self._mm = mmap.mmap(-1, capacity * SLOT_SIZE, flags=mmap.MAP_SHARED)
        self._seqs = _seq_words(self._mm)

    def _offset(self, index: int) -> int:
        if not 0 <= index < self.capacity:
            raise IndexError(f"scoreboard slot {index} out of range 0..{self.capacity - 1}")
        return index * SLOT_SIZE

    def _rewrite(self, off: int, fields: tuple) -> None:
        # Master-side whole-slot write. No worker writes this slot at that moment (not forked
        # yet, or already reaped), but bracketing it keeps the invariant "even = stable" true
        # for any reader, and moving past a stuck odd value repairs a slot whose writer died.
        seqs, word = self._seqs, off >> 3
        seq = (seqs[word] | 1) + 1
        seqs[word] = seq - 1
        _SLOT.pack_into(self._mm, off, seq - 1, *fields)
        seqs[word] = seq

    def claim(self, index: int, pid: int, generation: int) -> None:
        """Reset a slot for a worker about to be forked.

        The pid may be 0 when it is not known yet; the worker writes its own with set_pid().
        booted_at and heartbeat start at the claim, so a worker that never reports in still
        ages and can be timed out.
        """
        off = self._offset(index)
        now = time.monotonic()
        self._rewrite(off, (pid, generation, now, 0, Reason.NONE, State.BOOTING, now,
                            0, 0, 0.0, b"", *_ZERO_COUNTERS))

    def release(self, index: int) -> None:
        """Return a slot to EMPTY once its worker has been reaped."""
        off = self._offset(index)
        self._rewrite(off, (0, 0, 0.0, 0, Reason.NONE, State.EMPTY, 0.0,
                            0, 0, 0.0, b"", *_ZERO_COUNTERS))

    def free_index(self) -> int | None:
        """The lowest EMPTY slot, or None when every slot is in use."""
        mm = self._mm
        for index in range(self.capacity):
            if mm[index * SLOT_SIZE + _OFF_STATE] == State.EMPTY:
                return index
        return None

    def read(self, index: int) -> SlotView:
        """A consistent snapshot of one slot (best effort if its writer is stuck mid-update)."""
        off = self._offset(index)
        mm, seqs, word = self._mm, self._seqs, off >> 3
        end = off + SLOT_SIZE
        spins = 0
        give_up = 0.0
        while True:
            before = seqs[word]
            if not before & 1:
                raw = mm[off:end]
                if seqs[word] == before:
                    return _view(index, raw)
            spins += 1
            if spins > _FAST_SPINS:
                now = time.monotonic()
                if not give_up:
                    give_up = now + _STUCK_AFTER
                elif now >= give_up:
                    break
                time.sleep(_PAUSE)
        # No update finished for _STUCK_AFTER seconds: the writer is stopped or dead. The request
        # updates copy a prepared block over the old one (see SlotWriter), so each field of a
        # plain copy holds either its old or its new value, never a zero-filled placeholder.
        return _view(index, mm[off:end])

    def slots(self) -> list[SlotView]:
        """Snapshots of every slot in use (not EMPTY), in index order."""
        mm = self._mm
        return [
            self.read(index)
            for index in range(self.capacity)
            if mm[index * SLOT_SIZE + _OFF_STATE] != State.EMPTY
        ]

    def writer(self, index: int) -> SlotWriter:
        """The worker's write handle on its own slot; create it in the child after fork."""
        return SlotWriter(self._mm, self._seqs, self._offset(index), self.read(index))

    def close(self) -> None:
        """Unmap this process's view; other processes keep theirs. Writers of it stop working."""
        self._seqs.release()  # the mapping cannot be closed while a view of it exists
        self._mm.close()


class SlotWriter:
    """A worker's writer for its own slot.

    Each method is one seqlock-bracketed update. The writer keeps shadow copies of its counters
    (only it writes them while it lives), so they are incremented without reading shared memory
    back, and a request start or finish is a single pack_into over the contiguous dynamic block
    instead of one call per field.
    """

    __slots__ = ("_buckets", "_bytes", "_counts", "_duration_sum", "_dynamic", "_dynamic_end",
                 "_mm", "_off", "_requests", "_seq", "_seqs", "_started", "_started_end",
                 "_state_off", "_word")

    def __init__(self, mm: mmap.mmap, seqs: memoryview, offset: int, current: SlotView) -> None:
        self._mm = mm
        self._seqs = seqs
        self._off = offset
        self._word = offset >> 3
        # Request updates are packed here, then copied into the slot in one piece: pack_into
        # zero-fills its target before writing it, and a worker killed halfway through that
        # would leave zeroed counters for the master to fold into the totals.
        self._state_off = offset + _OFF_STATE
        self._started = bytearray(_STARTED.size)
        self._started_end = self._state_off + _STARTED.size
        self._dynamic = bytearray(_DYNAMIC.size)
        self._dynamic_end = self._state_off + _DYNAMIC.size
        self._seq = (seqs[self._word] | 1) + 1  # resume from an even value if left odd
        seqs[self._word] = self._seq
        self._requests = current.requests
        self._bytes = current.bytes_sent
        self._counts = list(current.status_counts)
        self._buckets = list(current.duration_buckets)
        self._duration_sum = current.duration_sum

    # Every update is: seq odd, payload, seq even. The even write sits in `finally` so that an
    # exception in between (a signal handler raising, a bad argument) cannot leave the slot
    # looking mid-update forever; `try` costs nothing on the normal path in 3.11. The pattern is
    # written out in each method rather than factored into a helper taking a callable, because
    # this runs twice per request.

    def set_pid(self, pid: int) -> None:
        """The child records its own pid; the master may not have known it at claim time."""
        mm, off, seqs, word = self._mm, self._off, self._seqs, self._word
        seq = self._seq + 1
        self._seq = seq + 1
        try:
            seqs[word] = seq
            _PID.pack_into(mm, off + _OFF_PID, pid)
        finally:
            seqs[word] = seq + 1

    def set_state(self, state: State, reason: Reason = Reason.NONE) -> None:
        """Change state (and retirement reason); a state change is also a sign of life."""
        now = time.monotonic()
        mm, off, seqs, word = self._mm, self._off, self._seqs, self._word
        seq = self._seq + 1
        self._seq = seq + 1
        try:
            seqs[word] = seq
            _STATE_REASON.pack_into(mm, off + _OFF_REASON, reason, state, now)
        finally:
            seqs[word] = seq + 1

    def heartbeat(self) -> None:
        """Tell the master this worker's loop is still turning."""
        now = time.monotonic()
        mm, off, seqs, word = self._mm, self._off, self._seqs, self._word
        seq = self._seq + 1
        self._seq = seq + 1
        try:
            seqs[word] = seq
            _HEARTBEAT.pack_into(mm, off + _OFF_HEARTBEAT, now)
        finally:
            seqs[word] = seq + 1

    def request_started(self, request_line: bytes) -> None:
        """Mark the worker BUSY with this request (line truncated to LINE_MAX bytes).

        Also refreshes the heartbeat: starting a request is a sign of life.
        """
        now = time.monotonic()
        mm, seqs, word = self._mm, self._seqs, self._word
        seq = self._seq + 1
        self._seq = seq + 1
        try:
            seqs[word] = seq
            # "80s" truncates longer lines and NUL-pads shorter ones by itself.
            block = self._started
            _STARTED.pack_into(block, 0, State.BUSY, now, self._requests, self._bytes, now,
                               request_line)
            mm[self._state_off:self._started_end] = block
        finally:
            seqs[word] = seq + 1

    def request_finished(self, status: int, bytes_sent: int, state: State,
                         duration: float = 0.0) -> None:
        """Count a finished response that took `duration` seconds; return to `state`.

        `state` is IDLE or KEEPALIVE. A status outside 100..599 is counted as a request but in
        no status class. Every request lands in exactly one duration bucket.
        """
        if bytes_sent < 0:
            raise ValueError(f"bytes_sent must not be negative, not {bytes_sent}")
        if not duration >= 0.0:  # also refuses NaN, which would poison the sum for good
            raise ValueError(f"duration must be a number of seconds >= 0, not {duration}")
        now = time.monotonic()
        c = self._counts
        klass = status // 100 - 1
        if 0 <= klass < _STATUS_CLASSES:
            c[klass] += 1
        b = self._buckets
        # bisect_left finds the first bound >= duration: Prometheus buckets are inclusive.
        b[bisect.bisect_left(_FINITE_BOUNDS, duration)] += 1
        duration_sum = self._duration_sum + duration
        self._duration_sum = duration_sum
        requests = self._requests + 1
        total = self._bytes + bytes_sent
        self._requests = requests
        self._bytes = total
        mm, seqs, word = self._mm, self._seqs, self._word
        seq = self._seq + 1
        self._seq = seq + 1
        try:
            seqs[word] = seq
            block = self._dynamic
            _DYNAMIC.pack_into(block, 0, state, now, requests, total, 0.0, b"",
                               c[0], c[1], c[2], c[3], c[4], duration_sum,
                               b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10],
                               b[11])
            mm[self._state_off:self._dynamic_end] = block
        finally:
            seqs[word] = seq + 1

    def set_connections(self, n: int) -> None:
        """Record how many client connections this worker holds open."""
        mm, off, seqs, word = self._mm, self._off, self._seqs, self._word
        seq = self._seq + 1
        self._seq = seq + 1
        try:
            seqs[word] = seq
            _CONNECTIONS.pack_into(mm, off + _OFF_CONNECTIONS, n)
        finally:
            seqs[word] = seq + 1
