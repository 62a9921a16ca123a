"""Threaded workers (issue 12) against the real server: ``--threads N`` with real clients.

Timing checks leave wide margins (the machine has 2 cores and other tests run beside these):
they prove that a fast request did not wait for a slow one by comparing against the slow
one's own multi-second duration, never against a tight bound.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.conformance import test_conformance as _conformance
from tests.conftest import ResponseReader, Server
from tests.corpus.http_verdicts import SERVER_ARGS

APP = "tests.apps.threads_app:app"


def get(url: str, timeout: float = 20) -> tuple[int, str]:
    response = requests.get(url, timeout=timeout)
    return response.status_code, response.text


def test_a_slow_request_does_not_delay_fast_ones_in_the_same_worker(server_factory):
    server = server_factory(APP, "--threads", "4", workers=1)
    slow_seconds = 3.0
    with ThreadPoolExecutor(2) as pool:
        started = time.monotonic()
        slow = [pool.submit(get, f"{server.url}/sleep?s={slow_seconds}") for _ in range(2)]
        time.sleep(0.3)  # both slow requests are running in their threads
        fast_pids = set()
        with requests.Session() as session:  # one keep-alive connection
            for _ in range(30):
                response = session.get(f"{server.url}/fast", timeout=20)
                assert response.status_code == 200
                fast_pids.add(response.text.split()[0])
        fast_done = time.monotonic() - started
        results = [future.result() for future in slow]
        slow_done = time.monotonic() - started
    slow_pids = {text.split()[0] for _, text in results}
    assert [status for status, _ in results] == [200, 200]
    assert fast_pids == slow_pids and len(fast_pids) == 1  # one worker served all of them
    assert slow_done >= slow_seconds
    # 30 fast requests finished while the slow ones still ran (they would otherwise queue
    # behind them: at least 3 s more). Half the slow duration is a wide margin.
    assert fast_done < slow_seconds / 2 + 0.3, (fast_done, slow_done)


def test_environ_says_multithread_with_threads(server_factory):
    server = server_factory(APP, "--threads", "3", workers=1)
    status, text = get(f"{server.url}/flags")
    assert status == 200 and "multithread=True" in text
    assert re.search(r" w0\.t[0-2] ", text + " "), text


def test_hooks_run_in_the_requests_thread(server_factory, tmp_path):
    hook_log = tmp_path / "hooks.log"
    server = server_factory(APP, "--threads", "4", "--pre-request",
                            "tests.apps.threads_app:pre_request", "--post-request",
                            "tests.apps.threads_app:post_request", workers=1,
                            env={"THREADS_APP_HOOK_LOG": str(hook_log)})
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: get(f"{server.url}/hooked"), range(12)))
    for status, text in results:
        pid, thread, pre = text.split()
        assert status == 200 and pre == f"pre_request_thread={thread}"
    deadline = time.monotonic() + 5
    while len(hook_log.read_text().splitlines()) < 12 and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = hook_log.read_text().splitlines()
    served = sorted(text.split()[1] for _, text in results)
    assert sorted(line.split()[3] for line in lines) == served  # post_request: same threads
    assert all(line.startswith("/hooked 200 ") for line in lines)


def test_access_log_lines_are_whole_and_counted_under_concurrency(server_factory, tmp_path):
    access_log = tmp_path / "access.log"
    server = server_factory(APP, "--threads", "4", "--access-log", str(access_log),
                            "--access-log-format", "{method} {path} {status}", workers=2)

    def client(number: int) -> None:
        with requests.Session() as session:
            for n in range(25):
                assert session.get(f"{server.url}/c{number}/r{n}", timeout=20).ok

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(client, range(8)))
    expected = {f"GET /c{c}/r{n} 200" for c in range(8) for n in range(25)}
    deadline = time.monotonic() + 5
    while len(access_log.read_text().splitlines()) < 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = access_log.read_text().splitlines()
    assert len(lines) == 200 and set(lines) == expected


def test_status_shows_each_busy_thread(server_factory):
    with socket.socket() as probe:  # a free port for the metrics listener
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    server = server_factory(APP, "--threads", "4", "--metrics-bind",
                            f"127.0.0.1:{metrics_port}", workers=1)
    with ThreadPoolExecutor(2) as pool:
        slow = [pool.submit(get, f"{server.url}/sleep?s=2.5") for _ in range(2)]
        time.sleep(0.8)
        url = f"http://127.0.0.1:{metrics_port}/status"
        with urllib.request.urlopen(url, timeout=10) as response:
            status = json.load(response)
        assert all(future.result()[0] == 200 for future in slow)
    workers = [w for w in status["workers"] if w.get("threads")]
    assert len(workers) == 1 and workers[0]["threads"] == 4
    assert workers[0]["busy_threads"] == 2
    requests_running = sorted(r["request"] for r in workers[0]["running"])
    assert requests_running == ["GET /sleep", "GET /sleep"]


def test_pipelined_requests_stay_in_order_with_threads(server_factory):
    server = server_factory(APP, "--threads", "4", workers=1)
    with server.connect() as sock:
        sock.sendall(b"".join(b"GET /sleep?s=0.%d HTTP/1.1\r\nHost: t\r\n\r\n" % (5 - n)
                              for n in range(5)))
        reader = ResponseReader(sock)
        threads = [reader.read() for _ in range(5)]
    assert all(status == 200 for status, _, _ in threads)


def test_a_stuck_request_costs_only_itself(server_factory):
    server = server_factory(APP, "--threads", "4", "--timeout", "2",
                            "--graceful-timeout", "8", workers=1)
    first_pid = get(f"{server.url}/fast")[1].split()[0]
    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        stuck = pool.submit(lambda: requests.get(f"{server.url}/sleep?s=60", timeout=30))
        time.sleep(1.0)
        innocent = pool.submit(get, f"{server.url}/sleep?s=3")  # ends 2 s past the timeout
        status, _ = innocent.result()
        assert status == 200
        with pytest.raises(requests.RequestException):
            stuck.result()
    # The worker went once the innocent request was done, not at the end of the grace.
    assert time.monotonic() - started < 8
    server.wait_for_log(r"over timeout=2s", timeout=10)
    assert re.search(r"w0\.t\d 0x[0-9a-f]+ tid=\d+ busy", server.log())
    status, text = get(f"{server.url}/fast")  # a replacement serves
    assert status == 200 and text.split()[0] != first_pid
    # The worker left by itself after the drain: logged as a timeout, never as a crash.
    assert "(crash)" not in server.log()


def test_threads_survive_a_burst_of_concurrent_clients(server_factory):
    server = server_factory(APP, "--threads", "4", workers=2)
    barrier = threading.Barrier(16)

    def client(_: int) -> set[str]:
        barrier.wait(10)
        with requests.Session() as session:
            return {session.get(f"{server.url}/fast", timeout=20).text.split()[1]
                    for _ in range(20)}

    with ThreadPoolExecutor(16) as pool:
        names = set().union(*pool.map(client, range(16)))
    assert names and all(re.fullmatch(r"w\d\.t[0-3]", name) for name in names)


def test_term_lets_every_running_request_finish(server_factory):
    server = server_factory(APP, "--threads", "4", "--graceful-timeout", "20", workers=1)
    with ThreadPoolExecutor(3) as pool:
        slow = [pool.submit(get, f"{server.url}/sleep?s=1.5") for _ in range(3)]
        time.sleep(0.5)  # all three are running in their threads
        server.send_signal(signal.SIGTERM)
        assert [future.result()[0] for future in slow] == [200, 200, 200]
    assert server.proc.wait(20) == 0


def test_max_requests_recycles_a_threaded_worker_without_a_failed_request(server_factory):
    server = server_factory(APP, "--threads", "4", "--max-requests", "10",
                            "--max-requests-jitter", "0", workers=1)

    def one(_: int) -> tuple[int, str]:
        response = requests.get(f"{server.url}/fast", headers={"Connection": "close"},
                                timeout=20)
        return response.status_code, response.text.split()[0]

    results = []
    with ThreadPoolExecutor(4) as pool:
        for _ in range(5):
            results += pool.map(one, range(8))
            time.sleep(0.2)
    assert [status for status, _ in results] == [200] * 40
    assert len({pid for _, pid in results}) >= 2  # recycled at least once


# ---------------------------------------------------------------------------------------------
# The HTTP verdict corpus once more, against 2 workers with 4 threads each: the conformance
# suite's tests collected here run with this module's `conformance_server`.

@pytest.fixture(scope="module")
def conformance_server(tmp_path_factory):
    records_dir = tmp_path_factory.mktemp("conformance-records")
    server = Server(tmp_path_factory.mktemp("conformance"), "tests.apps.conformance_app:app",
                    *SERVER_ARGS, "--threads", "4", env={"CONFORMANCE_DIR": str(records_dir)})
    server.start()
    server.records_dir = records_dir
    server.first_workers = sorted(server.worker_pids())
    yield server
    server.stop()


test_verdict_corpus_with_threads = _conformance.test_case
test_verdict_corpus_split_with_threads = _conformance.test_case_split
test_no_smuggled_request_reached_the_threaded_app = \
    _conformance.test_no_smuggled_request_ever_reached_the_app
