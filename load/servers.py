"""Start, probe, measure and stop a server process for the load drivers (run.py, bench.py).

forkserver, gunicorn and load/prefork.py print ``Listening at: http://HOST:PORT (PID)`` when
bound, so one helper serves them all: the server binds port 0, and the real port is read from
its log instead of being guessed in advance (no race with other programs picking the same free
port). A server that cannot bind port 0 and report it (granian) gets a ``fixed_port`` from
``free_port()`` instead.

Stopping is checked, not assumed: every PID the master had as a child is remembered, and after
the master exits any of them still alive is killed by PID and reported as a leftover.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
LISTEN_RE = re.compile(r"Listening at: https?://(127\.0\.0\.1|\[::1\]):(\d+) \(")
POLL = 0.05
# Handshakes in a row answered with something other than TLS before a server counts as having
# no TLS (one could be a fluke; a listener not yet accepting is refused, not answered).
HANDSHAKE_TRIES = 3
HANDSHAKE_TIMEOUT = 3.0


class ServerError(Exception):
    """The server did not start, did not stop, or left processes behind."""


class NoTls(ServerError):
    """A server given a certificate that does not complete a TLS handshake: no TLS in it."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.reason = reason


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now, for servers that cannot bind port 0 and say which they got."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@dataclass
class ManagedServer:
    """One server master started as a subprocess whose stdout and stderr go to ``log_path``.

    ``ready_pattern`` must occur ``ready_count`` times in the log before the server counts as
    up (forkserver logs "2 workers ready" once; gunicorn logs "Booting worker" per worker);
    then one HTTP request to ``probe_path`` must succeed.
    """

    name: str
    argv: Sequence[str]
    log_path: Path
    workers: int
    ready_pattern: str
    ready_count: int = 1
    probe_path: str = "/"
    env: Mapping[str, str] | None = None
    cwd: Path = ROOT
    fixed_port: int = 0  # the port given on the command line; 0: read it from the log
    scheme: str = "http"
    proc: subprocess.Popen | None = None
    host: str = ""
    port: int = 0
    # pid -> create_time, so a recycled PID is never mistaken for one of ours
    known: dict[int, float] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def start(self, timeout: float = 30.0) -> ManagedServer:
        # A user's WEB_CONCURRENCY, FORKSERVER_* or GUNICORN_CMD_ARGS would silently change
        # what is measured (workers, a shutdown_delay that slows every stop...): the rows
        # say everything themselves.
        inherited = {key: value for key, value in os.environ.items()
                     if key not in ("WEB_CONCURRENCY", "GUNICORN_CMD_ARGS")
                     and not key.startswith("FORKSERVER_")}
        env = {**inherited, **(self.env or {})}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            # Own session: a Ctrl-C in the terminal reaches the driver, which then stops the
            # server gracefully, instead of hitting the server in the middle of a run.
            self.proc = subprocess.Popen(list(self.argv), cwd=self.cwd, env=env,
                                         stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self._remember(self.proc.pid)
        deadline = time.monotonic() + timeout
        try:
            if self.fixed_port:
                self.host, self.port = "127.0.0.1", self.fixed_port
            else:
                match = self._wait_for(LISTEN_RE, 1, deadline)
                self.host, self.port = match.group(1).strip("[]"), int(match.group(2))
                if ":" in self.host:
                    self.host = f"[{self.host}]"
            self._wait_for(re.compile(self.ready_pattern), self.ready_count, deadline)
            if self.scheme == "https":
                self._wait_for_handshake(deadline)
            self._wait_for_probe(deadline)
        except BaseException:
            try:
                self.stop(timeout=10.0)
            except ServerError:
                pass  # the start failure is the news; stop() has killed what was left
            raise
        self.worker_pids()  # remember the workers while they are certainly there
        return self

    def _wait_for(self, regex: re.Pattern, count: int, deadline: float) -> re.Match:
        while True:
            matches = list(regex.finditer(self.log()))
            if len(matches) >= count:
                return matches[count - 1]
            self._check_alive(f"waiting for {regex.pattern!r}")
            if time.monotonic() > deadline:
                raise ServerError(f"{self.name}: timed out waiting for {regex.pattern!r} "
                                  f"in its log:\n{self.log_tail()}")
            time.sleep(POLL)

    def _wait_for_handshake(self, deadline: float) -> None:
        """Wait until a TLS handshake completes; NoTls when the server answers without TLS.

        A build may accept a certificate and still serve plain HTTP (its "400" then reads as a
        bad TLS record), reset, or say nothing: HANDSHAKE_TRIES such answers in a row mean
        no TLS. A refused connection only means the listener is not accepting yet.
        """
        context = ssl._create_unverified_context()  # a throwaway certificate made for the run
        last, not_tls = "", 0
        while time.monotonic() < deadline:
            self._check_alive("waiting for a TLS handshake")
            try:
                raw = socket.create_connection((self.host.strip("[]"), self.port),
                                               timeout=HANDSHAKE_TIMEOUT)
            except OSError as exc:
                last = str(exc)
                time.sleep(POLL)
                continue
            try:
                context.wrap_socket(raw).close()
                return
            except OSError as exc:  # SSLError, reset, EOF, timeout
                last = str(exc) or type(exc).__name__
                not_tls += 1
                if not_tls >= HANDSHAKE_TRIES:
                    raise NoTls(self.name, "given a certificate, it answered a TLS handshake "
                                f"without TLS: {last}") from None
            finally:
                raw.close()
            time.sleep(POLL)
        raise ServerError(f"{self.name}: no TLS handshake completed ({last})")

    def _wait_for_probe(self, deadline: float) -> None:
        last = ""
        while time.monotonic() < deadline:
            self._check_alive("probing")
            if self.scheme == "https":
                # A throwaway certificate made for the run: the probe checks the server
                # answers, not who it is.
                conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                    self.host.strip("[]"), self.port, timeout=2.0,
                    context=ssl._create_unverified_context())
            else:
                conn = http.client.HTTPConnection(self.host.strip("[]"), self.port, timeout=2.0)
            try:
                conn.request("GET", self.probe_path)
                response = conn.getresponse()
                response.read()
                if response.status == 200:
                    return
                last = f"status {response.status}"
            except OSError as exc:
                last = str(exc)
            finally:
                conn.close()
            time.sleep(POLL)
        raise ServerError(f"{self.name}: GET {self.probe_path} never answered 200 ({last})")

    def _check_alive(self, doing: str) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise ServerError(f"{self.name}: exited with status {self.proc.returncode} while "
                              f"{doing}:\n{self.log_tail()}")

    def _remember(self, pid: int) -> None:
        try:
            self.known.setdefault(pid, psutil.Process(pid).create_time())
        except psutil.NoSuchProcess:
            pass

    def worker_pids(self) -> list[int]:
        """The master's current children (workers).

        Every descendant is remembered for the leftover check, grandchildren included (a
        worker forked by another worker, as forkserver's refork does).
        """
        if self.proc is None:
            return []
        try:
            master = psutil.Process(self.proc.pid)
            children = master.children()
            descendants = master.children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for child in descendants:
            self._remember(child.pid)
        return [child.pid for child in children]

    def rss(self) -> dict[str, object]:
        """Resident memory in bytes: master, each worker, and the workers' sum."""
        def one(pid: int) -> int:
            try:
                return psutil.Process(pid).memory_info().rss
            except psutil.NoSuchProcess:
                return 0
        workers = [one(pid) for pid in self.worker_pids()]
        return {"master": one(self.proc.pid) if self.proc else 0,
                "workers": workers, "workers_sum": sum(workers)}

    def _tree(self) -> list[psutil.Process]:
        if self.proc is None:
            return []
        try:
            master = psutil.Process(self.proc.pid)
            return [master, *master.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def descendant_pids(self) -> set[int]:
        """Every process under the master now: workers and whatever they forked."""
        return {proc.pid for proc in self._tree()[1:]}

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the whole process tree (master and every worker).

        Read before and after a run, the difference over the requests served is the server's
        CPU per request. A process that exits between two readings takes its share with it;
        the benchmarks recycle no workers while they measure.
        """
        total = 0.0
        for proc in self._tree():
            try:
                times = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        return total

    def pss(self) -> dict[str, object]:
        """Proportional set size in bytes of each process of the tree, by PID, and the total.

        PSS divides each shared page among the processes mapping it, so the tree's sum is what
        the server really costs in memory, copy-on-write sharing included.
        """
        sizes: dict[str, int] = {}
        for proc in self._tree():
            try:
                sizes[str(proc.pid)] = proc.memory_full_info().pss
            except psutil.NoSuchProcess:
                continue
        return {"processes": sizes, "total": sum(sizes.values())}

    def stop(self, timeout: float = 30.0, signum: int = signal.SIGTERM) -> int:
        """Stop gracefully and return the master's exit status.

        Raises ServerError when the master had to be killed or any known process outlived it;
        those are killed by PID first, so nothing is left running either way.
        """
        if self.proc is None:
            return 0
        self.worker_pids()
        problems = []
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                problems.append(f"master did not exit within {timeout:g}s of "
                                f"{signal.Signals(signum).name}; killed")
                self.proc.kill()
                self.proc.wait(10.0)
        # The workers notice the master's exit on their own; give them a moment before
        # calling them leftovers.
        leftovers = self._alive_others(deadline=time.monotonic() + 5.0)
        for proc in leftovers:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        if leftovers:
            problems.append("processes left behind (killed): "
                            + ", ".join(str(p.pid) for p in leftovers))
        if problems:
            raise ServerError(f"{self.name}: " + "; ".join(problems) + f"\n{self.log_tail()}")
        return self.proc.returncode

    def _alive_others(self, deadline: float) -> list[psutil.Process]:
        while True:
            alive = []
            for pid, created in self.known.items():
                if self.proc is not None and pid == self.proc.pid:
                    continue
                try:
                    proc = psutil.Process(pid)
                    if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                        alive.append(proc)
                except psutil.NoSuchProcess:
                    continue
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(POLL)
