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

Layout of a slot (native byte order, explicit padding). The first 320 bytes (five cache lines)
are the worker's own block, written by its main thread; it holds the request record of a
single-threaded worker, so that path costs what it always did. Then come the handoff counters,
then one record per application thread of a threaded worker:

    off  field           written by
      0  seq      u64    whoever writes the block (seqlock counter)
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
    288  records  u32    worker (thread_writers), master (claim: 0 = single-threaded)
    292  (padding)
    320  handoff block, 128 bytes, its own seq (see below)
    448  THREADS_MAX thread records of RECORD_SIZE bytes, each with its own seq

Handoff block (written under a lock inside the worker: the threads that hand connections over
and the thread that adopts them are not always the same one, and a handoff is rare next to a
request, so an uncontended lock costs nothing that matters; the seqlock still guards the reader):

      0  seq u64, 8 sent u64, 16 adopted u64, 24 wait_sum f64, 32 wait_buckets 11*u64, 120 pad

Thread record (256 bytes, four cache lines, so two threads never write the same line). One
writer: the application thread that owns it. Its counters are that thread's own; the reader sums
the records (no shared counter, so no lock and no atomic increment, which Python cannot do on
shared memory anyway):

      0  seq u64
      8  state u8 (ThreadState), 7 pad
     16  request_start f64
     24  request 72s     "METHOD /path", the path without its query string, NUL-padded
     96  requests u64, 104 bytes_sent u64, 112 status_counts 5*u64, 152 duration_sum f64,
    160  duration_buckets 12*u64

THREADS_MAX is fixed (64): the mapping is made once, before the first fork, and a reload may
raise `threads` without a new one. Pages of records that no worker uses are never touched, so
the room costs address space, not memory.

The duration histogram keeps one plain (non-cumulative) counter per bucket of DURATION_BUCKETS;
the renderer accumulates them. Its counters are 64-bit like the others: at ten thousand requests
a second, a 32-bit bucket of one long-lived worker would wrap within a week.
"""

from __future__ import annotations

import bisect
import enum
import mmap
import struct
import threading
import time
from dataclasses import dataclass

__all__ = [
    "DURATION_BUCKETS",
    "HANDOFF_WAIT_BUCKETS",
    "LINE_MAX",
    "RECORD_LINE_MAX",
    "SLOT_SIZE",
    "THREADS_MAX",
    "Reason",
    "Scoreboard",
    "SlotView",
    "SlotWriter",
    "State",
    "ThreadState",
    "ThreadView",
    "ThreadWriter",
]


class State(enum.IntEnum):
    """What a worker is doing; stored as one byte in its slot."""

    EMPTY = 0  # slot unused
    BOOTING = 1  # claimed by the master, worker not ready yet
    IDLE = 2  # ready, no open connection
    BUSY = 3  # running the application
    KEEPALIVE = 4  # only parked idle keep-alive connections
    EXITING = 5  # draining or shutting down


class ThreadState(enum.IntEnum):
    """What one application thread of a threaded worker is doing; one byte in its record."""

    IDLE = 0  # waiting for a request (also: a record nobody has used yet)
    BUSY = 1  # running a request: the app, its body, its response


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
    REFORK = 10  # replaced by a child of the mold (refork_after)


LINE_MAX = 80  # bytes of the request line kept for /status
RECORD_LINE_MAX = 72  # bytes of "METHOD /path" kept in a thread record
THREADS_MAX = 64  # thread records per slot: the most threads a worker can report
_STATUS_CLASSES = 5

# Upper bounds (seconds, inclusive, as Prometheus' "le") of the request-duration histogram; a
# last, implicit bucket takes everything slower (+Inf). Fixed, because they are part of the slot
# layout shared between processes.
DURATION_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"),
)
_FINITE_BOUNDS = DURATION_BUCKETS[:-1]
_BUCKETS = len(DURATION_BUCKETS)
# The handoff wait: from a connection being ready to its adopter serving it; a good one is well
# under a millisecond, a bad one is a request that waited behind another.
HANDOFF_WAIT_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, float("inf"),
)
_HANDOFF_BOUNDS = HANDOFF_WAIT_BUCKETS[:-1]
_HANDOFF_BUCKETS = len(HANDOFF_WAIT_BUCKETS)

_PID = struct.Struct("=i")
_CONNECTIONS = struct.Struct("=I")
_STATE_REASON = struct.Struct("=BB2xd")  # reason, state, heartbeat (starts at the reason byte)
_HEARTBEAT = struct.Struct("=d")
_RECORDS = struct.Struct("=I")
# A request start changes only the block up to the request line; a finish changes all of it.
_STARTED = struct.Struct(f"=B2xdQQd{LINE_MAX}s")
_DYNAMIC = struct.Struct(f"=B2xdQQd{LINE_MAX}s{_STATUS_CLASSES}Qd{_BUCKETS}Q")
_MAIN = struct.Struct(f"=QiIdIBB2xdQQd{LINE_MAX}s{_STATUS_CLASSES}Qd{_BUCKETS}QI28x")
# The handoff block after its seq: sent, adopted, wait_sum, wait buckets.
_HANDOFF = struct.Struct(f"=QQd{_HANDOFF_BUCKETS}Q")
_HANDOFF_SIZE = 128
# A thread record after its seq: a start changes state..request; a finish changes it all.
_THREAD_STARTED = struct.Struct(f"=B7xd{RECORD_LINE_MAX}s")
_THREAD = struct.Struct(f"=B7xd{RECORD_LINE_MAX}sQQ{_STATUS_CLASSES}Qd{_BUCKETS}Q")
RECORD_SIZE = 8 + _THREAD.size
# Bound methods and plain ints for the two per-request writes (no attribute or Enum lookups).
_pack_started = _STARTED.pack_into
_pack_dynamic = _DYNAMIC.pack_into
_bisect_left = bisect.bisect_left
_BUSY = int(State.BUSY)

_OFF_PID = 8
_OFF_CONNECTIONS = 24
_OFF_REASON = 28
_OFF_STATE = 29
_OFF_HEARTBEAT = 32
_OFF_RECORDS = 288
_OFF_HANDOFF = _MAIN.size
_OFF_THREADS = _OFF_HANDOFF + _HANDOFF_SIZE

SLOT_SIZE = _OFF_THREADS + THREADS_MAX * RECORD_SIZE

# The layout above is a contract between processes; refuse to run with a mismatched one rather
# than corrupt neighbouring fields (checked once at import, not with assert, so -O keeps it).
# request_finished() also spells out the twelve buckets, for speed.
if (_MAIN.size != 320 or _OFF_STATE + _DYNAMIC.size != _OFF_RECORDS or _BUCKETS != 12
        or 8 + _HANDOFF.size > _HANDOFF_SIZE or RECORD_SIZE != 256):
    raise ImportError(f"scoreboard slot layout is inconsistent ({SLOT_SIZE} bytes)")


def _seq_words(mm: mmap.mmap) -> memoryview:
    """The mapping as native u64s; the seq at byte offset o is item o // 8."""
    raw = memoryview(mm)
    try:
        return raw.cast("Q")
    finally:
        raw.release()  # the cast view keeps the buffer; only it has to be released on close


# status_counts, duration_sum and duration_buckets of a fresh slot.
_ZERO_COUNTERS = (0,) * _STATUS_CLASSES + (0.0,) + (0,) * _BUCKETS
_ZERO_HANDOFF = bytes(_HANDOFF_SIZE - 8)
_ZERO_RECORD = bytes(RECORD_SIZE - 8)

# Reader effort before concluding that a writer is stuck mid-update: a few plain spins (an update
# takes well under a microsecond), then short sleeps, so that a writer the scheduler preempted in
# the middle of an update (a busy machine can keep it off the CPU for milliseconds) gets to
# finish. Bounded so a SIGSTOPped or killed worker costs the master a moment, not a hang; once
# one part of a slot gave up, the other parts of the same read only spin.
_FAST_SPINS = 64
_PAUSE = 0.0001
_STUCK_AFTER = 0.05


@dataclass(frozen=True)
class ThreadView:
    """One application thread of a threaded worker, as its record says."""

    number: int  # 0 .. threads - 1
    state: ThreadState
    request_start: float  # time.monotonic() of the running request's start; 0 when none
    method: str
    path: str  # without the query string, at most RECORD_LINE_MAX bytes with the method
    requests: int  # finished by this thread


@dataclass(frozen=True)
class SlotView:
    """A consistent snapshot of one slot. Times are time.monotonic() values; 0 means none.

    The counters are the worker's: for a threaded worker, the sum over its threads. For a
    threaded worker ``state`` is BUSY while any thread runs a request (unless the worker is
    booting or exiting), and ``request_start`` and ``request_line`` are those of the oldest
    running request, so that timeouts read one slot the same way whatever ``threads`` is.
    """

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
    threads: tuple[ThreadView, ...] = ()  # empty for a single-threaded worker
    handoffs_sent: int = 0  # connections this worker passed to another
    handoffs_adopted: int = 0  # connections it took over from another
    handoff_wait_buckets: tuple[int, ...] = (0,) * _HANDOFF_BUCKETS  # of HANDOFF_WAIT_BUCKETS
    handoff_wait_sum: float = 0.0

    @property
    def thread_count(self) -> int:
        """Threads that run requests: 1 for a single-threaded worker."""
        return len(self.threads) or 1

    @property
    def busy_threads(self) -> int:
        """Requests this worker runs right now."""
        if self.threads:
            return sum(1 for t in self.threads if t.state is ThreadState.BUSY)
        return 1 if self.state is State.BUSY else 0


def _decode_line(raw: bytes) -> str:
    # The line is NUL-terminated rather than length-prefixed so that clearing it is part of the
    # same write as the other fields; request lines cannot contain NUL (the parser rejects it).
    return raw.partition(b"\0")[0].decode("latin-1")


def _thread_view(number: int, raw: bytes) -> tuple[ThreadView, tuple]:
    """A record's view and its counters (requests, bytes, 5 status classes, sum, buckets)."""
    fields = _THREAD.unpack_from(raw, 8)
    state, start, line = fields[:3]
    method, _, path = _decode_line(line).partition(" ")
    view = ThreadView(number, ThreadState(state) if state in (0, 1) else ThreadState.IDLE,
                      start, method, path, fields[3])
    return view, fields[3:]


def _view(index: int, main: bytes, handoff: bytes, records: list[bytes]) -> SlotView:
    fields = _MAIN.unpack(main)
    (_seq, pid, generation, booted_at, connections, reason, state, heartbeat, requests,
     bytes_sent, request_start, line, c1, c2, c3, c4, c5, duration_sum) = fields[:18]
    counts = [c1, c2, c3, c4, c5]
    buckets = list(fields[18:18 + _BUCKETS])
    state = State(state)
    line = _decode_line(line)
    threads = []
    oldest = None
    for number, raw in enumerate(records):
        thread, counters = _thread_view(number, raw)
        threads.append(thread)
        requests += counters[0]
        bytes_sent += counters[1]
        for i in range(_STATUS_CLASSES):
            counts[i] += counters[2 + i]
        duration_sum += counters[2 + _STATUS_CLASSES]
        for i, count in enumerate(counters[3 + _STATUS_CLASSES:]):
            buckets[i] += count
        if thread.state is ThreadState.BUSY and (oldest is None
                                                 or thread.request_start < oldest.request_start):
            oldest = thread
    if oldest is not None and state in (State.IDLE, State.KEEPALIVE, State.BUSY):
        state = State.BUSY
        request_start, line = oldest.request_start, f"{oldest.method} {oldest.path}"
    elif threads:
        request_start, line = 0.0, ""
    sent, adopted, wait_sum, *wait_buckets = _HANDOFF.unpack_from(handoff, 8)
    return SlotView(index, pid, generation, state, Reason(reason), requests, bytes_sent,
                    connections, booted_at, heartbeat, request_start, line, tuple(counts),
                    tuple(buckets), duration_sum, tuple(threads), sent, adopted,
                    tuple(wait_buckets), wait_sum)


class _Seqlock:
    """Seqlock-bracketed writes and torn-free copies of one part of the mapping."""

    __slots__ = ("mm", "seqs")

    def __init__(self, mm: mmap.mmap, seqs: memoryview) -> None:
        self.mm = mm
        self.seqs = seqs

    def rewrite(self, off: int, data: bytes) -> None:
        """Replace the part at ``off`` (whose first 8 bytes are its seq) with ``data``.

        Used by one writer at a time. Moving past a stuck odd value repairs a part whose
        writer died mid-update."""
        seqs, word = self.seqs, off >> 3
        seq = (seqs[word] | 1) + 1
        seqs[word] = seq - 1
        try:
            self.mm[off + 8:off + 8 + len(data)] = data
        finally:
            seqs[word] = seq

    def copy(self, off: int, size: int, patient: bool) -> tuple[bytes, bool]:
        """(a consistent copy of the part, whether it was consistent). Impatient: spins only."""
        mm, seqs, word = self.mm, self.seqs, off >> 3
        end = off + size
        spins = 0
        give_up = 0.0
        while True:
            before = seqs[word]
            if not before & 1:
                raw = mm[off:end]
                if seqs[word] == before:
                    return raw, True
            spins += 1
            if spins > _FAST_SPINS:
                if not patient:
                    break
                now = time.monotonic()
                if not give_up:
                    give_up = now + _STUCK_AFTER
                elif now >= give_up:
                    break
                time.sleep(_PAUSE)
        # No update finished in time: the writer is stopped or dead. Updates copy a prepared
        # block over the old one (see SlotWriter), so each field of a plain copy holds either its
        # old or its new value, never a zero-filled placeholder.
        return mm[off:end], False


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
        self._lock = _Seqlock(self._mm, self._seqs)

    def _offset(self, index: int) -> int:
        if not 0 <= index < self.capacity:
            raise IndexError(f"scoreboard slot {index} out of range 0..{self.capacity - 1}")
        return index * SLOT_SIZE

    def _reset(self, off: int, main: tuple) -> None:
        # Master-side write of the worker's block and its handoff counters. No worker writes this
        # slot at that moment (not forked yet, or already reaped). Thread records are reset by
        # the worker that uses them (SlotWriter.thread_writers), before it says it has any.
        self._lock.rewrite(off, _MAIN.pack(0, *main)[8:])
        self._lock.rewrite(off + _OFF_HANDOFF, _ZERO_HANDOFF)

    def claim(self, index: int, pid: int, generation: int) -> None:
        """Reset a slot for a worker about to be forked.

        The pid may be 0 when it is not known yet; the worker writes its own with set_pid().
        booted_at and heartbeat start at the claim, so a worker that never reports in still
        ages and can be timed out.
        """
        off = self._offset(index)
        now = time.monotonic()
        self._reset(off, (pid, generation, now, 0, Reason.NONE, State.BOOTING, now,
                          0, 0, 0.0, b"", *_ZERO_COUNTERS, 0))

    def release(self, index: int) -> None:
        """Return a slot to EMPTY once its worker has been reaped."""
        off = self._offset(index)
        self._reset(off, (0, 0, 0.0, 0, Reason.NONE, State.EMPTY, 0.0,
                          0, 0, 0.0, b"", *_ZERO_COUNTERS, 0))

    def free_index(self) -> int | None:
        """The lowest EMPTY slot, or None when every slot is in use."""
        mm = self._mm
        for index in range(self.capacity):
            if mm[index * SLOT_SIZE + _OFF_STATE] == State.EMPTY:
                return index
        return None

    def read(self, index: int) -> SlotView:
        """A consistent snapshot of one slot (best effort if its writer is stuck mid-update).

        Each part (the worker's block, the handoff counters, each thread record) is consistent
        in itself; the counters summed over parts are each at least what they were at the start
        of the read and at most what they are at its end."""
        return self._read(index, with_threads=True)

    def _read(self, index: int, with_threads: bool) -> SlotView:
        off = self._offset(index)
        lock = self._lock
        main, patient = lock.copy(off, _MAIN.size, True)
        handoff, ok = lock.copy(off + _OFF_HANDOFF, _HANDOFF_SIZE, patient)
        patient = patient and ok
        count = min(_RECORDS.unpack_from(main, _OFF_RECORDS)[0], THREADS_MAX) if with_threads else 0
        records = []
        for number in range(count):
            raw, ok = lock.copy(off + _OFF_THREADS + number * RECORD_SIZE, RECORD_SIZE, patient)
            patient = patient and ok
            records.append(raw)
        return _view(index, main, handoff, records)

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
        # The writer continues the worker's own counters, not the sum over its threads.
        return SlotWriter(self._mm, self._seqs, self._offset(index), self._read(index, False))

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
                 "_handoff", "_handoff_lock", "_mm", "_off", "_requests", "_seq", "_seqs",
                 "_started", "_started_end", "_state_off", "_threads", "_word")

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
        # sent, adopted, wait_sum, wait buckets; any thread of the worker may hand off or adopt.
        self._handoff = [current.handoffs_sent, current.handoffs_adopted,
                         current.handoff_wait_sum, *current.handoff_wait_buckets]
        self._handoff_lock = threading.Lock()
        self._threads: list[ThreadWriter] | None = None

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

    def request_started(self, request_line: bytes, now: float | None = None) -> None:
        """Mark the worker BUSY with this request (line truncated to LINE_MAX bytes).

        Also refreshes the heartbeat: starting a request is a sign of life. ``now`` is a
        ``time.monotonic()`` reading the caller already took (it is read here if not given).
        """
        if now is None:
            now = time.monotonic()
        seqs, word = self._seqs, self._word
        seq = self._seq + 1
        self._seq = seq + 1
        try:
            seqs[word] = seq
            # "80s" truncates longer lines and NUL-pads shorter ones by itself.
            block = self._started
            _pack_started(block, 0, _BUSY, now, self._requests, self._bytes, now, request_line)
            self._mm[self._state_off:self._started_end] = block
        finally:
            seqs[word] = seq + 1

    def request_finished(self, status: int, bytes_sent: int, state: State,
                         duration: float = 0.0, now: float | None = None) -> None:
        """Count a finished response that took `duration` seconds; return to `state`.

        `state` is IDLE or KEEPALIVE. A status outside 100..599 is counted as a request but in
        no status class. Every request lands in exactly one duration bucket. ``now``: as for
        ``request_started``.
        """
        # One test for both (this runs per request); NaN fails it too, which would poison the
        # sum for good.
        if bytes_sent < 0 or not duration >= 0.0:
            raise ValueError(f"bytes_sent must be >= 0 and duration a number of seconds >= 0, "
                             f"not {bytes_sent} and {duration}")
        if now is None:
            now = time.monotonic()
        c = self._counts
        klass = status // 100 - 1
        if 0 <= klass < _STATUS_CLASSES:
            c[klass] += 1
        b = self._buckets
        # bisect_left finds the first bound >= duration: Prometheus buckets are inclusive.
        b[_bisect_left(_FINITE_BOUNDS, duration)] += 1
        duration_sum = self._duration_sum = self._duration_sum + duration
        requests = self._requests = self._requests + 1
        total = self._bytes = self._bytes + bytes_sent
        seqs, word = self._seqs, self._word
        seq = self._seq + 1
        self._seq = seq + 1
        try:
            seqs[word] = seq
            block = self._dynamic
            _pack_dynamic(block, 0, state, now, requests, total, 0.0, b"",
                          c[0], c[1], c[2], c[3], c[4], duration_sum,
                          b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11])
            self._mm[self._state_off:self._dynamic_end] = block
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

    def thread_writers(self, n: int) -> list[ThreadWriter]:
        """Make this a threaded worker's slot with ``n`` thread records, and return one writer
        per record, to be given each to its own thread (which alone may use it).

        Called once, by the main thread, before the threads start. The records are reset
        first and counted in the slot after, so the master never reads a stale one. From then
        on the request methods of this writer are not used: each thread reports its own.
        """
        if self._threads is not None:
            raise RuntimeError("thread_writers() was already called for this slot")
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= THREADS_MAX:
            raise ValueError(f"threads must be 1..{THREADS_MAX}, not {n!r}")
        lock = _Seqlock(self._mm, self._seqs)
        first = self._off + _OFF_THREADS
        for number in range(n):
            lock.rewrite(first + number * RECORD_SIZE, _ZERO_RECORD)
        mm, seqs, word = self._mm, self._seqs, self._word
        seq = self._seq + 1
        self._seq = seq + 1
        try:
            seqs[word] = seq
            _RECORDS.pack_into(mm, self._off + _OFF_RECORDS, n)
        finally:
            seqs[word] = seq + 1
        self._threads = [ThreadWriter(mm, seqs, first + number * RECORD_SIZE)
                         for number in range(n)]
        return list(self._threads)

    def handoff_sent(self, count: int = 1) -> None:
        """Count connections this worker handed to another worker. Any thread may call it."""
        if count < 0:
            raise ValueError(f"count must not be negative, not {count}")
        with self._handoff_lock:
            self._handoff[0] += count
            self._publish_handoff()

    def handoff_adopted(self, wait: float) -> None:
        """Count a connection taken over from another worker, served ``wait`` seconds after it
        became ready. Any thread may call it."""
        if not wait >= 0.0:  # also refuses NaN
            raise ValueError(f"wait must be a number of seconds >= 0, not {wait}")
        with self._handoff_lock:
            h = self._handoff
            h[1] += 1
            h[2] += wait
            h[3 + bisect.bisect_left(_HANDOFF_BOUNDS, wait)] += 1
            self._publish_handoff()

    def _publish_handoff(self) -> None:
        # Under _handoff_lock: one writer of the handoff block at a time.
        data = _HANDOFF.pack(*self._handoff)
        _Seqlock(self._mm, self._seqs).rewrite(self._off + _OFF_HANDOFF, data)


class ThreadWriter:
    """One application thread's writer for its own record in its worker's slot.

    The same seqlock discipline as SlotWriter, on the record's own sequence counter; the thread
    keeps shadow copies of its counters, so an update is one pack_into and one copy.
    """

    __slots__ = ("_block", "_buckets", "_bytes", "_counts", "_duration_sum", "_end", "_mm",
                 "_requests", "_seq", "_seqs", "_start", "_started", "_started_end", "_word")

    def __init__(self, mm: mmap.mmap, seqs: memoryview, offset: int) -> None:
        self._mm = mm
        self._seqs = seqs
        self._word = offset >> 3
        self._seq = seqs[self._word]  # even: thread_writers() has just reset the record
        self._start = offset + 8
        self._started = bytearray(_THREAD_STARTED.size)
        self._started_end = self._start + _THREAD_STARTED.size
        self._block = bytearray(_THREAD.size)
        self._end = self._start + _THREAD.size
        self._requests = 0
        self._bytes = 0
        self._counts = [0] * _STATUS_CLASSES
        self._buckets = [0] * _BUCKETS
        self._duration_sum = 0.0

    def request_started(self, method: str, path: str) -> None:
        """This thread runs ``method path`` from now (the query string is never recorded)."""
        now = time.monotonic()
        text = f"{method} {path.partition('?')[0]}".encode("latin-1", "replace")
        seqs, word = self._seqs, self._word
        seq = self._seq + 1
        self._seq = seq + 1
        try:
            seqs[word] = seq
            block = self._started
            _THREAD_STARTED.pack_into(block, 0, ThreadState.BUSY, now, text)
            self._mm[self._start:self._started_end] = block
        finally:
            seqs[word] = seq + 1

    def request_finished(self, status: int, bytes_sent: int, duration: float) -> None:
        """Count this thread's finished response (as SlotWriter.request_finished); the thread
        is IDLE again."""
        if bytes_sent < 0:
            raise ValueError(f"bytes_sent must not be negative, not {bytes_sent}")
        if not duration >= 0.0:
            raise ValueError(f"duration must be a number of seconds >= 0, not {duration}")
        c = self._counts
        klass = status // 100 - 1
        if 0 <= klass < _STATUS_CLASSES:
            c[klass] += 1
        b = self._buckets
        b[bisect.bisect_left(_FINITE_BOUNDS, duration)] += 1
        self._duration_sum += duration
        self._requests += 1
        self._bytes += bytes_sent
        seqs, word = self._seqs, self._word
        seq = self._seq + 1
        self._seq = seq + 1
        try:
            seqs[word] = seq
            block = self._block
            _THREAD.pack_into(block, 0, ThreadState.IDLE, 0.0, b"", self._requests, self._bytes,
                              *c, self._duration_sum, *b)
            self._mm[self._start:self._end] = block
        finally:
            seqs[word] = seq + 1
