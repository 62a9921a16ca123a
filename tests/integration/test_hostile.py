"""Slow, idle, vanishing and half-closed clients, and apps that break the WSGI contract.

All of it runs against one server with a single worker: with one worker there is nowhere else
for a request to go, so "other clients are still served" and "the same worker keeps serving"
are both direct observations (its PID is in every answer and never changes).
"""

from __future__ import annotations

import json
import re
import resource
import socket
import struct
import threading
import time

import psutil
import pytest

from tests.conftest import ResponseReader, Server, http_request, post_unread

HEADER_TIMEOUT = 3.0
SEND_TIMEOUT = 1.0
IDLE_CONNECTIONS = 1000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # The server inherits this process's open-files limit; 1,000 idle clients need both ends.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = IDLE_CONNECTIONS * 3 + 256
    if soft < wanted and (hard == resource.RLIM_INFINITY or hard >= wanted):
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    server = Server(tmp_path_factory.mktemp("hostile"), "tests.apps.conformance_app:app",
                    "--header-timeout", str(HEADER_TIMEOUT),
                    "--send-timeout", str(SEND_TIMEOUT),
                    "--keepalive", "10",
                    "--worker-connections", str(IDLE_CONNECTIONS * 2),
                    workers=1)
    server.start()
    server.first_worker = server.worker_pids()[0]
    yield server
    server.stop()


def pid_of_worker(server: Server, timeout: float = 5.0) -> int:
    raw = b"GET /hostile/pid HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    response = http_request(server.port, raw, timeout=timeout)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), response
    return int(body)


def assert_same_worker_serves(server: Server) -> None:
    """The one worker answers, it is the one that booted, and nothing crashed or was aborted."""
    assert pid_of_worker(server) == server.first_worker
    assert server.worker_pids() == [server.first_worker]
    log = server.log()
    assert "crash" not in log and "aborting" not in log, log


def timed_get(server: Server, path: str = "/") -> float:
    start = time.monotonic()
    raw = f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode()
    response = http_request(server.port, raw, timeout=5)
    assert response.startswith(b"HTTP/1.1 200 "), response
    return time.monotonic() - start


def rst_close(sock: socket.socket) -> None:
    """Close with a reset instead of a FIN (SO_LINGER with a zero timeout)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# ---------------------------------------------------------------------------------------------
# Slow and idle clients


def test_slowloris_is_cut_off_while_others_are_served(server):
    request = b"GET /slow-loris HTTP/1.1\r\nHost: t\r\nX-Padding: " + b"p" * 50 + b"\r\n\r\n"
    results: list[tuple[float, bytes]] = []

    def slow_client() -> None:
        with socket.create_connection(("127.0.0.1", server.port), timeout=1.0) as sock:
            start = time.monotonic()
            received = b""
            closed_at = None
            for byte in request:
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    break
                try:
                    data = sock.recv(4096)  # waits one second: the pace of the attack
                except TimeoutError:
                    continue
                except OSError:
                    closed_at = time.monotonic() - start
                    break
                received += data
                if not data or received:
                    closed_at = time.monotonic() - start
                    break
            results.append((closed_at if closed_at is not None else -1.0, received))

    threads = [threading.Thread(target=slow_client) for _ in range(5)]
    for thread in threads:
        thread.start()
    latencies = []
    deadline = time.monotonic() + HEADER_TIMEOUT + 0.5
    while time.monotonic() < deadline:
        latencies.append(timed_get(server))
        time.sleep(0.1)
    for thread in threads:
        thread.join(10)
    assert max(latencies) < 0.5, latencies
    assert len(results) == 5
    for closed_at, received in results:
        # Cut off by the head deadline, which trickling bytes do not extend.
        assert HEADER_TIMEOUT - 0.3 <= closed_at <= HEADER_TIMEOUT + 1.5, results
        assert received.startswith(b"HTTP/1.1 408 "), received
    assert_same_worker_serves(server)


def _established(pid: int) -> int:
    return sum(1 for conn in psutil.Process(pid).net_connections(kind="tcp")
               if conn.status == psutil.CONN_ESTABLISHED)


def test_a_thousand_idle_connections_do_not_delay_a_request(server):
    socks = []
    try:
        # A fifth of them parked in keep-alive after a request, the rest silent since connect.
        for _ in range(IDLE_CONNECTIONS // 5):
            sock = server.connect()
            sock.sendall(b"GET /hostile/pid HTTP/1.1\r\nHost: t\r\n\r\n")
            assert ResponseReader(sock).read()[0] == 200
            socks.append(sock)
        while len(socks) < IDLE_CONNECTIONS:
            socks.append(server.connect())
        # Wait until the worker itself holds them all (not just the kernel's accept queue).
        deadline = time.monotonic() + 2.0
        while _established(server.first_worker) < IDLE_CONNECTIONS and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        assert _established(server.first_worker) >= IDLE_CONNECTIONS
        assert timed_get(server) < 1.0
        assert timed_get(server, "/hostile/pid") < 1.0
    finally:
        for sock in socks:
            sock.close()
    assert_same_worker_serves(server)


def test_client_that_stops_reading_is_cut_off_by_send_timeout(server):
    size = 256 * 1024 * 1024  # far more than the socket buffers on both ends can hold
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.settimeout(10)
    try:
        stuck.connect(("127.0.0.1", server.port))
        stuck.sendall(f"GET /hostile/big?size={size} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        time.sleep(0.2)
        # One worker, blocked on the stuck client: this request waits for the send timeout.
        started = time.monotonic()
        assert pid_of_worker(server, timeout=10) == server.first_worker
        waited = time.monotonic() - started
        assert SEND_TIMEOUT - 0.5 <= waited <= SEND_TIMEOUT + 2.0, waited
        # The stuck connection was closed: draining it now ends well short of the body.
        received = 0
        while True:
            try:
                data = stuck.recv(1 << 20)
            except ConnectionResetError:
                break
            if not data:
                break
            received += len(data)
        assert 0 < received < size // 4, received
    finally:
        stuck.close()
    assert_same_worker_serves(server)


def test_slow_body_is_cut_off_without_aborting_the_worker(server):
    limit = HEADER_TIMEOUT + SEND_TIMEOUT + 2.0
    with server.connect() as sock:
        # More than the worker pre-reads (64 KiB), so the app is already reading the body.
        sock.sendall(b"POST /hostile/read-body HTTP/1.1\r\nHost: t\r\n"
                     b"Content-Length: 1000000\r\n\r\n" + b"x" * 70_000)
        start = time.monotonic()
        sock.settimeout(SEND_TIMEOUT / 2)
        cut_off = None
        while time.monotonic() - start < limit + 1.0:
            try:
                sock.sendall(b"x")  # always within send_timeout of the last byte
                data = sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                data = b""
            if not data or data.startswith(b"HTTP/1.1 4"):
                cut_off = time.monotonic() - start
                break
        assert cut_off is not None and cut_off <= limit, "the slow body held the worker"
    assert_same_worker_serves(server)


# ---------------------------------------------------------------------------------------------
# Clients that vanish


def _disconnect_mid_head(server, close):
    sock = server.connect()
    sock.sendall(b"GET /partial HTTP/1.1\r\nHost: t\r\nX-Half: ")
    time.sleep(0.05)
    close(sock)


def _disconnect_mid_small_body(server, close):
    sock = server.connect()
    sock.sendall(b"POST /hostile/read-body HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n"
                 + b"x" * 10)
    time.sleep(0.05)
    close(sock)


def _disconnect_mid_streamed_body(server, close):
    # Larger than what the worker pre-reads, so the app is already reading when the client goes.
    sock = server.connect()
    sock.sendall(b"POST /hostile/read-body HTTP/1.1\r\nHost: t\r\n"
                 b"Content-Length: 10000000\r\n\r\n" + b"x" * 300_000)
    time.sleep(0.1)
    close(sock)


def _disconnect_mid_chunked_body(server, close):
    sock = server.connect()
    chunk = b"x" * 50_000
    sock.sendall(b"POST /hostile/read-body HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked"
                 b"\r\n\r\n" + (b"%x\r\n%s\r\n" % (len(chunk), chunk)) * 4 + b"ffff\r\nxx")
    time.sleep(0.1)
    close(sock)


def _disconnect_mid_response(server, close):
    sock = server.connect()
    sock.sendall(b"GET /hostile/big?size=100000000 HTTP/1.1\r\nHost: t\r\n\r\n")
    got = 0
    while got < 200_000:
        got += len(sock.recv(65536))
    close(sock)


def _disconnect_while_queued(server, close):
    # The single worker is busy in the app; the client sends its request and leaves before the
    # worker gets to it, so the worker finds a dead socket in its accept queue.
    busy = threading.Thread(target=timed_get, args=(server, "/hostile/slow?ms=600"))
    busy.start()
    time.sleep(0.15)
    for path in (b"/", b"/hostile/big?size=50000000"):
        sock = server.connect()
        sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: t\r\n\r\n")
        close(sock)
    busy.join(10)


DISCONNECTS = {
    "mid-head": _disconnect_mid_head,
    "mid-small-body": _disconnect_mid_small_body,
    "mid-streamed-body": _disconnect_mid_streamed_body,
    "mid-chunked-body": _disconnect_mid_chunked_body,
    "mid-response": _disconnect_mid_response,
    "while-queued": _disconnect_while_queued,
}


@pytest.mark.parametrize("how", ["fin", "reset"])
@pytest.mark.parametrize("when", list(DISCONNECTS))
def test_disconnect_does_not_wedge_the_worker(server, when, how):
    close = socket.socket.close if how == "fin" else rst_close
    DISCONNECTS[when](server, close)
    assert timed_get(server) < 1.0
    assert_same_worker_serves(server)


def test_half_closed_sockets_do_not_spin_the_loop(server):
    """EOF from clients that keep their socket open must be handled once, not polled forever."""
    socks = []
    try:
        for _ in range(10):
            sock = server.connect()                      # nothing sent, then EOF
            sock.shutdown(socket.SHUT_WR)
            socks.append(sock)
            sock = server.connect()                      # EOF in the middle of a head
            sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n")
            sock.shutdown(socket.SHUT_WR)
            socks.append(sock)
            sock = server.connect()                      # EOF in the middle of a body
            sock.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 99\r\n\r\nabc")
            sock.shutdown(socket.SHUT_WR)
            socks.append(sock)
            sock = server.connect()                      # EOF after a request; never reads
            sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            sock.shutdown(socket.SHUT_WR)
            socks.append(sock)
            sock = server.connect()                      # EOF after an error (lingering close)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nBad Header: x\r\n\r\n")
            sock.shutdown(socket.SHUT_WR)
            socks.append(sock)
            sock = server.connect()                      # EOF while parked in keep-alive
            sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            ResponseReader(sock).read()
            sock.shutdown(socket.SHUT_WR)
            socks.append(sock)
        time.sleep(0.3)  # let the worker see every EOF
        worker = psutil.Process(server.first_worker)
        before = worker.cpu_times()
        time.sleep(2.0)
        after = worker.cpu_times()
        used = (after.user - before.user) + (after.system - before.system)
        assert used < 0.1, f"worker used {used:.2f}s of CPU while idle"
    finally:
        for sock in socks:
            sock.close()
    assert_same_worker_serves(server)


# ---------------------------------------------------------------------------------------------
# Apps that break the contract

ANSWERED_500 = [
    "status-crlf", "status-nul", "status-garbage",
    "header-cr", "header-lf", "header-crlf", "header-nul",
    "header-name-crlf", "header-name-colon", "header-non-latin1",
    "start-twice", "body-longer", "body-shorter", "non-bytes",
    "raise-before", "no-start-response",
]
# The head is already on the wire when the fault shows, so the only honest signal left is to
# close the connection before the body is complete.
CUT_SHORT = ["body-longer-iter", "body-shorter-iter", "non-bytes-later", "raise-midway"]
APP_ERROR_LOG = re.compile(r"\[ERROR\] (invalid response from app|error handling GET /hostile/)")


def _read_all(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            piece = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not piece:
            return data
        data += piece


def _app_fault(server: Server, route: str) -> bytes:
    errors_before = len(APP_ERROR_LOG.findall(server.log()))
    with server.connect() as sock:
        # Keep-alive on purpose: the server, not the client, must decide to close.
        sock.sendall(f"GET /hostile/{route} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        response = _read_all(sock)
    server.wait_for_log(APP_ERROR_LOG, timeout=5, count=errors_before + 1)
    return response


@pytest.mark.parametrize("route", ANSWERED_500)
def test_app_fault_becomes_500(server, route):
    response = _app_fault(server, route)
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 500 Internal Server Error", response
    assert b"Connection: close" in lines
    # The prebuilt error body, and nothing after it: no part of the app's response leaks out.
    assert body == b"500 Internal Server Error\n", response
    for leaked in (b"evil", b"injected", b"snowman", b"x-c", b"\x00"):
        assert leaked not in head.lower(), response
    assert_same_worker_serves(server)


@pytest.mark.parametrize("route", CUT_SHORT)
def test_app_fault_after_head_closes_connection(server, route):
    response = _app_fault(server, route)
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0].startswith(b"HTTP/1.1 200 "), response
    lengths = [line for line in lines if line.lower().startswith(b"content-length:")]
    if lengths:
        declared = int(lengths[0].split()[1])
        assert len(body) < declared, "the body must stop short so the client sees the fault"
    else:
        assert b"Transfer-Encoding: chunked" in lines
        assert not body.endswith(b"0\r\n\r\n"), "the chunked body must not look complete"
    assert_same_worker_serves(server)


# ---------------------------------------------------------------------------------------------
# Issue 10: lost responses and broken apps, each against a server of its own


def test_answers_to_unread_8mib_posts_reach_all_20_clients(server_factory):
    server = server_factory("tests.apps.basic:app", workers=2)
    results: list[object] = []

    def client() -> None:
        try:
            results.append(post_unread(server.port, 8 * 1024 * 1024, timeout=30))
        except OSError as error:
            results.append(error)
    threads = [threading.Thread(target=client) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 20
    failures = [r for r in results if not (isinstance(r, bytes) and r.startswith(b"HTTP/1.1 200 ")
                                          and r.endswith(b"\r\n\r\nok"))]
    assert not failures, failures[:3]


def test_informational_status_from_the_app_is_a_500(server_factory):
    server = server_factory("tests.apps.basic:app", workers=1)
    raw = (b"GET /informational HTTP/1.1\r\nHost: t\r\n\r\n"
           b"GET /pid HTTP/1.1\r\nHost: t\r\n\r\n")
    response = http_request(server.port, raw)
    assert response.startswith(b"HTTP/1.1 500 "), response
    assert b"101" not in response


def test_oserror_from_the_app_is_a_logged_500(server_factory):
    server = server_factory("tests.apps.basic:app", workers=1)
    response = http_request(server.port, b"GET /oserror HTTP/1.1\r\nHost: t\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 500 "), response
    server.wait_for_log("FileNotFoundError", timeout=5)


def test_app_closing_fds_0_to_2_leaks_no_log_lines_into_clients(server_factory):
    server = server_factory("tests.apps.basic:app", "--access-log", "-", workers=1)
    response = http_request(server.port, b"GET /close-stdio HTTP/1.1\r\nHost: t\r\n"
                                         b"Connection: close\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 200 "), response
    clients = [server.connect() for _ in range(4)]  # would have taken fds 0, 1 and 2
    try:
        for _ in range(3):
            for sock in clients:
                sock.sendall(b"GET /pid HTTP/1.1\r\nHost: t\r\n\r\n")
                reader = ResponseReader(sock)
                status, _, _ = reader.read()
                assert status == 200
                sock.settimeout(0.3)
                try:
                    extra = reader.buf + sock.recv(65536)
                except TimeoutError:
                    extra = reader.buf
                sock.settimeout(10)
                assert extra == b"", extra  # an access-log line would show up here
    finally:
        for sock in clients:
            sock.close()


def test_absolute_form_target_names_the_host(server_factory):
    server = server_factory("tests.apps.basic:app", workers=1)
    raw = (b"GET http://example.org/environ HTTP/1.1\r\nHost: other.example\r\n"
           b"Connection: close\r\n\r\n")
    response = http_request(server.port, raw)
    assert response.startswith(b"HTTP/1.1 200 "), response
    assert json.loads(response.partition(b"\r\n\r\n")[2])["HTTP_HOST"] == "example.org"


def test_head_over_limit_request_head_is_431(server):
    fields = b"".join(b"X-Field-%d: %s\r\n" % (i, b"v" * 8000) for i in range(10))
    response = http_request(server.port, b"GET / HTTP/1.1\r\nHost: t\r\n" + fields + b"\r\n")
    assert response.startswith(b"HTTP/1.1 431 "), response


def test_recycling_never_closes_a_connection_under_a_request(server_factory):
    """Keep-alive clients through many max_requests recycles: every request is answered (a
    retiring worker says Connection: close instead of closing parked connections)."""
    server = server_factory("tests.apps.basic:app", "--max-requests", "40", workers=2)
    failures: list[str] = []
    served = [0]

    def client() -> None:
        sock = None
        reader = None
        for _ in range(250):
            if sock is None:
                sock = server.connect()
                reader = ResponseReader(sock)
            try:
                sock.sendall(b"GET /pid HTTP/1.1\r\nHost: t\r\n\r\n")
                status, headers, _ = reader.read()
            except OSError as error:
                failures.append(repr(error))
                sock.close()
                sock = None
                continue
            if status != 200:
                failures.append(f"status {status}")
            served[0] += 1
            if headers.get("connection") == "close":
                sock.close()
                sock = None
            time.sleep(0.01)  # think time: the connection is parked most of the time
        if sock is not None:
            sock.close()
    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures[:5]
    assert served[0] == 1000
    assert "asking to be recycled" in server.log()
