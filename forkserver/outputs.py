"""What the master tells the world besides serving: the metrics listener (/metrics, /status and
the probes), the access log every worker inherits, systemd's watchdog and status line, and the
pidfile. The master's loop drives all of it; nothing here forks, reaps or decides.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any

from forkserver import logs, metrics, sockets, systemd
from forkserver.pool import Pool
from forkserver.scoreboard import State

NEVER = float("inf")
STATUS_INTERVAL = 5.0     # how often systemd's STATUS= line is refreshed


class Outputs:
    """The metrics listener, answered from the master's own loop so a scrape works while every
    worker is busy; the access log, opened here so every worker inherits the same file;
    systemd's watchdog and status line."""

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

    # -- systemd ----------------------------------------------------------------------------
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

    def status(self, text: str) -> None:
        """Say at once what the server is doing (a stop in progress), outside the periodic line."""
        systemd.notify(f"STATUS={text}")

    # -- the metrics listener and the access log --------------------------------------------
    def open(self, settings: Any, snapshot: Callable[[], metrics.Snapshot]) -> None:
        if settings.metrics_bind:
            spec = sockets.parse_bind(settings.metrics_bind)
            sock = sockets.bind(spec, 64)
            self.listener = (sock, spec)
            self.server = metrics.MetricsServer(sock, snapshot, settings)
            logs.get_logger().info("Metrics at: %s", sockets.describe(sock))
        self.set_access_log(settings)

    def configure(self, settings: Any) -> None:
        """A reload changed the settings: the token and options of the metrics listener (its
        address changes only on restart), and the access log."""
        if self.server is not None:
            self.server.configure(settings)
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

    def in_child(self) -> None:
        """In a worker the master forks: close its copies of the metrics listener and of the
        scrapes in progress (no shutdown, no unlink: they are the master's). A worker holding
        the listener would keep the address taken from the image a USR2 execs."""
        if self.server is not None:
            self.server.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            sock, spec = self.listener
            sockets.cleanup([sock], [spec])
        if self.access_log is not None:
            self.access_log.close()


# -- the pidfile ------------------------------------------------------------------------------
def write_pidfile(path: str, pid: int, metrics_address: str) -> None:
    if not path:
        return
    _write_atomically(path, f"{pid}\n", pid)
    if metrics_address:
        # `forkserver status --pidfile` finds the metrics listener here (its real port,
        # even when metrics_bind asked for port 0).
        _write_atomically(path + ".metrics", metrics_address + "\n", pid)


def remove_pidfile(path: str, pid: int) -> None:
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
