"""A real ``Worker`` driven in-process: real Settings, a real scoreboard, real sockets.

No fork and no subprocess: the worker's loop turns (``run_once``) in a thread of the test, and
clients are the test's end of a socketpair (``adopt`` takes the other end, as an accepted or
handed-over connection) or real TCP connections to a loopback listener the worker accepts on.
Deadlines are set small and the checks leave generous margins.
"""

from __future__ import annotations

import errno
import os
import queue
import signal
import socket
import ssl
import stat
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable

import pytest

from forkserver import config, handoff, logs, tls, worker
from forkserver.scoreboard import Scoreboard
from forkserver.worker import Worker, WorkerSpec
from tests.conftest import ResponseReader, post_unread, read_until_closed

GET = b"GET /%s HTTP/1.1\r\nHost: t\r\n\r\n"


def hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [environ["PATH_INFO"].encode()]


class Harness:
    """One worker whose loop runs in a thread; everything it does happens on that thread."""

    def __init__(self, worker: Worker, app: Callable) -> None:
        self.worker = worker
        self.calls: queue.Queue[Callable[[], None]] = queue.Queue()
        self.stop = threading.Event()
        opened = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(app, opened), daemon=True)
        self.thread.start()
        assert opened.wait(10), "the worker did not open"

    def _run(self, app: Callable, opened: threading.Event) -> None:
        self.worker.open(app)  # on the loop's thread: the reactor owns its thread pool
        opened.set()
        while not self.stop.is_set():
            while not self.calls.empty():
                self.calls.get()()
            self.worker.run_once(0.01)

    def on_loop(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the worker's thread and wait for it."""
        done = threading.Event()
        self.calls.put(lambda: (fn(), done.set()))
        assert done.wait(10), "the worker's loop is stuck"

    def client(self, timeout: float = 5.0) -> socket.socket:
        """A connected client; the worker holds the other end."""
        mine, theirs = socket.socketpair()
        mine.settimeout(timeout)
        self.on_loop(lambda: self.worker.adopt(theirs))
        return mine

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        if self.worker.handing is not None:
            self.worker.handing.close()
        lending = self.worker.lending
        if lending is not None:
            lending.pool.stop(timeout=5)
            self.worker.epoll.unregister(lending.fd)
            lending.pool.close()
        for conn in list(self.worker.conns.values()):
            conn.sock.close()
        self.worker.epoll.close()
        os.close(self.worker.wake_r)
        os.close(self.worker.wake_w)


@pytest.fixture
def make_worker(tmp_path):
    made: list[tuple[Harness, Scoreboard]] = []

    def make(app: Callable = hello, listeners: tuple[socket.socket, ...] = (),
             max_requests: int = 0, notify_fd: int = -1, reload_dir: str | None = None,
             tls_context: ssl.SSLContext | None = None,
             channel: handoff.Channel | None = None, **overrides: object) -> Harness:
        settings = config.resolve({"app": "tests.apps.basic:app", **overrides}, None, {},
                                  str(tmp_path))
        board = Scoreboard(1)
        spec = WorkerSpec(settings=settings, index=0, generation=1, listeners=list(listeners),
                          load_app=lambda: app, scoreboard=board, master_pid=os.getppid(),
                          title="test worker", max_requests=max_requests, hooks={},
                          access_log=None, tls_context=tls_context, reload_dir=reload_dir,
                          notify_fd=notify_fd, handoff=channel, mold_link=None)
        harness = Harness(Worker(spec), app)
        made.append((harness, board))
        return harness

    yield make
    for harness, board in made:
        harness.close()
        board.close()


@pytest.fixture
def listener():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.setblocking(False)
    yield sock
    sock.close()


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True if the peer closes (EOF or reset) within ``seconds``, reading whatever comes."""
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# keep-alive, pipelining, deadlines


def test_keep_alive_serves_requests_in_turn_on_one_connection(make_worker):
    h = make_worker()
    client = h.client()
    reader = ResponseReader(client)
    for name in ("a", "b", "c"):
        client.sendall(GET % name.encode())
        status, headers, body = reader.read()
        assert (status, body) == (200, b"/" + name.encode())
        assert "connection" not in headers
    assert len(h.worker.conns) == 1


def test_pipelined_requests_are_answered_in_order(make_worker):
    h = make_worker()
    client = h.client()
    client.sendall(GET % b"1" + GET % b"2" + GET % b"3")
    reader = ResponseReader(client)
    assert [reader.read()[2] for _ in range(3)] == [b"/1", b"/2", b"/3"]


def test_idle_connection_is_closed_after_keepalive(make_worker):
    h = make_worker(keepalive=0.3)
    client = h.client()
    client.sendall(GET % b"x")
    assert ResponseReader(client).read()[0] == 200
    started = time.monotonic()
    assert closed_within(client, 5)
    assert 0.2 < time.monotonic() - started < 3


def test_unfinished_head_gets_408_after_header_timeout(make_worker):
    h = make_worker(header_timeout=0.3)
    client = h.client()
    client.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n")
    started = time.monotonic()
    assert read_until_closed(client).startswith(b"HTTP/1.1 408 ")
    assert 0.2 < time.monotonic() - started < 3


def test_a_connection_that_sends_nothing_is_closed_after_header_timeout(make_worker):
    h = make_worker(header_timeout=0.3)
    with h.client() as client:
        started = time.monotonic()
        assert read_until_closed(client) == b""
        assert 0.2 < time.monotonic() - started < 3


def test_a_head_cut_short_in_the_first_read_gets_408_after_header_timeout(make_worker):
    # The deadline of a new connection starts once its first read leaves it open.
    h = make_worker(header_timeout=0.3)
    client, theirs = socket.socketpair()
    with client:
        client.settimeout(5)
        client.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n")
        started = time.monotonic()
        h.on_loop(lambda: h.worker.adopt(theirs))
        assert read_until_closed(client).startswith(b"HTTP/1.1 408 ")
        assert 0.2 < time.monotonic() - started < 3


def test_unfinished_small_body_gets_408_after_header_timeout(make_worker):
    h = make_worker(header_timeout=0.3)
    client = h.client()
    client.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
    assert read_until_closed(client).startswith(b"HTTP/1.1 408 ")


def test_malformed_request_gets_400_and_the_worker_goes_on(make_worker):
    h = make_worker()
    bad = h.client()
    bad.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nBad Header: x\r\n\r\n")
    assert read_until_closed(bad).startswith(b"HTTP/1.1 400 ")
    good = h.client()
    good.sendall(GET % b"ok")
    assert ResponseReader(good).read()[2] == b"/ok"


def test_app_exception_is_500_and_the_connection_closes(make_worker):
    def app(environ, start_response):
        raise ValueError("broken")
    h = make_worker(app)
    client = h.client()
    client.sendall(GET % b"x")
    assert read_until_closed(client).startswith(b"HTTP/1.1 500 ")


# ---------------------------------------------------------------------------------------------
# issue 10, item 1: a response to an unread body reaches the client (lingering close)


def ignore_body(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]


def test_unread_large_body_does_not_destroy_the_response(make_worker, listener):
    make_worker(ignore_body, listeners=(listener,))
    answer = post_unread(listener.getsockname()[1], 8 * 1024 * 1024)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\nok"), answer[:200]
    assert b"Connection: close" in answer


def test_small_unread_body_is_read_and_the_connection_kept(make_worker):
    h = make_worker(ignore_body)
    client = h.client()
    client.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3000\r\n\r\n" + b"y" * 3000)
    reader = ResponseReader(client)
    status, headers, _ = reader.read()
    assert status == 200 and "connection" not in headers
    client.sendall(GET % b"next")
    assert reader.read()[0] == 200


def test_linger_ends_after_linger_timeout(make_worker):
    h = make_worker(ignore_body, linger_timeout=0.5)
    client = h.client()
    client.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100000000\r\n\r\n"
                   + b"z" * 100_000)
    client.settimeout(5)
    answer = b""
    while not answer.endswith(b"ok"):
        answer += client.recv(65536)
    assert b"Connection: close" in answer
    assert client.recv(100) == b""  # our side was shut down after the answer
    started = time.monotonic()
    client.settimeout(0.1)
    sent_after = 0
    while time.monotonic() - started < 5:
        try:
            sent_after += client.send(b"z" * 4096)  # still drained while lingering
        except (BrokenPipeError, ConnectionResetError):
            break
        except TimeoutError:
            continue
        time.sleep(0.01)
    else:
        pytest.fail("the lingering connection was never closed")
    assert sent_after > 0
    assert 0.3 < time.monotonic() - started < 4
    assert not h.worker.conns


def test_linger_stops_after_linger_bytes(make_worker):
    h = make_worker(ignore_body, linger_bytes=100_000, linger_timeout=30)
    client = h.client()
    client.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100000000\r\n\r\n")
    client.settimeout(5)
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        for _ in range(1000):
            client.sendall(b"z" * 4096)
    assert not h.worker.conns


# ---------------------------------------------------------------------------------------------
# issue 10, items 3, 4, 6


def test_informational_final_status_from_the_app_is_500(make_worker):
    def app(environ, start_response):
        start_response("101 Switching Protocols", [])
        return [b""]
    h = make_worker(app)
    client = h.client()
    client.sendall(GET % b"ws" + GET % b"after")
    data = read_until_closed(client)
    assert data.startswith(b"HTTP/1.1 500 ") and b"101" not in data


def test_oserror_from_the_app_is_a_logged_500(make_worker, caplog):
    def app(environ, start_response):
        raise FileNotFoundError(2, "No such file", "/missing/config.json")
    h = make_worker(app)
    client = h.client()
    client.sendall(GET % b"x")
    with caplog.at_level("ERROR", logger=logs.LOGGER_NAME):
        assert read_until_closed(client).startswith(b"HTTP/1.1 500 ")
        h.on_loop(lambda: None)
    assert "FileNotFoundError" in caplog.text


def test_wsgi_errors_on_a_full_disk_does_not_cost_the_answer(make_worker, monkeypatch):
    class FullDisk:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(logs, "error_stream", lambda: FullDisk())

    def app(environ, start_response):
        environ["wsgi.errors"].write("app message\n")
        environ["wsgi.errors"].flush()
        start_response("200 OK", [])
        return [b"answered"]
    h = make_worker(app)
    client = h.client()
    client.sendall(GET % b"x")
    status, _, body = ResponseReader(client).read()
    assert (status, body) == (200, b"answered")


def test_absolute_form_target_sets_the_host(make_worker):
    def app(environ, start_response):
        start_response("200 OK", [])
        return [environ["HTTP_HOST"].encode()]
    h = make_worker(app)
    client = h.client()
    client.sendall(b"GET http://example.org:8080/x HTTP/1.1\r\nHost: other.example\r\n\r\n"
                   b"GET /y HTTP/1.1\r\nHost: other.example\r\n\r\n")
    reader = ResponseReader(client)
    assert reader.read()[2] == b"example.org:8080"
    assert reader.read()[2] == b"other.example"


# ---------------------------------------------------------------------------------------------
# issue 10, item 8: at worker_connections, the longest-idle connection makes room


def test_at_the_connection_limit_the_longest_idle_connection_makes_room(make_worker, listener):
    h = make_worker(listeners=(listener,), worker_connections=2, keepalive=30)
    address = listener.getsockname()
    first, second = (socket.create_connection(address, timeout=5) for _ in range(2))
    for client in (first, second):
        client.sendall(GET % b"parked")
        assert ResponseReader(client).read()[0] == 200
    started = time.monotonic()
    third = socket.create_connection(address, timeout=5)
    third.sendall(GET % b"new")
    assert ResponseReader(third).read()[2] == b"/new"
    assert time.monotonic() - started < 3
    assert closed_within(first, 5)  # the longest idle one went
    second.sendall(GET % b"still")
    assert ResponseReader(second).read()[2] == b"/still"
    assert len(h.worker.conns) == 2  # never more than worker_connections
    for client in (first, second, third):
        client.close()


# ---------------------------------------------------------------------------------------------
# issue 10, item 9: limit_request_head


def test_head_over_limit_request_head_is_431(make_worker):
    h = make_worker(limit_request_head=16 * 1024)
    client = h.client()
    client.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n")
    for i in range(4):
        client.sendall(b"X-Field-%d: %s\r\n" % (i, b"v" * 5000))
    assert read_until_closed(client).startswith(b"HTTP/1.1 431 ")


def test_unfinished_heads_cost_a_bounded_amount_of_memory(make_worker):
    """Connections that never finish their heads (fields just under every per-field limit)
    hold at most about limit_request_head each, not fields x field size."""
    h = make_worker(header_timeout=30)
    clients = [h.client() for _ in range(20)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        line = b"X-F: " + b"v" * 8000 + b"\r\n"
        for client in clients:
            client.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n")
        for _ in range(40):  # 320 KB offered per connection; the limit is 64 KiB
            for client in clients:
                try:
                    client.sendall(line)
                except (BrokenPipeError, ConnectionResetError):
                    pass
            h.on_loop(lambda: h.worker.run_once(0))
        h.on_loop(lambda: h.worker.run_once(0))
        peak_per_connection = (tracemalloc.get_traced_memory()[1] - before) / len(clients)
    finally:
        tracemalloc.stop()
    # limit_request_head of buffered head, its decoded fields, and one read in flight.
    assert peak_per_connection < 200 * 1024, peak_per_connection
    for client in clients:
        assert read_until_closed(client).startswith(b"HTTP/1.1 431 ")


# ---------------------------------------------------------------------------------------------
# issue 10, item 10: a retiring worker never closes a connection under a request


def test_retiring_worker_answers_each_next_request_with_close(make_worker):
    h = make_worker(max_requests=2, keepalive=30)
    parked = h.client()
    parked.sendall(GET % b"one")
    parked_reader = ResponseReader(parked)
    assert parked_reader.read()[0] == 200
    other = h.client()
    other.sendall(GET % b"two")  # the worker's last request before it asks to be recycled
    assert ResponseReader(other).read()[0] == 200
    h.on_loop(lambda: None)  # the loop has finished that request's bookkeeping
    assert h.worker.requests.retiring
    parked.sendall(GET % b"three")
    status, headers, body = parked_reader.read()
    assert (status, headers.get("connection"), body) == (200, "close", b"/three")
    assert closed_within(parked, 5)


def test_sigwinch_answers_each_next_request_with_close(make_worker):
    h = make_worker(keepalive=30)
    parked = h.client()
    reader = ResponseReader(parked)
    parked.sendall(GET % b"before")
    assert reader.read()[0] == 200

    def winch() -> None:
        h.worker.pending_signals.append(signal.SIGWINCH)
        h.worker._handle_signals()

    h.on_loop(winch)
    # An idle keep-alive connection is not closed under a request its client may be sending:
    # its next response says close.
    parked.sendall(GET % b"next")
    status, headers, _ = reader.read()
    assert (status, headers.get("connection")) == (200, "close")
    assert closed_within(parked, 5)
    fresh = h.client()  # still serving (and accepting), each response closes
    fresh.sendall(GET % b"after")
    status, headers, body = ResponseReader(fresh).read()
    assert (status, headers.get("connection"), body) == (200, "close", b"/after")
    assert closed_within(fresh, 5)
    assert not h.worker.stopping


def test_notify_fd_gets_a_byte_when_ready_and_when_asking_to_be_recycled(make_worker):
    r, w = os.pipe2(os.O_NONBLOCK)
    try:
        h = make_worker(max_requests=1, notify_fd=w)
        assert os.read(r, 16) == b"!"  # ready
        client = h.client()
        client.sendall(GET % b"x")
        assert ResponseReader(client).read()[0] == 200
        h.on_loop(lambda: None)
        assert os.read(r, 16) == b"!"  # recycle reason set
    finally:
        os.close(r)
        os.close(w)


def test_stopping_worker_gives_idle_connections_a_grace_period(make_worker):
    h = make_worker(keepalive=30)
    parked, silent = h.client(), h.client()
    reader = ResponseReader(parked)
    for client in (parked, silent):
        client.sendall(GET % b"before")
        assert ResponseReader(client).read()[0] == 200
    h.on_loop(h.worker.begin_stop)
    time.sleep(0.3)  # a client reusing its connection right after the worker began to stop
    parked.sendall(GET % b"after")
    status, headers, body = reader.read()
    assert (status, headers.get("connection"), body) == (200, "close", b"/after")
    started = time.monotonic()
    assert closed_within(silent, 10)  # idle and silent: closed once the grace is over
    assert time.monotonic() - started < 5


# ---------------------------------------------------------------------------------------------
# issue 10, item 12: when a client that stopped reading is cut, the others are not lost


def test_requests_that_came_while_a_slow_reader_held_the_worker_are_served(make_worker):
    big = b"b" * (16 * 1024 * 1024)

    def app(environ, start_response):
        start_response("200 OK", [])
        return [big if environ["PATH_INFO"] == "/big" else b"small"]
    h = make_worker(app, send_timeout=1.0, keepalive=0.3, header_timeout=0.3)
    waiting = h.client()
    waiting.sendall(GET % b"first")
    waiting_reader = ResponseReader(waiting)
    assert waiting_reader.read()[2] == b"small"
    stalled = h.client()
    stalled.sendall(GET % b"big")  # and never read: the worker blocks in send for 1 s
    time.sleep(0.6)  # past the waiting connection's keep-alive, while the worker is held
    waiting.sendall(GET % b"second")
    status, _, body = waiting_reader.read()
    assert (status, body) == (200, b"small")
    assert closed_within(stalled, 10)


# ---------------------------------------------------------------------------------------------
# issue 10, item 5: a client socket never gets fd 0, 1 or 2


def test_a_client_socket_on_a_standard_fd_is_moved_above_2(make_worker):
    h = make_worker()
    saved = os.dup(0)
    mine, theirs = socket.socketpair()
    mine.settimeout(5)
    try:
        os.dup2(theirs.fileno(), 0)  # as if an app had closed fd 0 and accept() reused it
        theirs.close()
        low = socket.socket(fileno=0)
        h.on_loop(lambda: h.worker.adopt(low))
        assert h.worker.conns and all(fd > 2 for fd in h.worker.conns)
        assert stat.S_ISCHR(os.fstat(0).st_mode)  # /dev/null holds fd 0 again
        mine.sendall(GET % b"moved")
        assert ResponseReader(mine).read()[2] == b"/moved"
    finally:
        os.dup2(saved, 0)
        os.close(saved)
        mine.close()


def test_with_reload_the_worker_reports_the_files_its_app_is_made_of(make_worker, tmp_path):
    report_dir = tmp_path / "reports"
    report_dir.mkdir()
    h = make_worker(reload_dir=str(report_dir))
    inherited = set(sys.modules) - {__name__}
    worker.report_modules(h.worker.spec, inherited)
    (report,) = report_dir.iterdir()
    assert report.name.startswith(f"worker-{os.getpid()}")
    assert __file__ in report.read_text()


# ---------------------------------------------------------------------------------------------
# issue 12: threads; the reactor lends complete requests to a pool and takes connections back


def gated(gate: threading.Event, started: queue.Queue) -> Callable:
    """An app whose /wait requests block until ``gate`` is set (each reports its start)."""
    def app(environ, start_response):
        if environ["PATH_INFO"] == "/wait":
            started.put(threading.current_thread().name)
            gate.wait(10)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [environ["PATH_INFO"].encode(), b" ", threading.current_thread().name.encode()]
    return app


def test_threads_answer_pipelined_requests_in_order(make_worker):
    def app(environ, start_response):
        time.sleep(0.05 if environ["PATH_INFO"] == "/1" else 0)  # the first is the slowest
        start_response("200 OK", [])
        return [environ["PATH_INFO"].encode()]
    h = make_worker(app, threads=4)
    client = h.client()
    client.sendall(b"".join(GET % str(n).encode() for n in range(1, 6)))
    reader = ResponseReader(client)
    assert [reader.read()[2] for _ in range(5)] == [b"/%d" % n for n in range(1, 6)]


def test_a_slow_request_in_one_thread_does_not_hold_the_others(make_worker):
    gate, started = threading.Event(), queue.Queue()
    h = make_worker(gated(gate, started), threads=4, keepalive=30)
    slow = h.client()
    slow.sendall(GET % b"wait")
    busy_thread = started.get(timeout=5)
    fast = h.client()
    reader = ResponseReader(fast)
    for _ in range(20):  # keep-alive: each request is lent and given back in turn
        fast.sendall(GET % b"fast")
        status, _, body = reader.read()
        assert status == 200 and body.startswith(b"/fast w0.t")
        assert not body.endswith(busy_thread.encode())
    time.sleep(0.1)
    phases = []
    h.on_loop(lambda: phases.extend(sorted(c.phase.name for c in h.worker.conns.values())))
    assert phases == ["BUSY", "IDLE"]  # the fast connection waits in epoll, not in a thread
    gate.set()
    status, _, body = ResponseReader(slow).read()
    assert (status, body) == (200, f"/wait {busy_thread}".encode())


def test_environ_says_multithread_only_with_threads(make_worker):
    def app(environ, start_response):
        start_response("200 OK", [])
        return [repr(environ["wsgi.multithread"]).encode()]
    for threads, expected in ((1, b"False"), (3, b"True")):
        client = make_worker(app, threads=threads).client()
        client.sendall(GET % b"")
        assert ResponseReader(client).read()[2] == expected


def test_a_job_that_raises_closes_its_connection_and_the_thread_lives_on(make_worker, caplog):
    h = make_worker(threads=2)

    def broken(conn, seat):
        raise RuntimeError("job broke")
    h.worker.requests.run_lent = broken
    client = h.client()
    client.sendall(GET % b"x")
    assert closed_within(client, 5)
    assert "job broke" in caplog.text or "raised" in caplog.text
    del h.worker.requests.run_lent  # back to the real job: the same threads serve on
    for _ in range(4):
        client = h.client()
        client.sendall(GET % b"y")
        assert ResponseReader(client).read()[0] == 200


def test_a_client_gone_while_its_request_runs_is_closed_without_a_spin(make_worker):
    gate, started = threading.Event(), queue.Queue()
    h = make_worker(gated(gate, started), threads=2)
    client = h.client()
    client.sendall(GET % b"wait")
    started.get(timeout=5)
    client.close()  # hang up while the app runs: the reactor hears it and mutes the socket
    time.sleep(0.2)
    turns = []
    h.on_loop(lambda: turns.append(h.worker.conns and
                                   next(iter(h.worker.conns.values())).registered))
    assert turns == [False]  # out of epoll while lent, so the hang-up is not reported again
    gate.set()
    deadline = time.monotonic() + 5
    while h.worker.conns and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not h.worker.conns
    other = h.client()
    other.sendall(GET % b"after")
    assert ResponseReader(other).read()[0] == 200


def test_accepting_pauses_while_every_thread_is_busy(listener, make_worker):
    gate, started = threading.Event(), queue.Queue()
    h = make_worker(gated(gate, started), listeners=(listener,), threads=2)
    port = listener.getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
    for client in clients:
        client.sendall(GET % b"wait")
    started.get(timeout=5)
    started.get(timeout=5)
    states = []
    h.on_loop(lambda: states.append(h.worker.listeners.accepting))
    assert states == [False]
    waiting = socket.create_connection(("127.0.0.1", port), timeout=5)  # in the backlog
    waiting.sendall(GET % b"later")
    time.sleep(0.2)
    assert len(h.worker.conns) == 2
    gate.set()
    assert ResponseReader(waiting).read()[2].startswith(b"/later")  # accepting resumed
    deadline = time.monotonic() + 5
    while not states[-1] and time.monotonic() < deadline:  # until every give-back is taken
        time.sleep(0.02)
        h.on_loop(lambda: states.append(h.worker.listeners.accepting))
    assert states[-1] is True
    for client in [*clients, waiting]:
        client.close()


def test_threads_report_to_their_own_scoreboard_records(make_worker):
    gate, started = threading.Event(), queue.Queue()
    h = make_worker(gated(gate, started), threads=3)
    board = h.worker.spec.scoreboard
    client = h.client()
    client.sendall(GET % b"wait")
    started.get(timeout=5)
    view = board.read(0)
    assert view.busy_threads == 1 and view.state.name == "BUSY"
    assert view.request_line == "GET /wait"
    gate.set()
    assert ResponseReader(client).read()[0] == 200
    for _ in range(2):
        client.sendall(GET % b"x")
        ResponseReader(client).read()
    h.on_loop(lambda: None)
    view = board.read(0)
    assert view.busy_threads == 0 and view.requests == 3
    assert h.worker.requests.count == 3


# ---------------------------------------------------------------------------------------------
# issue 16: TLS and the PROXY protocol before HTTP, in the reactor


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    """A CA (trustme), the server's certificate for 127.0.0.1 and localhost, and its files."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    directory = tmp_path_factory.mktemp("tls")
    cert.private_key_and_cert_chain_pem.write_to_path(str(directory / "server.pem"))
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    return ca, directory


def server_tls(certificates) -> ssl.SSLContext:
    _, directory = certificates
    settings = config.resolve({"app": "tests.apps.basic:app",
                               "certfile": str(directory / "server.pem")}, None, {}, "/")
    return tls.server_context(settings)


def tls_client(h: Harness, certificates, timeout: float = 5.0) -> ssl.SSLSocket:
    ca, _ = certificates
    context = ssl.create_default_context()
    ca.configure_trust(context)
    sock = h.client(timeout)
    return context.wrap_socket(sock, server_hostname="localhost")


def test_tls_keep_alive_and_pipelining_through_the_reactor(make_worker, certificates):
    def app(environ, start_response):
        start_response("200 OK", [])
        return [f"{environ['wsgi.url_scheme']} {environ['HTTPS']} "
                f"{environ['SSL_PROTOCOL']} {environ['PATH_INFO']}".encode()]
    h = make_worker(app, tls_context=server_tls(certificates))
    client = tls_client(h, certificates)
    reader = ResponseReader(client)
    client.sendall(GET % b"one")
    assert reader.read()[2].split()[:2] == [b"https", b"on"]
    client.sendall(GET % b"two" + GET % b"three")
    assert [reader.read()[2].split()[-1] for _ in range(2)] == [b"/two", b"/three"]


def test_tls_with_threads_and_a_file_body(make_worker, certificates, tmp_path):
    data = os.urandom(300_000)
    (tmp_path / "blob").write_bytes(data)

    def app(environ, start_response):
        start_response("200 OK", [("Content-Length", str(len(data)))])
        return environ["wsgi.file_wrapper"](open(tmp_path / "blob", "rb"))
    h = make_worker(app, tls_context=server_tls(certificates), threads=2)
    client = tls_client(h, certificates)
    reader = ResponseReader(client)
    for _ in range(2):
        client.sendall(GET % b"blob")
        status, _, body = reader.read()
        assert status == 200 and body == data


def test_a_stalled_handshake_is_cut_at_header_timeout_and_others_are_served(
        make_worker, certificates):
    h = make_worker(tls_context=server_tls(certificates), header_timeout=0.5)
    stalled = h.client()
    stalled.sendall(b"\x16\x03\x01")  # the start of a ClientHello, and then nothing
    served = tls_client(h, certificates)
    served.sendall(GET % b"fine")
    assert ResponseReader(served).read()[0] == 200
    started = time.monotonic()
    assert closed_within(stalled, 5)
    assert time.monotonic() - started < 3


def test_plain_http_to_the_tls_port_gets_a_400_and_a_close(make_worker, certificates):
    h = make_worker(tls_context=server_tls(certificates))
    client = h.client()
    client.sendall(GET % b"plain")
    answer = read_until_closed(client)
    assert answer.startswith(b"HTTP/1.1 400 ") and b"HTTPS" in answer


def test_proxy_v1_header_names_the_remote_address(listener, make_worker):
    def app(environ, start_response):
        start_response("200 OK", [])
        return [f"{environ['REMOTE_ADDR']} {environ['REMOTE_PORT']}".encode()]
    make_worker(app, listeners=(listener,), proxy_protocol="v1")
    port = listener.getsockname()[1]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(b"PROXY TCP4 203.0.113.9 127.0.0.1 4567 80\r\n" + GET % b"")
        assert ResponseReader(client).read()[2] == b"203.0.113.9 4567"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(GET % b"")  # no header where one is required: closed unanswered
        assert read_until_closed(client) == b""


def test_proxy_header_from_a_peer_not_allowed_is_never_read(listener, make_worker):
    make_worker(listeners=(listener,), proxy_protocol="auto", proxy_allow_ips="192.0.2.1")
    port = listener.getsockname()[1]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(b"PROXY TCP4 203.0.113.9 127.0.0.1 4567 80\r\n" + GET % b"")
        assert read_until_closed(client) == b""


def test_a_trickling_body_is_cut_in_its_thread_while_others_are_served(make_worker):
    def app(environ, start_response):
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        start_response("200 OK", [])
        return [b"%d" % len(body)]
    h = make_worker(app, threads=2, header_timeout=0.5, min_body_rate=1024)
    slow = h.client(timeout=10)
    slow.sendall(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 10)
    started = time.monotonic()
    fast = h.client()
    fast.sendall(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello")
    assert ResponseReader(fast).read()[2] == b"5"  # served while the slow body waits
    answer = read_until_closed(slow)
    assert time.monotonic() - started < 5
    assert answer.startswith(b"HTTP/1.1 408 ")


def test_a_tls_close_is_announced_with_close_notify(make_worker, certificates):
    def app(environ, start_response):
        start_response("200 OK", [])  # no length: an HTTP/1.0 body ends with the connection
        return iter([b"part one, ", b"part two"])
    h = make_worker(app, tls_context=server_tls(certificates))
    ca, _ = certificates
    context = ssl.create_default_context()
    ca.configure_trust(context)
    client = context.wrap_socket(h.client(), server_hostname="localhost",
                                 suppress_ragged_eofs=False)  # a truncation would raise
    client.sendall(b"GET / HTTP/1.0\r\n\r\n")
    data = b""
    while chunk := client.recv(65536):
        data += chunk
    assert data.endswith(b"\r\n\r\npart one, part two")


# ---------------------------------------------------------------------------------------------
# connection handoff (issue 13)


@pytest.fixture
def channel():
    made = handoff.Channel.create()
    yield made
    made.close()


def received(channel: handoff.Channel, seconds: float = 5.0) -> handoff.Handed:
    """The next connection handed over the channel (the test plays the idle worker)."""
    deadline = time.monotonic() + seconds
    while (handed := handoff.receive(channel)) is None:
        assert time.monotonic() < deadline, "nothing was handed off"
        time.sleep(0.002)
    return handed


def test_a_handed_connection_is_served_from_its_pending_bytes_on(channel, make_worker):
    h = make_worker(channel=channel, handoff_delay=5, keepalive=30)
    mine, theirs = socket.socketpair()
    mine.settimeout(5)
    # One whole request and the start of the next were read by the sender, not parsed.
    pending = GET % b"a" + b"GET /b HTTP/1.1\r\nHo"
    assert handoff.send(channel, theirs, pending, ("10.0.0.9", "4711"), 0, time.monotonic(),
                        requests=7)
    theirs.close()
    reader = ResponseReader(mine)
    assert reader.read()[2] == b"/a"
    mine.sendall(b"st: t\r\n\r\n")
    assert reader.read()[2] == b"/b"
    seen = []
    h.on_loop(lambda: seen.extend((c.remote, c.hops, c.requests)
                                  for c in h.worker.conns.values()))
    assert seen == [(("10.0.0.9", "4711"), 0, 9)]  # hops start over once a request is served
    mine.close()


def test_a_busy_worker_gives_a_waiting_connection_away(channel, make_worker):
    gate, started = threading.Event(), queue.Queue()
    h = make_worker(gated(gate, started), channel=channel, handoff_delay=5, keepalive=30)
    slow, waiting = h.client(), h.client()
    waiting.sendall(GET % b"first")
    assert ResponseReader(waiting).read()[2].startswith(b"/first")  # now parked
    slow.sendall(GET % b"wait")
    started.get(timeout=5)
    waiting.sendall(GET % b"next")  # parked on the busy worker: the watcher hands it off
    handed = received(channel)
    try:
        assert handed.pending == b"" and handed.hops == 1
        assert handed.sock.recv(1024) == GET % b"next"  # the request, unread by the worker
        gate.set()
        assert ResponseReader(slow).read()[2].startswith(b"/wait")
        conns = []
        h.on_loop(lambda: conns.extend(h.worker.conns))
        assert len(conns) == 1  # the busy worker forgot the handed connection
        handed.sock.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
        assert waiting.recv(1024).startswith(b"HTTP/1.1 204")  # the socket itself moved
    finally:
        handed.sock.close()


def test_a_stopping_worker_offers_its_idle_connections(channel, make_worker):
    h = make_worker(channel=channel, handoff_delay=5, keepalive=30)
    client = h.client()
    client.sendall(GET % b"first")
    assert ResponseReader(client).read()[2] == b"/first"
    h.on_loop(h.worker.begin_stop)
    handed = received(channel, 1.0)
    try:
        assert handed.requests == 1
        conns = []
        h.on_loop(lambda: conns.extend(h.worker.conns))
        assert conns == []
        handed.sock.sendall(b"x")
        assert client.recv(1) == b"x"
    finally:
        handed.sock.close()


def test_a_tls_connection_is_never_handed_off(channel, make_worker, certificates):
    gate, started = threading.Event(), queue.Queue()
    h = make_worker(gated(gate, started), channel=channel, handoff_delay=5, keepalive=30,
                    tls_context=server_tls(certificates))
    slow, waiting = tls_client(h, certificates), tls_client(h, certificates)
    for sock, path in ((slow, b"warm"), (waiting, b"warm")):
        sock.sendall(GET % path)
        assert ResponseReader(sock).read()[0] == 200
    slow.sendall(GET % b"wait")
    started.get(timeout=5)
    waiting.sendall(GET % b"next")
    time.sleep(0.1)  # twenty times handoff_delay
    assert handoff.receive(channel) is None
    gate.set()
    assert ResponseReader(waiting).read()[2].startswith(b"/next ")


def test_a_threaded_worker_gives_away_what_arrives_while_no_thread_is_free(channel, make_worker):
    gate, started = threading.Event(), queue.Queue()
    h = make_worker(gated(gate, started), channel=channel, handoff_delay=5, keepalive=30,
                    threads=2)
    first, second, waiting = h.client(), h.client(), h.client()
    waiting.sendall(GET % b"first")
    assert ResponseReader(waiting).read()[2].startswith(b"/first")
    first.sendall(GET % b"wait")
    second.sendall(GET % b"wait")
    started.get(timeout=5)
    started.get(timeout=5)
    time.sleep(0.05)  # ten times handoff_delay with no thread free
    waiting.sendall(GET % b"next")
    handed = received(channel)
    try:
        assert handed.pending == GET % b"next"  # read by the reactor, travels unparsed
        gate.set()
        for sock in (first, second):
            assert ResponseReader(sock).read()[2].startswith(b"/wait")
    finally:
        gate.set()
        handed.sock.close()


def test_a_backlog_of_closing_connections_is_all_served(make_worker, listener):
    """The close path stops its accept batch after a connection that closed at once; the
    backlog left is reported again by epoll and served on the next turns."""
    port = listener.getsockname()[1]
    clients = []
    for n in range(6):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"GET /%d HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" % n)
        clients.append(sock)
    make_worker(listeners=(listener,))
    for n, sock in enumerate(clients):
        data = read_until_closed(sock)
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"/%d" % n)
        sock.close()
