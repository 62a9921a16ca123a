"""``forkserver status``: finding the address, fetching /status, the table, --watch, errors.

A small thread plays the server's metrics listener with a canned answer, so each test controls
exactly what the command receives; one test puts the real MetricsServer behind it instead.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from forkserver import cli
from forkserver.metrics import MetricsServer, Totals, collect
from forkserver.scoreboard import Scoreboard, State

ROOT = Path(__file__).resolve().parents[2]

STATUS = {
    "master": {"pid": 4242, "uptime": 3725.2, "reloads": 1, "restarts": {"crash": 2, "oom": 1},
               "listeners": []},
    "workers": [
        {"pid": 4243, "generation": 2, "state": "busy", "requests": 17,
         "current_request": "GET /slow?s=2", "busy_seconds": 2.04, "rss": 25 * 2**20 + 300000,
         "connections": 1},
        {"pid": 4244, "generation": 2, "state": "idle", "requests": 5, "current_request": "",
         "busy_seconds": 0, "rss": 24 * 2**20, "connections": 0},
        {"pid": 4245, "generation": 2, "state": "keepalive", "requests": 9,
         "current_request": "", "busy_seconds": 0, "rss": 24 * 2**20, "connections": 3},
        {"pid": 4246, "generation": 3, "state": "booting", "requests": 0, "current_request": "",
         "busy_seconds": 0, "rss": 10 * 2**20, "connections": 0},
    ],
    "totals": {"requests": 31, "responses": {"1xx": 0, "2xx": 29, "3xx": 0, "4xx": 2, "5xx": 0},
               "in_flight": 1, "connections": 4, "sent_bytes": 3 * 2**20,
               "workers": {"idle": 1, "busy": 1, "keepalive": 1, "booting": 1, "exiting": 0}},
}


def http_answer(body: bytes, status: str = "200 OK") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: "
            f"{len(body)}\r\nConnection: close\r\n\r\n").encode() + body


class FakeListener:
    """Answers every connection with fixed bytes and remembers the requests it got."""

    def __init__(self, answer: bytes, family: int = socket.AF_INET, path: str = "") -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        if family == socket.AF_UNIX:
            self.sock.bind(path)
            self.address = f"unix:{path}"
        else:
            self.sock.bind(("127.0.0.1", 0))
            self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.sock.listen(8)
        self.sock.settimeout(0.1)
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                self.requests.append(data)
                conn.sendall(self.answer)

    def close(self) -> None:
        self.stopping = True
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def fake():
    listeners = []

    def start(answer=None, **kwargs):
        if answer is None:
            answer = http_answer(json.dumps(STATUS).encode())
        listener = FakeListener(answer, **kwargs)
        listeners.append(listener)
        return listener

    yield start
    for listener in listeners:
        listener.close()


@pytest.fixture
def clean(tmp_path, monkeypatch):
    for var in list(os.environ):
        if var.startswith("FORKSERVER_"):
            monkeypatch.delenv(var)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "WATCH_INTERVAL", 0.0)
    return tmp_path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["status", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_table(clean, fake, capsys):
    server = fake()
    code, out, err = run(capsys, "--metrics-bind", server.address)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "forkserver master 4242, up 1h02m, 1 reloads, 3 worker restarts"
    assert lines[1].startswith("scoreboard: W_KS ")
    header = lines[3].split()
    assert header == ["PID", "GEN", "STATE", "REQUESTS", "FOR", "RSS", "MiB", "CONN", "REQUEST"]
    rows = [line.split() for line in lines[4:8]]
    assert rows[0] == ["4243", "2", "busy", "17", "2.0s", "25.3", "1", "GET", "/slow?s=2"]
    assert rows[1] == ["4244", "2", "idle", "5", "-", "24.0", "0"]
    assert rows[2] == ["4245", "2", "keepalive", "9", "-", "24.0", "3"]
    assert rows[3] == ["4246", "3", "booting", "0", "-", "10.0", "0"]
    assert lines[-1] == ("4 workers (1 idle, 1 busy, 1 keepalive, 1 booting); 1 in flight; "
                         "31 requests (2xx 29, 4xx 2); 4 connections open; 3.0 MiB sent")
    assert server.requests[0].startswith(b"GET /status HTTP/1.1\r\nHost: ")


def test_columns_line_up(clean, fake, capsys):
    server = fake()
    _, out, _ = run(capsys, "--metrics-bind", server.address)
    lines = out.splitlines()
    header = lines[3]
    for row in lines[4:8]:
        # Right-aligned numeric columns end where their header ends.
        for title in ("PID", "REQUESTS", "RSS MiB"):
            end = header.index(title) + len(title)
            assert row[end - 1] != " " and row[end] == " ", (title, row)


def test_unix_socket_address(clean, fake, capsys, tmp_path):
    server = fake(family=socket.AF_UNIX, path=str(tmp_path / "m.sock"))
    code, out, _ = run(capsys, "--metrics-bind", server.address)
    assert code == 0 and "4243" in out


def test_address_from_the_config_file_and_the_environment(clean, fake, capsys, monkeypatch):
    server = fake()
    (clean / "forkserver.toml").write_text(f'metrics_bind = "{server.address}"\n')
    assert run(capsys)[0] == 0
    (clean / "forkserver.toml").unlink()
    (clean / "other.toml").write_text(f'metrics_bind = "{server.address}"\n')
    assert run(capsys, "-c", "other.toml")[0] == 0
    monkeypatch.setenv("FORKSERVER_METRICS_BIND", server.address)
    assert run(capsys)[0] == 0
    assert len(server.requests) == 3


def test_wildcard_address_connects_to_loopback(clean, fake, capsys):
    server = fake()
    port = server.address.rsplit(":", 1)[1]
    code, out, _ = run(capsys, "--metrics-bind", f"0.0.0.0:{port}")
    assert code == 0 and "4242" in out


def test_watch_refreshes_and_clears_the_screen(clean, fake, capsys):
    server = fake()
    code, out, _ = run(capsys, "--metrics-bind", server.address, "--watch", "--count", "3")
    assert code == 0
    assert out.count("\x1b[H\x1b[2J") == 3 and out.startswith("\x1b[H\x1b[2J")
    assert out.count("forkserver master 4242") == 3
    assert len(server.requests) == 3


def test_count_implies_watch(clean, fake, capsys):
    server = fake()
    code, out, _ = run(capsys, "--metrics-bind", server.address, "--count", "2")
    assert code == 0 and out.count("\x1b[2J") == 2


def test_watch_ends_quietly_on_ctrl_c(clean, fake, capsys, monkeypatch):
    server = fake()

    def interrupt(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.time, "sleep", interrupt)
    code, out, err = run(capsys, "--metrics-bind", server.address, "--watch")
    assert (code, err) == (0, "") and out.count("forkserver master") == 1


def test_plain_status_prints_no_escape_codes(clean, fake, capsys):
    server = fake()
    _, out, _ = run(capsys, "--metrics-bind", server.address)
    assert "\x1b" not in out


def test_hostile_values_cannot_reach_the_terminal(clean, fake, capsys):
    status = json.loads(json.dumps(STATUS))
    status["workers"][0]["current_request"] = "GET /\x1b[2J\x1b]0;owned\x07" + "a" * 200
    status["workers"][0]["state"] = "busy"
    server = fake(http_answer(json.dumps(status).encode()))
    code, out, _ = run(capsys, "--metrics-bind", server.address)
    assert code == 0 and "\x1b" not in out and "\x07" not in out
    row = next(line for line in out.splitlines() if line.lstrip().startswith("4243"))
    assert row.endswith("~") and len(row) < 140


def test_unreachable_is_one_line_and_exit_1(clean, capsys, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    code, out, err = run(capsys, "--metrics-bind", f"127.0.0.1:{port}")
    assert (code, out) == (1, "")
    assert err == (f"forkserver: error: cannot reach the metrics listener at 127.0.0.1:{port}: "
                   "Connection refused\n")
    code, _, err = run(capsys, "--metrics-bind", f"unix:{tmp_path}/none.sock")
    assert code == 1 and err.count("\n") == 1 and "No such file or directory" in err


@pytest.mark.parametrize("answer, message", [
    (http_answer(b"not found", "404 Not Found"), "'HTTP/1.1 404 Not Found', not a /status"),
    (http_answer(b"{not json"), "not JSON"),
    (http_answer(b'{"some": "thing"}'), "not a forkserver /status page"),
    (http_answer(b'{"workers": [{"requests": "many"}]}'), "cannot read"),
    (b"", "answered 'nothing'"),
])
def test_a_wrong_answer_is_one_line_and_exit_1(clean, fake, capsys, answer, message):
    server = fake(answer)
    code, out, err = run(capsys, "--metrics-bind", server.address)
    assert (code, out) == (1, "")
    assert err.startswith("forkserver: error: ") and err.count("\n") == 1
    assert message in err


def test_watch_stops_with_exit_1_when_the_server_goes_away(clean, fake, capsys, monkeypatch):
    server = fake()
    calls = []

    def stop_server(seconds):
        calls.append(seconds)
        server.close()

    monkeypatch.setattr(cli.time, "sleep", stop_server)
    code, out, err = run(capsys, "--metrics-bind", server.address, "--watch")
    assert code == 1 and out.count("forkserver master") == 1
    assert "cannot reach" in err and calls == [0.0]


@pytest.mark.parametrize("argv, message", [
    ([], "no metrics address: pass --metrics-bind or set metrics_bind"),
    (["--metrics-bind", "nonsense"], "metrics address 'nonsense'"),
    (["--metrics-bind", "fd://3"], "inherited descriptor"),
    (["--metrics-bind", "127.0.0.1:1", "--count", "0"], "--count must be at least 1"),
    (["--metrics-bind", "127.0.0.1:1", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_usage_errors_are_one_line_and_exit_2(clean, capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert (code, out) == (2, "")
    assert err.startswith("forkserver: error: ") and message in err and err.count("\n") == 1


def test_config_error_is_reported_like_the_server_does(clean, capsys):
    (clean / "forkserver.toml").write_text('metrics_bind = "nope"\n')
    code, _, err = run(capsys)
    assert code == 2 and "metrics_bind" in err and "forkserver.toml" in err


def test_help(clean, capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "--metrics-bind" in out and "--watch" in out


def test_durations():
    assert [cli._duration(s) for s in (0, 2.04, 59.99, 60, 3599, 3600, 86399, 90061)] == [
        "0.0s", "2.0s", "60.0s", "1m00s", "59m59s", "1h00m", "23h59m", "1d01h"]


@pytest.fixture
def real_listener(tmp_path):
    """The real MetricsServer over a real scoreboard, pumped by a thread as the master would;
    returns start(family, settings) -> the address to give --metrics-bind."""
    board = Scoreboard(2)
    board.claim(0, os.getpid(), 1)
    writer = board.writer(0)
    writer.set_state(State.IDLE)
    writer.request_finished(200, 10, State.IDLE, 0.01)
    writer.request_started(b"GET /being-served?secret=1")
    stop = threading.Event()
    running = []

    def start(family=socket.AF_UNIX, settings=None) -> str:
        listener = socket.socket(family)
        if family == socket.AF_UNIX:
            listener.bind(str(tmp_path / "real.sock"))
            address = f"unix:{tmp_path}/real.sock"
        else:
            listener.bind(("127.0.0.1", 0))
            address = f"127.0.0.1:{listener.getsockname()[1]}"
        listener.listen(8)
        server = MetricsServer(listener, lambda: collect(
            board, [(os.getpid(), 0, 1)], Totals(), {}, 0, time.monotonic() - 5, []), settings)

        def loop():  # the master's part: select, dispatch, expire
            while not stop.is_set():
                readable, _, _ = select.select(server.fds(), [], [], 0.05)
                for fd in readable:
                    server.on_readable(fd)
                server.expire(time.monotonic())

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        running.append((thread, server))
        return address

    yield start
    stop.set()
    for thread, server in running:
        thread.join(5)
        server.close()
    board.close()


def test_against_the_real_metrics_listener(clean, capsys, real_listener):
    """The command reads what MetricsServer serves from a real scoreboard."""
    code, out, err = run(capsys, "--metrics-bind", real_listener())
    assert (code, err) == (0, "")
    row = next(line for line in out.splitlines() if line.lstrip().startswith(str(os.getpid())))
    assert row.split()[1:4] == ["1", "busy", "1"]
    assert row.endswith("GET /being-served")  # the query string is not shown
    assert out.splitlines()[-1].startswith("1 workers (1 busy); 1 in flight; 1 requests (2xx 1)")


def test_a_tcp_listener_with_a_token(clean, capsys, real_listener):
    (clean / "forkserver.toml").write_text('metrics_token = "from-the-file"\n')
    settings = cli.config.resolve({}, None, {}, str(clean))
    address = real_listener(socket.AF_INET, settings)
    # The token comes from the configuration, as the server reads it; Host names the address.
    code, out, err = run(capsys, "--metrics-bind", address)
    assert (code, err) == (0, "") and "GET /being-served" in out
    code, out, err = run(capsys, "--metrics-bind", address, "--metrics-token", "wrong")
    assert (code, out) == (1, "")
    assert err == (f"forkserver: error: {address} wants a different token: pass --metrics-token "
                   "or set metrics_token\n")
    (clean / "forkserver.toml").unlink()
    code, _, err = run(capsys, "--metrics-bind", address)
    assert code == 1 and f"{address} wants a token" in err


def test_the_request_names_the_address_and_carries_the_token(clean, fake, capsys):
    server = fake()
    assert run(capsys, "--metrics-bind", server.address, "--metrics-token", "t0k")[0] == 0
    head = server.requests[0].decode("latin-1")
    assert f"\r\nHost: {server.address}\r\n" in head
    assert "\r\nAuthorization: Bearer t0k\r\n" in head


def test_as_a_real_process(fake):
    server = fake()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORKSERVER_")}
    result = subprocess.run(
        [sys.executable, "-m", "forkserver", "status", "--metrics-bind", server.address],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("forkserver master 4242")
