"""Supervision policies: pure functions from what the master knows to what it should do, and when.

Each policy takes a worker's record, a snapshot of its scoreboard slot, the settings and the
time, and returns a `Verdict`: the actions due now, and the moment this worker next needs a
look (`wake_at`) if nothing else happens. The master carries the actions out (`pool`) and sleeps
until the nearest `wake_at` of all workers; nothing here signals, forks, reads a clock or logs,
so every rule is unit-tested as plain data (tests/unit/test_policies.py). Unicorn's
`murder_lazy_workers`, which returns how long the master may sleep, is the model.

The heartbeat contract with the worker: a worker whose loop turns, whatever its state (idle,
keep-alive, draining), refreshes its slot's heartbeat at least every `HEARTBEAT_EVERY` seconds
(worker.py's housekeeping does it every second); only a running app call leaves it unrefreshed,
and that is what the request timeout is for. A worker silent for longer than the `timeout` (and
never less than `SILENCE_FLOOR`, a few missed beats) is hung or stopped and is aborted.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

from forkserver.pool import Phase, WorkerRecord
from forkserver.scoreboard import Reason, SlotView, State

NEVER = math.inf
KILL_GRACE = 5.0          # after SIGABRT (traceback), SIGKILL follows this much later
BOOT_POLL = 0.05          # how often a booting worker's slot is read for readiness
REQUEST_POLL = 1.0        # with max_requests on, how often slots are read for recycle requests
HEARTBEAT_EVERY = 1.0     # the worker's side of the heartbeat contract (module docstring)
SILENCE_FLOOR = 3 * HEARTBEAT_EVERY  # a silence shorter than this is never judged a hang
OVERSLEEP = 0.5           # a master that woke this much later than planned was suspended
RECYCLE_SPACING = 1.0     # at most one worker recycled for lifetime or memory per second
MAX_BOOT_BACKOFF = 30.0

JUDGED = frozenset({Phase.READY, Phase.RECYCLING, Phase.RETIRING})  # timeouts apply to these


class Act(enum.Enum):
    READY = "ready"       # the slot shows the booting worker serving
    RECYCLE = "recycle"   # start a replacement; retire this one once it is ready
    ABORT = "abort"       # hung: SIGABRT now, SIGKILL after KILL_GRACE
    KILL = "kill"         # SIGKILL now


@dataclass(frozen=True)
class Action:
    act: Act
    reason: Reason = Reason.NONE
    why: str = ""         # what the log says about it


@dataclass(frozen=True)
class Verdict:
    actions: tuple[Action, ...] = ()
    wake_at: float = NEVER  # look at this worker again then, at the latest

    def __add__(self, other: Verdict) -> Verdict:
        return Verdict(self.actions + other.actions, min(self.wake_at, other.wake_at))


def supervise(worker: WorkerRecord, slot: SlotView | None, settings: Any, now: float, *,
              own_memory: int | None = None, quiet_until: float = 0.0,
              notified: bool = False) -> Verdict:
    """Every policy for one worker. ``slot`` is None for a worker without one (adopted after a
    USR2); ``own_memory`` (its USS, bytes) is given when it was read; silence is not judged
    before ``quiet_until`` (see `overslept`); ``notified``: workers write to the master's note
    pipe when they become ready or ask to be replaced, so their slots need no polling."""
    verdict = escalation(worker, now)
    if verdict.actions or slot is None:
        return verdict
    if worker.phase is Phase.BOOTING or slot.state is State.BOOTING:
        return verdict + readiness(worker, slot, settings, now, notified)
    if worker.phase not in JUDGED:
        return verdict
    verdict += timeouts(slot, settings, now, quiet_until)
    if verdict.actions or worker.phase is not Phase.READY:
        return verdict
    return verdict + recycling(worker, slot, settings, now, own_memory, notified)


def escalation(worker: WorkerRecord, now: float) -> Verdict:
    """A worker told to go (or aborted) that is still there at its kill time gets SIGKILL."""
    if not worker.kill_at or worker.phase is Phase.KILLED:
        return Verdict()
    if now >= worker.kill_at:
        return Verdict((Action(Act.KILL, worker.reason, "did not exit in time"),))
    return Verdict(wake_at=worker.kill_at)


def readiness(worker: WorkerRecord, slot: SlotView, settings: Any, now: float,
              notified: bool = False) -> Verdict:
    """A booting worker is ready once its slot leaves BOOTING. Until then (even if it was told
    to go meanwhile) only ``boot_timeout`` applies: importing the app is not a hang.

    A worker that is ``notified`` wakes the master with a byte once ready; otherwise readiness
    is only visible in shared memory, and while a worker boots its slot is read every
    BOOT_POLL: short, and only while something boots."""
    if slot.state is not State.BOOTING:
        return Verdict((Action(Act.READY),)) if worker.phase is Phase.BOOTING else Verdict()
    wake_at = NEVER if notified else now + BOOT_POLL
    limit = settings.boot_timeout
    if limit:
        if now >= worker.started + limit:
            return Verdict((Action(Act.KILL, Reason.TIMEOUT, f"did not boot within {limit:g}s"),))
        wake_at = min(wake_at, worker.started + limit)
    return Verdict(wake_at=wake_at)


def silence_limit(timeout: float) -> float:
    """How long a worker may go without a heartbeat: the timeout, but never a few beats."""
    return max(timeout, SILENCE_FLOOR)


def timeouts(slot: SlotView, settings: Any, now: float, quiet_until: float = 0.0) -> Verdict:
    """Abort a worker whose request runs past ``timeout``, or which gave no sign of life for
    that long in any state (a worker wedged or SIGSTOPped while idle holds its keep-alive
    clients just as surely as a hung request)."""
    timeout = settings.timeout
    if not timeout:
        return Verdict()
    wake_at = NEVER
    if slot.state is State.BUSY and slot.request_start:
        # A threaded worker drains itself when a request outlives timeout: it stops accepting
        # and gives its other threads graceful_timeout to finish theirs (fair to the innocent),
        # then exits. The abort is the backstop after that grace.
        grace = settings.graceful_timeout if slot.thread_count > 1 else 0.0
        deadline = slot.request_start + timeout + grace
        if now >= deadline:
            why = f"timed out after {now - slot.request_start:.1f}s serving {slot.request_line!r}"
            return Verdict((Action(Act.ABORT, Reason.TIMEOUT, why),))
        wake_at = deadline
    if slot.heartbeat:
        deadline = max(slot.heartbeat + silence_limit(timeout), quiet_until)
        if now >= deadline:
            why = (f"gave no sign of life for {now - slot.heartbeat:.1f}s while "
                   f"{slot.state.name.lower()} (hung or stopped)")
            return Verdict((Action(Act.ABORT, Reason.TIMEOUT, why),))
        wake_at = min(wake_at, deadline)
    return Verdict(wake_at=wake_at)


def recycling(worker: WorkerRecord, slot: SlotView, settings: Any, now: float,
              own_memory: int | None = None, notified: bool = False) -> Verdict:
    """Replace a serving worker that asked for it (max_requests), outlived
    max_worker_lifetime, or uses more than max_worker_memory MiB of its own (USS: the pages
    only it maps, what it would give back by exiting).

    A worker asks in its slot; unless it is ``notified`` (it then also writes a byte to the
    master's note pipe), with max_requests on the slot is read every REQUEST_POLL."""
    if slot.reason is not Reason.NONE and slot.state is not State.EXITING:
        return Verdict((Action(Act.RECYCLE, slot.reason, "asked to be replaced"),))
    wake_at = now + REQUEST_POLL if settings.max_requests and not notified else NEVER
    lifetime = settings.max_worker_lifetime
    if lifetime:
        if now >= worker.started + lifetime:
            return Verdict((Action(Act.RECYCLE, Reason.LIFETIME, f"older than {lifetime:g}s"),))
        wake_at = min(wake_at, worker.started + lifetime)
    limit = settings.max_worker_memory
    if limit and own_memory is not None and own_memory > limit * 1024 * 1024:
        why = f"uses {own_memory / 1048576:.1f} MiB of its own memory (USS; limit {limit} MiB)"
        return Verdict((Action(Act.RECYCLE, Reason.MEMORY, why),))
    return Verdict(wake_at=wake_at)


def recycle_paced(reason: Reason, last_recycle: float, now: float) -> float:
    """0 if a recycle for ``reason`` may start now, else when it may. Limits found by the
    master (lifetime, memory) start one a second, so a pool forked together does not all
    restart at once; a worker's own request count is already spread by max_requests_jitter."""
    if reason not in (Reason.LIFETIME, Reason.MEMORY):
        return 0.0
    allowed = last_recycle + RECYCLE_SPACING
    return 0.0 if now >= allowed else allowed


class BootOutcome(enum.Enum):
    IGNORE = "ignore"     # a worker of a generation already given up, or the master stops
    ABANDON = "abandon"   # a reload's new generation cannot boot: roll back to the old one
    HALT = "halt"         # the first generation cannot boot: stop the master, exit 1
    RETRY = "retry"       # it served before: try again after a back-off


def after_boot_failure(failures: int, *, current: bool, stopping: bool, reloading: bool,
                       ever_ready: bool) -> tuple[BootOutcome, float]:
    """What a worker that failed to boot means; ``failures`` counts this one. Returns the
    outcome and, for RETRY, the back-off in seconds (doubling, at most MAX_BOOT_BACKOFF)."""
    if stopping or not current:
        return BootOutcome.IGNORE, 0.0
    if reloading:
        return BootOutcome.ABANDON, 0.0
    if not ever_ready:
        return BootOutcome.HALT, 0.0
    return BootOutcome.RETRY, min(MAX_BOOT_BACKOFF, 2.0 ** min(failures, 5))


def overslept(planned: float, now: float) -> bool:
    """The master woke well after it meant to: it was suspended (SIGSTOP, or the whole group
    with Ctrl-Z), and its workers with it. Their heartbeats then look stale through no fault
    of theirs, so silence is not judged until they had time to beat again."""
    return planned != NEVER and now - planned > OVERSLEEP


def quiet_period(now: float) -> float:
    """Until when silence is not judged after an oversleep."""
    return now + SILENCE_FLOOR
