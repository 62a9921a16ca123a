"""Start, wait for and stop real forkserver processes; make sure none is left behind."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from forkserver.scoreboard import Scoreboard

ROOT = Path(__file__).resolve().parent.parent
LISTEN_RE = re.compile(r"Listening at: (\S+) \(")
READY_RE = re.compile(r"(\d+) workers? ready")


class Server:
    """A forkserver master started as a subprocess, logging to a file the test can read."""

    def __init__(self, tmp_path: Path, app: str = "tests.apps.basic:app", *args: str,
                 workers: int = 2, binds: tuple[str, ...] = ("127.0.0.1:0",),
                 env: dict[str, str] | None = None, cwd: Path | None = None,
                 wait_ready: bool = True, new_session: bool = False) -> None:
        self.tmp_path = tmp_path
        self.log_path = tmp_path / f"server-{time.monotonic_ns()}.log"
        self.argv = [sys.executable, "-m", "forkserver", app, "--workers", str(workers),
                     "--error-log", str(self.log_path), *args]
        for bind in binds:
            self.argv += ["--bind", bind]
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.env.pop("WEB_CONCURRENCY", None)
        self.cwd = cwd or ROOT
        self.workers = workers
        self.wait_ready = wait_ready
        # Its own session: one os.killpg() then takes the master and its workers at once.
        self.new_session = new_session
        self.proc: subprocess.Popen | None = None
        self.addresses: list[str] = []
        self.known_pids: set[int] = set()

    # -- lifecycle --------------------------------------------------------------------------
    def start(self, timeout: float = 20.0) -> Server:
        self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=self.new_session)
        self.known_pids.add(self.proc.pid)
        if self.wait_ready:
            self.wait_for_log(READY_RE, timeout)
            self.addresses = LISTEN_RE.findall(self.log())
            self.known_pids.update(self.worker_pids())
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str | re.Pattern, timeout: float = 20.0,
                     count: int = 1) -> re.Match:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            matches = list(regex.finditer(self.log()))
            if len(matches) >= count:
                return matches[count - 1]
            if self.proc is not None and self.proc.poll() is not None:
                out = self.proc.stdout.read().decode(errors="replace") if self.proc.stdout else ""
                raise AssertionError(f"server exited ({self.proc.returncode}) before "
                                     f"{regex.pattern!r}:\n{self.log()}\n{out}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {regex.pattern!r} in log:\n{self.log()}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def port(self) -> int:
        return int(self.addresses[0].rsplit(":", 1)[1])

    @property
    def url(self) -> str:
        return self.addresses[0]

    def worker_pids(self) -> list[int]:
        try:
            return [child.pid for child in psutil.Process(self.pid).children()]
        except psutil.NoSuchProcess:
            return []

    def wait_exit(self, timeout: float = 30.0) -> int:
        """Wait for a server that stops by itself (a failed boot); kill it if it does not."""
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def send_signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def connect(self, timeout: float = 10.0) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        return sock

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Stop the master, wait for it, and check that no process it started is left."""
        if self.proc is None:
            return 0
        self.known_pids.update(self.worker_pids())
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self._kill_leftovers()
            raise AssertionError(f"server did not stop within {timeout}s:\n{self.log()}")
        if self.proc.stdout:
            self.proc.stdout.close()
        left = self._kill_leftovers()
        assert not left, f"processes left behind: {left}\n{self.log()}"
        return code

    def _kill_leftovers(self) -> list[int]:
        left = []
        for pid in self.known_pids:
            if pid == self.proc.pid:
                continue
            try:
                proc = psutil.Process(pid)
                if proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                cmd = " ".join(proc.cmdline())
            except psutil.NoSuchProcess:
                continue
            if "forkserver" in cmd or "python" in cmd:
                left.append(pid)
                proc.kill()
        return left


@pytest.fixture
def server_factory(tmp_path):
    """Returns a function that starts a server; every server started is stopped afterwards."""
    started: list[Server] = []

    def start(*args, **kwargs) -> Server:
        server = Server(tmp_path, *args, **kwargs)
        started.append(server)
        return server.start()

    yield start
    errors = []
    for server in started:
        if server.proc is not None and server.proc.poll() is None:
            try:
                server.stop(signal.SIGQUIT)
            except AssertionError as error:
                errors.append(str(error))
        else:
            left = server._kill_leftovers()
            if left:
                errors.append(f"processes left behind: {left}")
    assert not errors, "\n".join(errors)


@pytest.fixture
def board():
    """A small scoreboard, closed afterwards (scoreboard and metrics unit tests)."""
    sb = Scoreboard(4)
    yield sb
    sb.close()


@pytest.fixture
def server(server_factory) -> Server:
    return server_factory()


def http_request(port: int, raw: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes and read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        return read_until_closed(sock)


def post_unread(port: int, size: int, timeout: float = 20.0) -> bytes:
    """POST ``size`` bytes the app never reads, then read the answer, as most clients do
    (``requests`` among them): a reset while sending loses the request, as it does for them."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"POST /ignore-body HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n"
                     % size)
        piece = b"x" * 65536
        for _ in range(size // len(piece)):
            sock.sendall(piece)
        return read_until_closed(sock)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the peer sends until it closes (a reset after the answer counts as a close)."""
    chunks = []
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


class ResponseReader:
    """Reads successive responses from one socket, keeping bytes that belong to the next one."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise ConnectionError(f"closed with {len(self.buf)} of {n} bytes")
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError(f"closed mid-line: {self.buf!r}")
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def read(self, head_request: bool = False) -> tuple[int, dict[str, str], bytes]:
        """One response: (status, lower-cased headers, body). Interim 1xx ones are returned too."""
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError(f"closed before a full head: {self.buf!r}")
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if head_request or status < 200 or status in (204, 304):
            return status, headers, b""
        if "content-length" in headers:
            return status, headers, self._take(int(headers["content-length"]))
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size = int(self._line().split(b";")[0], 16)
                if size == 0:
                    while self._line():  # trailers up to the empty line
                        pass
                    return status, headers, body
                body += self._take(size)
                if self._take(2) != b"\r\n":
                    raise ValueError("chunk not followed by CRLF")
        while self._fill():
            pass
        body, self.buf = self.buf, b""
        return status, headers, body


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    return ResponseReader(sock).read()


# -- reruns: say which test failed on its first attempt, and why ---------------------------------
_RERUNS: list[tuple[str, str]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.outcome == "rerun":
        errors = [line for line in report.longreprtext.splitlines() if line.startswith("E ")]
        _RERUNS.append((report.nodeid, "\n".join(errors[:6]) or report.longreprtext[-600:]))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """A test that passed (or failed again) on its rerun is named with its first failure, so a
    flaky test shows in CI's log with a reason instead of one R among the dots."""
    if _RERUNS:
        terminalreporter.section("first attempts that failed (rerun once)")
        for nodeid, why in _RERUNS:
            terminalreporter.write_line(f"RERUN {nodeid}\n{why}")
