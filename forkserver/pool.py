"""The worker pool: one record per worker, its phase, and the mechanics of fork, reap and retire.

A worker's life is a `Phase`, moved only through `TRANSITIONS` (an unlisted move raises): it
boots, serves, may be asked to make room for a replacement (recycling), is told to go (retiring),
and if it does not go in time it is aborted (SIGABRT, for its traceback) and finally killed.
Deciding *when* a worker moves is the job of the pure policies in `supervision`; this module only
carries the moves out and keeps the books (the scoreboard slot, the counters of exited workers).
"""

from __future__ import annotations

import enum
import functools
import gc
import math
import os
import random
import signal
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from forkserver import handoff, loader, logs, metrics, mold, worker
from forkserver.scoreboard import Reason, Scoreboard

WORKER_HOOKS = ("post_fork", "post_worker_init", "worker_exit", "pre_request", "post_request")
FORK_RETRY = 1.0  # after a failed fork(), the next try waits this long
# A worker that exits on one of these (or with code 0) while the server stops was stopped with
# it, never a crash: a terminal's Ctrl-C sends INT to the whole process group.
STOPPED_BY = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGQUIT})


class Phase(enum.Enum):
    BOOTING = "booting"      # forked; not serving until its scoreboard slot says so
    READY = "ready"          # serving
    RECYCLING = "recycling"  # past a limit: serves until its replacement is ready, then retires
    RETIRING = "retiring"    # sent TERM: finishes what it holds, then exits
    ABORTING = "aborting"    # hung: sent SIGABRT (traceback), SIGKILL follows at kill_at
    KILLED = "killed"        # sent SIGKILL; only the reap is left


TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.BOOTING: frozenset({Phase.READY, Phase.RETIRING, Phase.KILLED}),
    Phase.READY: frozenset({Phase.RECYCLING, Phase.RETIRING, Phase.ABORTING, Phase.KILLED}),
    Phase.RECYCLING: frozenset({Phase.RETIRING, Phase.ABORTING, Phase.KILLED}),
    Phase.RETIRING: frozenset({Phase.ABORTING, Phase.KILLED}),
    Phase.ABORTING: frozenset({Phase.KILLED}),
    Phase.KILLED: frozenset(),
}

SERVING = frozenset({Phase.BOOTING, Phase.READY})       # counted towards the target
ACCEPTING = frozenset({Phase.READY, Phase.RECYCLING})   # taking new connections
LEAVING = frozenset({Phase.RETIRING, Phase.ABORTING, Phase.KILLED})


class PhaseError(RuntimeError):
    """A move the transition table does not list: a bug in the master, never a runtime event."""


@dataclass
class WorkerRecord:
    pid: int
    index: int                    # scoreboard slot; -1 for a worker of the image before a USR2
    generation: int
    started: float                # time.monotonic() at fork (or adoption)
    phase: Phase = Phase.BOOTING
    reason: Reason = Reason.NONE  # why it recycles, retires or was aborted
    kill_at: float = 0.0          # SIGKILL is due then (0: not scheduled)
    ready_at: float = 0.0         # when its slot first showed it serving (0: never)
    mold: int = 0                 # pid of the mold that forked it; 0: the master did

    def move(self, phase: Phase) -> None:
        if phase not in TRANSITIONS[self.phase]:
            raise PhaseError(f"worker {self.pid}: no move from {self.phase.value} to "
                             f"{phase.value}")
        self.phase = phase


@dataclass(frozen=True)
class Blueprint:
    """What every new worker of the current generation is made from."""

    settings: Any
    generation: int
    listeners: list[socket.socket]
    app: Callable | None          # preloaded in the master, or None: each worker imports it
    hooks: dict[str, Callable]    # every loaded hook; workers get the worker-side ones
    access_log: logs.AccessLog | None
    master_pid: int
    tls_context: ssl.SSLContext | None = None  # the generation's, shared by its workers
    reload_dir: str | None = None  # development reload: where workers report their modules
    notify_fd: int = -1           # the write end of the master's note pipe
    freeze: bool = False          # gc.collect() + gc.freeze() before forking (preload)
    one_first: bool = False       # boot one worker of the generation before the others
    handoff: handoff.Channel | None = None  # the master's channel; None: handoff_delay is 0


@dataclass(frozen=True)
class Exit:
    """A reaped worker, and how it ended."""

    record: WorkerRecord
    status: int
    boot_failed: bool             # exited with the boot-error code before it ever served


def workers_text(count: int) -> str:
    """"1 worker", "2 workers"."""
    return f"{count} worker{'' if count == 1 else 's'}"


def log_fields(record: WorkerRecord, **more: Any) -> dict[str, Any]:
    """The structured fields of a log line about a worker (logs.FIELDS); a Reason is named."""
    fields: dict[str, Any] = {"worker_pid": record.pid, "slot": record.index,
                              "generation": record.generation}
    for name, value in more.items():
        if isinstance(value, Reason):
            value = value.name.lower() if value is not Reason.NONE else None
        if value is not None:
            fields[name] = value
    return fields


def call_hook(hooks: dict[str, Callable], name: str, *args: Any) -> None:
    hook = hooks.get(name)
    if hook is not None:
        log = logs.get_logger()
        try:
            hook(*args)
        except Exception:  # a hook must not take the master down
            log.exception("hook %s failed", name)


def worker_spec(blueprint: Blueprint, index: int, scoreboard: Scoreboard,
                mold_link: socket.socket | None = None) -> worker.WorkerSpec:
    settings = blueprint.settings
    app = blueprint.app
    load_app: Callable[[], Callable]
    if app is not None:
        load_app = lambda: app  # preloaded in the master
    else:
        load_app = functools.partial(loader.load_app, settings.app)
    jitter = settings.max_requests_jitter
    return worker.WorkerSpec(
        settings=settings, index=index, generation=blueprint.generation,
        listeners=blueprint.listeners, load_app=load_app, scoreboard=scoreboard,
        master_pid=blueprint.master_pid,
        title=f"{settings.proc_name}: worker {index} [{settings.app}]",
        max_requests=(settings.max_requests + random.randint(0, jitter)
                      if settings.max_requests else 0),
        hooks={name: hook for name, hook in blueprint.hooks.items() if name in WORKER_HOOKS},
        access_log=blueprint.access_log,
        tls_context=blueprint.tls_context, reload_dir=blueprint.reload_dir,
        notify_fd=blueprint.notify_fd, handoff=blueprint.handoff, mold_link=mold_link,
    )


class Pool:
    """The master's workers. ``blocked`` are the signals the master handles: they stay blocked
    across fork, and ``in_child`` undoes the master's signal plumbing in the child before they
    are unblocked there (or a signal meant for the worker would land in the master's pipe).
    ``keeper`` is the master's book of the mold (refork): spawns go to the mold while one of
    the current generation lives, and `refork` replaces the master's workers by its children."""

    def __init__(self, scoreboard: Scoreboard, target: int, blocked: tuple[int, ...],
                 in_child: Callable[[], None], keeper: mold.Keeper | None = None) -> None:
        self.keeper = keeper if keeper is not None else mold.Keeper(())
        self.scoreboard = scoreboard
        self.target = target
        self.blocked = blocked
        self.in_child = in_child
        self.log = logs.get_logger()
        self.records: dict[int, WorkerRecord] = {}
        self.next_spawn = 0.0        # boot back-off or fork failure: no spawn before this
        self.boot_failures = 0       # in a row, since a worker last became ready
        self.last_recycle = 0.0
        self.totals = metrics.Totals()   # counters of exited workers, so none is ever lost
        self.restarts: dict[str, int] = {}

    # -- views ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def serving(self, generation: int) -> list[WorkerRecord]:
        """Workers of ``generation`` that count towards the target (booting or ready)."""
        return [record for record in self.records.values()
                if record.generation == generation and record.phase in SERVING]

    def all_ready(self, generation: int) -> bool:
        """The generation has its full count, and every one of them serves."""
        serving = self.serving(generation)
        return len(serving) >= self.target and \
            all(record.phase is Phase.READY for record in serving)

    def readiness(self) -> str | None:
        """None while some worker takes connections; else why not ("booting", "no workers")."""
        phases = {record.phase for record in self.records.values()}
        if phases & ACCEPTING:
            return None
        return "booting" if Phase.BOOTING in phases else "no workers"

    # -- spawning ---------------------------------------------------------------------------
    def maintain(self, blueprint: Blueprint, now: float) -> float:
        """Bring the generation to the target count: spawn the missing, retire the extras.
        Returns when to look again: at once after a spawn (the new worker's readiness is to be
        watched), at the end of a back-off, or never (a reaped child wakes the master)."""
        serving = self.serving(blueprint.generation)
        missing = self.target - len(serving)
        if blueprint.one_first and not any(r.phase is Phase.READY for r in serving):
            missing = min(missing, 1 - len(serving))
        spawned = False
        while missing > 0 and now >= self.next_spawn:
            # One collection and freeze per batch: the first moves every object the master
            # holds into the permanent generation; between two forks of a batch the master
            # makes only a few short-lived objects of its own, not worth a pass per fork.
            if not self.spawn(blueprint, freeze=blueprint.freeze and not spawned):
                break
            spawned = True
            missing -= 1
        if missing < 0:
            # Retire the youngest extras first (the oldest are warm).
            for record in sorted(serving, key=lambda r: r.started, reverse=True)[:-missing]:
                self.retire(record, Reason.SCALE)
        if spawned:
            return now
        return self.next_spawn if missing > 0 and self.next_spawn > now else math.inf

    def spawn(self, blueprint: Blueprint, freeze: bool = False) -> bool:
        """Fork one worker: from the mold if one of this generation serves, else from the
        master. With ``freeze`` (preload), a cold fork collects and freezes first, after the
        pre_fork hook: the workers' own collections then never write to the headers of (and
        so never unshare) the objects they inherited. The master never unfreezes: frozen
        objects are still freed by reference counting, and collect() runs right before each
        freeze, so what stays uncollected is at most a cycle the master drops later."""
        index = self.scoreboard.free_index()
        if index is None:
            return False
        spec = worker_spec(blueprint, index, self.scoreboard, self.keeper.worker_link)
        call_hook(blueprint.hooks, "pre_fork", blueprint.settings, index)
        self.scoreboard.claim(index, 0, blueprint.generation)
        if self._spawn_from_mold(spec):
            return True
        if freeze:
            gc.collect()
            gc.freeze()
        signal.pthread_sigmask(signal.SIG_BLOCK, self.blocked)
        try:
            pid = os.fork()
        except OSError as error:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.blocked)
            self.scoreboard.release(index)
            self.log.error("cannot fork a worker: %s", error)
            self.next_spawn = time.monotonic() + FORK_RETRY
            return False
        if pid == 0:
            self.in_child()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.blocked)
            worker.run(spec)  # never returns
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.blocked)
        self.records[pid] = WorkerRecord(pid, index, blueprint.generation, time.monotonic())
        self.log.info("booting worker %d (slot %d, generation %d)", pid, index,
                      blueprint.generation, extra=log_fields(self.records[pid]))
        return True

    def _spawn_from_mold(self, spec: worker.WorkerSpec) -> bool:
        """Ask the mold for the worker ``spec`` describes (its slot is claimed); False: fork
        it cold (no mold of this generation, or it just failed; a hung one is killed)."""
        keeper = self.keeper
        mold_pid = keeper.mold_pid
        pid = keeper.spawn(mold.Order(spec.index, spec.generation, spec.max_requests, spec.title))
        for hung in keeper.take_kills():
            self._signal(hung, signal.SIGKILL)
        if pid is None:
            return False
        record = WorkerRecord(pid, spec.index, spec.generation, time.monotonic(), mold=mold_pid)
        self.records[pid] = record
        self.log.info("booting worker %d (slot %d, generation %d, from mold %d)", pid,
                      spec.index, spec.generation, mold_pid, extra=log_fields(record))
        return True

    def refork(self, now: float) -> float:
        """Promote a template when a threshold is passed, and replace the next worker not
        forked by the current mold (one at a time: its replacement, from the mold, boots
        first); returns when to look again."""
        if not self.keeper.enabled:
            return math.inf
        seats = [mold.Seat.of(record, self.scoreboard.read(record.index).requests
                              if record.index >= 0 else 0)
                 for record in self.records.values()]
        plan = self.keeper.plan(seats, now)
        if plan.promote is not None:
            self._signal(plan.promote, mold.PROMOTE_SIGNAL)
        record = self.records.get(plan.recycle) if plan.recycle is not None else None
        if record is not None:
            self.log.info("replacing worker %d by a child of mold %d", record.pid,
                          self.keeper.mold_pid, extra=log_fields(record, reason=mold.REASON))
            self.mark_recycle(record, mold.REASON, now)
            return now
        return plan.wake_at

    def adopt(self, pids: list[int], now: float) -> None:
        """Workers of the image before a USR2 re-exec: still our children, serving, no slot."""
        for pid in pids:
            self.records[pid] = WorkerRecord(pid, -1, 0, now, Phase.READY, ready_at=now)

    # -- moves ------------------------------------------------------------------------------
    def mark_ready(self, record: WorkerRecord, now: float) -> None:
        record.move(Phase.READY)
        record.ready_at = now
        self.boot_failures = 0

    def mark_recycle(self, record: WorkerRecord, reason: Reason, now: float) -> None:
        record.move(Phase.RECYCLING)
        record.reason = reason
        self.last_recycle = now

    def retire_recycled(self, generation: int) -> None:
        """Once the generation is whole and ready without them, recycled workers may go."""
        if not self.all_ready(generation):
            return
        for record in list(self.records.values()):
            if record.phase is Phase.RECYCLING:
                self.log.info("recycling worker %d (%s)", record.pid, record.reason.name.lower(),
                              extra=log_fields(record, reason=record.reason))
                self.retire(record, record.reason)

    def retire(self, record: WorkerRecord, reason: Reason, kill_at: float = 0.0,
               signum: int = signal.SIGTERM) -> None:
        """Tell a worker to go (TERM: drain; QUIT: at once); SIGKILL at ``kill_at`` if set."""
        if record.phase in (Phase.ABORTING, Phase.KILLED):
            return  # already on a harder way out
        if record.phase is not Phase.RETIRING:
            record.move(Phase.RETIRING)
            record.reason = reason
        if kill_at and (not record.kill_at or kill_at < record.kill_at):
            record.kill_at = kill_at
        self._signal(record.pid, signum)

    def retire_all(self, reason: Reason, kill_at: float, signum: int) -> None:
        for record in list(self.records.values()):
            self.retire(record, reason, kill_at, signum)

    def abort(self, record: WorkerRecord, reason: Reason, kill_at: float) -> None:
        """SIGABRT makes a hung worker dump its stacks; SIGCONT lets a stopped one take it."""
        record.move(Phase.ABORTING)
        record.reason = reason
        record.kill_at = kill_at
        self._signal(record.pid, signal.SIGABRT)
        self._signal(record.pid, signal.SIGCONT)

    def kill(self, record: WorkerRecord, reason: Reason | None = None) -> None:
        """SIGKILL: the one way every escalation ends (boot timeout, abort, stop deadline)."""
        record.move(Phase.KILLED)
        if reason is not None and record.reason is Reason.NONE:
            record.reason = reason
        self._signal(record.pid, signal.SIGKILL)

    def signal_all(self, signum: int) -> None:
        for pid in list(self.records):
            self._signal(pid, signum)

    def signal(self, record: WorkerRecord, signum: int) -> None:
        self._signal(record.pid, signum)

    def _signal(self, pid: int, signum: int) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    # -- exits ------------------------------------------------------------------------------
    def reaped(self, pid: int, status: int, stopping: bool = False) -> Exit | None:
        """Book a reaped child if it is one of ours: fold its counters, free its slot, log.
        ``stopping``: the server stops (or a stop signal waits to be acted on)."""
        record = self.records.pop(pid, None)
        if record is None:
            return None
        requests = 0
        own_reason = Reason.NONE  # what the worker wrote in its slot before leaving by itself
        if record.index >= 0:
            view = self.scoreboard.read(record.index)
            requests, own_reason = view.requests, view.reason
            self.totals.fold(view)
            self.scoreboard.release(record.index)
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == worker.EXIT_BOOT_ERROR \
                and not record.ready_at:
            return Exit(record, status, boot_failed=True)
        self._log_exit(record, status, requests, stopping, own_reason)
        return Exit(record, status, boot_failed=False)

    def _log_exit(self, record: WorkerRecord, status: int, requests: int,
                  stopping: bool, own_reason: Reason = Reason.NONE) -> None:
        told_to_go = record.phase in LEAVING
        fields = log_fields(record)
        if os.WIFSIGNALED(status):
            signum = os.WTERMSIG(status)
            fields["signal"] = signal.Signals(signum).name
            how = f"killed by {fields['signal']}"
            if signum == signal.SIGKILL and record.phase not in (Phase.ABORTING, Phase.KILLED):
                how += " (not sent by the master: out of memory?)"
                record.reason, told_to_go = Reason.OOM, False
            elif stopping and signum in STOPPED_BY:
                told_to_go = True
        else:
            fields["exit_code"] = os.WEXITSTATUS(status)
            how = f"exited with code {fields['exit_code']}"
            clean = fields["exit_code"] == 0
            # A worker may leave by itself, cleanly, having said why in its slot (a threaded
            # worker that drained around a stuck request says TIMEOUT): not a crash.
            if clean and own_reason is not Reason.NONE and record.reason is Reason.NONE:
                record.reason = own_reason
            told_to_go = told_to_go or (clean and (stopping or own_reason is not Reason.NONE))
        if told_to_go and record.reason is Reason.NONE:
            record.reason = Reason.SHUTDOWN  # stopped with the server (Ctrl-C reaches all)
        if not told_to_go and record.reason is not Reason.OOM:
            record.reason = Reason.CRASH
        reason = record.reason.name.lower()
        fields["reason"] = reason
        self.restarts[reason] = self.restarts.get(reason, 0) + 1
        if told_to_go and record.reason is not Reason.TIMEOUT:
            self.log.info("worker %d %s (%s, %d requests)", record.pid, how, reason, requests,
                          extra=fields)
        else:
            self.log.error("worker %d %s after %d requests (%s)", record.pid, how, requests,
                           reason, extra=fields)
