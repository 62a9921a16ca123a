"""Connection handoff: a busy worker passes its waiting keep-alive connections to an idle one.

The channel is one unix datagram socketpair, made by the master before the first fork and
shared by every worker of every generation (and kept across a USR2 exec, like the listeners).
Any worker sends on one end; an idle worker receives on the other, registered in its epoll with
``EPOLLEXCLUSIVE`` so that one worker takes each connection. A message is one datagram: a small
header, the peer address, the bytes already read but not parsed, and the socket itself as
``SCM_RIGHTS``. Once ``send`` returns True the connection belongs to the channel: the sender
only closes its own descriptor (never ``shutdown``), and whoever receives serves it.

Three parts, one concern each:
- the wire: ``Channel``, ``send``, ``receive``, ``settle`` (non-blocking; ``receive`` never
  leaks a descriptor, whatever arrives);
- the policy: pure functions deciding when a worker gives connections away and which ones;
- the ``Watcher``: the thread that lets a single-threaded worker act while its one thread runs
  the app.

Nobody-can-take-it is judged from the queue itself: while a handed connection still waits in the
channel, no worker is idle, so ``send`` refuses the next one (and the kernel refuses with EAGAIN
once ``net.unix.max_dgram_qlen`` datagrams wait). A connection refused stays with its worker,
which answers it when it frees up.
"""

from __future__ import annotations

import array
import enum
import errno
import fcntl
import os
import select
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

# The USR2 handover of the channel's two descriptors ("receive,send"); config reserves the name.
ENV_HANDOFF_FDS = "FORKSERVER_HANDOFF_FDS"

MAX_MESSAGE = 64 * 1024  # one datagram; far below the default unix socket send buffer
HOP_LIMIT = 2            # handoffs of one waiting request; a served request resets the count
SETTLE_SLOW = 0.001      # how long a busy worker waits for a receiver to take what it sent
SETTLE_EXIT = 0.02       # how long an exiting one waits before it takes the connection back

_MAGIC = b"FSH1"
# magic, hops, host length, port length, pending length, requests served, ready_at (monotonic)
_HEADER = struct.Struct("=4sBHHIId")
MAX_PENDING = MAX_MESSAGE - _HEADER.size - 2 * 0xFF  # room left with the longest address
_MAX_FDS = 4  # room for more than one, so that a message carrying several is seen and refused
_FD_SIZE = array.array("i").itemsize
_ANCILLARY = socket.CMSG_SPACE(_MAX_FDS * _FD_SIZE)


class Channel:
    """The two ends of the handoff socketpair. Every worker holds both; the master holds them
    only to give them to the workers it forks (and to the image it execs), never to read."""

    def __init__(self, receiving: socket.socket, sending: socket.socket) -> None:
        self.receiving = receiving
        self.sending = sending
        self._count = array.array("i", [0])

    @classmethod
    def create(cls) -> Channel:
        receiving, sending = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        return cls(receiving, sending)

    @classmethod
    def inherit(cls, environ: MutableMapping[str, str]) -> Channel | None:
        """The channel a previous image handed over through a USR2 exec, if any (the note is
        removed, so no child inherits it)."""
        value = environ.pop(ENV_HANDOFF_FDS, "")
        if not value:
            return None
        receive_fd, send_fd = (int(item) for item in value.split(","))
        ends = []
        for fd in (receive_fd, send_fd):
            end = socket.socket(fileno=fd)
            end.set_inheritable(False)
            end.setblocking(False)
            ends.append(end)
        return cls(ends[0], ends[1])

    def environ(self) -> dict[str, str]:
        """What to add to the environment of a USR2 exec (after ``set_inheritable(True)``)."""
        return {ENV_HANDOFF_FDS: f"{self.receiving.fileno()},{self.sending.fileno()}"}

    def set_inheritable(self, inheritable: bool) -> None:
        self.receiving.set_inheritable(inheritable)
        self.sending.set_inheritable(inheritable)

    def fileno(self) -> int:
        """The end an idle worker registers in its epoll (EPOLLIN | EPOLLEXCLUSIVE)."""
        return self.receiving.fileno()

    def queued(self) -> bool:
        """Whether a handed connection waits in the channel (nobody has taken it yet)."""
        try:
            fcntl.ioctl(self.receiving.fileno(), termios.FIONREAD, self._count)
        except OSError:
            return False
        return self._count[0] > 0

    def close(self) -> None:
        self.receiving.close()
        self.sending.close()


@dataclass(frozen=True)
class Handed:
    """A connection taken from the channel, ready for ``Worker.adopt``."""

    sock: socket.socket
    pending: bytes            # read from the client but not parsed: feed before reading more
    remote: tuple[str, str]   # (host, port) as the sender knew it (after a PROXY header)
    hops: int                 # handoffs so far, this one included
    ready_at: float           # monotonic: when the waiting request was first seen ready
    requests: int = 0         # requests served on it so far (keepalive_requests goes on)


def encode(pending: bytes, remote: tuple[str, str], hops: int, ready_at: float,
           requests: int = 0) -> bytes | None:
    """The message body, or None if it cannot travel in one datagram."""
    host, port = remote[0].encode(), remote[1].encode()
    if len(pending) > MAX_PENDING or len(host) > 0xFF or len(port) > 0xFF or \
            not 0 <= hops < 256 or not 0 <= requests < 2**32:
        return None
    header = _HEADER.pack(_MAGIC, hops, len(host), len(port), len(pending), requests,
                          ready_at)
    return b"".join((header, host, port, pending))


def decode(data: bytes) -> tuple[bytes, tuple[str, str], int, float, int] | None:
    """``(pending, remote, hops, ready_at, requests)`` from a message body, or None if
    malformed."""
    if len(data) < _HEADER.size:
        return None
    magic, hops, host_len, port_len, pending_len, requests, ready_at = \
        _HEADER.unpack_from(data)
    if magic != _MAGIC or len(data) != _HEADER.size + host_len + port_len + pending_len:
        return None
    at = _HEADER.size
    try:
        host = data[at:at + host_len].decode()
        port = data[at + host_len:at + host_len + port_len].decode()
    except UnicodeDecodeError:
        return None
    return data[at + host_len + port_len:], (host, port), hops, ready_at, requests


def send(channel: Channel, sock: socket.socket, pending: bytes, remote: tuple[str, str],
         hops: int, ready_at: float, *, requests: int = 0) -> bool:
    """Offer ``sock`` to an idle worker, without blocking. True: it is the channel's now (close
    your descriptor, never shut it down). False: nobody can take it now; keep serving it."""
    if not hop_allowed(hops):
        return False
    message = encode(pending, remote, hops + 1, ready_at, requests)
    if message is None or channel.queued():
        return False
    rights = array.array("i", [sock.fileno()])
    try:
        channel.sending.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)],
                                socket.MSG_DONTWAIT)
    except OSError:  # EAGAIN (queue full), ENOBUFS, EMSGSIZE...: it stays with its worker
        return False
    return True


def receive(channel: Channel) -> Handed | None:
    """Take one handed connection, without blocking; None if there is none, or if the message
    was malformed (every descriptor it carried is closed then)."""
    try:
        data, ancillary, flags, _ = channel.receiving.recvmsg(
            MAX_MESSAGE + 1, _ANCILLARY, socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return None
    fds = _descriptors(ancillary)
    fields = decode(data) if not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) else None
    sock = _stream_socket(fds[0]) if fields is not None and len(fds) == 1 else None
    if sock is None:
        for fd in fds:
            _close_fd(fd)
        return None
    return Handed(sock, *fields)


def settle(channel: Channel, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for a receiver to take what waits in the channel; True
    once it is empty. (Polls the queue length: the receiving end is not ours to wait on.)"""
    deadline = time.monotonic() + timeout
    pause = 0.00005
    while channel.queued():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(pause, left))
        pause = min(pause * 2, 0.002)
    return True


class Outcome(enum.Enum):
    """What became of a connection offered with ``offer``."""

    KEPT = "kept"      # refused (nobody idle, hop limit, too big): still the caller's
    TAKEN = "taken"    # a worker took it within the wait
    QUEUED = "queued"  # sent, not yet taken: the next worker to become idle takes it


def offer(channel: Channel, sock: socket.socket, pending: bytes, remote: tuple[str, str],
          hops: int, ready_at: float, *, requests: int = 0, wait: float = 0.0) -> Outcome:
    """``send``, then wait up to ``wait`` seconds for a receiver, so that the next offer is
    not refused merely because this one is still in the queue. Unless KEPT, close your
    descriptor. An exiting worker that gets QUEUED takes it back with ``receive`` (nobody is
    listening) and adopts it again; a busy one leaves it for whoever frees up first."""
    if not send(channel, sock, pending, remote, hops, ready_at, requests=requests):
        return Outcome.KEPT
    return Outcome.TAKEN if settle(channel, wait) else Outcome.QUEUED


def rescue(channel: Channel, wait: float = SETTLE_EXIT) -> list[Handed]:
    """For a stopping worker about to exit: whatever no other worker has taken within
    ``wait``, taken to be served here, so that a shutdown never strands a handed connection."""
    if settle(channel, wait):
        return []
    taken = []
    while (handed := receive(channel)) is not None:
        taken.append(handed)
    return taken


def _descriptors(ancillary: Sequence[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % _FD_SIZE
            fds.extend(array.array("i", payload[:usable]))
    return fds


def _stream_socket(fd: int) -> socket.socket | None:
    """The descriptor as a stream socket, or None (left open, for the caller to close)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:  # not a socket
        return None
    if sock.type != socket.SOCK_STREAM or sock.family not in (
            socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
        sock.detach()
        return None
    sock.setblocking(False)
    return sock


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError as error:
        if error.errno != errno.EBADF:
            raise


# -- policy (pure) -------------------------------------------------------------------------
class Why(enum.Enum):
    """Why a worker gives connections away."""

    BUSY = "busy"  # every thread has run its request past handoff_delay; requests wait
    EXIT = "exit"  # the worker is leaving (TERM, recycle, reload): its idle connections go


@dataclass(frozen=True)
class Candidate:
    """What the policy needs to know about one of a worker's connections."""

    waiting: bool      # a request (or part of one) is there to be read or parsed
    dispatched: bool   # a request of it is in the app (or queued for a thread)
    tls: bool          # its session state lives in this worker: it can never move
    hops: int          # handoffs since its last request was served
    pending: int       # bytes read but not parsed, which must travel with it
    settled: bool = True  # between requests or before a head completes; False mid-body/proxy


def give_away(delay: float, free_threads: int, busy_for: float, waiting: bool,
              exiting: bool) -> Why | None:
    """Whether a worker hands connections off now. ``delay`` is handoff_delay in seconds (0:
    never); ``busy_for`` is the age of its youngest running request (0 if none runs)."""
    if delay <= 0:
        return None
    if exiting:
        return Why.EXIT
    if free_threads > 0 or not waiting or busy_for < delay:
        return None
    return Why.BUSY


def hop_allowed(hops: int) -> bool:
    """A waiting request moves at most HOP_LIMIT times, so it can never bounce for ever."""
    return 0 <= hops < HOP_LIMIT


def eligible(candidate: Candidate, why: Why) -> bool:
    """Whether this connection may be handed off for ``why``."""
    if candidate.dispatched or candidate.tls or not candidate.settled:
        return False
    if not hop_allowed(candidate.hops) or candidate.pending > MAX_PENDING:
        return False
    return candidate.waiting or why is Why.EXIT


def choose(candidates: Iterable[tuple[Any, Candidate]], why: Why) -> list[Any]:
    """The connections to hand off, in order: those with a request waiting first."""
    allowed = [(conn, c) for conn, c in candidates if eligible(c, why)]
    return [conn for conn, c in allowed if c.waiting] + \
        [conn for conn, c in allowed if not c.waiting]


def receiving(delay: float, free_threads: int, stopping: bool, retiring: bool) -> bool:
    """Whether a worker listens on the channel: only with a free thread, and never while it
    is leaving, so nothing is handed into a retiring worker or generation."""
    return delay > 0 and free_threads > 0 and not stopping and not retiring


def readable(fds: Iterable[int]) -> set[int]:
    """The descriptors with bytes to read now (a zero-timeout poll; hung-up ones excluded)."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return {fd for fd, events in poller.poll(0)
            if events & select.POLLIN and not events & (select.POLLERR | select.POLLNVAL)}


# -- the watcher ---------------------------------------------------------------------------
# The watcher's longest wait, in handoff delays, while the requests it sees are fast: BACKOFF
# while it has seen a request BACKOFF delays old in the last SLOW_MEMORY seconds (slow requests
# are about: the next one is caught within BACKOFF delays), QUIET_BACKOFF after (each wake takes
# the GIL from the serving thread, which a saturated machine pays for in stalls). A younger
# request does not count: on a busy machine a preempted worker's fast request often outlives
# one delay, and that is no slow app.
BACKOFF = 10
QUIET_BACKOFF = 50
SLOW_MEMORY = 1.0


class Inline:
    """What the reactor and the watcher share about the request the reactor runs inline.

    Plain attributes, so that the reactor's part costs two stores and two tests a request and
    no call (``worker.Requests`` is one of these; a call at each end of every request cost a
    hello-world load 4% of its throughput):
    - ``app_since``: the reactor sets it to its clock reading just before the app is called,
      and back to 0.0 as soon as the app has returned, however it returned;
    - ``count``: requests served; the watcher tells a quiet spell by it standing still;
    - ``giving``: the watcher sets it, under its lock, before it looks whether the request it
      timed still runs. The reactor, having set ``app_since`` to 0.0, calls
      ``Watcher.collect`` if it sees it set: that waits for a handoff in progress and returns
      the connections given away, which the reactor then forgets (each side writes its flag
      before it reads the other's, so one of them always sees the other);
    - ``dozing``: the watcher sets it before it sleeps through a quiet spell; the reactor that
      sees it set as a request begins calls ``Watcher.wake``.
    """

    def __init__(self) -> None:
        self.app_since = 0.0
        self.count = 0
        self.giving = False
        self.dozing = False


class Watcher:
    """Lets a single-threaded worker hand off while its one thread runs the app.

    It reads the reactor's ``Inline`` record; between the reactor's setting ``app_since`` and
    its setting it back, and only then, the watcher may read ``parked()`` and give connections
    away: the reactor is inside the app and touches none of them.
    """

    def __init__(self, delay: float, inline: Inline, parked: Callable[[], Iterable[Any]],
                 give: Callable[[Any, float], bool], fileno: Callable[[Any], int],
                 *, name: str = "handoff", quiet_after: float = 0.25) -> None:
        self.delay = delay
        self.inline = inline
        self.parked = parked      # the reactor's idle connections (called only while the app runs)
        self.give = give          # (conn, seen_at) -> handed off?
        self.fileno = fileno
        self.quiet_after = quiet_after  # no request for this long: doze until one begins
        self.slow_at = -SLOW_MEMORY  # when it last saw a request of BACKOFF delays or more
        self.slow = BACKOFF * delay
        self.handed: list[Any] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    # -- the reactor's side (rare: only when a flag of ``Inline`` says so) ------------------
    def wake(self) -> None:
        """A request begins while the watcher dozes."""
        self._wake.set()

    def collect(self) -> list[Any]:
        """The connections given away while the app ran (after any handoff in progress)."""
        with self._lock:
            handed, self.handed = self.handed, []
            self.inline.giving = False
        return handed

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        self._stopped = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the watcher's side ---------------------------------------------------------------
    def _run(self) -> None:
        delay = self.delay
        inline = self.inline
        # While every request it looks at is younger than delay (a fast load), the watcher
        # looks less often, doubling its wait up to BACKOFF x delay (QUIET_BACKOFF x delay when
        # it has seen no slow request for SLOW_MEMORY, see above): waking every delay would take
        # the GIL from the serving thread hundreds of times a second for nothing. A request
        # found past delay brings the wait back to delay (slow requests are about).
        patience = delay
        watched = 0.0  # the request the last wait was for
        count, counted_at = -1, 0.0  # requests begun, when that figure was last seen to move
        while not self._stopped:
            started = inline.app_since
            now = time.monotonic()
            if started > 0 and now - started >= self.slow:
                self.slow_at = now
            longest = (QUIET_BACKOFF if now - self.slow_at > SLOW_MEMORY else BACKOFF) * delay
            if started > 0:
                if now >= started + delay:
                    self._act(started)
                    patience, wait = delay, delay  # bytes may come on other connections
                else:
                    if watched and started != watched:
                        patience = 2 * patience
                    patience = min(patience, longest)
                    wait = max(started + delay - now, patience)
                watched = started
            else:
                if inline.count != count:
                    count, counted_at = inline.count, now
                elif now - counted_at > self.quiet_after:
                    self._doze()
                    watched = 0.0
                    continue
                wait = patience = min(patience, longest)
            if self._wake.wait(wait):  # a late wake() (meant for a doze already over)
                self._wake.clear()      # must not turn every next wait into a spin

    def _doze(self) -> None:
        """Sleep until a request begins (the reactor wakes it) or the watcher stops."""
        inline = self.inline
        inline.dozing = True
        if inline.app_since <= 0 and not self._stopped:
            self._wake.wait()
        self._wake.clear()
        inline.dozing = False

    def _act(self, started: float) -> None:
        """Give away the parked connections with bytes waiting, while the request that began
        at ``started`` still runs."""
        inline = self.inline
        with self._lock:
            inline.giving = True
            try:
                if inline.app_since != started:
                    return
                conns = list(self.parked())
                ready = readable(self.fileno(conn) for conn in conns)
                seen_at = time.monotonic()
                for conn in conns:
                    if inline.app_since != started:
                        return  # the app returned: the reactor waits for us
                    if self.fileno(conn) in ready and self.give(conn, seen_at):
                        self.handed.append(conn)
            finally:
                if not self.handed:
                    inline.giving = False
