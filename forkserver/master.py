"""The master: binds listeners, forks workers and supervises them. It never serves app traffic.

The control plane is one loop in a fixed order (rule 3 of style.md): reap children, act on
queued signals, apply the supervision policies to every worker (readiness, timeouts, recycling,
escalation), move a reload or upgrade along, fix the worker count, then sleep until the nearest
deadline any of those returned, or until a signal. There is no fixed tick. Signal handlers only
record the signal; ``set_wakeup_fd`` wakes the sleep (rule 2).

The seams: `pool` keeps one record per worker and carries out spawn, retire, abort and kill;
`supervision` decides, as pure functions, what is due and when to look again; `generations` is
the HUP/USR2 state machine. This module holds the loop, the signal table, stopping and cleanup.
"""

from __future__ import annotations

import enum
import os
import select
import signal
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from forkserver import (
    generations,
    handoff,
    loader,
    logs,
    memory,
    metrics,
    mold,
    outputs,
    reloader,
    sockets,
    supervision,
    systemd,
    tls,
    worker,
)
from forkserver.generations import Generations, load_hooks
from forkserver.pool import (
    Blueprint,
    Phase,
    Pool,
    WorkerRecord,
    call_hook,
    log_fields,
    workers_text,
)
from forkserver.scoreboard import Reason, Scoreboard
from forkserver.supervision import NEVER, Act, Action, BootOutcome

QUICK_STOP_GRACE = 2.0    # after SIGQUIT on a quick stop, SIGKILL follows this much later
METRICS_POLL = metrics.CONNECTION_TTL / 4  # while a scrape is open, so its TTL is enforced
# Set by worker.py once its workers write a byte to WorkerSpec.notify_fd when they become
# ready and when they ask to be replaced; until then the master polls their slots.
NOTIFY_WORKS = bool(getattr(worker, "NOTIFIES_MASTER", False))


class StopMode(enum.Enum):
    RUNNING = "running"
    DELAYING = "delaying"    # TERM with shutdown_delay: serve on (closing), /readyz says 503
    GRACEFUL = "graceful"    # TERM: stop listening, workers drain up to graceful_timeout
    QUICK = "quick"          # INT, QUIT: workers quit at once


# Where each mode may go (a move not listed is ignored: a stop only gets harder), and what
# /readyz says meanwhile.
STOP_MOVES: dict[StopMode, frozenset[StopMode]] = {
    StopMode.RUNNING: frozenset({StopMode.DELAYING, StopMode.GRACEFUL, StopMode.QUICK}),
    StopMode.DELAYING: frozenset({StopMode.GRACEFUL, StopMode.QUICK}),
    StopMode.GRACEFUL: frozenset({StopMode.QUICK}),
    StopMode.QUICK: frozenset(),
}
STOP_READINESS: dict[StopMode, str | None] = {
    StopMode.RUNNING: None,
    StopMode.DELAYING: "shutting down",
    StopMode.GRACEFUL: "draining",
    StopMode.QUICK: "shutting down",
}
SERVING_MODES = frozenset({StopMode.RUNNING, StopMode.DELAYING})  # still taking connections

# The signal table: signal -> (handler method, acted on while stopping). CHLD only wakes the
# loop, which reaps on every pass; its handler must exist, or it would write nothing.
SIGNALS: dict[int, tuple[str, bool]] = {
    signal.SIGTERM: ("_on_term", True),
    signal.SIGINT: ("_on_quick", True),
    signal.SIGQUIT: ("_on_quick", True),
    signal.SIGHUP: ("_on_hup", False),
    signal.SIGUSR1: ("_on_usr1", False),
    signal.SIGUSR2: ("_on_usr2", False),
    signal.SIGTTIN: ("_on_ttin", False),
    signal.SIGTTOU: ("_on_ttou", False),
    signal.SIGCHLD: ("", True),
}
HANDLED_SIGNALS = tuple(SIGNALS)


class Master:
    def __init__(self, settings: Any, reload: Callable[[], Any] | None = None) -> None:
        self.log = logs.get_logger()
        self.pid = os.getpid()
        self.wakeups = Wakeups()
        self.pending_signals = self.wakeups.pending
        self.listeners: list[socket.socket] = []
        self.bind_specs: list[sockets.BindSpec] = []
        self.scoreboard: Scoreboard | None = None
        self.pool: Pool | None = None
        self.outputs = outputs.Outputs()
        self.generations = Generations(settings, reload, self._config_changed,
                                       prepare=_prepare_generation)
        self.memory = memory.Sampler(settings.memory_check_interval)
        self.dev_reload: DevReload | None = None
        self.app: Callable | None = None
        self.stop_mode = StopMode.RUNNING
        self.delay_until = NEVER           # end of the shutdown delay
        self.exit_code = 0
        self.quiet_until = 0.0             # no silence judged before (after an oversleep)
        self.next_memory_check = 0.0
        self.keeper = mold.Keeper(())     # refork: the real one once settings are checked
        self.channel: handoff.Channel | None = None  # handoff: made once, kept for life
        self.started = time.monotonic()

    @property
    def settings(self) -> Any:
        """The current generation's settings."""
        return self.generations.settings

    @property
    def running(self) -> bool:
        """Not stopping at all: reloads, scaling and recycling go on."""
        return self.stop_mode is StopMode.RUNNING

    @property
    def serving(self) -> bool:
        """Still taking connections (running, or in the shutdown delay): workers are kept."""
        return self.stop_mode in SERVING_MODES

    @property
    def readiness(self) -> str | None:
        """None when some worker takes connections; else "booting", "draining", "shutting
        down" or "no workers" (what /readyz answers)."""
        reason = STOP_READINESS[self.stop_mode]
        if reason is not None:
            return reason
        return self.pool.readiness() if self.pool is not None else "booting"

    # -- startup ----------------------------------------------------------------------------
    def run(self) -> int:
        settings = self.settings
        self.log = logs.setup(settings.log_level, settings.error_log, proc="master",
                              fmt=settings.error_log_format)
        if settings.umask is not None:
            os.umask(settings.umask)
        why = _refork_refusal(settings)
        if why is not None:
            self.log.error("%s", why)
            return 1
        opened = open_resources(settings, self.pid, self.log, self.outputs, self._snapshot)
        if opened is None:
            return 1
        self.channel, self.listeners, self.bind_specs, self.app = (
            opened.channel, opened.listeners, opened.bind_specs, opened.app)
        self.generations.hooks, self.generations.prepared = opened.hooks, opened.prepared
        self.keeper = mold.Keeper(settings.refork_after)
        outputs.write_pidfile(settings.pidfile, self.pid, self.outputs.metrics_address())
        self.scoreboard = Scoreboard(max(2, 2 * settings.workers))
        self.wakeups.install()
        self.pool = Pool(self.scoreboard, settings.workers, HANDLED_SIGNALS, self._in_child,
                         self.keeper)
        old = generations.take_old_workers(os.environ)  # a USR2 re-exec's: still our children
        if old:
            self.generations.adopt(self.pool, old, time.monotonic())
        self.dev_reload = DevReload(settings) if settings.reload else None
        import setproctitle
        setproctitle.setproctitle(f"{settings.proc_name}: master [{settings.app}]")
        self.log.info("forkserver master %d starting, app %s, %s", self.pid, settings.app,
                      workers_text(settings.workers))
        call_hook(self.generations.hooks, "on_starting", settings)
        try:
            self._loop()
        finally:
            self._cleanup()
            call_hook(self.generations.hooks, "on_exit", self.settings)
        self.log.info("forkserver master %d exiting (%d)", self.pid, self.exit_code)
        return self.exit_code

    def _in_child(self) -> None:
        """In a worker the master forks: drop the master's ends of its pipes and wires."""
        self.wakeups.in_child()
        self.keeper.in_child()
        self.outputs.in_child()

    def _config_changed(self, settings: Any) -> None:
        """A reload (or its rollback) changed the settings: follow their logs and options."""
        follow_settings(settings, self.memory, self.keeper, self.log, self.outputs)

    def _snapshot(self) -> metrics.Snapshot:
        records = self.pool.records
        workers = [(pid, record.index, record.generation) for pid, record in records.items()]
        others = self.keeper.others()
        readings = self.memory.readings([self.pid, *records, *others], time.monotonic())
        return metrics.collect(self.scoreboard, workers, self.pool.totals, self.pool.restarts,
                               self.generations.reloads, self.started, self.listeners,
                               not_ready=self.readiness, readings=readings, others=others)

    # -- the loop ---------------------------------------------------------------------------
    def _loop(self) -> None:
        planned = NEVER
        while True:
            if supervision.overslept(planned, time.monotonic()):
                self.quiet_until = supervision.quiet_period(time.monotonic())
            self._reap()
            self._handle_signals()
            now = time.monotonic()
            wake_at = min(self._supervise(now), self._delay(now))
            if self.dev_reload is not None and self.running:
                wake_at = min(wake_at, self.dev_reload.check(now, self.generations, self.pool))
            if self.serving:
                self.generations.advance(self.pool)
                self.keeper.follow(self.generations.current)  # a new generation starts cold
                self.pool.retire_recycled(self.generations.current)
                if self.running:
                    wake_at = min(wake_at, self.pool.refork(now))
                wake_at = min(wake_at, self.pool.maintain(self._blueprint(), now))
            elif not self.pool:
                return
            status_due = self.generations.ever_ready and self.running
            planned = min(wake_at, self.outputs.tell_systemd(now, self.pool, status_due))
            self.wakeups.sleep(planned, self.outputs, self.keeper)

    def _blueprint(self) -> Blueprint:
        settings = self.settings
        dev_reload = self.dev_reload
        return Blueprint(
            settings, self.generations.current, self.listeners, self.app, self.generations.hooks,
            self.outputs.access_log, self.pid, tls_context=self.generations.prepared,
            reload_dir=dev_reload.watcher.report_dir if dev_reload is not None else None,
            notify_fd=self.wakeups.notify_w, freeze=bool(settings.preload and settings.gc_freeze),
            # A development reload boots one worker first: a broken change then costs one
            # traceback, not one per worker.
            one_first=settings.reload and self.generations.reloading,
            handoff=self.channel if settings.handoff_delay > 0 else None)

    def _supervise(self, now: float) -> float:
        """Apply the policies to every worker; returns when the next one is due."""
        settings = self.settings
        wake_at = NEVER
        uss: dict[int, int] = {}
        if settings.max_worker_memory and self.running:
            if now >= self.next_memory_check:
                self.next_memory_check = now + settings.memory_check_interval
            wake_at = self.next_memory_check
            uss = _own_memory(self.pool, self.memory, now)
        for record in list(self.pool.records.values()):
            slot = self.scoreboard.read(record.index) if record.index >= 0 else None
            verdict = supervision.supervise(record, slot, settings, now,
                                            own_memory=uss.get(record.pid),
                                            quiet_until=self.quiet_until, notified=NOTIFY_WORKS)
            wake_at = min(wake_at, verdict.wake_at)
            for action in verdict.actions:
                wake_at = min(wake_at, self._carry_out(record, action, now))
        return wake_at

    def _carry_out(self, record: WorkerRecord, action: Action, now: float) -> float:
        """One action of a verdict; returns when to look at the worker again. A worker whose
        phase changed is looked at again at once: the rules of its new phase (the timeouts of
        a worker just ready) were not part of the verdict that moved it."""
        fields = log_fields(record, reason=action.reason)
        if action.act is Act.READY:
            self.pool.mark_ready(record, now)
            self.generations.worker_ready(self.pool)
            if self.stop_mode is StopMode.DELAYING:
                self.pool.signal(record, signal.SIGWINCH)  # born in the delay: close too
            return now
        if action.act is Act.ABORT:
            self.log.error("worker %d %s; aborting", record.pid, action.why, extra=fields)
            self.pool.abort(record, action.reason, now + supervision.KILL_GRACE)
            return record.kill_at
        if action.act is Act.KILL:
            self.log.error("worker %d %s; sending SIGKILL", record.pid, action.why,
                           extra=fields)
            self.pool.kill(record, action.reason)  # only its reap is left: SIGCHLD wakes us
            return NEVER
        if not self.running:  # Act.RECYCLE: pointless while stopping
            return NEVER
        retry_at = supervision.recycle_paced(action.reason, self.pool.last_recycle, now)
        if retry_at:
            return retry_at
        if action.reason in (Reason.LIFETIME, Reason.MEMORY):
            self.log.info("worker %d %s", record.pid, action.why, extra=fields)
        self.pool.mark_recycle(record, action.reason, now)
        return now

    # -- children ---------------------------------------------------------------------------
    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            check = self.generations.check
            if check is not None and pid == check.pid:
                self._upgrade_checked(status)
                continue
            self.memory.forget(pid)
            if self.dev_reload is not None:
                self.dev_reload.watcher.forget(pid)
            stopping = not self.running or _stop_queued(self.pending_signals)
            exit_ = self.pool.reaped(pid, status, stopping=stopping)
            if exit_ is None:
                self.keeper.reaped(pid, status)  # a mold, or an orphan we adopted as subreaper
            elif exit_.boot_failed:
                self._boot_failed(exit_.record)

    def _boot_failed(self, record: WorkerRecord) -> None:
        pool = self.pool
        outcome, delay = supervision.after_boot_failure(
            pool.boot_failures + 1, current=record.generation == self.generations.current,
            stopping=not self.serving, reloading=self.generations.reloading,
            ever_ready=self.generations.ever_ready)
        fields = log_fields(record, reason=Reason.CRASH)
        if outcome is BootOutcome.IGNORE:
            self.log.info("worker %d of abandoned generation %d exited", record.pid,
                          record.generation, extra=fields)
            return
        pool.boot_failures += 1
        if outcome is BootOutcome.ABANDON:
            self.generations.abandon(pool, "a new worker failed to boot")
        elif outcome is BootOutcome.HALT:
            self.log.error("worker %d failed to boot in the first generation; shutting down",
                           record.pid, extra=fields)
            self.exit_code = 1
            self._begin_stop(StopMode.QUICK)
        else:
            pool.next_spawn = time.monotonic() + delay
            self.log.error("worker %d failed to boot; next try in %.0fs", record.pid, delay,
                           extra=fields)

    # -- reload (HUP, or a source change: DevReload) and upgrade (USR2): see generations ----
    def _on_hup(self) -> None:
        self.generations.begin(self.pool)

    def _on_usr2(self) -> None:
        self.generations.start_check()

    def _upgrade_checked(self, status: int) -> None:
        argv = self.generations.checked(status, go=self.running)
        if argv is not None:
            # The handoff channel passes to the new image like the listeners; the molds do
            # not (their channels are close-on-exec: they see EOF and go).
            self.channel.set_inheritable(True)
            error = generations.exec_image(argv, self.listeners, list(self.pool.records),
                                           HANDLED_SIGNALS, self.wakeups.wake_w,
                                           extra_env=self.channel.environ())
            self.channel.set_inheritable(False)
            self.generations.exec_failed(error)

    # -- signals ----------------------------------------------------------------------------
    def _handle_signals(self) -> None:
        while self.pending_signals:
            name, while_stopping = SIGNALS[self.pending_signals.popleft()]
            if name and (self.running or while_stopping):
                getattr(self, name)()

    def _on_term(self) -> None:
        """The first TERM starts the shutdown delay if there is one; a second cuts it short."""
        delayed = self.running and self.settings.shutdown_delay > 0
        self._begin_stop(StopMode.DELAYING if delayed else StopMode.GRACEFUL)

    def _on_quick(self) -> None:
        self._begin_stop(StopMode.QUICK)

    def _on_usr1(self) -> None:
        logs.reopen()
        self.log.info("USR1: log files reopened")
        self.pool.signal_all(signal.SIGUSR1)

    def _on_ttin(self) -> None:
        self.pool.target += 1
        self.log.info("TTIN: %s", workers_text(self.pool.target))

    def _on_ttou(self) -> None:
        self.pool.target = max(1, self.pool.target - 1)
        self.log.info("TTOU: %s", workers_text(self.pool.target))

    def _delay(self, now: float) -> float:
        """The shutdown delay runs out: the graceful drain begins."""
        if self.stop_mode is not StopMode.DELAYING:
            return NEVER
        if now < self.delay_until:
            return self.delay_until
        self._begin_stop(StopMode.GRACEFUL)
        return NEVER

    def _begin_stop(self, mode: StopMode) -> None:
        if mode not in STOP_MOVES[self.stop_mode]:
            return  # already stopping this way, or a harder one
        if self.running:
            systemd.notify("STOPPING=1")
            self.keeper.stop("shutdown")  # workers forked from now on are cold
        self.stop_mode = mode
        now = time.monotonic()
        if mode is StopMode.DELAYING:
            delay = self.settings.shutdown_delay
            self.delay_until = now + delay
            self.log.info("shutdown in %gs: /readyz says 503 and every response closes its "
                          "connection while load balancers stop sending", delay)
            self.outputs.status(f"shutting down in {delay:g} s: draining from load balancers")
            self.pool.signal_all(signal.SIGWINCH)  # serve on, but close after each response
            return
        # Stop listening now: new clients are refused at once instead of waiting in a backlog
        # that nobody will accept from. Workers take what is already queued before they close
        # their own copies (systemd's copy, if any, keeps the socket for the next start).
        sockets.cleanup(self.listeners, self.bind_specs)
        self.listeners = []
        if mode is StopMode.GRACEFUL:
            grace = self.settings.graceful_timeout
            self.log.info("graceful shutdown: draining workers (up to %gs)", grace)
            self.outputs.status(f"shutting down: draining workers (up to {grace:g} s)")
            self.pool.retire_all(Reason.SHUTDOWN, now + grace, signal.SIGTERM)
        else:
            self.log.info("quick shutdown")
            self.outputs.status("shutting down now")
            self.pool.retire_all(Reason.SHUTDOWN, now + QUICK_STOP_GRACE, signal.SIGQUIT)

    # -- exit -------------------------------------------------------------------------------
    def _cleanup(self) -> None:
        # Make sure no child outlives us even on an unexpected error in the loop.
        check = self.generations.check
        _kill_and_wait([*(self.pool.records if self.pool is not None else ()),
                        *([check.pid] if check is not None else []), *self.keeper.pids()])
        self.keeper.close()
        if self.channel is not None:
            self.channel.close()
        sockets.cleanup(self.listeners, self.bind_specs)
        self.outputs.close()
        if self.dev_reload is not None:
            self.dev_reload.watcher.close()
        outputs.remove_pidfile(self.settings.pidfile, self.pid)
        if self.scoreboard is not None:
            self.scoreboard.close()
        signal.set_wakeup_fd(-1)
        # A second TERM while the interpreter winds down must not turn a clean exit into a
        # death by signal: keep them pending until the process is gone.
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)


@dataclass
class Opened:
    """What the master opens once at startup, before the first fork."""

    channel: handoff.Channel
    hooks: dict[str, Callable]
    prepared: Any  # the first generation's TLS context (generations.prepared)
    listeners: list[socket.socket]
    bind_specs: list[Any]
    app: Callable | None  # preloaded, or None


def open_resources(settings: Any, pid: int, log: Any, outs: outputs.Outputs,
                   snapshot: Callable[[], metrics.Snapshot]) -> Opened | None:
    """The handoff channel, hooks, the TLS context, listeners, the preloaded app, metrics and
    access log; None (logged) if one cannot be had."""
    try:
        # Before the first fork; the same for every generation and across a USR2 exec.
        channel = handoff.Channel.inherit(os.environ) or handoff.Channel.create()
    except (ValueError, OSError) as error:
        log.error("handoff channel (%s): %s", handoff.ENV_HANDOFF_FDS, error)
        return None
    try:
        hooks = load_hooks(settings)
        prepared = _tls_context(settings)
        listeners, bind_specs = _open_listeners(settings, pid, log)
    except (sockets.BindError, ValueError, loader.LoadError, tls.TLSConfigError) as error:
        log.error("%s", error)
        channel.close()
        return None
    try:
        app = loader.load_app(settings.app) if settings.preload else None
        outs.open(settings, snapshot)
    except (loader.LoadError, sockets.BindError, ValueError, OSError) as error:
        log.error("%s", error)
        sockets.cleanup(listeners, bind_specs)
        channel.close()
        return None
    return Opened(channel, hooks, prepared, listeners, bind_specs, app)


def follow_settings(settings: Any, memory_sampler: Any, keeper: mold.Keeper, log: Any,
                    outs: outputs.Outputs) -> None:
    """After a reload (or its rollback): the new memory interval, refork thresholds, logs."""
    memory_sampler.interval = settings.memory_check_interval
    if keeper.enabled:
        keeper.thresholds = tuple(settings.refork_after)  # from the next generation
    elif settings.refork_after:
        log.warning("refork_after: takes effect on restart or USR2 (the master must become a "
                    "subreaper first)")
    try:
        logs.setup(settings.log_level, settings.error_log, proc="master",
                   fmt=settings.error_log_format)
        outs.configure(settings)
    except (OSError, ValueError) as error:
        log.error("reload: %s; keeping the old log", error)


class Wakeups:
    """What ends the master's sleep: a signal (its handler only records it; ``set_wakeup_fd``
    writes to a pipe), a worker's note on a second pipe (``notify_w`` is the workers'
    ``notify_fd``: they write a byte when they become ready or ask to be replaced, so their
    slots need no polling), the metrics listener's sockets, or the nearest deadline."""

    def __init__(self) -> None:
        self.pending: deque[int] = deque()
        self.wake_r = self.wake_w = -1
        self.notify_r = self.notify_w = -1

    def install(self) -> None:
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # Workers get the write end by fork; CLOEXEC keeps both ends out of a USR2 image and
        # of the upgrade check.
        self.notify_r, self.notify_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, self._record)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        # A USR2 re-exec arrives with these blocked (they were blocked across exec).
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)

    def _record(self, signum: int, frame: Any) -> None:
        # NO logging, no work: the loop acts on it (a handler can interrupt anything).
        self.pending.append(signum)

    def in_child(self) -> None:
        """In a new worker, signals still blocked: undo the master's signal plumbing (the
        worker keeps only the write end of the note pipe)."""
        signal.set_wakeup_fd(-1)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        for fd in (self.wake_r, self.wake_w, self.notify_r):
            os.close(fd)

    def sleep(self, wake_at: float, outs: outputs.Outputs, keeper: mold.Keeper) -> None:
        """Wait for a signal, a worker's note, a scrape, a new mold's hello (read here), or
        ``wake_at`` (NEVER: no deadline)."""
        if self.pending:
            return
        readers, writers = outs.fds()
        molds = keeper.fds()
        readers = [*readers, *molds]
        timeout = None if wake_at == NEVER else max(0.0, wake_at - time.monotonic())
        if outs.scraped():
            # A scrape connection is open: its time limit lives in the metrics server.
            timeout = METRICS_POLL if timeout is None else min(timeout, METRICS_POLL)
        own = [self.wake_r, self.notify_r]
        try:
            ready, writable, _ = select.select([*own, *readers], writers, [], timeout)
        except InterruptedError:
            return
        outs.serve(ready, writable)
        if set(molds) & set(ready):
            keeper.receive()
        for fd in own:
            if fd in ready:
                _drain(fd)  # the loop reads every slot on its next pass anyway


class DevReload:
    """Development reload (``reload``): a changed source file, a file matching
    ``reload_extra_files`` or the configuration file starts a reload through the HUP path,
    after the one in progress if any. A generation that fails to boot is rolled back and not
    tried again until the next change: no back-off."""

    def __init__(self, settings: Any) -> None:
        watched = [settings.config_file] if settings.config_file else []
        self.watcher = reloader.Reloader.for_workers(settings.reload_extra_files, files=watched)
        self.due = False  # a change waits for the reload in progress

    def check(self, now: float, gens: Generations, pool: Pool) -> float:
        """Scan if due, start the reload a change asks for; returns when to look again."""
        watcher = self.watcher
        if watcher.check(now):
            shown = ", ".join(map(_shown_path, watcher.changed[:3]))
            more = len(watcher.changed) - 3
            logs.get_logger().info("reload: %s changed%s", shown,
                                   f" (and {more} more)" if more > 0 else "")
            self.due = True
        if self.due and gens.steady:
            self.due = False
            gens.begin(pool, why="source changed")
        return watcher.next_check()


# -- startup helpers (no master state) ------------------------------------------------------
def _open_listeners(settings: Any, pid: int, log: Any) -> tuple[list[socket.socket],
                                                                list[sockets.BindSpec]]:
    """The listeners: handed over by a previous image (USR2), passed by systemd, or bound."""
    specs = [sockets.parse_bind(spec) for spec in settings.bind]
    inherited = generations.take_inherited_fds(os.environ)
    systemd_socks = sockets.inherited_sockets(os.environ, pid)
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    listeners: list[socket.socket] = []
    if inherited:
        listeners = [sockets.adopt(fd, "upgrade") for fd in inherited]
    elif systemd_socks:
        log.info("using %d socket(s) passed by systemd; ignoring bind", len(systemd_socks))
        listeners, specs = systemd_socks, []
    else:
        try:
            for spec in specs:
                listeners.append(sockets.bind(spec, settings.backlog, settings.reuse_port))
        except (sockets.BindError, ValueError):
            sockets.cleanup(listeners, specs)
            raise
    for sock in listeners:
        log.info("Listening at: %s (%d)", sockets.describe(sock), pid)
    return listeners, specs


def _refork_refusal(settings: Any) -> str | None:
    """One line if refork cannot run with these settings or on this system; with refork on,
    the master becomes the subreaper of the workers its molds fork."""
    why = mold.refusal(settings)
    if why is None and settings.refork_after:
        try:
            mold.set_child_subreaper()
        except mold.MoldUnsupported as error:
            return str(error)
    return why


def _prepare_generation(settings: Any) -> ssl.SSLContext | None:
    """What a reload builds before its workers fork (the TLS context); raises if the new
    settings cannot be served, and the running generation keeps serving."""
    why = mold.refusal(settings)
    if why is not None:
        raise ValueError(why)
    return _tls_context(settings)


def _tls_context(settings: Any) -> ssl.SSLContext | None:
    """One context per generation, built before its workers fork (they share its session
    ticket key); raises TLSConfigError naming the setting."""
    return tls.server_context(settings) if tls.enabled(settings) else None


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _shown_path(path: str) -> str:
    """A path as the log shows it: relative to the working directory when it is inside."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def _stop_queued(pending: deque[int]) -> bool:
    """A stop signal waits to be acted on: Ctrl-C sends INT to the workers too, and one of
    them may be reaped before the master acts on its own INT."""
    return any(SIGNALS[signum][0] in ("_on_term", "_on_quick") for signum in pending)


def _kill_and_wait(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def _own_memory(pool: Pool, sampler: memory.Sampler, now: float) -> dict[int, int]:
    """The USS of each ready worker, by pid (read at most once per interval)."""
    ready = [pid for pid, record in pool.records.items() if record.phase is Phase.READY]
    return {pid: reading.uss for pid, reading in sampler.readings(ready, now).items()}
