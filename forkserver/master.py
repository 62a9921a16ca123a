"""The master: binds listeners, forks workers and supervises them. It never serves app traffic.

The control plane is one loop in a fixed order (rule 3 of style.md): reap children, act on
queued signals, read the scoreboard (readiness, timeouts, recycling), fix the worker count, then
sleep until the nearest deadline or a signal. Signal handlers only record the signal;
``set_wakeup_fd`` wakes the sleep (rule 2). Reloads and upgrades advance as states of that loop,
never as sleeps: a new generation is started, and the old one is retired only once every new
worker has marked itself ready in the scoreboard (rule 8).
"""

from __future__ import annotations

import functools
import os
import random
import select
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

from forkserver import loader, logs, metrics, sockets, systemd, worker
from forkserver.scoreboard import Reason, Scoreboard, State

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1,
                   signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD)
KILL_GRACE = 5.0          # after SIGABRT, SIGKILL follows this much later
QUICK_STOP_GRACE = 2.0
MAX_BOOT_BACKOFF = 30.0
RECYCLE_SPACING = 1.0     # at most one worker recycled per second
BOOT_POLL = 0.05          # how often to look for a booting worker's readiness
STATUS_INTERVAL = 5.0     # how often systemd's STATUS= line is refreshed
TICK = 1.0                # the longest the master sleeps without looking at the scoreboard

# Environment handed across a USR2 re-exec (the listeners keep their descriptor numbers).
ENV_INHERIT_FDS = "FORKSERVER_INHERIT_FDS"
ENV_OLD_WORKERS = "FORKSERVER_OLD_WORKERS"

MASTER_HOOKS = ("on_starting", "when_ready", "pre_fork", "on_reload", "on_exit")
WORKER_HOOKS = ("post_fork", "post_worker_init", "worker_exit", "pre_request", "post_request")


@dataclass
class WorkerInfo:
    pid: int
    index: int                       # scoreboard slot; -1 for workers of a previous image
    generation: int
    started: float
    retiring: Reason = Reason.NONE   # why TERM was sent, if it was
    recycle: Reason = Reason.NONE    # asked to be replaced; TERM follows once a new one is ready
    kill_at: float = 0.0             # when to SIGKILL, 0 = not scheduled
    aborted: bool = False
    ready: bool = False
    sigkill_sent: bool = False


@dataclass
class Transition:
    """A reload or upgrade in progress: what to go back to if the new generation fails."""

    kind: str                        # "reload" or "upgrade"
    old_generation: int
    old_settings: Any
    old_target: int
    old_hooks: dict[str, Callable]
    started: float = field(default_factory=time.monotonic)


class Master:
    def __init__(self, settings: Any, reload: Callable[[], Any] | None = None) -> None:
        self.settings = settings
        self.reload = reload
        self.log = logs.get_logger()
        self.pid = os.getpid()
        self.workers: dict[int, WorkerInfo] = {}
        self.helpers: dict[int, Callable[[int], None]] = {}   # subprocesses: pid -> on_exit
        self.pending_signals: deque[int] = deque()
        self.generation = 1
        self.last_generation = 1           # generation numbers never repeat, even after rollback
        self.target = settings.workers
        self.listeners: list[socket.socket] = []
        self.bind_specs: list[sockets.BindSpec] = []
        self.scoreboard: Scoreboard | None = None
        self.app: Callable | None = None
        self.hooks: dict[str, Callable] = {}
        self.transition: Transition | None = None
        self.upgrade_check_pid = 0
        self.stopping: str = ""            # "", "graceful" or "quick"
        self.stop_deadline = 0.0
        self.exit_code = 0
        self.ever_ready = False
        self.boot_failures = 0
        self.next_spawn = 0.0
        self.last_recycle = 0.0
        self.next_memory_check = 0.0
        self.wake_r = self.wake_w = -1
        self.announced_generation = 0      # the last generation logged as fully ready
        self.watchdog = systemd.watchdog_interval(os.environ, self.pid)
        self.next_watchdog = 0.0
        self.next_status = 0.0
        self.totals = metrics.Totals()     # counters of exited workers, so none is ever lost
        self.restarts: dict[str, int] = {}
        self.reloads = 0
        self.started = time.monotonic()
        self.metrics_server: metrics.MetricsServer | None = None
        self.metrics_listener: tuple[socket.socket, sockets.BindSpec] | None = None
        self.access_log: logs.AccessLog | None = None
        self.access_log_config: tuple[str, str] = ("", "")

    # -- startup ----------------------------------------------------------------------------
    def run(self) -> int:
        settings = self.settings
        self.log = logs.setup(settings.log_level, settings.error_log, proc="master")
        if settings.umask is not None:
            os.umask(settings.umask)
        try:
            self.hooks = self._load_hooks(settings)
            self._open_listeners()
        except (sockets.BindError, ValueError, loader.LoadError) as error:
            self.log.error("%s", error)
            return 1
        if settings.preload:
            try:
                self.app = loader.load_app(settings.app)
            except loader.LoadError as error:
                self.log.error("%s", error)
                sockets.cleanup(self.listeners, self.bind_specs)
                return 1
        try:
            self._open_observability()
        except (sockets.BindError, ValueError, OSError) as error:
            self.log.error("%s", error)
            sockets.cleanup(self.listeners, self.bind_specs)
            return 1
        self._write_pidfile()
        self.scoreboard = Scoreboard(max(2, 2 * self.target))
        self._install_signals()
        self._adopt_old_workers()
        self._set_title()
        self.log.info("forkserver master %d starting, app %s, %d workers",
                      self.pid, settings.app, self.target)
        self._run_hook("on_starting", settings)
        try:
            self._loop()
        finally:
            self._cleanup()
            self._run_hook("on_exit", self.settings)
        self.log.info("forkserver master %d exiting (%d)", self.pid, self.exit_code)
        return self.exit_code

    def _load_hooks(self, settings: Any) -> dict[str, Callable]:
        hooks = {}
        for name in MASTER_HOOKS + WORKER_HOOKS:
            spec = getattr(settings, name, "")
            if spec:
                try:
                    hooks[name] = loader.load_hook(spec)
                except loader.LoadError as error:
                    raise loader.LoadError(f"hook {name}: {error}") from None
        return hooks

    def _run_hook(self, name: str, *args: Any) -> None:
        hook = self.hooks.get(name)
        if hook is not None:
            try:
                hook(*args)
            except Exception:  # a hook must not take the master down
                self.log.exception("hook %s failed", name)

    def _open_listeners(self) -> None:
        settings = self.settings
        self.bind_specs = [sockets.parse_bind(spec) for spec in settings.bind]
        inherited_fds = os.environ.pop(ENV_INHERIT_FDS, "")
        systemd_socks = sockets.inherited_sockets(os.environ, self.pid)
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
        if inherited_fds:
            self.listeners = [sockets.adopt(int(fd), "upgrade") for fd in inherited_fds.split(",")]
        elif systemd_socks:
            self.log.info("using %d socket(s) passed by systemd; ignoring bind", len(systemd_socks))
            self.listeners = systemd_socks
            self.bind_specs = []
        else:
            try:
                for spec in self.bind_specs:
                    self.listeners.append(sockets.bind(spec, settings.backlog, settings.reuse_port))
            except (sockets.BindError, ValueError):
                sockets.cleanup(self.listeners, self.bind_specs)
                raise
        for sock in self.listeners:
            self.log.info("Listening at: %s (%d)", sockets.describe(sock), self.pid)

    def _adopt_old_workers(self) -> None:
        """After a USR2 re-exec, the previous image's workers are still our children."""
        pids = os.environ.pop(ENV_OLD_WORKERS, "")
        if not pids:
            return
        now = time.monotonic()
        for pid in map(int, pids.split(",")):
            self.workers[pid] = WorkerInfo(pid=pid, index=-1, generation=0, started=now,
                                           ready=True)
        self.ever_ready = True
        self.transition = Transition("upgrade", 0, self.settings, self.target, self.hooks)
        self.log.info("upgraded in place: %d old workers drain once the new ones are ready",
                      len(self.workers))

    def _open_observability(self) -> None:
        """The metrics listener (served from this loop, never by workers) and the access log,
        opened here so every worker inherits the same file."""
        settings = self.settings
        if settings.metrics_bind:
            spec = sockets.parse_bind(settings.metrics_bind)
            sock = sockets.bind(spec, 64)
            self.metrics_listener = (sock, spec)
            self.metrics_server = metrics.MetricsServer(sock, self._snapshot)
            self.log.info("Metrics at: %s", sockets.describe(sock))
        self._set_access_log(settings)

    def _set_access_log(self, settings: Any) -> None:
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

    def _snapshot(self) -> metrics.Snapshot:
        workers = [(pid, info.index, info.generation) for pid, info in self.workers.items()]
        return metrics.collect(self.scoreboard, workers, self.totals, self.restarts,
                               self.reloads, self.started, self.listeners)

    def _write_pidfile(self) -> None:
        path = self.settings.pidfile
        if not path:
            return
        _write_atomically(path, f"{self.pid}\n", self.pid)
        if self.metrics_listener is not None:
            # `forkserver status --pidfile` finds the metrics listener here (its real port,
            # even when metrics_bind asked for port 0).
            address = sockets.describe(self.metrics_listener[0]).removeprefix("http://")
            _write_atomically(path + ".metrics", address + "\n", self.pid)

    def _remove_pidfile(self) -> None:
        path = self.settings.pidfile
        if not path:
            return
        try:
            with open(path) as handle:
                if handle.read().strip() == str(self.pid):
                    os.unlink(path)
                    if self.metrics_listener is not None:
                        os.unlink(path + ".metrics")
        except OSError:
            pass

    def _set_title(self) -> None:
        import setproctitle
        setproctitle.setproctitle(f"{self.settings.proc_name}: master [{self.settings.app}]")

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

    # -- the loop ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            self._reap()
            self._handle_signals()
            now = time.monotonic()
            self._read_scoreboard(now)
            if self.stopping:
                if not self.workers:
                    return
                if now >= self.stop_deadline:
                    for info in self.workers.values():
                        if not info.sigkill_sent:
                            self.log.warning("worker %d still running at the deadline; killing",
                                             info.pid)
                            info.sigkill_sent = True
                            self._signal(info.pid, signal.SIGKILL)
                    self.stop_deadline = now + TICK
            else:
                self._advance_transition()
                self._recycle(now)
                self._maintain(now)
            self._tell_systemd(now)
            self._sleep(self._next_wakeup(now))

    def _tell_systemd(self, now: float) -> None:
        """Watchdog pings at half of WATCHDOG_USEC, and a STATUS line every few seconds."""
        if self.watchdog and now >= self.next_watchdog:
            systemd.notify("WATCHDOG=1")
            self.next_watchdog = now + self.watchdog
        if now >= self.next_status and self.ever_ready and not self.stopping:
            self.next_status = now + STATUS_INTERVAL
            views = [self.scoreboard.read(info.index) for info in self.workers.values()
                     if info.index >= 0]
            busy = sum(1 for view in views if view.state == State.BUSY)
            served = self.totals.requests + sum(view.requests for view in views)
            systemd.notify(f"STATUS={len(self.workers)} workers ({busy} busy), "
                           f"{served} requests served")

    def _sleep(self, seconds: float) -> None:
        if self.pending_signals:
            return
        server = self.metrics_server
        readers = [self.wake_r, *server.fds()] if server else [self.wake_r]
        writers = server.write_fds() if server else []
        try:
            ready, writable, _ = select.select(readers, writers, [], max(0.0, seconds))
        except InterruptedError:
            return
        if server is not None:
            for fd in ready:
                if fd != self.wake_r:
                    server.on_readable(fd)
            for fd in writable:
                server.on_writable(fd)
            server.expire(time.monotonic())
        if self.wake_r in ready:
            try:
                while os.read(self.wake_r, 4096):
                    pass
            except BlockingIOError:
                pass

    def _next_wakeup(self, now: float) -> float:
        wake = now + TICK
        for info in self.workers.values():
            if info.kill_at:
                wake = min(wake, info.kill_at)
            if not info.ready:
                wake = min(wake, now + BOOT_POLL)  # notice readiness promptly
        if self.stopping:
            wake = min(wake, self.stop_deadline)
        elif self.next_spawn > now:
            wake = min(wake, self.next_spawn)
        if self.watchdog:
            wake = min(wake, self.next_watchdog)
        return max(0.0, wake - now)

    # -- children ---------------------------------------------------------------------------
    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            helper = self.helpers.pop(pid, None)
            if helper is not None:
                helper(status)
                continue
            info = self.workers.pop(pid, None)
            if info is not None:
                self._worker_exited(info, status)

    def _worker_exited(self, info: WorkerInfo, status: int) -> None:
        requests = 0
        if info.index >= 0:
            view = self.scoreboard.read(info.index)
            requests = view.requests
            self.totals.fold(view)
            self.scoreboard.release(info.index)
        if os.WIFSIGNALED(status):
            signum = os.WTERMSIG(status)
            how = f"killed by {signal.Signals(signum).name}"
            if signum == signal.SIGKILL and not (info.kill_at or info.sigkill_sent):
                how += " (not sent by the master: out of memory?)"
                info.retiring = Reason.OOM
        else:
            code = os.WEXITSTATUS(status)
            how = f"exited with code {code}"
            if code == worker.EXIT_BOOT_ERROR and not info.ready:
                self._boot_failed(info)
                return
        expected = (info.retiring not in (Reason.NONE, Reason.OOM) or self.stopping) \
            and not info.aborted
        reason = info.retiring.name.lower() if info.retiring != Reason.NONE else "crash"
        self.restarts[reason] = self.restarts.get(reason, 0) + 1
        if expected:
            self.log.info("worker %d %s (%s, %d requests)", info.pid, how, reason, requests)
        else:
            self.log.error("worker %d %s after %d requests (%s)", info.pid, how, requests,
                           "timeout" if info.aborted else reason)

    def _boot_failed(self, info: WorkerInfo) -> None:
        if self.stopping or info.generation != self.generation:
            self.log.info("worker %d of abandoned generation %d exited", info.pid, info.generation)
            return
        self.boot_failures += 1
        transition = self.transition
        if transition is not None and info.generation == self.generation \
                and transition.kind == "reload":
            self._abandon_reload("a new worker failed to boot")
            return
        if not self.ever_ready:
            self.log.error("worker %d failed to boot in the first generation; shutting down",
                           info.pid)
            self.exit_code = 1
            self._begin_stop("quick")
            return
        delay = min(MAX_BOOT_BACKOFF, 2.0 ** min(self.boot_failures, 5))
        self.next_spawn = time.monotonic() + delay
        self.log.error("worker %d failed to boot; next try in %.0fs", info.pid, delay)

    def _serving(self) -> list[WorkerInfo]:
        """Workers of the current generation that are not on their way out."""
        return [info for info in self.workers.values()
                if info.generation == self.generation and info.retiring == Reason.NONE
                and info.recycle == Reason.NONE]

    def _maintain(self, now: float) -> None:
        serving = self._serving()
        missing = self.target - len(serving)
        while missing > 0 and now >= self.next_spawn:
            if not self._spawn():
                break
            missing -= 1
        if missing < 0:
            # Retire the youngest extras first (the oldest are warm).
            for info in sorted(serving, key=lambda i: i.started, reverse=True)[:-missing]:
                self._retire(info, Reason.SCALE)

    def _retire(self, info: WorkerInfo, reason: Reason) -> None:
        if info.retiring == Reason.NONE:
            info.retiring = reason
        self._signal(info.pid, signal.SIGTERM)

    def _worker_spec(self, index: int) -> worker.WorkerSpec:
        settings = self.settings
        app = self.app
        load_app: Callable[[], Callable]
        if app is not None:
            load_app = lambda: app  # preloaded in the master
        else:
            load_app = functools.partial(loader.load_app, settings.app)
        jitter = settings.max_requests_jitter
        return worker.WorkerSpec(
            settings=settings, index=index, generation=self.generation,
            listeners=self.listeners, load_app=load_app, scoreboard=self.scoreboard,
            master_pid=self.pid, title=f"{settings.proc_name}: worker {index} [{settings.app}]",
            max_requests=(settings.max_requests + random.randint(0, jitter)
                          if settings.max_requests else 0),
            hooks={name: hook for name, hook in self.hooks.items() if name in WORKER_HOOKS},
            access_log=self.access_log,
        )

    def _spawn(self) -> bool:
        index = self.scoreboard.free_index()
        if index is None:
            return False
        spec = self._worker_spec(index)
        self._run_hook("pre_fork", self.settings, index)
        self.scoreboard.claim(index, 0, self.generation)
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            pid = os.fork()
        except OSError as error:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
            self.scoreboard.release(index)
            self.log.error("cannot fork a worker: %s", error)
            self.next_spawn = time.monotonic() + 1.0
            return False
        if pid == 0:
            self._become_worker(spec)  # never returns
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
        self.workers[pid] = WorkerInfo(pid=pid, index=index, generation=self.generation,
                                       started=time.monotonic())
        self.log.info("booting worker %d (slot %d, generation %d)", pid, index, self.generation)
        return True

    def _become_worker(self, spec: worker.WorkerSpec) -> None:
        # Still with signals blocked: undo the master's signal plumbing before anything can
        # arrive, or a signal meant for this worker would land in the master's wakeup pipe.
        signal.set_wakeup_fd(-1)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        os.close(self.wake_r)
        os.close(self.wake_w)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
        worker.run(spec)

    def _signal(self, pid: int, signum: int) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    def _kill_all(self, signum: int) -> None:
        for pid in list(self.workers):
            self._signal(pid, signum)

    # -- scoreboard: readiness, timeouts, recycling -----------------------------------------
    def _read_scoreboard(self, now: float) -> None:
        timeout = self.settings.timeout
        boot_timeout = self.settings.boot_timeout
        for info in list(self.workers.values()):
            if info.kill_at and now >= info.kill_at and not info.sigkill_sent:
                self.log.error("worker %d did not exit; sending SIGKILL", info.pid)
                info.sigkill_sent = True
                self._signal(info.pid, signal.SIGKILL)
                continue
            if info.index < 0:
                continue  # a previous image's worker: its slot lives in the old scoreboard
            view = self.scoreboard.read(info.index)
            if not info.ready:
                if view.state in (State.IDLE, State.BUSY, State.KEEPALIVE):
                    self._worker_ready(info)
                elif (boot_timeout and not info.aborted and view.state == State.BOOTING
                      and now - info.started > boot_timeout):
                    self.log.error("worker %d did not boot within %gs; killing", info.pid,
                                   boot_timeout)
                    info.aborted = True
                    info.sigkill_sent = True
                    self._signal(info.pid, signal.SIGKILL)
                continue
            if view.reason != Reason.NONE and info.recycle == Reason.NONE \
                    and view.state != State.EXITING and info.retiring == Reason.NONE:
                info.recycle = Reason(view.reason)   # the worker asked to be replaced
            if (timeout and not info.aborted and view.state == State.BUSY
                    and view.request_start and now - view.request_start > timeout):
                self.log.error("worker %d timed out after %.1fs serving %r; aborting",
                               info.pid, now - view.request_start, view.request_line)
                info.aborted = True
                info.retiring = Reason.TIMEOUT
                info.kill_at = now + KILL_GRACE
                self._signal(info.pid, signal.SIGABRT)

    def _worker_ready(self, info: WorkerInfo) -> None:
        info.ready = True
        self.boot_failures = 0
        self.ever_ready = True
        serving = self._serving()
        if (self.announced_generation != self.generation and len(serving) >= self.target
                and all(other.ready for other in serving)):
            self.announced_generation = self.generation
            self.log.info("%d workers ready (generation %d)", len(serving), self.generation)
            if self.generation == 1 and self.transition is None:
                self._run_hook("when_ready", self.settings)
                systemd.notify("READY=1\nSTATUS=serving")

    def _recycle(self, now: float) -> None:
        """Replace workers past their request, memory or lifetime limit, one a second: the
        replacement is started first, and TERM goes out once it is ready."""
        settings = self.settings
        serving = self._serving()
        if settings.max_worker_lifetime:
            for info in serving:
                if now - info.started > settings.max_worker_lifetime:
                    self._mark_recycle(info, Reason.LIFETIME, now)
        if settings.max_worker_memory and now >= self.next_memory_check:
            self.next_memory_check = now + settings.memory_check_interval
            limit = settings.max_worker_memory * 1024 * 1024
            for info in serving:
                own = _own_memory(info.pid)
                if own > limit:
                    self.log.info("worker %d uses %.1f MiB of its own memory (limit %d MiB)",
                                  info.pid, own / 1048576, settings.max_worker_memory)
                    self._mark_recycle(info, Reason.MEMORY, now)
        pending = [info for info in self.workers.values()
                   if info.recycle != Reason.NONE and info.retiring == Reason.NONE]
        if not pending:
            return
        ready = [info for info in self._serving() if info.ready]
        if len(ready) >= self.target:
            for info in pending:
                self.log.info("recycling worker %d (%s)", info.pid, info.recycle.name.lower())
                self._retire(info, info.recycle)

    def _mark_recycle(self, info: WorkerInfo, reason: Reason, now: float) -> None:
        if info.recycle == Reason.NONE and now - self.last_recycle >= RECYCLE_SPACING:
            self.last_recycle = now
            info.recycle = reason

    # -- reload (HUP) and upgrade (USR2) --------------------------------------------------------
    def _on_sighup(self) -> None:
        if self.transition is not None:
            self.log.warning("HUP ignored: a %s is already in progress", self.transition.kind)
            return
        old_settings, old_hooks = self.settings, self.hooks
        if self.reload is not None:
            try:
                new_settings = self.reload()
                new_hooks = self._load_hooks(new_settings)
            except Exception as error:  # noqa: BLE001 - a bad config must not stop the server
                self.log.error("reload failed, keeping the running configuration: %s", error)
                return
            if list(new_settings.bind) != list(old_settings.bind):
                self.log.warning("bind changed in the configuration; listeners change only on "
                                 "restart or USR2")
            try:
                logs.setup(new_settings.log_level, new_settings.error_log, proc="master")
                self._set_access_log(new_settings)
            except (OSError, ValueError) as error:
                self.log.error("reload: %s; keeping the old log", error)
            self.settings, self.hooks = new_settings, new_hooks
        self.reloads += 1
        self.transition = Transition("reload", self.generation, old_settings, self.target,
                                     old_hooks)
        self.last_generation += 1
        self.generation = self.last_generation
        self.target = self.settings.workers
        self.boot_failures = 0
        self.next_spawn = 0.0
        systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        self.log.info("HUP: reloading, starting generation %d", self.generation)
        self._run_hook("on_reload", self.settings)

    def _advance_transition(self) -> None:
        transition = self.transition
        if transition is None:
            return
        serving = self._serving()
        if len(serving) < self.target or not all(info.ready for info in serving):
            return
        old = [info for info in self.workers.values() if info.generation != self.generation]
        self.log.info("generation %d ready; retiring %d old workers", self.generation, len(old))
        for info in old:
            self._retire(info, Reason.RELOAD)
        self.transition = None
        systemd.notify("READY=1\nSTATUS=serving")

    def _abandon_reload(self, why: str) -> None:
        transition = self.transition
        self.log.error("reload abandoned (%s); generation %d keeps serving",
                       why, transition.old_generation)
        for info in list(self.workers.values()):
            if info.generation == self.generation:
                self._retire(info, Reason.RELOAD)
        self.generation = transition.old_generation
        self.settings = transition.old_settings
        try:
            self._set_access_log(self.settings)
        except (OSError, ValueError) as error:
            self.log.error("cannot reopen the access log: %s", error)
        self.hooks = transition.old_hooks
        self.target = transition.old_target
        self.transition = None
        self.next_spawn = 0.0
        systemd.notify("READY=1\nSTATUS=serving (reload failed)")

    def _on_sigusr2(self) -> None:
        if self.transition is not None or self.upgrade_check_pid:
            self.log.warning("USR2 ignored: a reload or upgrade is already in progress")
            return
        argv = self._own_argv()
        check_argv = [*argv, "--check-config"]
        output = tempfile.TemporaryFile()  # noqa: SIM115 - read and closed when the check exits
        try:
            pid = os.posix_spawn(check_argv[0], check_argv, os.environ,
                                 file_actions=[(os.POSIX_SPAWN_DUP2, output.fileno(), 1),
                                               (os.POSIX_SPAWN_DUP2, output.fileno(), 2)])
        except OSError as error:
            output.close()
            self.log.error("USR2: cannot start the upgrade check: %s", error)
            return
        self.upgrade_check_pid = pid
        self.helpers[pid] = functools.partial(self._upgrade_checked, output, argv)
        self.log.info("USR2: checking that the new code loads (pid %d)", pid)

    def _own_argv(self) -> list[str]:
        """How this master was started: the process title has overwritten the visible argv."""
        return [sys.executable, *sys.orig_argv[1:]]

    def _upgrade_checked(self, output: Any, argv: list[str], status: int) -> None:
        self.upgrade_check_pid = 0
        output.seek(0)
        text = output.read().decode(errors="replace").strip()
        output.close()
        if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
            last = text.splitlines()[-1] if text else f"status {status}"
            self.log.error("USR2: upgrade check failed, keeping the running master: %s", last)
            return
        if self.stopping:
            return
        self._exec_upgrade(argv)

    def _exec_upgrade(self, argv: list[str]) -> None:
        systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        self.log.info("USR2: re-executing the master in place (pid %d stays)", self.pid)
        fds = []
        for sock in self.listeners:
            sock.set_inheritable(True)
            fds.append(str(sock.fileno()))
        env = dict(os.environ)
        env[ENV_INHERIT_FDS] = ",".join(fds)
        env[ENV_OLD_WORKERS] = ",".join(str(pid) for pid in self.workers)
        for handler in self.log.handlers:
            handler.flush()
        # Signals stay blocked across exec; the new image unblocks them once it handles them.
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        signal.set_wakeup_fd(-1)
        try:
            os.execve(argv[0], argv, env)
        except OSError as error:
            signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
            for sock in self.listeners:
                sock.set_inheritable(False)
            self.log.error("USR2: exec failed, keeping the running master: %s", error)

    # -- signals ----------------------------------------------------------------------------
    def _handle_signals(self) -> None:
        while self.pending_signals:
            signum = self.pending_signals.popleft()
            if signum == signal.SIGCHLD:
                continue  # the loop reaps on every pass
            if self.stopping and signum not in (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM):
                continue
            handler = getattr(self, f"_on_{signal.Signals(signum).name.lower()}", None)
            if handler is not None:
                handler()

    def _on_sigterm(self) -> None:
        self._begin_stop("graceful")

    def _on_sigint(self) -> None:
        self._begin_stop("quick")

    _on_sigquit = _on_sigint

    def _on_sigusr1(self) -> None:
        logs.reopen()
        self.log.info("USR1: log files reopened")
        self._kill_all(signal.SIGUSR1)

    def _on_sigttin(self) -> None:
        self.target += 1
        self.log.info("TTIN: %d workers", self.target)

    def _on_sigttou(self) -> None:
        if self.target > 1:
            self.target -= 1
            self.log.info("TTOU: %d workers", self.target)

    def _begin_stop(self, how: str) -> None:
        if self.stopping == "quick" or self.stopping == how:
            return
        self.stopping = how
        now = time.monotonic()
        systemd.notify("STOPPING=1")
        # Stop listening now: new clients are refused at once instead of waiting in a backlog
        # that nobody will accept from. Workers take what is already queued before they close
        # their own copies (systemd's copy, if any, keeps the socket for the next start).
        sockets.cleanup(self.listeners, self.bind_specs)
        self.listeners = []
        if how == "graceful":
            self.log.info("graceful shutdown: draining workers (up to %gs)",
                          self.settings.graceful_timeout)
            self.stop_deadline = now + self.settings.graceful_timeout
            for info in self.workers.values():
                if info.retiring == Reason.NONE:
                    info.retiring = Reason.SHUTDOWN
            self._kill_all(signal.SIGTERM)
        else:
            self.log.info("quick shutdown")
            self.stop_deadline = now + QUICK_STOP_GRACE
            self._kill_all(signal.SIGQUIT)

    # -- exit -------------------------------------------------------------------------------
    def _cleanup(self) -> None:
        # Make sure no child outlives us even on an unexpected error in the loop.
        for pid in [*self.workers, *self.helpers]:
            self._signal(pid, signal.SIGKILL)
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        sockets.cleanup(self.listeners, self.bind_specs)
        if self.metrics_server is not None:
            self.metrics_server.close()
            sock, spec = self.metrics_listener
            sockets.cleanup([sock], [spec])
        if self.access_log is not None:
            self.access_log.close()
        self._remove_pidfile()
        if self.scoreboard is not None:
            self.scoreboard.close()
        signal.set_wakeup_fd(-1)
        # A second TERM while the interpreter winds down must not turn a clean exit into a
        # death by signal: keep them pending until the process is gone.
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)


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
