"""The real server over real sockets: raw bytes, http.client and requests.

Which status a malformed request gets is the verdict corpus's job (tests/corpus/, run live by
tests/conformance/); this module checks behaviour over a connection's life.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time

import pytest
import requests

from tests.conftest import ResponseReader, http_request


@pytest.fixture(scope="module", params=[1, 4], ids=["threads1", "threads4"])
def shared_server(request, tmp_path_factory):
    """One 2-worker server for the read-only tests of this module (starting one costs ~0.5 s),
    once with the inline path and once with a pool of 4 threads per worker (issue 12)."""
    from tests.conftest import Server
    server = Server(tmp_path_factory.mktemp("shared"), "tests.apps.basic:app",
                    "--threads", str(request.param)).start()
    yield server
    server.stop()


def get(server, path: str, **kwargs) -> requests.Response:
    return requests.get(f"{server.url}{path}", timeout=10, **kwargs)


def test_hello_with_requests(shared_server):
    response = get(shared_server, "/")
    assert response.status_code == 200
    assert response.text == "Hello, world!"
    assert response.headers["Content-Length"] == "13"
    assert response.headers["Server"] == "forkserver"
    assert "GMT" in response.headers["Date"]


def test_wsgiref_validator_passes_under_real_requests(server_factory, tmp_path):
    """wsgiref's PEP 3333 checker wraps the app: any breach by the server raises in it."""
    server = server_factory("tests.apps.basic:validated")
    path = tmp_path / "file.bin"
    path.write_bytes(b"x" * 5000)
    with requests.Session() as session:
        base = server.url
        assert session.get(f"{base}/").text == "Hello, world!"
        assert session.post(f"{base}/echo", data=b"abc").content == b"abc"
        assert session.post(f"{base}/echo", data=iter([b"a", b"b"])).content == b"ab"
        assert session.get(f"{base}/stream").text.count("part") == 5
        assert session.get(f"{base}/write").text == "written and returned"
        assert session.head(f"{base}/").status_code == 200
        assert session.get(f"{base}/file?name={path}").content == b"x" * 5000
        assert session.get(f"{base}/environ?q=1").json()["QUERY_STRING"] == "q=1"
    assert "AssertionError" not in server.log()
    assert "Traceback" not in server.log()


def test_http_client_keep_alive_reuses_one_connection(shared_server):
    conn = http.client.HTTPConnection("127.0.0.1", shared_server.port, timeout=10)
    conn.request("GET", "/")
    first = conn.getresponse()
    assert first.read() == b"Hello, world!"
    sock = conn.sock
    for _ in range(20):
        conn.request("GET", "/pid")
        response = conn.getresponse()
        assert response.status == 200
        response.read()
        assert conn.sock is sock  # never reconnected
    conn.close()


def test_environ_is_complete(shared_server):
    data = get(shared_server, "/environ?a=1&b=%20x", headers={"X-Custom": "v"}).json()
    assert data["REQUEST_METHOD"] == "GET"
    assert data["PATH_INFO"] == "/environ"
    assert data["QUERY_STRING"] == "a=1&b=%20x"
    assert data["RAW_URI"] == "/environ?a=1&b=%20x"
    assert data["SCRIPT_NAME"] == ""
    assert data["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert data["SERVER_NAME"] == "127.0.0.1"
    assert data["SERVER_PORT"] == str(shared_server.port)
    assert data["REMOTE_ADDR"] == "127.0.0.1"
    assert int(data["REMOTE_PORT"]) > 0
    assert data["wsgi.url_scheme"] == "http"
    assert data["wsgi.multiprocess"] is True
    assert data["wsgi.input_terminated"] is True
    assert data["HTTP_X_CUSTOM"] == "v"
    assert data["HTTP_HOST"] == f"127.0.0.1:{shared_server.port}"


def test_path_info_decoding(server_factory):
    server = server_factory("tests.apps.paths:app")
    raw = b"GET /caf%C3%A9%20x%2Fy?q HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    body = http_request(server.port, raw).partition(b"\r\n\r\n")[2]
    # PEP 3333: bytes decoded as latin-1, so the app can re-encode and decode as UTF-8.
    assert body.decode("utf-8") == "/café x/y"


def test_raw_pipelining_answers_in_order(shared_server):
    raw = (b"GET /pid HTTP/1.1\r\nHost: t\r\n\r\n"
           b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello"
           b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    with shared_server.connect() as sock:
        sock.sendall(raw)
        reader = ResponseReader(sock)
        first = reader.read()
        second = reader.read()
        third = reader.read()
        assert sock.recv(10) == b""  # closed after the last, as asked
    assert first[0] == 200 and first[2].isdigit()
    assert second[0] == 200 and second[2] == b"hello"
    assert third[0] == 200 and third[2] == b"Hello, world!"
    assert third[1]["connection"] == "close"


def test_keep_alive_reuse_over_raw_socket(shared_server):
    with shared_server.connect() as sock:
        reader = ResponseReader(sock)
        for i in range(5):
            sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            status, headers, body = reader.read()
            assert status == 200 and body == b"Hello, world!"
            assert "connection" not in headers


def test_chunked_upload(shared_server):
    raw = (b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: yes\r\n\r\n")
    with shared_server.connect() as sock:
        sock.sendall(raw)
        status, _headers, body = ResponseReader(sock).read()
    assert status == 200
    assert body == b"hello world"


def test_chunked_upload_with_requests_generator(shared_server):
    def pieces():
        for i in range(100):
            yield f"line {i}\n".encode()
    response = requests.post(f"{shared_server.url}/echo", data=pieces(), timeout=10)
    assert response.status_code == 200
    assert response.content == b"".join(f"line {i}\n".encode() for i in range(100))


def test_expect_100_continue(shared_server):
    with shared_server.connect() as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        reader = ResponseReader(sock)
        status, _, _ = reader.read()
        assert status == 100
        sock.sendall(b"data")
        status, _, body = reader.read()
        assert status == 200 and body == b"data"


def test_expect_100_continue_not_sent_when_app_does_not_read(shared_server):
    with shared_server.connect() as sock:
        sock.sendall(b"POST /ignore-body HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        status, headers, body = ResponseReader(sock).read()
        assert status == 200 and body == b"ok"
        # The body never came, so the connection cannot be reused safely.
        assert headers.get("connection") == "close"


def test_head_has_no_body(shared_server):
    with shared_server.connect() as sock:
        sock.sendall(b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n")
        reader = ResponseReader(sock)
        status, headers, body = reader.read(head_request=True)
        assert status == 200 and body == b""
        status, _headers, body = reader.read()
        assert body == b"Hello, world!"


def test_http10_gets_close_delimited_body_never_chunks(shared_server):
    reply = http_request(shared_server.port, b"GET /stream HTTP/1.0\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"chunked" not in head.lower()
    assert body == b"".join(f"part {i}\n".encode() for i in range(5))


def test_http10_keep_alive_when_length_known(shared_server):
    with shared_server.connect() as sock:
        reader = ResponseReader(sock)
        sock.sendall(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, headers, body = reader.read()
        assert headers.get("connection", "").lower() == "keep-alive"
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        _status, headers, body = reader.read()
        assert body == b"Hello, world!"
        assert sock.recv(10) == b""


def test_streamed_response_is_chunked_on_http11(shared_server):
    with shared_server.connect() as sock:
        sock.sendall(b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n")
        _status, headers, body = ResponseReader(sock).read()
    assert headers["transfer-encoding"] == "chunked"
    assert body == b"".join(f"part {i}\n".encode() for i in range(5))


def test_write_callable(shared_server):
    assert get(shared_server, "/write").content == b"written and returned"


def test_no_content_has_no_body_and_keeps_alive(shared_server):
    with shared_server.connect() as sock:
        reader = ResponseReader(sock)
        sock.sendall(b"GET /no-content HTTP/1.1\r\nHost: t\r\n\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n")
        status, headers, _body = reader.read()
        assert status == 204 and "transfer-encoding" not in headers
        assert reader.read()[2] == b"Hello, world!"


def test_one_mib_upload_and_download(shared_server):
    payload = os.urandom(1024 * 1024)
    response = requests.post(f"{shared_server.url}/echo", data=payload, timeout=20)
    assert response.status_code == 200 and response.content == payload
    response = get(shared_server, "/download?size=1048576")
    assert len(response.content) == 1048576
    assert response.content[:512] == bytes(range(256)) * 2


def test_file_wrapper_serves_a_real_file(server, tmp_path):
    path = tmp_path / "data.bin"
    data = os.urandom(300_000)
    path.write_bytes(data)
    response = get(server, f"/file?name={path}")
    assert response.status_code == 200 and response.content == data
    assert response.headers["Content-Length"] == str(len(data))
    response = get(server, f"/file-nolength?name={path}")
    assert response.content == data
    assert response.headers["Content-Length"] == str(len(data))


def test_crashing_app_gives_500_and_worker_keeps_serving(server):
    pids = set(server.worker_pids())
    for _ in range(6):
        response = get(server, "/crash")
        assert response.status_code == 500
    assert get(server, "/").status_code == 200
    assert set(server.worker_pids()) == pids  # no worker died
    assert "this app crashes on purpose" in server.log()


def test_crash_after_response_started_closes_connection(server):
    with server.connect() as sock:
        sock.sendall(b"GET /crash-midway HTTP/1.1\r\nHost: t\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200")
    assert b"first part" in data
    assert not data.endswith(b"0\r\n\r\n")  # never a clean end: the client must see breakage
    assert get(server, "/").status_code == 200


def test_header_injection_from_app_is_500_and_never_sent(server):
    reply = http_request(server.port, b"GET /bad-header HTTP/1.1\r\nHost: t\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 500")
    assert b"evil" not in reply


def test_idle_keepalive_connection_is_closed_after_timeout(server_factory):
    server = server_factory("tests.apps.basic:app", "--keepalive", "0.5")
    with server.connect() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        ResponseReader(sock).read()
        started = time.monotonic()
        assert sock.recv(10) == b""
        assert time.monotonic() - started < 5


def test_header_timeout_cuts_a_slow_client(server_factory):
    server = server_factory("tests.apps.basic:app", "--header-timeout", "1")
    with server.connect() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n")
        started = time.monotonic()
        data = sock.recv(1000)
        assert data.startswith(b"HTTP/1.1 408")
        assert time.monotonic() - started < 5
    assert get(server, "/").status_code == 200


def test_keepalive_requests_limit_closes(server_factory):
    server = server_factory("tests.apps.basic:app", "--keepalive-requests", "3")
    with server.connect() as sock:
        reader = ResponseReader(sock)
        for i in range(3):
            sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            _status, headers, _ = reader.read()
        assert headers.get("connection") == "close"
        assert sock.recv(10) == b""


def test_flask_app(server_factory):
    server = server_factory("tests.apps.flask_app:app")
    response = requests.get(f"{server.url}/hello/forkserver", timeout=10)
    assert response.status_code == 200
    assert response.json() == {"hello": "forkserver"}
    response = requests.post(f"{server.url}/upload", files={"f": ("a.txt", b"abc" * 1000)},
                             timeout=10)
    assert response.json() == {"name": "a.txt", "size": 3000}
    assert requests.get(f"{server.url}/missing", timeout=10).status_code == 404


def test_unix_socket_listener(server_factory, tmp_path):
    path = tmp_path / "fs.sock"
    server = server_factory("tests.apps.basic:app", binds=(f"unix:{path}",))
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(b"GET /environ HTTP/1.1\r\nHost: t\r\n\r\n")
        status, _, body = ResponseReader(sock).read()
    assert status == 200
    assert json.loads(body)["REMOTE_ADDR"] == ""
    server.stop()
    assert not path.exists()  # the socket file is removed on exit


def test_ipv6_listener(server_factory):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("::1 unavailable")
    server = server_factory("tests.apps.basic:app", binds=("[::1]:0",))
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("::1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert ResponseReader(sock).read()[2] == b"Hello, world!"


def test_keep_alive_connections_spread_over_workers(server):
    """Connections opened one after another, and kept, land on every worker in turn."""
    connections = [http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
                   for _ in range(8)]
    served_by: dict[bytes, int] = {}
    for conn in connections:
        conn.request("GET", "/pid")
        pid = conn.getresponse().read()
        served_by[pid] = served_by.get(pid, 0) + 1
    for conn in connections:
        conn.close()
    assert len(served_by) == 2 and min(served_by.values()) >= 2, served_by


def test_wsgi_errors_goes_to_the_error_log(server):
    assert get(server, "/errors").status_code == 200
    server.wait_for_log(r"a message from the app via wsgi.errors")


def test_workers_map_no_module_the_server_imports_only_where_used(server):
    """ctypes (refork's subreaper) and psutil (memory readings, metrics) are imported where
    they are used, so no process of a default server maps them: a worker inherits what its
    master imported, at a few hundred KiB to 2 MiB of RSS each (architecture.md, "What a
    worker inherits")."""
    assert get(server, "/").status_code == 200
    for pid in (server.pid, *server.worker_pids()):
        with open(f"/proc/{pid}/maps", encoding="ascii", errors="replace") as maps:
            mapped = maps.read()
        assert "_ctypes" not in mapped and "_psutil" not in mapped, pid
