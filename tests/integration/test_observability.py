"""Observability against a real server: /metrics, /status, the access log, ``forkserver status``.

The metrics listener belongs to the master, so these tests also check that it answers while the
only worker is busy, and that counters survive a worker killed with SIGKILL (the master folds
the dead worker's slot into its totals).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, http_request


@pytest.fixture
def short_dir():
    """A short directory for unix sockets (sun_path holds 107 bytes; tmp_path may be longer)."""
    path = tempfile.mkdtemp(prefix="fs-obs-", dir="/tmp")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


def unix_get(path: Path, target: str, method: str = "GET", timeout: float = 5.0
             ) -> tuple[int, bytes]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(f"{method} {target} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split()[1]), body


class Metrics:
    """Reads a running server's metrics listener on a unix socket."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def wait_ready(self, server, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.path.exists():
                try:
                    if unix_get(self.path, "/status")[0] == 200:
                        return
                except OSError:
                    pass
            time.sleep(0.05)
        raise AssertionError(f"the metrics listener never answered at {self.path} (is "
                             f"metrics_bind wired into the master?)\n{server.log()}")

    def status(self) -> dict:
        code, body = unix_get(self.path, "/status")
        assert code == 200
        return json.loads(body)

    def samples(self) -> dict[tuple[str, tuple], float]:
        code, body = unix_get(self.path, "/metrics")
        assert code == 200
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples
        }

    def value(self, name: str, **labels: str) -> float:
        return self.samples()[(name, tuple(sorted(labels.items())))]

    def wait_for(self, predicate, what: str, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.samples()
            if predicate(last):
                return last
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; last scrape: {last}")


def start(server_factory, directory: Path, *args: str, workers: int = 2):
    sock = directory / "metrics.sock"
    server = server_factory("tests.apps.basic:app", "--metrics-bind", f"unix:{sock}", *args,
                            workers=workers)
    metrics = Metrics(sock)
    metrics.wait_ready(server)
    return server, metrics


def requests_total(samples) -> float:
    return samples[("forkserver_requests_total", ())]


# ------------------------------------------------------------------------------ /metrics


def test_counters_match_the_requests_sent_even_across_a_worker_kill(server_factory, short_dir):
    server, metrics = start(server_factory, short_dir)
    for _ in range(20):
        assert requests.get(f"{server.url}/", timeout=10).status_code == 200
    for _ in range(5):
        assert requests.get(f"{server.url}/nope", timeout=10).status_code == 404
    # The worker updates its slot after the response is out, so poll rather than read once.
    samples = metrics.wait_for(lambda s: requests_total(s) == 25, "25 requests")
    assert samples[("forkserver_responses_total", (("class", "2xx"),))] == 20
    assert samples[("forkserver_responses_total", (("class", "4xx"),))] == 5
    assert samples[("forkserver_request_duration_seconds_count", ())] == 25
    assert samples[("forkserver_request_duration_seconds_bucket", (("le", "+Inf"),))] == 25
    assert samples[("forkserver_sent_bytes_total", ())] > 0
    assert samples[("forkserver_requests_in_flight", ())] == 0
    pids = server.worker_pids()
    assert len(pids) == 2
    for pid in pids:
        memory = {kind: samples[("forkserver_worker_memory_bytes",
                                 (("kind", kind), ("pid", str(pid))))]
                  for kind in ("rss", "uss", "pss")}
        assert 0 < memory["uss"] <= memory["pss"] <= memory["rss"], memory
        assert ("forkserver_worker_cpu_seconds_total", (("pid", str(pid)),)) in samples

    victim = pids[0]
    os.kill(victim, signal.SIGKILL)
    status = None
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        status = metrics.status()
        live = [w for w in status["workers"] if w["state"] in ("idle", "keepalive")]
        if len(live) == 2 and victim not in {w["pid"] for w in status["workers"]}:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"no replacement for worker {victim}: {status}")
    samples = metrics.samples()
    assert requests_total(samples) == 25, "the killed worker's requests were lost"
    restarts = sum(v for (name, _), v in samples.items()
                   if name == "forkserver_worker_restarts_total")
    assert restarts >= 1

    for _ in range(10):
        assert requests.get(f"{server.url}/", timeout=10).status_code == 200
    samples = metrics.wait_for(lambda s: requests_total(s) == 35, "35 requests")
    assert samples[("forkserver_responses_total", (("class", "2xx"),))] == 30
    assert samples[("forkserver_request_duration_seconds_count", ())] == 35


def test_memory_of_the_whole_server(server_factory, short_dir):
    """PSS of master and workers adds up to the server's total; the master reads each process
    at most once per memory_check_interval, so two scrapes in a row show the same reading."""
    server, metrics = start(server_factory, short_dir, "--memory-check-interval", "60")
    status = metrics.status()
    master, workers, totals = status["master"], status["workers"], status["totals"]
    assert 0 < master["uss"] <= master["pss"] <= master["rss"]
    assert len(workers) == 2
    for kind in ("rss", "uss", "pss"):
        assert totals["memory"][kind] == master[kind] + sum(w[kind] for w in workers)
    # Forked from the master, the workers share its pages: each owns less than it maps.
    for worker in workers:
        assert worker["uss"] < worker["pss"] < worker["rss"]
    samples = metrics.samples()
    server_pss = samples[("forkserver_memory_bytes", (("kind", "pss"),))]
    assert server_pss == totals["memory"]["pss"]  # the same cached readings
    master_pss = samples[("forkserver_process_memory_bytes",
                          (("kind", "pss"), ("pid", str(server.pid)), ("process", "master")))]
    assert master_pss > 0
    again = metrics.status()
    assert [w["pss"] for w in again["workers"]] == [w["pss"] for w in workers]


def test_tcp_metrics_listener_and_listen_backlog(server_factory, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = server_factory("tests.apps.basic:app", "--metrics-bind", f"127.0.0.1:{port}",
                            "--backlog", "100")
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while True:
        try:
            response = requests.get(f"{base}/metrics", timeout=5)
            break
        except requests.ConnectionError:
            if time.monotonic() > deadline:
                raise AssertionError(f"no metrics listener on {base}\n{server.log()}") from None
            time.sleep(0.05)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    [backlog] = families["forkserver_listen_backlog_max"].samples
    assert backlog.labels == {"listener": server.url.removeprefix("http://")}
    assert backlog.value == 100
    assert families["forkserver_uptime_seconds"].samples[0].value > 0
    assert requests.post(f"{base}/metrics", timeout=5).status_code == 405
    assert requests.get(f"{base}/other", timeout=5).status_code == 404
    assert requests.head(f"{base}/status", timeout=5).status_code == 200
    # A page in a browser reaching this port by DNS rebinding sends its own name as Host.
    rebound = requests.get(f"{base}/status", headers={"Host": f"evil.example:{port}"}, timeout=5)
    assert rebound.status_code == 421
    assert "workers" not in rebound.text


def test_probes_on_the_metrics_listener(server_factory, short_dir):
    # Each worker waits a second after the fork, so a replacement is seen booting.
    (short_dir / "slow_boot.py").write_text("import time\n\ndef hook(pid):\n    time.sleep(1)\n")
    sock = short_dir / "metrics.sock"
    server = server_factory("tests.apps.basic:app", "--metrics-bind", f"unix:{sock}",
                            "--post-fork", "slow_boot:hook", workers=1,
                            env={"PYTHONPATH": f"{ROOT}:{short_dir}"})
    metrics = Metrics(sock)
    metrics.wait_ready(server)
    for path, body in (("/livez", b"ok\n"), ("/readyz", b"ready\n")):
        assert unix_get(sock, path) == (200, body)
    # While the only worker is being replaced, /readyz says so until the new one is up.
    [pid] = server.worker_pids()
    os.kill(pid, signal.SIGKILL)
    seen = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        answer = unix_get(sock, "/readyz")
        if not seen or seen[-1] != answer:
            seen.append(answer)
        if answer[0] == 200 and len(seen) > 1:
            break
        time.sleep(0.02)
    assert seen[-1] == (200, b"ready\n")
    assert (503, b"booting\n") in seen, seen
    assert set(seen) <= {(200, b"ready\n"), (503, b"booting\n"), (503, b"no workers\n")}, seen
    assert unix_get(sock, "/livez") == (200, b"ok\n")


def test_metrics_token_guards_metrics_and_status_but_not_probes(server_factory, short_dir):
    sock = short_dir / "metrics.sock"
    server_factory("tests.apps.basic:app", "--metrics-bind", f"unix:{sock}",
                   "--metrics-token", "s3cret")
    deadline = time.monotonic() + 10
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert unix_get(sock, "/livez") == (200, b"ok\n")
    assert unix_get(sock, "/readyz")[0] == 200
    assert unix_get(sock, "/metrics")[0] == 401
    assert unix_get(sock, "/status")[0] == 401


def test_status_shows_the_busy_worker_and_metrics_answer_while_it_is(server_factory,
                                                                      short_dir):
    server, metrics = start(server_factory, short_dir, workers=1)
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(r=requests.get(f"{server.url}/slow?s=2", timeout=20)))
    thread.start()
    try:
        busy = None
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            busy = [w for w in metrics.status()["workers"] if w["state"] == "busy"]
            if busy and busy[0]["busy_seconds"] >= 0.5:
                break
            time.sleep(0.05)
        assert busy, "no worker was ever shown busy"
        [worker] = busy
        assert worker["current_request"] == "GET /slow"  # query strings are cut by default
        assert 0.5 <= worker["busy_seconds"] < 2.5
        assert worker["pid"] == server.worker_pids()[0]
        # The only worker is busy, and the master still answers a scrape at once.
        started = time.monotonic()
        samples = metrics.samples()
        assert time.monotonic() - started < 0.5
        assert samples[("forkserver_requests_in_flight", ())] == 1
        assert samples[("forkserver_workers", (("state", "busy"),))] == 1
        assert samples[("forkserver_threads", (("state", "busy"),))] == 1
        assert samples[("forkserver_worker_threads_busy", (("pid", str(worker["pid"])),))] == 1
        assert worker["busy_threads"] == 1 and worker["running"][0]["request"] == "GET /slow"
    finally:
        thread.join(20)
    assert result["r"].text == "slept"
    status = metrics.status()
    deadline = time.monotonic() + 5
    while status["workers"][0]["state"] == "busy" and time.monotonic() < deadline:
        time.sleep(0.05)
        status = metrics.status()
    assert status["workers"][0]["current_request"] == ""
    assert status["totals"]["requests"] == 1


# -------------------------------------------------------------------------- access log

HOSTILE_UA = b'evil "quoted" \\ %0A%22 caf\xe9 \xff <script>'
HOSTILE_REFERER = b'"><x y="1'


def hostile_request(path: str) -> bytes:
    return (b"GET " + path.encode() + b" HTTP/1.1\r\nHost: t\r\nUser-Agent: " + HOSTILE_UA
            + b"\r\nReferer: " + HOSTILE_REFERER + b"\r\nConnection: close\r\n\r\n")


def wait_for_lines(path: Path, count: int, timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while time.monotonic() < deadline:
        if path.exists():
            lines = path.read_bytes().decode("ascii").splitlines()
            if len(lines) >= count:
                return lines
        time.sleep(0.05)
    raise AssertionError(f"{path} has {len(lines)} lines, expected {count}: {lines}")


def test_json_access_log_with_hostile_headers(server_factory, tmp_path):
    log = tmp_path / "access.json"
    server = server_factory("tests.apps.basic:app", "--access-log", str(log),
                            "--access-log-format", "json")
    assert http_request(server.port, hostile_request("/?a=%22b%22&c")).startswith(
        b"HTTP/1.1 200")
    assert http_request(server.port, hostile_request("/missing")).startswith(b"HTTP/1.1 404")
    first, second = (json.loads(line) for line in wait_for_lines(log, 2))
    assert set(first) == {"time", "remote", "method", "path", "query", "status", "bytes",
                          "duration_ms", "user_agent", "referer", "request_id"}
    assert first["user_agent"] == HOSTILE_UA.decode("latin-1")
    assert first["referer"] == HOSTILE_REFERER.decode("latin-1")
    assert (first["method"], first["path"], first["query"]) == ("GET", "/", 'a=%22b%22&c')
    assert (first["status"], second["status"], second["path"]) == (200, 404, "/missing")
    assert first["remote"] == "127.0.0.1" and first["bytes"] > 0
    assert 0 <= first["duration_ms"] < 5000
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", first["time"])
    assert isinstance(first["request_id"], str)


QUOTED = r'"((?:[^"\\]|\\.)*)"'
COMBINED = re.compile(r'^(\S+) - - \[(\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4})\] ' + QUOTED
                      + r" (\d{3}) (\d+|-) " + QUOTED + " " + QUOTED + "$")


def unescape(text: str) -> str:
    return re.sub(r'\\(x[0-9a-f]{2}|["\\])',
                  lambda m: chr(int(m.group(1)[1:], 16)) if m.group(1)[0] == "x" else m.group(1),
                  text)


def test_combined_access_log_cannot_be_forged(server_factory, tmp_path):
    log = tmp_path / "access.log"
    server = server_factory("tests.apps.basic:app", "--access-log", str(log))
    assert http_request(server.port, hostile_request('/?x="y"')).startswith(b"HTTP/1.1 200")
    [line] = wait_for_lines(log, 1)
    match = COMBINED.match(line)
    assert match, line
    remote, _, request, status, size, referer, agent = match.groups()
    assert (remote, status) == ("127.0.0.1", "200") and size != "-"
    assert unescape(request) == 'GET /?x="y" HTTP/1.1'
    assert unescape(agent) == HOSTILE_UA.decode("latin-1")
    assert unescape(referer) == HOSTILE_REFERER.decode("latin-1")


# ---------------------------------------------------------------------- forkserver status


def test_status_command_against_a_running_server(server_factory, short_dir):
    server, metrics = start(server_factory, short_dir)
    for _ in range(3):
        requests.get(f"{server.url}/", timeout=10)
    metrics.wait_for(lambda s: requests_total(s) == 3, "3 requests")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORKSERVER_")}
    env["PYTHONPATH"] = str(ROOT)
    argv = [sys.executable, "-m", "forkserver", "status", "--metrics-bind",
            f"unix:{metrics.path}"]
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"forkserver master {server.pid}, up ")
    pids = {str(pid) for pid in server.worker_pids()}
    rows = [line.split() for line in lines if line.split()[:1] and line.split()[0] in pids]
    assert len(rows) == 2
    for row in rows:
        assert row[1] == "1" and row[2] in ("idle", "keepalive") and row[3] == "0/1"
        uss, pss = float(row[6]), float(row[7])
        assert 0 < uss <= pss
    assert sum(int(row[4]) for row in rows) == 3
    assert lines[2].startswith("memory: ") and "MiB PSS in all (master " in lines[2]
    assert "0 of 2 threads busy" in lines[-2]
    assert "3 requests (2xx 3)" in lines[-1]

    watched = subprocess.run([*argv, "--watch", "--count", "2"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=30, check=False)
    assert watched.returncode == 0 and watched.stdout.count("\x1b[2J") == 2

    env["FORKSERVER_METRICS_BIND"] = f"unix:{metrics.path}"
    from_env = subprocess.run(argv[:4], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=30, check=False)
    assert from_env.returncode == 0 and str(server.pid) in from_env.stdout

    server.stop()
    gone = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30,
                          check=False)
    assert gone.returncode == 1 and gone.stdout == ""
    assert gone.stderr.startswith("forkserver: error: cannot reach the metrics listener")


def test_status_command_finds_the_server_by_its_pidfile(server_factory, tmp_path):
    pidfile = tmp_path / "fs.pid"
    server = server_factory("tests.apps.basic:app", "--pidfile", str(pidfile),
                            "--metrics-bind", "127.0.0.1:0")
    sidecar = Path(f"{pidfile}.metrics")
    address = sidecar.read_text().strip()
    assert address.startswith("127.0.0.1:") and not address.endswith(":0")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORKSERVER_")}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run([sys.executable, "-m", "forkserver", "status", "--pidfile",
                             str(pidfile)], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"forkserver master {server.pid}, up ")
    server.stop()
    assert not pidfile.exists() and not sidecar.exists()


def test_hup_picks_up_a_new_access_log(server_factory, tmp_path):
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    config_file = tmp_path / "forkserver.toml"
    config_file.write_text(f'access_log = "{first}"\n')
    server = server_factory("tests.apps.basic:app", "--config", str(config_file))
    requests.get(f"{server.url}/", timeout=10)
    config_file.write_text(f'access_log = "{second}"\naccess_log_format = "json"\n')
    server.send_signal(signal.SIGHUP)
    server.wait_for_log(r"generation 2 ready; retiring")
    server.wait_for_log(r"2 workers ready \(generation 2\)")
    server.wait_for_log(r"exited with code 0 \(reload", count=2)  # only new workers serve
    requests.get(f"{server.url}/after-reload", timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "after-reload" not in second.read_text():
        time.sleep(0.05)  # the line is written just after the response is sent
    assert json.loads(second.read_text().splitlines()[-1])["path"] == "/after-reload"
    assert "after-reload" not in first.read_text()
    server.known_pids.update(server.worker_pids())


def test_json_error_log_beside_the_json_access_log(server_factory, tmp_path):
    access = tmp_path / "access.log"
    server = server_factory("tests.apps.basic:app", "--error-log-format", "json",
                            "--access-log", str(access), "--access-log-format", "json")
    assert requests.get(f"{server.url}/", timeout=10).status_code == 200
    [entry] = wait_for_lines(access, 1)
    assert json.loads(entry)["status"] == 200
    records = [json.loads(line) for line in server.log().splitlines() if line]
    assert records and {"time", "level", "pid", "message"} <= set(records[0])
    assert any(r["message"].startswith("Listening at: ") for r in records)
    # The master's lines about a worker carry its fields as keys of their own.
    booted = [r for r in records if r["message"].startswith("booting worker")]
    assert booted and all({"worker_pid", "slot", "generation"} <= set(r) for r in booted)
    victim = booted[0]["worker_pid"]
    os.kill(victim, signal.SIGKILL)
    server.wait_for_log(rf"worker {victim} killed by SIGKILL")
    [died] = [json.loads(line) for line in server.log().splitlines()
              if f'"worker {victim} killed' in line]
    assert died["level"] == "ERROR" and died["signal"] == "SIGKILL" and died["reason"] == "oom"
    assert (died["worker_pid"], died["slot"], died["generation"]) == \
        (victim, booted[0]["slot"], 1)
    server.wait_for_log(r"booting worker", count=3)
    server.known_pids.update(server.worker_pids())


def test_hup_takes_a_new_metrics_token(server_factory, short_dir, tmp_path):
    sock = short_dir / "metrics.sock"
    config_file = tmp_path / "forkserver.toml"
    config_file.write_text('metrics_token = "first"\n')
    server = server_factory("tests.apps.basic:app", "--config", str(config_file),
                            "--metrics-bind", f"unix:{sock}")

    def status_with(token: str) -> int:
        with socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(5)
            conn.connect(str(sock))
            conn.sendall(f"GET /metrics HTTP/1.1\r\nHost: localhost\r\n"
                         f"Authorization: Bearer {token}\r\n\r\n".encode())
            return int(conn.recv(64).split()[1])

    assert (status_with("first"), status_with("second")) == (200, 401)
    config_file.write_text('metrics_token = "second"\n')
    server.send_signal(signal.SIGHUP)
    server.wait_for_log(r"2 workers ready \(generation 2\)")
    assert (status_with("first"), status_with("second")) == (401, 200)
    server.known_pids.update(server.worker_pids())
