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
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import psutil

from forkserver import generations, loader, logs, metrics, sockets, supervision, systemd
from forkserver.generations import Generations, load_hooks
from forkserver.pool import Blueprint, Phase, Pool, WorkerRecord, call_hook
from forkserver.scoreboard import Reason, Scoreboard, State
from forkserver.supervision import NEVER, Act, Action, BootOutcome

QUICK_STOP_GRACE = 2.0    # after SIGQUIT on a quick stop, SIGKILL follows this much later
STATUS_INTERVAL = 5.0     # how often systemd's STATUS= line is refreshed
METRICS_POLL = metrics.CONNECTION_TTL / 4  # while a scrape is open, so its TTL is enforced


class StopMode(enum.Enum):
    RUNNING = "running"
    GRACEFUL = "graceful"    # TERM: stop listening, workers drain up to graceful_timeout
    QUICK = "quick"          # INT, QUIT: workers quit at once


# Where each mode may go (an unlisted move raises), and what /readyz would say meanwhile. A
# shutdown delay fits in as RUNNING -> DELAYING -> GRACEFUL (DELAYING -> QUICK), "shutting down".
STOP_MOVES: dict[StopMode, frozenset[StopMode]] = {
    StopMode.RUNNING: frozenset({StopMode.GRACEFUL, StopMode.QUICK}),
    StopMode.GRACEFUL: frozenset({StopMode.QUICK}),
    StopMode.QUICK: frozenset(),
}
STOP_READINESS: dict[StopMode, str | None] = {
    StopMode.RUNNING: None,
    StopMode.GRACEFUL: "draining",
    StopMode.QUICK: "shutting down",
}

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
        self.pending_signals: deque[int] = deque()
        self.listeners: list[socket.socket] = []
        self.bind_specs: list[sockets.BindSpec] = []
        self.scoreboard: Scoreboard | None = None
        self.pool: Pool | None = None
        self.outputs = Outputs()
        self.generations = Generations(settings, reload, self._config_changed)
        self.app: Callable | None = None
        self.stop_mode = StopMode.RUNNING
        self.exit_code = 0
        self.quiet_until = 0.0             # no silence judged before (after an oversleep)
        self.next_memory_check = 0.0
        self.wake_r = self.wake_w = -1
        self.started = time.monotonic()

    @property
    def settings(self) -> Any:
        """The current generation's settings."""
        return self.generations.settings

    @property
    def hooks(self) -> dict[str, Callable]:
        return self.generations.hooks

    @property
    def running(self) -> bool:
        return self.stop_mode is StopMode.RUNNING

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
        self.log = logs.setup(settings.log_level, settings.error_log, proc="master")
        if settings.umask is not None:
            os.umask(settings.umask)
        if not self._open():
            return 1
        _write_pidfile(settings.pidfile, self.pid, self.outputs.metrics_address())
        self.scoreboard = Scoreboard(max(2, 2 * settings.workers))
        self._install_signals()
        self.pool = Pool(self.scoreboard, settings.workers, HANDLED_SIGNALS, self._in_child)
        self._adopt_old_workers()
        import setproctitle
        setproctitle.setproctitle(f"{settings.proc_name}: master [{settings.app}]")
        self.log.info("forkserver master %d starting, app %s, %d workers",
                      self.pid, settings.app, settings.workers)
        call_hook(self.hooks, "on_starting", settings)
        try:
            self._loop()
        finally:
            self._cleanup()
            call_hook(self.hooks, "on_exit", self.settings)
        self.log.info("forkserver master %d exiting (%d)", self.pid, self.exit_code)
        return self.exit_code

    def _open(self) -> bool:
        """Hooks, listeners, the preloaded app, metrics and access log; False (logged) if one
        cannot be had."""
        settings = self.settings
        try:
            self.generations.hooks = load_hooks(settings)
            self.listeners, self.bind_specs = _open_listeners(settings, self.pid, self.log)
        except (sockets.BindError, ValueError, loader.LoadError) as error:
            self.log.error("%s", error)
            return False
        try:
            if settings.preload:
                self.app = loader.load_app(settings.app)
            self.outputs.open(settings, self._snapshot)
        except (loader.LoadError, sockets.BindError, ValueError, OSError) as error:
            self.log.error("%s", error)
            sockets.cleanup(self.listeners, self.bind_specs)
            return False
        return True

    def _adopt_old_workers(self) -> None:
        """After a USR2 re-exec, the previous image's workers are still our children."""
        pids = generations.take_old_workers(os.environ)
        if pids:
            self.generations.adopt(self.pool, pids, time.monotonic())

    def _config_changed(self, settings: Any) -> None:
        """A reload (or its rollback) changed the settings: follow their logs."""
        try:
            logs.setup(settings.log_level, settings.error_log, proc="master")
            self.outputs.set_access_log(settings)
        except (OSError, ValueError) as error:
            self.log.error("reload: %s; keeping the old log", error)

    def _snapshot(self) -> metrics.Snapshot:
        records = self.pool.records
        workers = [(pid, record.index, record.generation) for pid, record in records.items()]
        return metrics.collect(self.scoreboard, workers, self.pool.totals, self.pool.restarts,
                               self.generations.reloads, self.started, self.listeners)

    def _install_signals(self) -> None:
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, self._record_signal)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        # A USR2 re-exec arrives with these blocked (they were blocked across exec).
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)

    def _record_signal(self, signum: int, frame: Any) -> None:
        # NO logging, no work: the loop acts on it (a handler can interrupt anything).
        self.pending_signals.append(signum)

    def _in_child(self) -> None:
        """In a new worker, signals still blocked: undo the master's signal plumbing."""
        signal.set_wakeup_fd(-1)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        os.close(self.wake_r)
        os.close(self.wake_w)

    # -- the loop ---------------------------------------------------------------------------
    def _loop(self) -> None:
        planned = NEVER
        while True:
            if supervision.overslept(planned, time.monotonic()):
                self.quiet_until = supervision.quiet_period(time.monotonic())
            self._reap()
            self._handle_signals()
            now = time.monotonic()
            wake_at = self._supervise(now)
            if self.running:
                self.generations.advance(self.pool)
                self.pool.retire_recycled(self.generations.current)
                wake_at = min(wake_at, self.pool.maintain(self._blueprint(), now))
            elif not self.pool:
                return
            status_due = self.generations.ever_ready and self.running
            planned = min(wake_at, self.outputs.tell_systemd(now, self.pool, status_due))
            self._sleep(planned)

    def _blueprint(self) -> Blueprint:
        return Blueprint(self.settings, self.generations.current, self.listeners, self.app,
                         self.hooks, self.outputs.access_log, self.pid)

    def _supervise(self, now: float) -> float:
        """Apply the policies to every worker; returns when the next one is due."""
        settings = self.settings
        wake_at = NEVER
        sample = False
        if settings.max_worker_memory and self.running:
            sample = now >= self.next_memory_check
            if sample:
                self.next_memory_check = now + settings.memory_check_interval
            wake_at = self.next_memory_check
        for record in list(self.pool.records.values()):
            slot = self.scoreboard.read(record.index) if record.index >= 0 else None
            memory = _own_memory(record.pid) if sample and record.phase is Phase.READY else None
            verdict = supervision.supervise(record, slot, settings, now, own_memory=memory,
                                            quiet_until=self.quiet_until)
            wake_at = min(wake_at, verdict.wake_at)
            for action in verdict.actions:
                wake_at = min(wake_at, self._carry_out(record, action, now))
        return wake_at

    def _carry_out(self, record: WorkerRecord, action: Action, now: float) -> float:
        """One action of a verdict; returns when to look at the worker again. A worker whose
        phase changed is looked at again at once: the rules of its new phase (the timeouts of
        a worker just ready) were not part of the verdict that moved it."""
        if action.act is Act.READY:
            self.pool.mark_ready(record, now)
            self.generations.worker_ready(self.pool)
            return now
        if action.act is Act.ABORT:
            self.log.error("worker %d %s; aborting", record.pid, action.why)
            self.pool.abort(record, action.reason, now + supervision.KILL_GRACE)
            return record.kill_at
        if action.act is Act.KILL:
            self.log.error("worker %d %s; sending SIGKILL", record.pid, action.why)
            self.pool.kill(record, action.reason)  # only its reap is left: SIGCHLD wakes us
            return NEVER
        if not self.running:  # Act.RECYCLE: pointless while stopping
            return NEVER
        retry_at = supervision.recycle_paced(action.reason, self.pool.last_recycle, now)
        if retry_at:
            return retry_at
        if action.reason in (Reason.LIFETIME, Reason.MEMORY):
            self.log.info("worker %d %s", record.pid, action.why)
        self.pool.mark_recycle(record, action.reason, now)
        return now

    def _sleep(self, wake_at: float) -> None:
        """Wait for a signal, a scrape, or ``wake_at`` (NEVER: no deadline at all)."""
        if self.pending_signals:
            return
        readers, writers = self.outputs.fds()
        timeout = None if wake_at == NEVER else max(0.0, wake_at - time.monotonic())
        if self.outputs.scraped():
            # A scrape connection is open: its time limit lives in the metrics server.
            timeout = METRICS_POLL if timeout is None else min(timeout, METRICS_POLL)
        try:
            ready, writable, _ = select.select([self.wake_r, *readers], writers, [], timeout)
        except InterruptedError:
            return
        self.outputs.serve(ready, writable)
        if self.wake_r in ready:
            try:
                while os.read(self.wake_r, 4096):
                    pass
            except BlockingIOError:
                pass

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
            exit_ = self.pool.reaped(pid, status)
            if exit_ is not None and exit_.boot_failed:
                self._boot_failed(exit_.record)

    def _boot_failed(self, record: WorkerRecord) -> None:
        pool = self.pool
        outcome, delay = supervision.after_boot_failure(
            pool.boot_failures + 1, current=record.generation == self.generations.current,
            stopping=not self.running, reloading=self.generations.reloading,
            ever_ready=self.generations.ever_ready)
        if outcome is BootOutcome.IGNORE:
            self.log.info("worker %d of abandoned generation %d exited", record.pid,
                          record.generation)
            return
        pool.boot_failures += 1
        if outcome is BootOutcome.ABANDON:
            self.generations.abandon(pool, "a new worker failed to boot")
        elif outcome is BootOutcome.HALT:
            self.log.error("worker %d failed to boot in the first generation; shutting down",
                           record.pid)
            self.exit_code = 1
            self._begin_stop(StopMode.QUICK)
        else:
            pool.next_spawn = time.monotonic() + delay
            self.log.error("worker %d failed to boot; next try in %.0fs", record.pid, delay)

    # -- reload (HUP) and upgrade (USR2): see generations -----------------------------------
    def _on_hup(self) -> None:
        self.generations.begin(self.pool)

    def _on_usr2(self) -> None:
        self.generations.start_check()

    def _upgrade_checked(self, status: int) -> None:
        argv = self.generations.checked(status, go=self.running)
        if argv is not None:
            error = generations.exec_image(argv, self.listeners, list(self.pool.records),
                                           HANDLED_SIGNALS, self.wake_w)
            self.generations.exec_failed(error)

    # -- signals ----------------------------------------------------------------------------
    def _handle_signals(self) -> None:
        while self.pending_signals:
            name, while_stopping = SIGNALS[self.pending_signals.popleft()]
            if name and (self.running or while_stopping):
                getattr(self, name)()

    def _on_term(self) -> None:
        self._begin_stop(StopMode.GRACEFUL)

    def _on_quick(self) -> None:
        self._begin_stop(StopMode.QUICK)

    def _on_usr1(self) -> None:
        logs.reopen()
        self.log.info("USR1: log files reopened")
        self.pool.signal_all(signal.SIGUSR1)

    def _on_ttin(self) -> None:
        self.pool.target += 1
        self.log.info("TTIN: %d workers", self.pool.target)

    def _on_ttou(self) -> None:
        if self.pool.target > 1:
            self.pool.target -= 1
            self.log.info("TTOU: %d workers", self.pool.target)

    def _begin_stop(self, mode: StopMode) -> None:
        if mode not in STOP_MOVES[self.stop_mode]:
            return  # already stopping this way, or a harder one
        self.stop_mode = mode
        now = time.monotonic()
        systemd.notify("STOPPING=1")
        # Stop listening now: new clients are refused at once instead of waiting in a backlog
        # that nobody will accept from. Workers take what is already queued before they close
        # their own copies (systemd's copy, if any, keeps the socket for the next start).
        sockets.cleanup(self.listeners, self.bind_specs)
        self.listeners = []
        if mode is StopMode.GRACEFUL:
            grace = self.settings.graceful_timeout
            self.log.info("graceful shutdown: draining workers (up to %gs)", grace)
            self.pool.retire_all(Reason.SHUTDOWN, now + grace, signal.SIGTERM)
        else:
            self.log.info("quick shutdown")
            self.pool.retire_all(Reason.SHUTDOWN, now + QUICK_STOP_GRACE, signal.SIGQUIT)

    # -- exit -------------------------------------------------------------------------------
    def _cleanup(self) -> None:
        # Make sure no child outlives us even on an unexpected error in the loop.
        pids = list(self.pool.records) if self.pool is not None else []
        if self.generations.check is not None:
            pids.append(self.generations.check.pid)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        sockets.cleanup(self.listeners, self.bind_specs)
        self.outputs.close()
        _remove_pidfile(self.settings.pidfile, self.pid)
        if self.scoreboard is not None:
            self.scoreboard.close()
        signal.set_wakeup_fd(-1)
        # A second TERM while the interpreter winds down must not turn a clean exit into a
        # death by signal: keep them pending until the process is gone.
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)


class Outputs:
    """What the master tells the world besides serving: the metrics listener, answered from
    the master's own loop so a scrape works while every worker is busy; the access log, opened
    here so every worker inherits the same file; systemd's watchdog and status line."""

    def __init__(self) -> None:
        self.server: metrics.MetricsServer | None = None
        self.listener: tuple[socket.socket, sockets.BindSpec] | None = None
        self.access_log: logs.AccessLog | None = None
        self.access_log_config: tuple[str, str] = ("", "")
        self.watchdog = systemd.watchdog_interval(os.environ, os.getpid())
        self.next_watchdog = 0.0
        # STATUS= lines only mean something under systemd; elsewhere they cost wakeups.
        self.status_lines = bool(os.environ.get("NOTIFY_SOCKET"))
        self.next_status = 0.0

    def tell_systemd(self, now: float, pool: Pool, status_due: bool) -> float:
        """Watchdog pings at half of WATCHDOG_USEC, and (once serving) a STATUS line every few
        seconds; returns when the next one is due."""
        wake_at = NEVER
        if self.watchdog:
            if now >= self.next_watchdog:
                systemd.notify("WATCHDOG=1")
                self.next_watchdog = now + self.watchdog
            wake_at = self.next_watchdog
        if status_due and self.status_lines:
            if now >= self.next_status:
                self.next_status = now + STATUS_INTERVAL
                views = [pool.scoreboard.read(record.index)
                         for record in pool.records.values() if record.index >= 0]
                busy = sum(1 for view in views if view.state == State.BUSY)
                served = pool.totals.requests + sum(view.requests for view in views)
                systemd.notify(f"STATUS={len(pool)} workers ({busy} busy), "
                               f"{served} requests served")
            wake_at = min(wake_at, self.next_status)
        return wake_at

    def open(self, settings: Any, snapshot: Callable[[], metrics.Snapshot]) -> None:
        if settings.metrics_bind:
            spec = sockets.parse_bind(settings.metrics_bind)
            sock = sockets.bind(spec, 64)
            self.listener = (sock, spec)
            self.server = metrics.MetricsServer(sock, snapshot)
            logs.get_logger().info("Metrics at: %s", sockets.describe(sock))
        self.set_access_log(settings)

    def set_access_log(self, settings: Any) -> None:
        """Open the access log the settings ask for (at start, and when a reload changes it).
        Workers already forked keep the file they inherited; the master's copy can go."""
        old = self.access_log
        wanted = (settings.access_log, settings.access_log_format)
        if old is not None and wanted == self.access_log_config:
            return
        self.access_log = (logs.AccessLog(settings.access_log, settings.access_log_format)
                           if settings.access_log else None)
        self.access_log_config = wanted
        if old is not None:
            old.close()

    def metrics_address(self) -> str:
        """HOST:PORT of the metrics listener (its real port), or "" without one."""
        if self.listener is None:
            return ""
        return sockets.describe(self.listener[0]).removeprefix("http://")

    def fds(self) -> tuple[list[int], list[int]]:
        """What to select() on for reading and for writing."""
        if self.server is None:
            return [], []
        return self.server.fds(), self.server.write_fds()

    def scraped(self) -> bool:
        """A scrape connection is open (fds() holds more than the listener, or output waits)."""
        return self.server is not None and (len(self.server.fds()) > 1
                                            or bool(self.server.write_fds()))

    def serve(self, readable: list[int], writable: list[int]) -> None:
        server = self.server
        if server is None:
            return
        own = set(server.fds())
        for fd in readable:
            if fd in own:
                server.on_readable(fd)
        for fd in writable:
            server.on_writable(fd)
        server.expire(time.monotonic())

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            sock, spec = self.listener
            sockets.cleanup([sock], [spec])
        if self.access_log is not None:
            self.access_log.close()


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


def _write_pidfile(path: str, pid: int, metrics_address: str) -> None:
    if not path:
        return
    _write_atomically(path, f"{pid}\n", pid)
    if metrics_address:
        # `forkserver status --pidfile` finds the metrics listener here (its real port,
        # even when metrics_bind asked for port 0).
        _write_atomically(path + ".metrics", metrics_address + "\n", pid)


def _remove_pidfile(path: str, pid: int) -> None:
    if not path:
        return
    try:
        with open(path) as handle:
            if handle.read().strip() != str(pid):
                return
        os.unlink(path)
    except OSError:
        return
    try:
        os.unlink(path + ".metrics")
    except FileNotFoundError:
        pass


def _write_atomically(path: str, text: str, pid: int) -> None:
    tmp = f"{path}.{pid}.tmp"
    with open(tmp, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def _own_memory(pid: int) -> int:
    """Resident memory not shared with other processes: RSS minus shared pages, so a preloaded
    app's copy-on-write pages do not count against every worker at once."""
    try:
        info = psutil.Process(pid).memory_info()
    except psutil.Error:
        return 0
    return max(0, info.rss - getattr(info, "shared", 0))
