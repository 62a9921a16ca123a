"""Refork: workers forked from a warm copy of a worker (the mold) instead of the cold master.

Once a worker of the current generation has served ``refork_after[k]`` requests, the master
sends it `PROMOTE_SIGNAL`. That worker (the template) forks a fresh copy of itself, the mold,
which drops the template's epoll and clients, keeps its listeners (the workers it forks serve
on them), runs ``gc.collect(); gc.freeze()`` and then only forks workers on the master's
request. Every fork here is a double fork, and the master is a child subreaper
(``PR_SET_CHILD_SUBREAPER``): the middle process exits at once, so the mold and every worker
it forks are re-parented to the master, which reaps them, times them out, signals them and
gives them their slots, exactly as for the workers it forks itself.

The wires (all ``AF_UNIX``/``SOCK_SEQPACKET``, so every message arrives whole):

    link     master <- any worker    created once by the master; every worker inherits its
                                     worker end. A new mold announces itself on it: its pid,
                                     its template's pid, its generation, and (SCM_RIGHTS)
                                     the master's end of its channel.
    channel  master <-> one mold     created by the template for its mold. The master sends
                                     an `Order` (slot, generation, max_requests, title); the
                                     mold answers with the new worker's pid, or an errno; the
                                     master says it booked that pid ("took"). Only then does
                                     the new process become a worker: one whose pid the master
                                     never booked (the mold died or hung meanwhile) exits
                                     before it touches its slot. The master closing its end
                                     tells the mold to exit.

Three layers, each usable alone: the pure policies (`promotion_due`, `next_replacement`,
`spawns_from_mold`, the `Stage` table), tested as plain data; the process mechanics
(`fork_mold` in the template, the mold's loop, `MoldClient` in the master), tested with real
processes; and `Keeper`, the master's book of the mold, which the pool drives. Nothing here
sends a signal: the pool does (it is the one place SIGKILL is sent).
"""

from __future__ import annotations

import enum
import errno
import functools
import gc
import math
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from forkserver import logs
from forkserver.scoreboard import Reason

PR_SET_CHILD_SUBREAPER = 36      # <linux/prctl.h>
PROMOTE_SIGNAL = signal.SIGURG   # master -> chosen worker: "fork a mold"; ignored by default
SPAWN_TIMEOUT = 2.0              # the master waits this long for a mold's answer
PROMOTE_TIMEOUT = 10.0           # a template that announced no mold by then is given up
PARENT_WAIT = 1.0                # a double-forked child waits this long to be re-parented
POLL = 1.0                       # the mold checks its master is alive this often
REQUEST_POLL = 1.0               # while a threshold is ahead, slots are read this often
NEVER = math.inf
# Why a worker forked by the master is replaced by one from the mold (scoreboard's own reason
# once it has one; until then the reload reason, which is what it is: new code, warmer).
REASON = Reason.REFORK

_HELLO = struct.Struct("=4sIIi")       # b"MOLD", mold pid, template pid, generation
_ORDER = struct.Struct("=4sIiii")      # b"FORK", token, slot, generation, max_requests; title
_ANSWER = struct.Struct("=4sIi")       # b"PID " or b"FAIL", token, pid or errno
_TAKEN = struct.Struct("=4sI")         # b"TOOK", token: the master booked the pid
_MAGIC_HELLO, _MAGIC_ORDER, _MAGIC_PID, _MAGIC_FAIL = b"MOLD", b"FORK", b"PID ", b"FAIL"
_MAGIC_TAKEN = b"TOOK"
_MAX_MESSAGE = 4096


class MoldUnsupported(RuntimeError):
    """This system cannot keep the mold's workers as the master's children."""


class MoldError(RuntimeError):
    """A request to the mold failed: it is gone, hung or could not fork. Spawn cold."""


# -- the subreaper ----------------------------------------------------------------------------
def set_child_subreaper() -> None:
    """Make this process the reaper of its orphaned descendants (Linux 3.4+)."""
    if not sys.platform.startswith("linux"):
        raise MoldUnsupported(f"refork_after: needs Linux (PR_SET_CHILD_SUBREAPER); this is "
                              f"{sys.platform}")
    import ctypes.util  # (imported where used: architecture.md, "What a worker inherits")

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise MoldUnsupported(f"refork_after: prctl(PR_SET_CHILD_SUBREAPER) failed: "
                              f"{os.strerror(code)}")


def refusal(settings: Any) -> str | None:
    """One line saying why refork cannot run with these settings, or None (or it is off)."""
    if not settings.refork_after:
        return None
    if not sys.platform.startswith("linux"):
        return f"refork_after: needs Linux (PR_SET_CHILD_SUBREAPER); this is {sys.platform}"
    if getattr(settings, "threads", 1) > 1:
        return "refork_after: not with threads > 1 (a worker running app threads cannot fork)"
    if getattr(settings, "reload", False):
        return "refork_after: not with reload (every change starts a cold generation anyway)"
    return None


# -- the pure policies ------------------------------------------------------------------------
class Stage(enum.Enum):
    IDLE = "idle"              # no mold; spawns are cold
    PROMOTING = "promoting"    # a template was told to fork a mold; spawns are cold meanwhile
    MOLDED = "molded"          # a mold of the current generation forks the workers
    REMOLDING = "remolding"    # as MOLDED, and a warmer template forks the next mold


class Event(enum.Enum):
    ASK = "ask"                # PROMOTE_SIGNAL sent to a template
    ANNOUNCED = "announced"    # the asked-for mold said hello
    GAVE_UP = "gave_up"        # no hello within PROMOTE_TIMEOUT
    LOST = "lost"              # the serving mold died, hung or failed a fork
    STOP = "stop"              # new generation, upgrade or shutdown: no mold


TABLE: dict[tuple[Stage, Event], Stage] = {
    (Stage.IDLE, Event.ASK): Stage.PROMOTING,
    (Stage.PROMOTING, Event.ANNOUNCED): Stage.MOLDED,
    (Stage.PROMOTING, Event.GAVE_UP): Stage.IDLE,
    (Stage.MOLDED, Event.ASK): Stage.REMOLDING,
    (Stage.MOLDED, Event.LOST): Stage.IDLE,
    (Stage.REMOLDING, Event.ANNOUNCED): Stage.MOLDED,   # the old mold is told to go
    (Stage.REMOLDING, Event.GAVE_UP): Stage.MOLDED,
    (Stage.REMOLDING, Event.LOST): Stage.PROMOTING,
    **{(stage, Event.STOP): Stage.IDLE for stage in Stage},
}
WITH_MOLD = frozenset({Stage.MOLDED, Stage.REMOLDING})


class TransitionError(RuntimeError):
    """A move `TABLE` does not list: a bug in the master, never a runtime event."""


def move(stage: Stage, event: Event) -> Stage:
    after = TABLE.get((stage, event))
    if after is None:
        raise TransitionError(f"mold: no {event.value} from {stage.value}")
    return after


@dataclass(frozen=True)
class Seat:
    """What the policies need of one worker record (the pool builds these)."""

    pid: int
    generation: int
    started: float     # time.monotonic() at fork
    phase: str         # pool.Phase value: "booting", "ready", "recycling", "retiring", ...
    requests: int      # served so far, from its slot
    mold: int = 0      # pid of the mold it was forked from; 0: forked by the master

    @classmethod
    def of(cls, record: Any, requests: int) -> Seat:
        """From a pool.WorkerRecord (read by attribute: mold sits below pool)."""
        return cls(record.pid, record.generation, record.started, record.phase.value,
                   requests, getattr(record, "mold", 0))


@dataclass(frozen=True)
class Promote:
    pid: int       # the template: the warmest ready worker of the generation
    level: int     # index into refork_after of the threshold it passed


def promotion_due(seats: Iterable[Seat], generation: int, thresholds: tuple[int, ...],
                  level: int, stage: Stage, mold_pid: int = 0) -> Promote | None:
    """Who becomes the template, if anyone now: the serving worker of the generation that
    served most (the first one, in practice; another if it was replaced), once it passed the
    next unspent threshold, ``thresholds[level]``. A worker waiting for its replacement
    (recycling) still serves and may be chosen: under a fast load with a low max_requests,
    every warm worker may be in that phase whenever the master looks. While a mold serves
    (``mold_pid``), only its children count: each refork starts from a process warmed since
    the last one, so the next threshold is not passed at once by the current mold's template."""
    if stage not in (Stage.IDLE, Stage.MOLDED) or level >= len(thresholds):
        return None
    ready = [seat for seat in seats if seat.generation == generation
             and seat.phase in ("ready", "recycling") and (not mold_pid or seat.mold == mold_pid)]
    if not ready:
        return None
    warmest = max(ready, key=lambda seat: (seat.requests, -seat.started))
    if warmest.requests < thresholds[level]:
        return None
    return Promote(warmest.pid, level)


def next_replacement(seats: Iterable[Seat], generation: int, mold_pid: int,
                     template_pid: int) -> int | None:
    """The next worker of the generation to replace by a child of the mold, or None. One at a
    time (none while one boots or waits to be retired), so capacity never dips; the oldest
    first, the template last (it is the warmest while the others are replaced)."""
    mine = [seat for seat in seats if seat.generation == generation]
    if any(seat.phase in ("booting", "recycling") for seat in mine):
        return None
    stale = [seat for seat in mine if seat.phase == "ready" and seat.mold != mold_pid]
    if not stale:
        return None
    stale.sort(key=lambda seat: (seat.pid == template_pid, seat.started))
    return stale[0].pid


def spawns_from_mold(stage: Stage, mold_generation: int, generation: int) -> bool:
    """Forks go to the mold while one of this generation lives; otherwise (none yet, lost,
    or of an older generation during a reload) the master forks cold."""
    return stage in WITH_MOLD and mold_generation == generation


def promotion_expired(asked_at: float, now: float) -> bool:
    return now >= asked_at + PROMOTE_TIMEOUT


# -- messages ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Order:
    """One worker the master wants from the mold."""

    index: int           # scoreboard slot, claimed by the master
    generation: int
    max_requests: int    # with this worker's jitter, drawn by the master
    title: str           # its process title

    def encode(self, token: int) -> bytes:
        head = _ORDER.pack(_MAGIC_ORDER, token, self.index, self.generation, self.max_requests)
        return head + self.title.encode("utf-8", "replace")[:_MAX_MESSAGE - _ORDER.size]

    @classmethod
    def decode(cls, data: bytes) -> tuple[int, Order]:
        if len(data) < _ORDER.size or data[:4] != _MAGIC_ORDER:
            raise ValueError(f"not an order: {data[:16]!r}")
        _, token, index, generation, max_requests = _ORDER.unpack_from(data)
        return token, cls(index, generation, max_requests,
                          data[_ORDER.size:].decode("utf-8", "replace"))


@dataclass
class Hello:
    """A new mold's announcement, read by the master from the link."""

    pid: int
    template: int
    generation: int
    channel: socket.socket   # the master's end of the mold's channel


def _seqpacket_pair() -> tuple[socket.socket, socket.socket]:
    # socketpair() descriptors are close-on-exec: a USR2 exec closes the master's ends, so
    # the molds of the old image see EOF and go.
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


class Link:
    """The master's announcement wire (module docstring). ``worker`` goes to every worker."""

    def __init__(self) -> None:
        self.master, self.worker = _seqpacket_pair()
        self.master.setblocking(False)

    def hellos(self) -> list[Hello]:
        """Every announcement waiting; a malformed one is dropped (its descriptors closed)."""
        found = []
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.master, _MAX_MESSAGE, 1)
            except (BlockingIOError, InterruptedError):
                return found
            if not data:
                return found
            if len(data) != _HELLO.size or data[:4] != _MAGIC_HELLO or len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                continue
            os.set_inheritable(fds[0], False)
            _, pid, template, generation = _HELLO.unpack(data)
            found.append(Hello(pid, template, generation, socket.socket(fileno=fds[0])))

    def close(self) -> None:
        self.master.close()
        self.worker.close()


class MoldClient:
    """The master's end of one mold's channel."""

    def __init__(self, pid: int, generation: int, channel: socket.socket) -> None:
        self.pid = pid
        self.generation = generation
        self.channel = channel
        self.token = 0

    def spawn(self, order: Order, timeout: float = SPAWN_TIMEOUT) -> int:
        """The pid of a new worker forked by the mold, already the caller's child. Blocks
        for at most ``timeout``; raises MoldError if the mold is gone, hung or cannot fork.
        The answer is awaited here, before the caller reaps again, so a worker that dies at
        once is still a zombie (its pid not reused) when the caller books it."""
        self.token += 1
        deadline = time.monotonic() + timeout
        try:
            self.channel.settimeout(timeout)
            self.channel.send(order.encode(self.token))
            while True:
                self.channel.settimeout(max(0.001, deadline - time.monotonic()))
                data = self.channel.recv(_MAX_MESSAGE)
                if not data:
                    raise MoldError(f"mold {self.pid} is gone")
                if len(data) != _ANSWER.size:
                    raise MoldError(f"mold {self.pid} answered {data[:16]!r}")
                kind, token, value = _ANSWER.unpack(data)
                if token != self.token:
                    continue  # an answer to an order given up on earlier
                if kind == _MAGIC_PID:
                    # Booked by the caller before it reaps again; the child may go on.
                    self.channel.send(_TAKEN.pack(_MAGIC_TAKEN, token))
                    return value
                raise MoldError(f"mold {self.pid} could not fork: {os.strerror(value)}")
        except TimeoutError:
            raise MoldError(f"mold {self.pid} did not answer within {timeout:g}s") from None
        except OSError as error:
            raise MoldError(f"mold {self.pid} is gone ({error})") from None

    def close(self) -> None:
        """The mold reads EOF and exits."""
        self.channel.close()


# -- process mechanics ------------------------------------------------------------------------
def _exit_after(target: Callable[[], object]) -> None:
    """A forked child's whole life: never returns into the caller's code."""
    code = 1
    try:
        target()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:  # noqa: BLE001 - say what killed it, then exit
        logs.get_logger().exception("process %d forked for refork failed", os.getpid())
    finally:
        os._exit(code)


def double_fork(target: Callable[[], object]) -> int:
    """Run ``target`` in a grandchild whose parent exits at once; return the grandchild's pid.
    The grandchild is re-parented to the nearest subreaper (the master). Raises OSError."""
    for stream in (sys.stdout, sys.stderr):  # no buffered output copied into the children
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    read_end, write_end = os.pipe()
    try:
        middle = os.fork()
    except OSError:
        os.close(read_end)
        os.close(write_end)
        raise
    if middle == 0:
        code = 1
        try:
            os.close(read_end)
            grandchild = os.fork()
            if grandchild == 0:
                os.close(write_end)
                _exit_after(target)
            os.write(write_end, grandchild.to_bytes(4, "little"))
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        data = _read_exactly(read_end, 4)
    finally:
        os.close(read_end)
        _wait_for(middle)
    if len(data) != 4:
        raise OSError(errno.EAGAIN, "the middle process of a double fork could not fork")
    return int.from_bytes(data, "little")


def _read_exactly(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        try:
            chunk = os.read(fd, size - len(data))
        except InterruptedError:
            continue
        if not chunk:
            break
        data += chunk
    return data


def _wait_for(pid: int) -> None:
    while True:
        try:
            os.waitpid(pid, 0)
            return
        except InterruptedError:
            continue
        except ChildProcessError:
            return


def await_parent(master_pid: int, limit: float = PARENT_WAIT) -> bool:
    """After a double fork: wait until the master is our parent (the middle process is gone).
    False if it is not by ``limit``: the master is dead, or is no subreaper."""
    deadline = time.monotonic() + limit
    while os.getppid() != master_pid:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.001)
    return True


def _park_signals() -> None:
    """The mold has no loop to hand signals to: TERM, INT, QUIT kill it (it holds no client);
    the rest are ignored. A signal caught by the template's handlers would go nowhere."""
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    for signum in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN,
                   signal.SIGTTOU, signal.SIGWINCH, PROMOTE_SIGNAL):
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def set_title(title: str) -> None:
    try:
        import setproctitle
        setproctitle.setproctitle(title)
    except ImportError:  # pragma: no cover - it is a declared dependency
        pass


@dataclass(frozen=True)
class Template:
    """What a worker hands to `fork_mold` when it is promoted.

    ``drop`` runs first in the mold: close the worker's epoll (its listener registrations),
    its client connections and its wakeup pipe; keep the listeners open (the workers forked
    from the mold serve on them). ``become`` runs in each worker the mold forks, with the
    `Order`: build the worker from the template's spec with the order's slot, max_requests
    and title, and the already loaded app, then run it (never returns)."""

    link: socket.socket          # the worker end of the master's Link
    generation: int
    master_pid: int
    title: str                   # the mold's process title
    drop: Callable[[], None]
    become: Callable[[Order], None]
    freeze: bool = True          # gc.collect(); gc.freeze() in the mold


def fork_mold(template: Template) -> int:
    """In the promoted worker: fork the mold (double fork, so it is the master's child) and
    return its pid; raises OSError if it cannot be forked. The mold announces itself to the
    master; the template goes back to serving."""
    ours, theirs = _seqpacket_pair()
    me = os.getpid()
    try:
        return double_fork(lambda: _mold_main(template, me, ours, theirs))
    finally:
        ours.close()
        theirs.close()


def _mold_main(template: Template, template_pid: int, master_end: socket.socket,
               mold_end: socket.socket) -> None:
    _park_signals()
    template.drop()
    if not await_parent(template.master_pid):
        return  # nobody would reap what we fork
    set_title(template.title)
    if template.freeze:
        # What the template warmed up is now shared with every worker forked from here: keep
        # their collections from writing to it (and unsharing its pages).
        gc.collect()
        gc.freeze()
    hello = _HELLO.pack(_MAGIC_HELLO, os.getpid(), template_pid, template.generation)
    socket.send_fds(template.link, [hello], [master_end.fileno()])
    master_end.close()
    serve(mold_end, template)


def serve(channel: socket.socket, template: Template) -> None:
    """The mold's loop: one order, one double fork, one answer, the master's "took", then the
    go-ahead to the new process; until the master closes the channel or dies."""
    channel.settimeout(POLL)
    while True:
        try:
            data = channel.recv(_MAX_MESSAGE)
        except TimeoutError:
            if os.getppid() != template.master_pid:
                return
            continue
        except OSError:
            return
        if not data:
            return
        try:
            token, order = Order.decode(data)
        except ValueError:
            continue
        if not _fork_for(channel, template, token, order):
            return


def _fork_for(channel: socket.socket, template: Template, token: int, order: Order) -> bool:
    """Carry out one order; False if the channel is gone (the mold then exits)."""
    if order.generation != template.generation:
        return _send(channel, _ANSWER.pack(_MAGIC_FAIL, token, errno.EINVAL))
    go_read, go_write = os.pipe()
    try:
        pid = double_fork(functools.partial(_worker_main, channel, template, order, go_read,
                                            go_write))
    except OSError as error:
        os.close(go_read)
        os.close(go_write)
        return _send(channel, _ANSWER.pack(_MAGIC_FAIL, token, error.errno or errno.EAGAIN))
    os.close(go_read)
    try:
        if not _send(channel, _ANSWER.pack(_MAGIC_PID, token, pid)):
            return False
        if not _taken(channel, token):
            return True  # not booked: the child sees the pipe close and exits
        os.write(go_write, b"g")
        return True
    finally:
        os.close(go_write)


def _send(channel: socket.socket, message: bytes) -> bool:
    try:
        channel.send(message)
    except OSError:
        return False
    return True


def _taken(channel: socket.socket, token: int) -> bool:
    """Wait for the master's "took" for ``token``."""
    deadline = time.monotonic() + SPAWN_TIMEOUT + POLL
    while time.monotonic() < deadline:
        try:
            data = channel.recv(_MAX_MESSAGE)
        except TimeoutError:
            continue
        except OSError:
            return False
        if not data:
            return False
        if data == _TAKEN.pack(_MAGIC_TAKEN, token):
            return True
    return False


def _worker_main(channel: socket.socket, template: Template, order: Order, go_read: int,
                 go_write: int) -> None:
    channel.close()  # the mold's end stays the mold's alone: the master sees EOF when it dies
    os.close(go_write)
    booked = _read_exactly(go_read, 1) == b"g"
    os.close(go_read)
    if not booked or not await_parent(template.master_pid):
        return  # nobody books or reaps us: go before touching the slot
    template.become(order)


# -- the master's book of the mold ------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """What the pool should do now about refork, and when to look again."""

    promote: int | None = None   # send PROMOTE_SIGNAL to this worker
    recycle: int | None = None   # mark this worker recycling (REASON): a mold child replaces it
    wake_at: float = NEVER


class Keeper:
    """The mold of the current generation, seen from the master: the stage (`TABLE`), the
    threshold reached, the channel, and the molds told to go but not reaped yet. It decides
    with the policies above and does the mold's I/O; the pool sends every signal."""

    EARLY_MEMORY = 64   # unknown reaped pids remembered (a mold may die before its hello)

    def __init__(self, thresholds: tuple[int, ...]) -> None:
        self.thresholds = tuple(thresholds)
        self.link = Link() if self.thresholds else None
        self.log = logs.get_logger()
        self.stage = Stage.IDLE
        self.level = 0                   # thresholds below this index are spent
        self.generation = 0              # the generation the levels count for
        self.client: MoldClient | None = None
        self.template = 0                # the worker the current mold was forked from
        self.asked: tuple[int, float] | None = None  # (template pid, when) while promoting
        self.leaving: set[int] = set()   # molds told to go, not reaped yet
        self.kills: list[int] = []       # hung molds: SIGKILL due (the pool sends it)
        self.early: dict[int, int] = {}  # reaped pids nobody knew, with their status

    def _to(self, event: Event) -> None:
        self.stage = move(self.stage, event)

    # -- views ------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.link is not None

    @property
    def worker_link(self) -> socket.socket | None:
        """For WorkerSpec: the end a promoted worker's mold announces itself on."""
        return self.link.worker if self.link is not None else None

    @property
    def mold_pid(self) -> int:
        """The mold that spawns fork from now (0: none); a record forked by it keeps this."""
        return self.client.pid if self.client is not None else 0

    def fds(self) -> list[int]:
        """Read these in the master's sleep; call `receive` when one is readable."""
        return [self.link.master.fileno()] if self.link is not None else []

    def others(self) -> dict[int, str]:
        """For metrics.collect(others=...): every mold process still there."""
        found = {pid: "mold" for pid in self.leaving}
        if self.client is not None:
            found[self.client.pid] = "mold"
        return found

    def pids(self) -> list[int]:
        """Every mold process not reaped yet (the master's cleanup kills and waits them)."""
        return list(self.others())

    # -- the loop's calls -------------------------------------------------------------------
    def follow(self, generation: int) -> None:
        """Each pass: a new current generation (HUP, rollback, USR2's own) starts cold."""
        if generation != self.generation:
            if self.generation:
                self.stop(f"generation {generation} is current")
            self.generation = generation
            self.level = 0

    def plan(self, seats: Iterable[Seat], now: float) -> Plan:
        """The promotion due, the next worker to replace, and when to look again."""
        if not self.enabled:
            return Plan()
        seats = list(seats)
        wake_at = now + REQUEST_POLL if self.level < len(self.thresholds) else NEVER
        if self.asked is not None:
            pid, asked_at = self.asked
            if promotion_expired(asked_at, now):
                self.log.error("worker %d announced no mold within %gs; giving up this "
                               "threshold", pid, PROMOTE_TIMEOUT)
                self.asked = None
                self._to(Event.GAVE_UP)
            else:
                wake_at = min(wake_at, asked_at + PROMOTE_TIMEOUT)
        promote = promotion_due(seats, self.generation, self.thresholds, self.level,
                                self.stage, self.mold_pid)
        if promote is not None:
            self.level = promote.level + 1
            self.asked = (promote.pid, now)
            self._to(Event.ASK)
            self.log.info("worker %d passed %d requests: promoting it to template", promote.pid,
                          self.thresholds[promote.level])
        recycle = None
        if self.client is not None and self.stage in WITH_MOLD:
            recycle = next_replacement(seats, self.generation, self.client.pid, self.template)
        return Plan(promote.pid if promote else None, recycle, wake_at)

    def receive(self) -> None:
        """Read the announcements waiting on the link (its fd was readable)."""
        if self.link is None:
            return
        for hello in self.link.hellos():
            asked = self.asked
            if asked is None or hello.template != asked[0] or \
                    hello.generation != self.generation:
                self.log.warning("mold %d (from worker %d) was not asked for; stopping it",
                                 hello.pid, hello.template)
                self._let_go(MoldClient(hello.pid, hello.generation, hello.channel))
                continue
            if self.client is not None:
                self._let_go(self.client)  # the older mold: the new one is warmer
            self.client = MoldClient(hello.pid, hello.generation, hello.channel)
            self.template = hello.template
            self.asked = None
            self._to(Event.ANNOUNCED)
            self.log.info("mold %d forked from worker %d (generation %d); new workers come "
                          "from it", hello.pid, hello.template, hello.generation)
            if hello.pid in self.early:  # it died before we heard from it
                self.reaped(hello.pid, self.early.pop(hello.pid))

    def spawn(self, order: Order) -> int | None:
        """A worker forked by the mold (the caller's child, pid returned), or None: there is
        no usable mold, or it just failed (it is then dropped; fork cold)."""
        client = self.client
        if client is None or not spawns_from_mold(self.stage, client.generation,
                                                  order.generation):
            return None
        try:
            return client.spawn(order)
        except MoldError as error:
            self.log.error("%s; forking workers from the master", error)
            self.kills.append(client.pid)
            self._lose()
            return None

    def take_kills(self) -> list[int]:
        """Molds that hung: the pool sends them SIGKILL (they are reaped as usual)."""
        kills, self.kills = self.kills, []
        return kills

    def reaped(self, pid: int, status: int) -> bool:
        """A reaped child the pool did not know: True if it was a mold."""
        if pid in self.leaving:
            self.leaving.discard(pid)
            return True
        if self.client is not None and pid == self.client.pid:
            self.log.error("mold %d %s; forking workers from the master until the next "
                           "threshold", pid, _how(status))
            self._lose()
            self.leaving.discard(pid)
            return True
        self.early[pid] = status
        while len(self.early) > self.EARLY_MEMORY:
            del self.early[next(iter(self.early))]
        return False

    def stop(self, why: str) -> None:
        """No mold from now on (until the next threshold): a new generation, an upgrade's
        exec, or shutdown. The molds read EOF and exit; the master reaps them."""
        if self.client is not None:
            self.log.info("stopping mold %d: %s", self.client.pid, why)
            self._let_go(self.client)
            self.client = None
        self.asked = None
        self._to(Event.STOP)

    def in_child(self) -> None:
        """In a worker the master forks: close the master's ends it inherited. A copy of a
        mold's channel held there would keep the mold from seeing EOF when the master lets it
        go; the link's worker end stays (any worker may be promoted)."""
        if self.client is not None:
            self.client.channel.close()
        if self.link is not None:
            self.link.master.close()

    def close(self) -> None:
        self.stop("the master exits")
        if self.link is not None:
            self.link.close()
            self.link = None

    def _lose(self) -> None:
        client = self.client
        self.client = None
        if client is not None:
            self._let_go(client)
        self._to(Event.LOST)

    def _let_go(self, client: MoldClient) -> None:
        client.close()
        if client.pid not in self.early:
            self.leaving.add(client.pid)
        else:
            del self.early[client.pid]


def _how(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with code {os.waitstatus_to_exitcode(status)}"
