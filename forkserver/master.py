"""The master: binds listeners, forks workers and supervises them. It never serves app traffic.

The control plane is one loop in a fixed order (rule 3 of style.md): reap children, act on
queued signals, read the scoreboard for timeouts, fix the worker count, then sleep until the
nearest deadline or a signal. Signal handlers only record the signal; ``set_wakeup_fd`` wakes the
sleep (rule 2).
"""

from __future__ import annotations

import functools
import os
import random
import select
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from forkserver import loader, logs, sockets, systemd, worker
from forkserver.scoreboard import Reason, Scoreboard, State

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1,
                   signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD)
KILL_GRACE = 5.0          # after SIGABRT (or a quick stop), SIGKILL follows this much later
QUICK_STOP_GRACE = 2.0
MAX_BOOT_BACKOFF = 30.0
TICK = 1.0                # the longest the master sleeps without looking at the scoreboard


@dataclass
class WorkerInfo:
    pid: int
    index: int
    generation: int
    started: float
    retiring: Reason = Reason.NONE   # why TERM was sent, if it was
    kill_at: float = 0.0             # when to SIGKILL (after ABRT or a stop), 0 = not scheduled
    aborted: bool = False
    ready: bool = False


class Master:
    def __init__(self, settings: Any, reload: Callable[[], Any] | None = None) -> None:
        self.settings = settings
        self.reload = reload
        self.log = logs.get_logger()
        self.pid = os.getpid()
        self.workers: dict[int, WorkerInfo] = {}
        self.pending_signals: deque[int] = deque()
        self.generation = 1
        self.target = settings.workers
        self.listeners: list[socket.socket] = []
        self.bind_specs: list[sockets.BindSpec] = []
        self.scoreboard: Scoreboard | None = None
        self.app: Callable | None = None
        self.stopping: str = ""            # "", "graceful" or "quick"
        self.stop_deadline = 0.0
        self.exit_code = 0
        self.ever_ready = False
        self.boot_failures = 0
        self.next_spawn = 0.0
        self.wake_r = self.wake_w = -1
        self.announced_generation = 0      # the last generation logged as fully ready

    # -- startup ----------------------------------------------------------------------------
    def run(self) -> int:
        settings = self.settings
        self.log = logs.setup(settings.log_level, settings.error_log, proc="master")
        try:
            self._open_listeners()
        except (sockets.BindError, ValueError) as error:
            self.log.error("%s", error)
            return 1
        if settings.preload:
            try:
                self.app = loader.load_app(settings.app)
            except loader.LoadError as error:
                self.log.error("%s", error)
                sockets.cleanup(self.listeners, self.bind_specs)
                return 1
        self._write_pidfile()
        self.scoreboard = Scoreboard(max(2, 2 * self.target))
        self._install_signals()
        self._set_title()
        self.log.info("forkserver master %d starting, app %s, %d workers",
                      self.pid, settings.app, self.target)
        try:
            self._loop()
        finally:
            self._cleanup()
        self.log.info("forkserver master %d exiting (%d)", self.pid, self.exit_code)
        return self.exit_code

    def _open_listeners(self) -> None:
        settings = self.settings
        inherited = sockets.inherited_sockets(os.environ, self.pid)
        if inherited:
            self.log.info("using %d socket(s) passed by systemd; ignoring bind", len(inherited))
            self.listeners = inherited
        else:
            self.bind_specs = [sockets.parse_bind(spec) for spec in settings.bind]
            for spec in self.bind_specs:
                self.listeners.append(sockets.bind(spec, settings.backlog))
        for sock in self.listeners:
            self.log.info("Listening at: %s (%d)", sockets.describe(sock), self.pid)

    def _write_pidfile(self) -> None:
        path = self.settings.pidfile
        if path:
            tmp = f"{path}.{self.pid}.tmp"
            with open(tmp, "w") as handle:
                handle.write(f"{self.pid}\n")
            os.replace(tmp, path)

    def _remove_pidfile(self) -> None:
        path = self.settings.pidfile
        if not path:
            return
        try:
            with open(path) as handle:
                if handle.read().strip() == str(self.pid):
                    os.unlink(path)
        except OSError:
            pass

    def _set_title(self) -> None:
        try:
            import setproctitle
            setproctitle.setproctitle(f"{self.settings.proc_name}: master [{self.settings.app}]")
        except ImportError:  # pragma: no cover
            pass

    def _install_signals(self) -> None:
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, self._record_signal)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)

    def _record_signal(self, signum: int, frame: Any) -> None:
        # NO logging, no work: the loop acts on it (a handler can interrupt anything).
        self.pending_signals.append(signum)

    # -- the loop ---------------------------------------------------------------------------
    def _loop(self) -> None:
        systemd_ready_sent = False
        while True:
            self._reap()
            self._handle_signals()
            now = time.monotonic()
            self._read_scoreboard(now)
            if self.stopping:
                if not self.workers:
                    return
                if now >= self.stop_deadline:
                    self._kill_all(signal.SIGKILL)
                    self.stop_deadline = now + TICK
            else:
                self._maintain(now)
                if self.ever_ready and not systemd_ready_sent:
                    systemd.notify("READY=1\nSTATUS=serving")
                    systemd_ready_sent = True
            self._sleep(self._next_wakeup(now))

    def _sleep(self, seconds: float) -> None:
        if self.pending_signals:
            return
        try:
            ready, _, _ = select.select([self.wake_r], [], [], max(0.0, seconds))
        except InterruptedError:
            return
        if ready:
            try:
                while os.read(self.wake_r, 4096):
                    pass
            except BlockingIOError:
                pass

    def _next_wakeup(self, now: float) -> float:
        wake = now + TICK
        timeout = self.settings.timeout
        for info in self.workers.values():
            if info.kill_at:
                wake = min(wake, info.kill_at)
        if self.stopping:
            wake = min(wake, self.stop_deadline)
        elif self.next_spawn > now and len(self._serving()) < self.target:
            wake = min(wake, self.next_spawn)
        if timeout and self.scoreboard is not None:
            for view in self.scoreboard.slots():
                if view.state == State.BUSY and view.request_start:
                    wake = min(wake, view.request_start + timeout)
        return wake - now

    # -- children ---------------------------------------------------------------------------
    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            info = self.workers.pop(pid, None)
            if info is None:
                continue
            self._worker_exited(info, status)

    def _worker_exited(self, info: WorkerInfo, status: int) -> None:
        view = self.scoreboard.read(info.index)
        self.scoreboard.release(info.index)
        if os.WIFSIGNALED(status):
            signum = os.WTERMSIG(status)
            how = f"killed by {signal.Signals(signum).name}"
            if signum == signal.SIGKILL and not info.kill_at:
                how += " (not sent by the master: out of memory?)"
        else:
            code = os.WEXITSTATUS(status)
            how = f"exited with code {code}"
            if code == worker.EXIT_BOOT_ERROR:
                self._boot_failed(info)
                return
        expected = info.retiring != Reason.NONE or self.stopping
        if expected and not info.aborted:
            self.log.info("worker %d %s (%s)", info.pid, how, info.retiring.name.lower()
                          if info.retiring != Reason.NONE else "shutdown")
        else:
            self.log.error("worker %d %s after %d requests%s", info.pid, how, view.requests,
                           " (aborted after timeout)" if info.aborted else "")

    def _boot_failed(self, info: WorkerInfo) -> None:
        self.boot_failures += 1
        if not self.ever_ready and not self.stopping:
            self.log.error("worker %d failed to boot; the app cannot be loaded, shutting down",
                           info.pid)
            self.exit_code = 1
            self._begin_stop("quick")
            return
        delay = min(MAX_BOOT_BACKOFF, 2.0 ** min(self.boot_failures, 5))
        self.next_spawn = time.monotonic() + delay
        self.log.error("worker %d failed to boot; next try in %.0fs", info.pid, delay)

    def _serving(self) -> list[WorkerInfo]:
        return [info for info in self.workers.values()
                if info.retiring == Reason.NONE and info.generation == self.generation]

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
        info.retiring = reason
        self._signal(info.pid, signal.SIGTERM)

    def _spawn(self) -> bool:
        index = self.scoreboard.free_index()
        if index is None:
            return False
        settings = self.settings
        app = self.app
        load_app: Callable[[], Callable]
        if app is not None:
            load_app = lambda: app  # noqa: E731 - preloaded in the master
        else:
            load_app = functools.partial(loader.load_app, settings.app)
        jitter = settings.max_requests_jitter
        spec = worker.WorkerSpec(
            index=index, generation=self.generation, listeners=self.listeners,
            load_app=load_app, scoreboard=self.scoreboard, master_pid=self.pid,
            title=f"{settings.proc_name}: worker {index} [{settings.app}]",
            keepalive=settings.keepalive, keepalive_requests=settings.keepalive_requests,
            header_timeout=settings.header_timeout, send_timeout=settings.send_timeout,
            graceful_timeout=settings.graceful_timeout,
            worker_connections=settings.worker_connections,
            limit_request_line=settings.limit_request_line,
            limit_request_fields=settings.limit_request_fields,
            limit_request_field_size=settings.limit_request_field_size,
            limit_request_body=settings.limit_request_body,
            max_requests=(settings.max_requests + random.randint(0, jitter)
                          if settings.max_requests else 0),
        )
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

    # -- scoreboard: readiness and timeouts ---------------------------------------------------
    def _read_scoreboard(self, now: float) -> None:
        timeout = self.settings.timeout
        for info in list(self.workers.values()):
            view = self.scoreboard.read(info.index)
            if not info.ready and view.state in (State.IDLE, State.BUSY, State.KEEPALIVE):
                info.ready = True
                self.boot_failures = 0
                if not self.ever_ready:
                    self.ever_ready = True
                serving = self._serving()
                if (self.announced_generation != self.generation and len(serving) >= self.target
                        and all(other.ready for other in serving)):
                    self.announced_generation = self.generation
                    self.log.info("%d workers ready (generation %d)", len(serving),
                                  self.generation)
            if info.kill_at and now >= info.kill_at:
                self.log.error("worker %d did not exit; sending SIGKILL", info.pid)
                self._signal(info.pid, signal.SIGKILL)
                info.kill_at = now + 3600
                continue
            if (timeout and not info.aborted and view.state == State.BUSY
                    and view.request_start and now - view.request_start > timeout):
                self.log.error("worker %d timed out after %.0fs serving %r; aborting",
                               info.pid, now - view.request_start, view.request_line)
                info.aborted = True
                info.retiring = Reason.TIMEOUT
                info.kill_at = now + KILL_GRACE
                self._signal(info.pid, signal.SIGABRT)

    # -- signals ----------------------------------------------------------------------------
    def _handle_signals(self) -> None:
        while self.pending_signals:
            signum = self.pending_signals.popleft()
            if signum == signal.SIGCHLD:
                continue  # the loop reaps on every pass
            handler = getattr(self, f"_on_{signal.Signals(signum).name.lower()}", None)
            if handler is not None:
                handler()

    def _on_sigterm(self) -> None:
        self._begin_stop("graceful")

    def _on_sigint(self) -> None:
        self._begin_stop("quick")

    _on_sigquit = _on_sigint

    def _on_sighup(self) -> None:
        self.log.info("HUP received; reload is not available yet, ignoring")

    def _on_sigusr1(self) -> None:
        logs.reopen()
        self._kill_all(signal.SIGUSR1)

    def _on_sigusr2(self) -> None:
        self.log.info("USR2 received; in-place upgrade is not available yet, ignoring")

    def _on_sigttin(self) -> None:
        if not self.stopping:
            self.target += 1
            self.log.info("TTIN: %d workers", self.target)

    def _on_sigttou(self) -> None:
        if not self.stopping and self.target > 1:
            self.target -= 1
            self.log.info("TTOU: %d workers", self.target)

    def _begin_stop(self, how: str) -> None:
        if self.stopping == "quick" or self.stopping == how:
            return
        self.stopping = how
        now = time.monotonic()
        systemd.notify("STOPPING=1")
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
        # Make sure no worker outlives us even on an unexpected error in the loop.
        for pid in list(self.workers):
            self._signal(pid, signal.SIGKILL)
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        sockets.cleanup(self.listeners, self.bind_specs)
        self._remove_pidfile()
        if self.scoreboard is not None:
            self.scoreboard.close()
        signal.set_wakeup_fd(-1)
