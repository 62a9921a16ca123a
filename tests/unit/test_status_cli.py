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

MiB = 2**20
STATUS = {
    "master": {"pid": 4242, "uptime": 3725.2, "reloads": 1, "restarts": {"crash": 2, "oom": 1},
               "listeners": [], "rss": 40 * MiB, "uss": 20 * MiB, "pss": 30 * MiB,
               "others": []},
    "workers": [
        {"pid": 4243, "generation": 2, "state": "busy", "requests": 17,
         "current_request": "GET /slow?s=2", "busy_seconds": 2.04, "rss": 25 * MiB + 300000,
         "uss": 5 * MiB, "pss": 12 * MiB + 300000, "connections": 1, "threads": 1,
         "busy_threads": 1,
         "running": [{"thread": 0, "request": "GET /slow?s=2", "seconds": 2.04}]},
        {"pid": 4244, "generation": 2, "state": "idle", "requests": 5, "current_request": "",
         "busy_seconds": 0, "rss": 24 * MiB, "uss": 4 * MiB, "pss": 11 * MiB,
         "connections": 0, "threads": 1, "busy_threads": 0, "running": []},
        {"pid": 4245, "generation": 2, "state": "keepalive", "requests": 9,
         "current_request": "", "busy_seconds": 0, "rss": 24 * MiB, "uss": 4 * MiB,
         "pss": 11 * MiB, "connections": 3, "threads": 1, "busy_threads": 0, "running": []},
        {"pid": 4246, "generation": 3, "state": "booting", "requests": 0, "current_request": "",
         "busy_seconds": 0, "rss": 10 * MiB, "uss": 2 * MiB, "pss": 6 * MiB,
         "connections": 0, "threads": 1, "busy_threads": 0, "running": []},
    ],
    "totals": {"requests": 31, "responses": {"1xx": 0, "2xx": 29, "3xx": 0, "4xx": 2, "5xx": 0},
               "in_flight": 1, "busy_threads": 1, "threads": 4, "connections": 4,
               "sent_bytes": 3 * MiB,
               "memory": {"rss": 123 * MiB, "uss": 35 * MiB, "pss": 70 * MiB + 300000},
               "handoffs": {"sent": 0, "adopted": 0},
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
    assert lines[2] == ("memory: 70.3 MiB PSS in all (master 30.0, workers 40.3); "
                        "USS 35.0 MiB, RSS 123.0 MiB")
    header = lines[4].split()
    assert header == ["PID", "GEN", "STATE", "THREADS", "REQUESTS", "FOR", "USS", "MiB", "PSS",
                      "MiB", "CONN", "REQUEST"]
    rows = [line.split() for line in lines[5:9]]
    assert rows[0] == ["4243", "2", "busy", "1/1", "17", "2.0s", "5.0", "12.3", "1", "GET",
                       "/slow?s=2"]
    assert rows[1] == ["4244", "2", "idle", "0/1", "5", "-", "4.0", "11.0", "0"]
    assert rows[2] == ["4245", "2", "keepalive", "0/1", "9", "-", "4.0", "11.0", "3"]
    assert rows[3] == ["4246", "3", "booting", "0/1", "0", "-", "2.0", "6.0", "0"]
    assert lines[-2:] == [
        ("4 workers (1 idle, 1 busy, 1 keepalive, 1 booting); 1 of 4 threads busy; "
         "4 connections open"),
        "31 requests (2xx 29, 4xx 2); 3.0 MiB sent"]
    assert server.requests[0].startswith(b"GET /status HTTP/1.1\r\nHost: ")


def test_columns_line_up(clean, fake, capsys):
    server = fake()
    _, out, _ = run(capsys, "--metrics-bind", server.address)
    lines = out.splitlines()
    header = lines[4]
    for row in lines[5:9]:
        # Right-aligned numeric columns end where their header ends.
        for title in ("PID", "THREADS", "REQUESTS", "USS MiB", "PSS MiB"):
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
    hostile = "GET /\x1b[2J\x1b]0;owned\x07" + "a" * 200
    status["workers"][0]["current_request"] = hostile
    status["workers"][0]["running"] = [{"thread": 0, "request": hostile, "seconds": 1},
                                       {"thread": 1, "request": hostile, "seconds": 1}]
    status["workers"][0]["state"] = "busy"
    status["master"]["others"] = [{"role": "\x1b[31mmold", "pid": 1, "pss": 0}]
    server = fake(http_answer(json.dumps(status).encode()))
    code, out, _ = run(capsys, "--metrics-bind", server.address)
    assert code == 0 and "\x1b" not in out and "\x07" not in out
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.lstrip().startswith("4243"))
    for row in lines[at:at + 2]:
        assert row.endswith("~") and len(row) < 140


def test_a_threaded_worker_lists_its_running_requests(clean, fake, capsys, monkeypatch):
    status = json.loads(json.dumps(STATUS))
    status["workers"][0].update(threads=4, running=[
        {"thread": n, "request": f"GET /r{n}", "seconds": 3.0 - n} for n in range(4)])
    status["master"]["others"] = [{"role": "mold", "pid": 4250, "pss": 2 * MiB}]
    status["totals"].update(busy_threads=4, threads=7, handoffs={"sent": 5, "adopted": 4})
    monkeypatch.setattr(cli, "RUNNING_SHOWN", 3)
    server = fake(http_answer(json.dumps(status).encode()))
    code, out, _ = run(capsys, "--metrics-bind", server.address)
    lines = out.splitlines()
    assert code == 0 and "(master 30.0, workers 40.3, mold 2.0)" in lines[2]
    header = lines[4]
    assert lines[5].split()[3:6] == ["4/4", "17", "3.0s"] and lines[5].endswith("GET /r0")
    # Further requests: their time under FOR, their line under REQUEST; then a count.
    assert lines[6].split() == ["2.0s", "GET", "/r1"] and lines[7].split() == ["1.0s", "GET", "/r2"]
    for line in lines[6:8]:
        assert line.index("s ") + 1 == header.index("FOR") + 3
        assert line.index("GET") == header.rindex("REQUEST")
    assert lines[8].strip() == "... and 1 more"
    assert lines[9].split()[0] == "4244"
    assert "4 of 7 threads busy" in lines[-2]
    assert lines[-1].endswith("; 5 connections handed off, 4 adopted")


def test_a_server_of_the_previous_version_is_still_shown(clean, fake, capsys):
    old = json.loads(json.dumps(STATUS))
    for worker in old["workers"]:
        for key in ("uss", "pss", "threads", "busy_threads", "running"):
            del worker[key]
    for key in ("busy_threads", "threads", "memory", "handoffs"):
        del old["totals"][key]
    server = fake(http_answer(json.dumps(old).encode()))
    code, out, _ = run(capsys, "--metrics-bind", server.address)
    lines = out.splitlines()
    assert code == 0 and lines[5].split()[3:6] == ["1/1", "17", "2.0s"]
    assert lines[5].endswith("GET /slow?s=2") and "1 of 4 threads busy" in lines[-2]


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
    assert row.split()[1:5] == ["1", "busy", "1/1", "1"]
    assert row.endswith("GET /being-served")  # the query string is not shown
    assert out.splitlines()[-2].startswith("1 workers (1 busy); 1 of 1 threads busy;")
    assert out.splitlines()[-1].startswith("1 requests (2xx 1)")
    # Memory as the master reads it: this process is the worker and the master here.
    memory = out.splitlines()[2]
    assert memory.startswith("memory: ") and " 0.0 MiB PSS" not in memory


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


def test_a_threaded_slot_from_scoreboard_to_table(clean):
    """The whole way without a canned page: thread records -> collect -> /status JSON ->
    the table, with the readings the master would pass."""
    from forkserver.memory import Reading
    from forkserver.metrics import render_status

    board = Scoreboard(1)
    try:
        board.claim(0, 7001, 1)
        writer = board.writer(0)
        writer.set_state(State.KEEPALIVE)
        threads = writer.thread_writers(3)
        threads[0].request_finished(200, 10, 0.01)
        threads[2].request_started("GET", "/report?token=x")
        time.sleep(0.01)
        threads[1].request_started("POST", "/upload")
        writer.handoff_sent()
        snapshot = collect(board, [(7001, 0, 1)], Totals(), {}, 0, time.monotonic() - 1, [],
                           readings={7001: Reading(30 * MiB, 6 * MiB, 12 * MiB),
                                     os.getpid(): Reading(20 * MiB, 10 * MiB, 15 * MiB)})
        text = cli.format_status(json.loads(render_status(snapshot)))
    finally:
        board.close()
    lines = text.splitlines()
    assert lines[2].startswith("memory: 27.0 MiB PSS in all (master 15.0, workers 12.0)")
    assert lines[5].split()[:8] == ["7001", "1", "busy", "2/3", "1", lines[5].split()[5],
                                    "6.0", "12.0"]
    assert lines[5].endswith("GET /report")  # never its query string
    assert lines[6].split()[1:] == ["POST", "/upload"]
    assert "2 of 3 threads busy" in lines[-2]
    assert lines[-1].endswith("1 connections handed off, 0 adopted")
