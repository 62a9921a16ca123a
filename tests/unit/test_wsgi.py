"""The WSGI adapter on its own: a fake channel over a real parser, no sockets."""

from __future__ import annotations

import io
import sys
from collections import deque
from wsgiref.validate import validator

import pytest

from forkserver import wsgi
from forkserver.http.parser import END_OF_MESSAGE, Request, RequestParser


class FakeChannel:
    """Feeds queued client bytes to the parser on demand and records what is sent."""

    def __init__(self, incoming: list[bytes] | None = None) -> None:
        self.parser = RequestParser()
        self.incoming = deque(incoming or [])
        self.sent: list[bytes] = []
        self.files: list[tuple[int, int, int]] = []

    def receive(self) -> bool:
        if not self.incoming:
            return False
        self.parser.feed(self.incoming.popleft())
        return True

    def send_all(self, data: bytes) -> None:
        self.sent.append(bytes(data))

    def send_file(self, fd: int, offset: int, count: int) -> int:
        self.files.append((fd, offset, count))
        import os
        self.sent.append(os.pread(fd, count, offset))
        return count

    @property
    def output(self) -> bytes:
        return b"".join(self.sent)


def parse_head(channel: FakeChannel, raw: bytes) -> Request:
    channel.parser.feed(raw)
    request = channel.parser.next_event()
    assert isinstance(request, Request)
    return request


def run(app, raw: bytes, body_chunks: list[bytes] | None = None, keep_alive: bool = True,
        errors: list | None = None):
    """Run one request the way the worker does when it streams the body."""
    channel = FakeChannel(body_chunks)
    request = parse_head(channel, raw)
    body = wsgi.open_body(channel, request)
    environ = wsgi.build_environ(request, wsgi.base_environ("127.0.0.1", "8000"),
                                 ("10.0.0.1", "5555"), body)
    logged = errors if errors is not None else []
    exchange = wsgi.handle(app, channel, request, body, environ, keep_alive, b"forkserver",
                           lambda message, tb: logged.append(message))
    return exchange, channel, environ


def split_response(data: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(": ")
        headers[name.lower()] = value
    return lines[0], headers, body


def hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


def test_single_item_body_goes_out_in_one_send_with_length():
    exchange, channel, _ = run(hello, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(channel.sent) == 1
    status, headers, body = split_response(channel.output)
    assert status == "HTTP/1.1 200 OK"
    assert headers["content-length"] == "5"
    assert body == b"hello"
    assert exchange.keep_alive and exchange.status_code == 200


def test_a_repeated_response_is_sent_alike_and_a_changed_one_changes():
    def app(environ, start_response):
        status = "404 Not Found" if environ["QUERY_STRING"] else "200 OK"
        start_response(status, [("Content-Type", "text/plain")])
        return [environ["PATH_INFO"].encode()]
    sent = []
    for target in ("/a", "/a", "/bb", "/bb?gone", "/a"):
        exchange, channel, _ = run(app, f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert len(channel.sent) == 1 and exchange.bytes_sent == len(channel.output)
        sent.append((exchange.status_code, exchange.verdict, split_response(channel.output)))
    assert sent[0] == sent[1] == sent[4]
    assert sent[2][2][1]["content-length"] == "3" and sent[2][2][2] == b"/bb"
    assert sent[3][0] == 404 and sent[3][2][0] == "HTTP/1.1 404 Not Found"
    assert {verdict for _, verdict, _ in sent} == {wsgi.Verdict.KEEP}


def test_environ_keys():
    _, _, environ = run(hello, b"GET /a%20b/c?x=1&y HTTP/1.1\r\nHost: example.org\r\n"
                                b"X-Forwarded-For: 1.2.3.4\r\nCookie: a=1\r\nCookie: b=2\r\n"
                                b"Accept: x\r\nAccept: y\r\n\r\n")
    assert environ["PATH_INFO"] == "/a b/c"
    assert environ["QUERY_STRING"] == "x=1&y"
    assert environ["RAW_URI"] == "/a%20b/c?x=1&y"
    assert environ["HTTP_HOST"] == "example.org"
    assert environ["HTTP_X_FORWARDED_FOR"] == "1.2.3.4"
    assert environ["HTTP_COOKIE"] == "a=1; b=2"
    assert environ["HTTP_ACCEPT"] == "x, y"
    assert environ["REMOTE_ADDR"] == "10.0.0.1" and environ["REMOTE_PORT"] == "5555"
    assert environ["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert environ["wsgi.multiprocess"] is True and environ["wsgi.multithread"] is False


def test_underscore_headers_never_reach_the_environ():
    _, _, environ = run(hello, b"GET / HTTP/1.1\r\nHost: x\r\nX_Auth: evil\r\nX-Auth: good\r\n\r\n")
    assert environ["HTTP_X_AUTH"] == "good"


def test_utf8_path_is_latin1_decoded():
    _, _, environ = run(hello, b"GET /caf%C3%A9 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert environ["PATH_INFO"].encode("latin-1").decode("utf-8") == "/café"


def test_content_headers_have_no_http_prefix():
    def app(environ, start_response):
        start_response("200 OK", [])
        return [environ["wsgi.input"].read()]
    _, channel, environ = run(app, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: text/x\r\n"
                                   b"Content-Length: 3\r\n\r\n", [b"abc"])
    assert environ["CONTENT_TYPE"] == "text/x" and environ["CONTENT_LENGTH"] == "3"
    assert "HTTP_CONTENT_TYPE" not in environ
    assert split_response(channel.output)[2] == b"abc"


def test_validator_accepts_our_environ_and_calls():
    def app(environ, start_response):
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        environ["wsgi.errors"].write("")
        start_response("200 OK", [("Content-Type", "text/plain"),
                                  ("Content-Length", str(len(body)))])
        return [body]
    errors = []
    _exchange, channel, _ = run(validator(app), b"POST /v HTTP/1.1\r\nHost: x\r\n"
                                               b"Content-Length: 4\r\n\r\n", [b"da", b"ta"],
                               errors=errors)
    assert errors == []
    assert split_response(channel.output)[2] == b"data"


def test_input_read_readline_iter_never_past_body():
    seen = {}

    def app(environ, start_response):
        stream = environ["wsgi.input"]
        seen["first"] = stream.readline()
        seen["two"] = stream.read(2)
        seen["rest"] = list(stream)
        seen["after"] = stream.read()
        start_response("200 OK", [])
        return []
    _exchange, channel, _ = run(app, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 14\r\n\r\n",
                               [b"line1\nab", b"line2\nlast-pipelined-bytes"])
    # The channel hands over a piece past the body; the parser must stop at 14 bytes.
    assert seen["first"] == b"line1\n"
    assert seen["two"] == b"ab"
    assert seen["rest"] == [b"line2\n"]
    assert seen["after"] == b""
    assert channel.parser.buffered > 0  # the extra bytes wait for the next request


def test_readline_with_size_and_readlines_hint():
    seen = {}

    def app(environ, start_response):
        stream = environ["wsgi.input"]
        seen["short"] = stream.readline(3)
        seen["lines"] = stream.readlines()
        start_response("200 OK", [])
        return []
    run(app, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\n", [b"abcdef\nxyz\n!"[:12]])
    assert seen["short"] == b"abc"
    assert seen["lines"] == [b"def\n", b"xyz\n", b"!"]


def test_chunked_input():
    def app(environ, start_response):
        start_response("200 OK", [])
        return [environ["wsgi.input"].read()]
    _, channel, environ = run(app, b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
                              [b"3\r\nabc\r\n", b"2\r\nde\r\n0\r\n\r\n"])
    assert "CONTENT_LENGTH" not in environ
    assert split_response(channel.output)[2] == b"abcde"


def test_expect_continue_sent_on_first_read_only():
    def app(environ, start_response):
        environ["wsgi.input"].read(1)
        environ["wsgi.input"].read(1)
        start_response("200 OK", [])
        return [b"x"]
    _, channel, _ = run(app, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                             b"Expect: 100-continue\r\n\r\n", [b"ab"])
    assert channel.sent[0] == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert channel.output.count(b"100 Continue") == 1


def test_expect_continue_unread_body_closes_connection():
    exchange, channel, _ = run(hello, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                                      b"Expect: 100-continue\r\n\r\n", [b"ab"])
    assert b"100 Continue" not in channel.output
    assert exchange.verdict is not wsgi.Verdict.KEEP


def test_unread_small_body_is_discarded_and_connection_kept():
    exchange, channel, _ = run(hello, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n",
                               [b"hello"])
    assert exchange.verdict is wsgi.Verdict.KEEP
    assert channel.parser.next_event() is not None


def test_streaming_response_is_chunked():
    def app(environ, start_response):
        start_response("200 OK", [])
        yield b"ab"
        yield b""
        yield b"cde"
    _, channel, _ = run(app, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    _status, headers, body = split_response(channel.output)
    assert headers["transfer-encoding"] == "chunked"
    assert body == b"2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n"


def test_http10_streaming_closes_instead_of_chunking():
    def app(environ, start_response):
        start_response("200 OK", [])
        yield b"ab"
        yield b"cd"
    exchange, channel, _ = run(app, b"GET / HTTP/1.0\r\n\r\n")
    _status, headers, body = split_response(channel.output)
    assert "transfer-encoding" not in headers and body == b"abcd"
    assert exchange.verdict is not wsgi.Verdict.KEEP


def test_head_sends_no_body():
    _exchange, channel, _ = run(hello, b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _headers, body = split_response(channel.output)
    assert body == b"" and status.endswith("200 OK")


def test_exception_before_start_is_500_and_logged():
    def app(environ, start_response):
        raise ValueError("boom")
    errors = []
    exchange, channel, _ = run(app, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", errors=errors)
    assert channel.output.startswith(b"HTTP/1.1 500")
    assert exchange.verdict is not wsgi.Verdict.KEEP
    assert any("boom" in message for message in errors)


def test_exception_after_start_closes_without_clean_end():
    def app(environ, start_response):
        start_response("200 OK", [])
        yield b"part"
        raise ValueError("midway")
    exchange, channel, _ = run(app, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert channel.output.startswith(b"HTTP/1.1 200")
    assert not channel.output.endswith(b"0\r\n\r\n")
    assert exchange.verdict is not wsgi.Verdict.KEEP


def test_close_is_always_called():
    closed = []

    class Body:
        def __iter__(self):
            yield b"x"
            raise RuntimeError("fails")

        def close(self):
            closed.append(True)

    def app(environ, start_response):
        start_response("200 OK", [])
        return Body()
    run(app, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert closed == [True]


def test_start_response_twice_without_exc_info_is_500():
    def app(environ, start_response):
        start_response("200 OK", [])
        start_response("404 Not Found", [])
        return [b""]
    _, channel, _ = run(app, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert channel.output.startswith(b"HTTP/1.1 500")


def test_start_response_with_exc_info_replaces_status_before_sending():
    def app(environ, start_response):
        start_response("200 OK", [])
        try:
            raise KeyError("x")
        except KeyError:
            start_response("503 Unavailable", [("Content-Type", "text/plain")], sys.exc_info())
        return [b"sorry"]
    _, channel, _ = run(app, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert channel.output.startswith(b"HTTP/1.1 503 Unavailable")


def test_start_response_with_exc_info_after_head_sent_reraises():
    def app(environ, start_response):
        write = start_response("200 OK", [])
        write(b"partial")
        try:
            raise KeyError("late")
        except KeyError:
            start_response("500 Oops", [], sys.exc_info())
        return [b"never"]
    exchange, channel, _ = run(app, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"never" not in channel.output
    assert exchange.verdict is not wsgi.Verdict.KEEP


@pytest.mark.parametrize("headers", [
    [("X-Bad", "a\r\nInjected: 1")],
    [("X-Bad", "nul\x00")],
    [("X-Bad", "snow\u2603")],
    [("Bad Name", "v")],
])
def test_invalid_headers_from_app_are_500_never_sent(headers):
    def app(environ, start_response):
        start_response("200 OK", headers)
        return [b"body"]
    _, channel, _ = run(app, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert channel.output.startswith(b"HTTP/1.1 500")
    assert b"Injected" not in channel.output and b"body" not in channel.output


def test_status_with_newline_is_500():
    def app(environ, start_response):
        start_response("200 OK\r\nX: y", [])
        return [b"body"]
    _, channel, _ = run(app, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert channel.output.startswith(b"HTTP/1.1 500")


def test_non_bytes_body_item_is_500():
    def app(environ, start_response):
        start_response("200 OK", [])
        return ["text is not bytes"]
    _, channel, _ = run(app, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert channel.output.startswith(b"HTTP/1.1 500")


def test_body_longer_than_content_length_is_cut_and_closed():
    def app(environ, start_response):
        start_response("200 OK", [("Content-Length", "3")])
        yield b"ab"
        yield b"cdef"
    exchange, channel, _ = run(app, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"cdef" not in channel.output
    assert exchange.verdict is not wsgi.Verdict.KEEP


def test_body_shorter_than_content_length_closes():
    def app(environ, start_response):
        start_response("200 OK", [("Content-Length", "10")])
        yield b"ab"
        yield b"c"
    exchange, _channel, _ = run(app, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert exchange.verdict is not wsgi.Verdict.KEEP


def test_file_wrapper_uses_sendfile_for_real_files(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"0123456789" * 1000)

    def app(environ, start_response):
        start_response("200 OK", [])
        return environ["wsgi.file_wrapper"](open(path, "rb"))
    _exchange, channel, _ = run(app, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    _status, headers, body = split_response(channel.output)
    assert headers["content-length"] == "10000"
    assert body == path.read_bytes()
    assert channel.files  # went through sendfile, not iteration


def test_file_wrapper_over_a_non_file_iterates():
    def app(environ, start_response):
        start_response("200 OK", [])
        return environ["wsgi.file_wrapper"](io.BytesIO(b"in memory"), 4)
    _, channel, _ = run(app, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    _status, headers, body = split_response(channel.output)
    assert headers["transfer-encoding"] == "chunked"
    assert b"in m" in body and not channel.files


def test_client_disconnect_mid_body_does_not_raise_out():
    def app(environ, start_response):
        environ["wsgi.input"].read()
        start_response("200 OK", [])
        return [b"x"]
    exchange, _channel, _ = run(app, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n",
                               [b"only ten b"])
    assert exchange.verdict is not wsgi.Verdict.KEEP


def test_large_single_body_is_sent_without_joining_it_to_the_head():
    big = b"z" * 300_000

    def app(environ, start_response):
        start_response("200 OK", [])
        return [big]
    _, channel, _ = run(app, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(channel.sent) == 2 and channel.sent[1] == big
    status, headers, body = split_response(channel.output)
    assert headers["content-length"] == "300000" and body == big


def test_single_body_short_of_declared_length_is_500_before_anything_is_sent():
    def app(environ, start_response):
        start_response("200 OK", [("Content-Length", "10")])
        return [b"short"]
    exchange, channel, _ = run(app, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert channel.output.startswith(b"HTTP/1.1 500")
    assert exchange.verdict is not wsgi.Verdict.KEEP


def test_oserror_raised_by_the_app_is_a_logged_500_not_a_disconnect():
    def app(environ, start_response):
        raise ConnectionRefusedError(111, "Connection refused")  # its database is down
    errors = []
    exchange, channel, _ = run(app, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", errors=errors)
    assert channel.output.startswith(b"HTTP/1.1 500")
    assert exchange.status_code == 500 and exchange.verdict is wsgi.Verdict.LINGER
    assert any("ConnectionRefusedError" in message for message in errors)


def test_failure_of_the_clients_socket_is_an_abort_without_an_error_line():
    class Gone(FakeChannel):
        def send_all(self, data):
            raise wsgi.ClientDisconnected("sending: [Errno 32] Broken pipe")
    channel = Gone()
    request = parse_head(channel, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    body = wsgi.open_body(channel, request)
    environ = wsgi.build_environ(request, wsgi.base_environ("h", "80"), ("a", "1"), body)
    errors = []
    exchange = wsgi.handle(hello, channel, request, body, environ, True, b"s",
                           lambda message, tb: errors.append(message))
    assert exchange.verdict is wsgi.Verdict.ABORT and "Broken pipe" in exchange.close_reason
    assert errors == []


def test_unread_large_body_means_close_then_linger():
    exchange, channel, _ = run(hello, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n"
                                      b"\r\n", [b"x" * 1000])
    assert b"Connection: close" in channel.output
    assert exchange.verdict is wsgi.Verdict.LINGER


def test_absolute_form_host_wins_over_the_host_field():
    _, _, environ = run(hello, b"GET http://example.org/x HTTP/1.1\r\nHost: other\r\n\r\n")
    assert environ["HTTP_HOST"] == "example.org" and environ["PATH_INFO"] == "/x"


def test_wsgi_errors_that_cannot_be_written_are_dropped():
    class Broken:
        def write(self, text):
            raise OSError(28, "No space left on device")

        def flush(self):
            raise ValueError("I/O operation on closed file")
    errors = wsgi.base_environ("h", "80", errors=Broken())["wsgi.errors"]
    assert errors.write("message\n") == len("message\n")
    errors.writelines(["a", "b"])
    errors.flush()


def _request(head: bytes):
    parser = RequestParser()
    parser.feed(head)
    return parser.next_event()


@pytest.mark.parametrize(("field", "key", "expected"), [
    (b"X-Forwarded-For: 1.2.3.4", "REMOTE_ADDR", "1.2.3.4"),
    (b"X-Forwarded-Proto: https", "wsgi.url_scheme", "https"),
    (b"X-Forwarded-Host: front.example", "HTTP_HOST", "front.example"),
    (b"Forwarded: for=1.2.3.4;proto=https", "REMOTE_ADDR", "1.2.3.4"),
])
def test_each_forwarding_header_of_a_trusted_proxy_is_believed(field, key, expected):
    from forkserver import proxy
    proxies = wsgi.trusted_proxies(["10.0.0.1"], proxy.HEADERS)
    request = _request(b"GET / HTTP/1.1\r\nHost: h\r\n" + field + b"\r\n\r\n")
    base = wsgi.base_environ("localhost", "80")
    environ = wsgi.build_environ(request, base, ("10.0.0.1", "5555"), None, proxies)
    assert environ[key] == expected


def test_proxies_are_not_consulted_without_a_forwarding_header(monkeypatch):
    from forkserver import proxy
    proxies = wsgi.trusted_proxies(["10.0.0.1"], proxy.HEADERS)
    asked = []
    monkeypatch.setattr(proxies, "resolve", lambda *args: asked.append(args) or args[0])
    request = _request(b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-Fore: x\r\nAccept: y\r\n\r\n")
    environ = wsgi.build_environ(request, wsgi.base_environ("localhost", "80"),
                                 ("10.0.0.1", "5555"), None, proxies)
    assert asked == [] and environ["REMOTE_ADDR"] == "10.0.0.1"
    assert environ["HTTP_X_FORWARDED_FORE"] == "x"


def test_the_environ_of_a_repeated_head_is_the_same_each_time_and_the_apps_own():
    """A connection that sends the same head again gets the parser's same Request; what its
    head decides is derived into the environ the first time and kept (memo) from the second,
    and an app changing its environ changes no later one."""
    raw = (b"GET /a%20b?x=1 HTTP/1.1\r\nHost: h\r\nCookie: a=1\r\nCookie: b=2\r\n"
           b"X-Id: 7\r\n\r\n")
    parser = RequestParser()
    base = wsgi.base_environ("127.0.0.1", "8000")
    environs = []
    for port in ("1", "2", "3"):
        parser.feed(raw)
        request = parser.next_event()
        assert parser.next_event() is END_OF_MESSAGE
        parser.start_next()
        environ = wsgi.build_environ(request, base, ("10.0.0.1", port), wsgi.EMPTY_INPUT)
        environs.append(dict(environ))
        environ["PATH_INFO"] = "/changed by the app"
        environ["HTTP_X_ID"] = "changed"
    assert isinstance(request.memo, dict)  # kept from the second use on
    assert environs[0]["PATH_INFO"] == "/a b" and environs[0]["HTTP_COOKIE"] == "a=1; b=2"
    assert environs[0]["HTTP_X_ID"] == "7" and environs[0]["QUERY_STRING"] == "x=1"
    for environ, port in zip(environs, ("1", "2", "3"), strict=True):
        assert environ["REMOTE_PORT"] == port
        assert {k: v for k, v in environ.items() if k != "REMOTE_PORT"} == \
            {k: v for k, v in environs[0].items() if k != "REMOTE_PORT"}
    assert "PATH_INFO" not in base and "HTTP_X_ID" not in base
