"""Generations: the settings and hooks the workers are made from, how a reload (HUP) and an
upgrade in place (USR2) move from the old workers to the new, as one state machine, and what a
USR2 re-exec hands over to the new image.

    STEADY --begin--> BOOTING --advance--> STEADY      HUP: new generation ready, old retired
                      BOOTING --abandon--> STEADY      HUP: it failed to boot; roll back
    STEADY --check--> CHECKING --exec--> EXECUTING     USR2: the new code loads; exec over us
                      CHECKING --abandon--> STEADY     USR2: it does not, or the master stops
                      EXECUTING --abandon--> STEADY    USR2: exec failed; keep running
    STEADY --adopt--> BOOTING                          the new image: the old workers drain
                                                       once its own generation is ready

Every move is listed in `TABLE`; any other raises. New before old, proven (rule 8 of style.md):
the old generation is retired only once every worker of the new one serves.
"""

from __future__ import annotations

import enum
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import IO, Any

from forkserver import config, loader, logs, systemd
from forkserver.pool import WORKER_HOOKS, Pool, call_hook, workers_text
from forkserver.scoreboard import Reason

MASTER_HOOKS = ("on_starting", "when_ready", "pre_fork", "on_reload", "on_exit")

# The environment a USR2 re-exec hands to the new image. config reserves the names (no setting
# may use them); they are spelled there once, and sort as inherit-fds, old-workers.
ENV_INHERIT_FDS, ENV_OLD_WORKERS = config.ENV_INHERIT_FDS, config.ENV_OLD_WORKERS


class Kind(enum.Enum):
    RELOAD = "reload"    # HUP: a new generation of workers under this master
    UPGRADE = "upgrade"  # USR2: a new master image in this same process


class Stage(enum.Enum):
    STEADY = "steady"        # one generation serves
    CHECKING = "checking"    # USR2: a subprocess checks that the new code loads
    EXECUTING = "executing"  # USR2: about to become the new image
    BOOTING = "booting"      # a new generation boots; the old one serves until it is ready


class Event(enum.Enum):
    BEGIN = "begin"
    ADVANCE = "advance"
    ABANDON = "abandon"
    CHECK = "check"
    EXEC = "exec"
    ADOPT = "adopt"


TABLE: dict[tuple[Stage, Event], Stage] = {
    (Stage.STEADY, Event.BEGIN): Stage.BOOTING,
    (Stage.BOOTING, Event.ADVANCE): Stage.STEADY,
    (Stage.BOOTING, Event.ABANDON): Stage.STEADY,
    (Stage.STEADY, Event.CHECK): Stage.CHECKING,
    (Stage.CHECKING, Event.EXEC): Stage.EXECUTING,
    (Stage.CHECKING, Event.ABANDON): Stage.STEADY,
    (Stage.EXECUTING, Event.ABANDON): Stage.STEADY,
    (Stage.STEADY, Event.ADOPT): Stage.BOOTING,
}


class TransitionError(RuntimeError):
    """A move `TABLE` does not list: a bug in the master, never a runtime event."""


@dataclass(frozen=True)
class Rollback:
    """What a reload returns to if its new generation cannot boot."""

    generation: int
    settings: Any
    target: int
    hooks: dict[str, Callable]
    prepared: Any


class Generations:
    """The current generation (its number, settings and hooks) and the transition in progress.

    ``reload`` builds fresh settings for a HUP (None: keep the same); ``on_config`` is called
    with the settings whenever the current ones change (the master reopens its logs there);
    ``prepare`` builds from new settings what a generation's workers share and the master
    makes before forking (the TLS context), kept as ``prepared``; if it raises, the reload is
    refused and the running generation keeps serving.
    """

    def __init__(self, settings: Any, reload: Callable[[], Any] | None,
                 on_config: Callable[[Any], None],
                 prepare: Callable[[Any], Any] | None = None) -> None:
        self.settings = settings
        self.hooks: dict[str, Callable] = {}
        self.prepared: Any = None
        self.reload = reload
        self.prepare = prepare
        self.on_config = on_config
        self.log = logs.get_logger()
        self.current = 1
        self.last = 1                  # numbers never repeat, even after a rollback
        self.announced = 0             # the last generation logged as fully ready
        self.ever_ready = False        # some worker served (a boot failure then backs off)
        self.reloads = 0
        self.stage = Stage.STEADY
        self.kind: Kind | None = None
        self.rollback: Rollback | None = None
        self.check: UpgradeCheck | None = None

    def _move(self, event: Event) -> None:
        stage = TABLE.get((self.stage, event))
        if stage is None:
            raise TransitionError(f"no {event.value} from {self.stage.value}")
        self.stage = stage
        if stage is Stage.STEADY:
            self.kind = None
            self.rollback = None
            self.check = None

    @property
    def steady(self) -> bool:
        return self.stage is Stage.STEADY

    @property
    def reloading(self) -> bool:
        """A HUP's new generation is booting (a failure there rolls back)."""
        return self.stage is Stage.BOOTING and self.kind is Kind.RELOAD

    def worker_ready(self, pool: Pool) -> None:
        """A worker became ready; once its whole generation is, say so (and the first time,
        tell systemd and the when_ready hook)."""
        self.ever_ready = True
        current = self.current
        if self.announced != current and pool.all_ready(current):
            self.announced = current
            self.log.info("%s ready (generation %d)", workers_text(len(pool.serving(current))),
                          current, extra={"generation": current})
            if current == 1 and self.steady:
                call_hook(self.hooks, "when_ready", self.settings)
                systemd.notify("READY=1\nSTATUS=serving")

    # -- HUP ----------------------------------------------------------------------------------
    def begin(self, pool: Pool, why: str = "HUP") -> None:
        """HUP (or a development reload): read the configuration again and start a new
        generation with it."""
        if not self.steady:
            self.log.warning("HUP ignored: the %s in progress must finish first", self.kind.value)
            return
        rollback = Rollback(self.current, self.settings, pool.target, self.hooks, self.prepared)
        if self.reload is not None and not self._reload_settings():
            return
        self._move(Event.BEGIN)
        self.kind, self.rollback = Kind.RELOAD, rollback
        self.reloads += 1
        self.last += 1
        self.current = self.last
        pool.target = self.settings.workers
        pool.boot_failures = 0
        pool.next_spawn = 0.0
        systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec()}")
        self.log.info("%s: reloading, starting generation %d", why, self.current,
                      extra={"generation": self.current})
        call_hook(self.hooks, "on_reload", self.settings)

    def _reload_settings(self) -> bool:
        old = self.settings
        try:
            new = self.reload()
            new_hooks = load_hooks(new)
            prepared = self.prepare(new) if self.prepare is not None else None
        except Exception as error:  # noqa: BLE001 - a bad config must not stop the server
            self.log.error("reload failed, keeping the running configuration: %s", error)
            return False
        if list(new.bind) != list(old.bind):
            self.log.warning("bind changed in the configuration; listeners change only on "
                             "restart or USR2")
        self.settings, self.hooks, self.prepared = new, new_hooks, prepared
        self.on_config(new)
        return True

    def advance(self, pool: Pool) -> None:
        """Once the new generation is whole and ready, the old one goes (a reload's, or the
        previous image's workers after a USR2)."""
        if self.stage is not Stage.BOOTING or not pool.all_ready(self.current):
            return
        old = [record for record in pool.records.values() if record.generation != self.current]
        self.log.info("generation %d ready; retiring %d old %s", self.current, len(old),
                      "worker" if len(old) == 1 else "workers", extra={"generation": self.current})
        for record in old:
            pool.retire(record, Reason.RELOAD)
        self._move(Event.ADVANCE)
        systemd.notify("READY=1\nSTATUS=serving")

    def abandon(self, pool: Pool, why: str) -> None:
        """A reload's new generation cannot boot: retire it, and go back to the old one."""
        failed, rollback = self.current, self.rollback
        self._move(Event.ABANDON)
        self.log.error("reload abandoned (%s); generation %d keeps serving",
                       why, rollback.generation)
        for record in list(pool.records.values()):
            if record.generation == failed:
                pool.retire(record, Reason.RELOAD)
        self.current = rollback.generation
        self.settings, self.hooks = rollback.settings, rollback.hooks
        self.prepared = rollback.prepared
        self.on_config(self.settings)
        pool.target = rollback.target
        pool.next_spawn = 0.0
        systemd.notify("READY=1\nSTATUS=serving (reload failed)")

    # -- USR2 ---------------------------------------------------------------------------------
    def adopt(self, pool: Pool, pids: list[int], now: float) -> None:
        """The new image after a USR2: the workers it inherited are generation 0, and go once
        this image's own generation is ready."""
        self._move(Event.ADOPT)
        self.kind = Kind.UPGRADE
        self.ever_ready = True
        self.rollback = Rollback(0, self.settings, pool.target, self.hooks, self.prepared)
        pool.adopt(pids, now)
        self.log.info("upgraded in place: %d old workers drain once the new ones are ready",
                      len(pids))

    def start_check(self) -> None:
        """USR2: check in a subprocess that the new code loads before anything else happens."""
        if not self.steady:
            self.log.warning("USR2 ignored: a reload or upgrade is already in progress")
            return
        try:
            check = UpgradeCheck(own_argv(), os.environ)
        except OSError as error:
            self.log.error("USR2: cannot start the upgrade check: %s", error)
            return
        self._move(Event.CHECK)
        self.kind, self.check = Kind.UPGRADE, check
        self.log.info("USR2: checking that the new code loads (pid %d)", check.pid)

    def checked(self, status: int, go: bool) -> list[str] | None:
        """The check exited; returns the argv to exec if it passed and ``go`` still holds
        (call `exec_failed` if that exec then fails)."""
        check = self.check
        failure = check.result(status)
        if failure is not None:
            self.log.error("USR2: upgrade check failed, keeping the running master: %s",
                           failure)
        if failure is not None or not go:
            self._move(Event.ABANDON)
            return None
        self._move(Event.EXEC)
        return check.argv

    def exec_failed(self, error: OSError) -> None:
        self.log.error("USR2: exec failed, keeping the running master: %s", error)
        self._move(Event.ABANDON)


def load_hooks(settings: Any) -> dict[str, Callable]:
    """Every hook the settings name, imported (a generation's hooks change only with it)."""
    hooks = {}
    for name in MASTER_HOOKS + WORKER_HOOKS:
        spec = getattr(settings, name, "")
        if spec:
            try:
                hooks[name] = loader.load_hook(spec)
            except loader.LoadError as error:
                raise loader.LoadError(f"hook {name}: {error}") from None
    return hooks


def monotonic_usec() -> int:
    """systemd's MONOTONIC_USEC= for RELOADING=1."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


# -- USR2: the check, and what the new image inherits ----------------------------------------
def own_argv() -> list[str]:
    """How this master was started: the process title has overwritten the visible argv."""
    return [sys.executable, *sys.orig_argv[1:]]


class UpgradeCheck:
    """``forkserver ... --check-config`` in a subprocess: does the new code load?"""

    def __init__(self, argv: list[str], environ: Mapping[str, str]) -> None:
        self.argv = argv
        check_argv = [*argv, "--check-config"]
        import tempfile  # (imported where used: architecture.md, "What a worker inherits")

        self._output: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed in result()
        try:
            self.pid = os.posix_spawn(
                check_argv[0], check_argv, environ,
                file_actions=[(os.POSIX_SPAWN_DUP2, self._output.fileno(), 1),
                              (os.POSIX_SPAWN_DUP2, self._output.fileno(), 2)])
        except OSError:
            self._output.close()
            raise

    def result(self, status: int) -> str | None:
        """None if the check passed, else the last line it printed (or its status)."""
        self._output.seek(0)
        text = self._output.read().decode(errors="replace").strip()
        self._output.close()
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            return None
        return text.splitlines()[-1] if text else f"status {status}"


def handover_env(environ: Mapping[str, str], listener_fds: list[int],
                 worker_pids: list[int]) -> dict[str, str]:
    """The environment of the new image: ours, plus the listeners and the old workers."""
    env = dict(environ)
    env[ENV_INHERIT_FDS] = ",".join(map(str, listener_fds))
    env[ENV_OLD_WORKERS] = ",".join(map(str, worker_pids))
    return env


def exec_image(argv: list[str], listeners: list[socket.socket], worker_pids: list[int],
               blocked: tuple[int, ...], wakeup_fd: int,
               extra_env: Mapping[str, str] | None = None) -> OSError:
    """Become the new master image in this process (same PID, so the workers stay our
    children). ``extra_env`` is more to hand over (the caller made its descriptors
    inheritable). Returns only if exec failed, with the signal plumbing and listeners
    restored."""
    systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec()}")
    log = logs.get_logger()
    log.info("USR2: re-executing the master in place (pid %d stays)", os.getpid())
    for sock in listeners:
        sock.set_inheritable(True)
    env = handover_env(os.environ, [sock.fileno() for sock in listeners], worker_pids)
    env.update(extra_env or {})
    for handler in log.handlers:
        handler.flush()
    # Signals stay blocked across exec; the new image unblocks them once it handles them.
    signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    signal.set_wakeup_fd(-1)
    try:
        os.execve(argv[0], argv, env)  # returns only by raising
    except OSError as error:
        signal.set_wakeup_fd(wakeup_fd, warn_on_full_buffer=False)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
        for sock in listeners:
            sock.set_inheritable(False)
        return error


def take_inherited_fds(environ: MutableMapping[str, str]) -> list[int]:
    """The listeners a previous image handed over (removed, so no child inherits the note)."""
    return _take_numbers(environ, ENV_INHERIT_FDS)


def take_old_workers(environ: MutableMapping[str, str]) -> list[int]:
    """The previous image's workers, now our children."""
    return _take_numbers(environ, ENV_OLD_WORKERS)


def _take_numbers(environ: MutableMapping[str, str], name: str) -> list[int]:
    value = environ.pop(name, "")
    return [int(item) for item in value.split(",") if item]
