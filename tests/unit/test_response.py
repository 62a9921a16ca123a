"""Response heads, framing, validation of what the app returns, and the prebuilt error responses."""

from __future__ import annotations

import email.utils

import pytest

from forkserver.http import errors, response
from forkserver.http.errors import HTTPError, InvalidResponse
from forkserver.http.response import Response, http_date

DATE = b"Date: " + b"Thu, 01 Jan 1970 00:00:00 GMT" + b"\r\n"


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch):
    """Time stands at the epoch unless a test moves it; the date cache starts empty."""
    clock = {"now": 0.0}
    monkeypatch.setattr(response, "_now", lambda: clock["now"])
    monkeypatch.setattr(response, "_date_second", -1)
    monkeypatch.setattr(response, "_last_head", (None, -1, 0, b"", False, False, 0))
    return clock


def make(status="200 OK", headers=(), *, minor=1, is_head=False, keep_alive=True, **kwargs):
    return Response(status, list(headers), minor=minor, is_head=is_head, keep_alive=keep_alive,
                    **kwargs)


def header_lines(resp: Response) -> list[bytes]:
    head = resp.head
    assert head.endswith(b"\r\n\r\n")
    return head[:-4].split(b"\r\n")


# --- Head layout and framing --------------------------------------------------------------------


def test_head_layout_with_app_content_length():
    resp = make("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    assert resp.head == (
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: text/plain\r\n"
        b"Content-Length: 5\r\n"
        b"Server: forkserver\r\n" + DATE + b"\r\n"
    )
    assert (resp.keep_alive, resp.chunked, resp.content_length, resp.remaining) == (
        True, False, 5, 5)
    assert resp.body(b"hello") == b"hello"
    assert resp.remaining == 0
    assert resp.end() == b""


def test_body_length_adds_content_length():
    resp = make("200 OK", [("Content-Type", "text/plain")], body_length=12)
    assert header_lines(resp)[-1] == b"Content-Length: 12"
    assert (resp.chunked, resp.content_length, resp.remaining) == (False, 12, 12)


def test_app_content_length_wins_over_body_length():
    resp = make("200 OK", [("content-length", "3")], body_length=12)
    assert b"Content-Length: 12" not in resp.head
    assert b"content-length: 3\r\n" in resp.head  # the app's header, spelled as given
    assert resp.content_length == 3


def test_http11_without_length_is_chunked():
    resp = make("200 OK", [("Content-Type", "text/plain")])
    assert resp.chunked
    assert header_lines(resp)[-1] == b"Transfer-Encoding: chunked"
    assert resp.body(b"hello") == b"5\r\nhello\r\n"
    assert resp.body(b"x" * 26) == b"1a\r\n" + b"x" * 26 + b"\r\n"
    assert resp.body(b"") == b""  # an empty chunk would end the body early
    assert resp.end() == b"0\r\n\r\n"
    assert resp.remaining is None


def test_http10_without_length_is_close_delimited():
    resp = make("200 OK", [], minor=0, keep_alive=True)
    assert not resp.chunked
    assert resp.keep_alive is False
    assert b"Transfer-Encoding" not in resp.head
    assert header_lines(resp)[-1] == b"Connection: close"
    assert resp.body(b"raw") == b"raw"
    assert resp.end() == b""


def test_http10_keep_alive_with_length_says_so():
    resp = make("200 OK", [], minor=0, keep_alive=True, body_length=2)
    assert resp.keep_alive is True
    assert header_lines(resp)[-2:] == [b"Content-Length: 2", b"Connection: keep-alive"]


def test_no_keep_alive_adds_connection_close():
    resp = make("200 OK", [], keep_alive=False, body_length=0)
    assert header_lines(resp)[-1] == b"Connection: close"
    assert resp.keep_alive is False


def test_http11_keep_alive_sends_no_connection_header():
    resp = make("200 OK", [], body_length=0)
    assert b"Connection" not in resp.head


def test_always_answers_as_http11():
    assert make(minor=0, body_length=0).head.startswith(b"HTTP/1.1 200 OK\r\n")


@pytest.mark.parametrize("status", ["204 No Content", "304 Not Modified"])
def test_bodiless_statuses_are_never_chunked(status):
    resp = make(status, [])
    assert not resp.chunked
    assert b"Transfer-Encoding" not in resp.head and b"Content-Length" not in resp.head
    assert resp.keep_alive is True  # no body: nothing forces a close
    assert resp.body(b"ignored") == b""
    assert resp.end() == b""


def test_head_request_gets_no_body_and_keeps_the_apps_length():
    resp = make("200 OK", [("Content-Length", "1234")], is_head=True)
    assert b"Content-Length: 1234\r\n" in resp.head
    assert resp.content_length == 1234
    assert not resp.chunked
    assert resp.body(b"x" * 5000) == b""  # discarded, not enforced
    assert resp.end() == b""  # nothing owed


def test_head_request_without_length_adds_no_framing():
    resp = make("200 OK", [], is_head=True, body_length=10)
    assert b"Content-Length" not in resp.head and b"Transfer-Encoding" not in resp.head
    assert resp.keep_alive is True


def test_304_keeps_content_length_204_drops_it():
    assert b"Content-Length: 10\r\n" in make("304 Not Modified", [("Content-Length", "10")]).head
    resp = make("204 No Content", [("Content-Length", "0")])
    assert b"Content-Length" not in resp.head
    assert resp.content_length is None


def test_reason_phrase_may_be_empty_or_unusual():
    assert make("200 ", [], body_length=0).head.startswith(b"HTTP/1.1 200 \r\n")
    assert make("299 \tcaf\xe9", [], body_length=0).head.startswith(b"HTTP/1.1 299 \tcaf\xe9\r\n")


# --- Connection, Server, Date -------------------------------------------------------------------


def test_app_connection_close_ends_keep_alive_and_is_sent_once():
    resp = make("200 OK", [("Connection", "Close")], body_length=0)
    assert resp.keep_alive is False
    assert resp.head.count(b"onnection") == 1
    assert header_lines(resp)[-1] == b"Connection: close"


def test_app_connection_other_values_are_dropped():
    resp = make("200 OK", [("Connection", "keep-alive, x-foo")], body_length=0)
    assert resp.keep_alive is True
    assert b"onnection" not in resp.head
    resp = make("200 OK", [("connection", "upgrade, close")], minor=0, body_length=0)
    assert resp.keep_alive is False


def test_app_server_and_date_replace_ours():
    resp = make("200 OK", [("server", "app/1.0"), ("DATE", "yesterday")], body_length=0)
    lines = header_lines(resp)
    assert lines[1:3] == [b"server: app/1.0", b"DATE: yesterday"]
    assert resp.head.count(b"erver") == 1
    assert resp.head.count(b"ATE:") + resp.head.count(b"ate:") == 1


def test_custom_and_empty_server():
    assert b"Server: custom\r\n" in make(body_length=0, server=b"custom").head
    assert b"Server" not in make(body_length=0, server=b"").head


def test_duplicate_identical_content_length_is_sent_once():
    resp = make("200 OK", [("Content-Length", "3"), ("content-length", "3")])
    assert resp.head.lower().count(b"content-length") == 1
    assert resp.content_length == 3


def test_tab_and_obs_text_allowed_in_values():
    resp = make("200 OK", [("X-A", "a\tb"), ("X-B", "caf\xe9")], body_length=0)
    assert b"X-A: a\tb\r\nX-B: caf\xe9\r\n" in resp.head


# --- Validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "status",
    ["200", "200OK", "20 OK", "2000 OK", "600 Too High", "099 Low", "abc OK", " 200 OK",
     "200 OK\r\nX-Injected: 1", "200 OK\n", "200 O\x00K", "200 O\x7fK", "200 \u20ac", b"200 OK",
     None, 200, "100 Continue", "101 Switching Protocols", "103 Early Hints", "199 Odd"],
)
def test_invalid_status(status):
    with pytest.raises(InvalidResponse):
        make(status, [])


@pytest.mark.parametrize(
    "header",
    [
        ("Bad Name", "v"), ("X:Y", "v"), ("", "v"), ("X\u00e9", "v"), ("X-A\r\n", "v"),
        ("X-A", "a\r\nX-Injected: 1"), ("X-A", "a\nb"), ("X-A", "a\rb"), ("X-A", "a\x00"),
        ("X-A", "\x1b[31m"), ("X-A", "a\x7f"), ("X-A", "\u20ac"), ("X-A", b"bytes"),
        (b"X-A", "v"), ("X-A", 1), (None, "v"),
    ],
)
def test_invalid_header(header):
    with pytest.raises(InvalidResponse):
        make("200 OK", [header])


@pytest.mark.parametrize("item", [["X-A", "v"], ("X-A",), ("X-A", "v", "w"), "ab", None])
def test_header_items_must_be_pairs(item):
    with pytest.raises(InvalidResponse):
        make("200 OK", [item])


def test_headers_must_be_iterable():
    with pytest.raises(InvalidResponse):
        Response("200 OK", None, minor=1, is_head=False, keep_alive=True)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name", ["Transfer-Encoding", "transfer-encoding", "Keep-Alive", "Upgrade", "TE", "Trailer",
             "Proxy-Connection"]
)
def test_hop_by_hop_headers_are_refused(name):
    with pytest.raises(InvalidResponse):
        make("200 OK", [(name, "x")])


@pytest.mark.parametrize("value", ["abc", "-1", "+1", "1.5", "1,1", "", " 1", "0x10",
                                   "1" * 19, "\u0661"])
def test_invalid_content_length(value):
    with pytest.raises(InvalidResponse):
        make("200 OK", [("Content-Length", value)])


def test_conflicting_content_lengths():
    with pytest.raises(InvalidResponse):
        make("200 OK", [("Content-Length", "3"), ("Content-Length", "4")])


# --- Length enforcement -------------------------------------------------------------------------


def test_body_over_content_length_raises_and_consumes_nothing():
    resp = make("200 OK", [("Content-Length", "5")])
    assert resp.body(b"abc") == b"abc"
    with pytest.raises(InvalidResponse):
        resp.body(b"def")
    assert resp.remaining == 2  # the caller may send what still fits, then close
    assert resp.body(b"de") == b"de"
    assert resp.end() == b""


def test_body_short_of_content_length_fails_at_end():
    resp = make("200 OK", [], body_length=4)
    resp.body(b"abc")
    with pytest.raises(InvalidResponse):
        resp.end()


def test_zero_length_body():
    resp = make("200 OK", [], body_length=0)
    assert resp.body(b"") == b""
    with pytest.raises(InvalidResponse):
        resp.body(b"x")
    assert resp.end() == b""


def test_bytearray_body_and_non_bytes_refused():
    resp = make("200 OK", [])
    assert resp.body(bytearray(b"ab")) == b"2\r\nab\r\n"
    with pytest.raises(InvalidResponse):
        resp.body("text")  # type: ignore[arg-type]


# --- Date ---------------------------------------------------------------------------------------


def test_http_date_format():
    assert http_date() == b"Thu, 01 Jan 1970 00:00:00 GMT"


@pytest.mark.parametrize("when", [951782400, 1_700_000_000, 1_794_927_599, 4_102_444_800])
def test_http_date_matches_the_rfc_format(frozen_clock, when):
    frozen_clock["now"] = when + 0.75
    assert http_date() == email.utils.formatdate(when, usegmt=True).encode()


def test_http_date_is_recomputed_only_when_the_second_changes(frozen_clock, monkeypatch):
    calls = []
    real_gmtime = response._gmtime
    monkeypatch.setattr(response, "_gmtime", lambda s: calls.append(s) or real_gmtime(s))
    frozen_clock["now"] = 1000.1
    first = http_date()
    frozen_clock["now"] = 1000.9
    assert http_date() is first
    assert make(body_length=0).head.count(first) == 1
    assert calls == [1000]
    frozen_clock["now"] = 1001.0
    assert http_date() != first
    assert calls == [1000, 1001]


# --- Remembered head layouts ----------------------------------------------------------------------


def fresh(*args, **kwargs) -> Response:
    """A Response built with no remembered layout to help it."""
    saved = dict(response._PLANS)
    response._PLANS.clear()
    try:
        return make(*args, **kwargs)
    finally:
        response._PLANS.clear()
        response._PLANS.update(saved)


CASES = [
    {"headers": [("Content-Type", "text/plain")], "body_length": 13},
    {"headers": [("Content-Type", "text/plain")], "body_length": 99999},
    {"headers": [("Content-Length", "5")], "body_length": 3},
    {"headers": [], "minor": 0},
    {"headers": [], "minor": 0, "body_length": 2},
    {"headers": [("Connection", "close")], "body_length": 1},
    {"headers": [("X-A", "1")], "is_head": True, "body_length": 7},
    {"status": "204 No Content", "headers": [("Content-Length", "0")]},
    {"status": "304 Not Modified", "headers": [("Content-Length", "10")]},
    {"headers": [("Date", "Mon, 01 Jan 2024 00:00:00 GMT"), ("Server", "x")]},
    {"headers": [], "keep_alive": False},
    {"headers": [], "server": b""},
]


@pytest.mark.parametrize("case", CASES)
def test_a_remembered_layout_gives_what_a_fresh_build_gives(case):
    expected = fresh(**case)
    for _ in range(2):  # the first builds and keeps the layout, the second uses it
        got = make(**case)
        assert got.head == expected.head
        assert (got.keep_alive, got.chunked, got.content_length, got.remaining) == (
            expected.keep_alive, expected.chunked, expected.content_length, expected.remaining)


def test_a_remembered_layout_takes_the_current_date_and_body_length(frozen_clock):
    headers = [("Content-Type", "text/plain")]
    make(headers=headers, body_length=13)
    frozen_clock["now"] = 86400.0 * 365
    later = make(headers=headers, body_length=4)
    assert b"Date: Fri, 01 Jan 1971 00:00:00 GMT\r\n" in later.head
    assert b"Content-Length: 4\r\n" in later.head and later.remaining == 4


def test_layouts_are_bounded_and_only_plain_values_are_kept():
    class Text(str):
        pass

    response._PLANS.clear()
    make(headers=[(Text("X-A"), "1")])
    assert not response._PLANS  # a str subclass could change under the key
    for n in range(response._PLANS_MAX + 10):
        make(headers=[("X-N", str(n))])
    assert 0 < len(response._PLANS) <= response._PLANS_MAX


def test_headers_are_read_once_and_later_changes_do_not_leak():
    headers = [("X-A", "1")]
    first = make(headers=headers)
    headers.append(("X-B", "2"))
    assert b"X-B" not in first.head
    assert b"X-B: 2\r\n" in make(headers=headers).head
    once = iter([("X-C", "3")])
    assert b"X-C: 3\r\n" in Response("200 OK", once, minor=1, is_head=False,  # type: ignore
                                        keep_alive=True).head


def test_an_invalid_header_is_refused_even_after_a_valid_layout_was_kept():
    make(headers=[("X-A", "1")])
    with pytest.raises(InvalidResponse):
        make(headers=[("X-A", "1\r\nX-Evil: 1")])


# --- Prebuilt error responses -------------------------------------------------------------------

ERRORS = [
    (errors.BadRequest, 400, "Bad Request"),
    (errors.RequestTimeout, 408, "Request Timeout"),
    (errors.PayloadTooLarge, 413, "Content Too Large"),
    (errors.URITooLong, 414, "URI Too Long"),
    (errors.ExpectationFailed, 417, "Expectation Failed"),
    (errors.HeaderFieldsTooLarge, 431, "Request Header Fields Too Large"),
    (errors.InternalServerError, 500, "Internal Server Error"),
    (errors.NotImplementedCoding, 501, "Not Implemented"),
    (errors.VersionNotSupported, 505, "HTTP Version Not Supported"),
    (errors.InvalidResponse, 500, "Internal Server Error"),
    (errors.HTTPError, 400, "Bad Request"),
]


@pytest.mark.parametrize(("cls", "status", "reason"), ERRORS)
def test_error_response_bytes(cls, status, reason):
    exc = cls("client sent \r\n<script>")
    body = f"{status} {reason}\n".encode()
    assert exc.status == status and exc.reason == reason
    assert exc.response() == (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body
    assert b"script" not in exc.response()  # the detail is for logs only
    assert exc.detail == "client sent \r\n<script>"
    assert isinstance(exc, HTTPError)


def test_error_response_is_built_once_per_class():
    assert errors.BadRequest("a").response() is errors.BadRequest("b").response()
    assert errors.URITooLong().response() is not errors.BadRequest().response()


def test_error_str_names_status_and_detail():
    assert str(errors.URITooLong("line too long")) == "414 URI Too Long: line too long"
    assert str(errors.RequestTimeout()) == "408 Request Timeout"


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("data", [b"", b"abc", b"x" * 13, bytearray(b"abc")])
def test_whole_gives_what_head_body_and_end_give(case, data):
    one, other = make(**case), make(**case)
    try:
        expected = other.head + other.body(data) + other.end()
    except InvalidResponse:
        with pytest.raises(InvalidResponse):
            one.whole(data)
        return
    assert one.whole(data) == expected
    assert one.remaining == other.remaining


def whole_of(case: dict, data: bytes):
    """What whole_response gives for ``case`` (as for ``make``), or the InvalidResponse raised."""
    case = {key: value for key, value in case.items() if key != "body_length"}
    status = case.pop("status", "200 OK")
    try:
        return response.whole_response(
            status, list(case.pop("headers", ())), case.pop("minor", 1),
            case.pop("is_head", False), case.pop("keep_alive", True),
            case.pop("server", b"forkserver"), data)
    except InvalidResponse as error:
        return error


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("data", [b"", b"abc", b"x" * 13])
def test_whole_response_gives_what_a_response_gives(case, data):
    case = {key: value for key, value in case.items() if key != "body_length"}
    one = make(**case, body_length=len(data))
    try:
        expected = (one.whole(data), one.keep_alive, one.status_code)
    except InvalidResponse:
        expected = None
    for _ in range(3):  # builds the plan, remembers it, then repeats the last head
        got = whole_of(case, data)
        if expected is None:
            assert isinstance(got, InvalidResponse)
        else:
            assert got == expected


def test_whole_response_repeats_a_head_only_for_the_same_length_and_second(frozen_clock):
    case = {"headers": [("Content-Type", "text/plain")]}
    for data in (b"a", b"abc", b"a", b"a"):
        expected = make(**case, body_length=len(data)).whole(data)
        assert whole_of(case, data)[0] == expected
        assert b"Content-Length: %d\r\n" % len(data) in expected
    first = whole_of(case, b"a")[0]
    frozen_clock["now"] = 86400.0
    moved = whole_of(case, b"a")[0]
    assert DATE in first and DATE not in moved
    assert b"Date: Fri, 02 Jan 1970 00:00:00 GMT\r\n" in moved


def test_whole_response_status_and_keep_alive():
    data, keep_alive, code = whole_of({"status": "404 Not Found",
                                       "headers": [("Connection", "close")]}, b"no")
    assert (keep_alive, code) == (False, 404)
    assert data.startswith(b"HTTP/1.1 404 Not Found\r\n") and data.endswith(b"\r\n\r\nno")
