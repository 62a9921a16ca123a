"""The sans-IO request parser: every RFC 9112 rule the server enforces, valid and invalid.

Most tests go through ``run()``, which feeds pieces, drains events after each piece the way the
worker does, signals EOF at the end and returns a normalized event list. The split-invariance
test at the bottom checks that ``run()`` gives the same answer however the input is cut.
"""

from __future__ import annotations

import pytest

from forkserver.http.errors import HTTPError
from forkserver.http.parser import (
    END_OF_MESSAGE,
    NEED_DATA,
    PAUSED,
    Limits,
    Request,
    RequestParser,
)
from forkserver.wsgi import base_environ, build_environ
from tests.apps.conformance_app import report
from tests.corpus.http_verdicts import LIMITS, SMUGGLED, VERDICTS, Verdict, check_seen

# --- Harness -------------------------------------------------------------------------------------


def snapshot(request: Request) -> dict:
    """What a Request says of its head (``memo`` is for the layers above, not the parser's)."""
    return {name: getattr(request, name) for name in Request.__slots__ if name != "memo"}


def drain(parser: RequestParser, out: list) -> None:
    """Take events until NEED_DATA, starting the next request at each PAUSED."""
    while True:
        event = parser.next_event()
        if event is NEED_DATA:
            return
        if event is PAUSED:
            parser.start_next()
            continue
        if isinstance(event, Request):
            out.append(("request", snapshot(event)))
        elif event is END_OF_MESSAGE:
            out.append(("end", list(parser.trailers)))
        else:
            assert type(event) is bytes and event, f"bad body event {event!r}"
            if out and out[-1][0] == "data":  # piece boundaries depend on the split
                out[-1] = ("data", out[-1][1] + event)
            else:
                out.append(("data", event))


def run(pieces: list[bytes], **limits: int) -> list:
    """Events for a connection that sends ``pieces`` and then closes, error status last."""
    parser = RequestParser(Limits(**limits))
    out: list = []
    try:
        for piece in pieces:
            parser.feed(piece)
            drain(parser, out)
        parser.eof()
        drain(parser, out)
    except HTTPError as exc:
        out.append(("error", exc.status))
    return out


def one(data: bytes, **limits: int) -> list:
    return run([data], **limits)


def status_of(data: bytes, **limits: int) -> int | None:
    events = one(data, **limits)
    return events[-1][1] if events and events[-1][0] == "error" else None


def head(data: bytes, **limits: int) -> Request:
    """The Request parsed from a complete head."""
    parser = RequestParser(Limits(**limits))
    parser.feed(data)
    event = parser.next_event()
    assert isinstance(event, Request), event
    return event


def get(target: str = "/", *fields: str, version: str = "HTTP/1.1", host: bool = True) -> bytes:
    lines = [f"GET {target} {version}"]
    if host:
        lines.append("Host: example.com")
    lines.extend(fields)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def post(*fields: str, body: bytes = b"", version: str = "HTTP/1.1") -> bytes:
    lines = [f"POST /submit {version}", "Host: example.com", *fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunked(body: bytes, *fields: str) -> bytes:
    return post("Transfer-Encoding: chunked", *fields, body=body)


# --- Valid requests -----------------------------------------------------------------------------


def test_simple_get_fields():
    request = head(
        b"GET /a%20b?x=1&y=2 HTTP/1.1\r\nHost: example.com:8080\r\n"
        b"User-Agent: test\r\nAccept: */*\r\n\r\n"
    )
    assert snapshot(request) == {
        "method": "GET",
        "target": "/a%20b?x=1&y=2",
        "path": "/a%20b",
        "query": "x=1&y=2",
        "version": "HTTP/1.1",
        "minor": 1,
        "headers": [("HOST", "example.com:8080"), ("USER-AGENT", "test"), ("ACCEPT", "*/*")],
        "keep_alive": True,
        "content_length": None,
        "chunked": False,
        "expect_continue": False,
        "host": "example.com:8080",
    }


def test_bodiless_request_is_request_then_end_then_paused():
    parser = RequestParser()
    parser.feed(get())
    assert isinstance(parser.next_event(), Request)
    assert parser.next_event() is END_OF_MESSAGE
    assert parser.next_event() is PAUSED
    assert parser.next_event() is PAUSED
    parser.start_next()
    assert parser.next_event() is NEED_DATA


def test_query_split_at_first_question_mark_and_empty_query():
    request = head(get("/p?a=1?b=2"))
    assert (request.path, request.query) == ("/p", "a=1?b=2")
    request = head(get("/p?"))
    assert (request.path, request.query) == ("/p", "")
    assert head(get("/p")).query == ""


def test_target_keeps_raw_bytes_as_latin1_free_ascii():
    request = head(get("/%E2%82%AC/x;y=1"))
    assert request.target == request.path == "/%E2%82%AC/x;y=1"


def test_header_names_upper_cased_order_and_duplicates_kept():
    request = head(get("/", "x-a: 1", "Set-Thing: 2", "X-A: 3"))
    assert request.headers == [
        ("HOST", "example.com"),
        ("X-A", "1"),
        ("SET-THING", "2"),
        ("X-A", "3"),
    ]


def test_value_ows_trimmed_inner_whitespace_kept():
    request = head(get("/", "X-Pad: \t  a \t b  \t", "X-Empty:", "X-Blank:   "))
    assert request.headers[1:] == [("X-PAD", "a \t b"), ("X-EMPTY", ""), ("X-BLANK", "")]


def test_obs_text_in_value_is_latin1_decoded():
    request = head(b"GET / HTTP/1.1\r\nHost: a\r\nX-Name: caf\xe9 \x80\xff\r\n\r\n")
    assert request.headers[1] == ("X-NAME", "caf\xe9 \x80\xff")


def test_underscore_names_are_dropped():
    request = head(get("/", "X_Forwarded_For: 1.2.3.4", "X-Real: 1", "_: x"))
    assert request.headers == [("HOST", "example.com"), ("X-REAL", "1")]


def test_underscore_names_still_count_toward_the_field_limit():
    assert status_of(get("/", "A_1: x", "B_2: y"), max_fields=2) == 431


def test_unusual_but_valid_token_methods_and_names():
    request = head(b"M-SEARCH * HTTP/1.1\r\nHost: a\r\n\r\n".replace(b"*", b"/"))
    assert request.method == "M-SEARCH"
    request = head(b"get / HTTP/1.1\r\nHost: a\r\nX!#$%&'*+.^`|~9: v\r\n\r\n")
    assert request.method == "get"  # methods are case-sensitive tokens, not upper-cased
    assert request.headers[1] == ("X!#$%&'*+.^`|~9", "v")


def test_one_leading_empty_line_is_ignored():
    request = head(b"\r\n" + get())
    assert request.method == "GET"


def test_http10_without_host_is_fine_and_closes_by_default():
    request = head(b"GET / HTTP/1.0\r\n\r\n")
    assert (request.version, request.minor, request.keep_alive, request.host) == (
        "HTTP/1.0",
        0,
        False,
        None,
    )


def test_absolute_form_target():
    request = head(get("http://example.com:81/p/q?x=1"))
    assert (request.target, request.path, request.query) == ("http://example.com:81/p/q?x=1",
                                                             "/p/q", "x=1")
    request = head(get("HTTPS://EXAMPLE.COM"))
    assert (request.path, request.query) == ("/", "")
    request = head(get("http://[::1]:8000?x"))
    assert (request.path, request.query) == ("/", "x")


def test_asterisk_form_with_options():
    request = head(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (request.path, request.query) == ("*", "")


def test_authority_form_with_connect():
    request = head(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
    assert (request.path, request.query) == ("example.com:443", "")
    request = head(b"CONNECT [2001:db8::1]:443 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert request.path == "[2001:db8::1]:443"


def test_get_with_no_framing_headers_has_no_body():
    # Methods get no special framing: a GET with Content-Length has a body, a POST without one
    # has none.
    assert one(post()) == [("request", snapshot(head(post()))), ("end", [])]
    events = one(get("/", "Content-Length: 3") + b"abc")
    assert events[1:] == [("data", b"abc"), ("end", [])]


# --- Bodies -------------------------------------------------------------------------------------


def test_content_length_body():
    events = one(post("Content-Length: 11", body=b"hello world"))
    assert events[0][1]["content_length"] == 11
    assert events[1:] == [("data", b"hello world"), ("end", [])]


def test_content_length_zero_and_leading_zeros():
    events = one(post("Content-Length: 0"))
    assert [kind for kind, _ in events] == ["request", "end"]
    assert events[0][1]["content_length"] == 0
    assert head(post("Content-Length: 007")).content_length == 7


def test_identical_repeated_content_length_is_accepted():
    events = one(post("Content-Length: 3", "Content-Length: 3", body=b"abc"))
    assert events[1:] == [("data", b"abc"), ("end", [])]


def test_eighteen_digit_content_length_is_accepted():
    request = head(post("Content-Length: 999999999999999999"))
    assert request.content_length == 999_999_999_999_999_999


def test_body_data_is_yielded_as_it_arrives_and_never_past_the_length():
    parser = RequestParser()
    parser.feed(post("Content-Length: 10", body=b"0123"))
    assert isinstance(parser.next_event(), Request)
    assert parser.next_event() == b"0123"
    assert parser.next_event() is NEED_DATA
    parser.feed(b"456789GET / HTTP/1.1\r\n")
    assert parser.next_event() == b"456789"
    assert parser.buffered == len(b"GET / HTTP/1.1\r\n")
    assert parser.next_event() is END_OF_MESSAGE


def test_chunked_body_with_extensions_and_trailers():
    body = (
        b"5;name=value;flag\r\nhello\r\n"
        b'6 ; q = "a \\"quoted\\" ;=\\\\ ext" ;x=y\r\n world\r\n'
        b"A\t;\tk\t=\tv\r\n0123456789\r\n"
        b"0;last=1\r\n"
        b"X-Checksum: abc \r\nX_Dropped: 1\r\nX-Other:x\r\n\r\n"
    )
    events = one(chunked(body))
    assert events[0][1]["chunked"] is True
    assert events[0][1]["content_length"] is None
    assert events[1:] == [
        ("data", b"hello world0123456789"),
        ("end", [("X-CHECKSUM", "abc"), ("X-OTHER", "x")]),
    ]


def test_chunk_sizes_are_hex_case_insensitive_up_to_16_digits():
    body = b"a\r\n" + b"x" * 10 + b"\r\nF\r\n" + b"y" * 15 + b"\r\n000000000000000\r\n\r\n"
    assert one(chunked(body))[1] == ("data", b"x" * 10 + b"y" * 15)
    assert one(chunked(b"0000000000000001\r\nz\r\n0\r\n\r\n"))[1] == ("data", b"z")


def test_chunked_data_is_yielded_before_the_chunk_is_complete():
    parser = RequestParser()
    parser.feed(chunked(b"a\r\n0123"))
    assert isinstance(parser.next_event(), Request)
    assert parser.next_event() == b"0123"
    assert parser.next_event() is NEED_DATA
    parser.feed(b"456789\r\n0\r\n\r\n")
    assert parser.next_event() == b"456789"
    assert parser.next_event() is END_OF_MESSAGE
    assert parser.trailers == []


def test_transfer_coding_names_compare_case_insensitively():
    events = one(post("Transfer-Encoding: CHUNKED", body=b"1\r\na\r\n0\r\n\r\n"))
    assert events[1:] == [("data", b"a"), ("end", [])]


def test_trailers_reset_for_the_next_request():
    parser = RequestParser()
    parser.feed(chunked(b"0\r\nX-T: 1\r\n\r\n") + get())
    assert isinstance(parser.next_event(), Request)
    assert parser.next_event() is END_OF_MESSAGE
    assert parser.trailers == [("X-T", "1")]
    parser.start_next()
    assert parser.trailers == []


# --- Expect -------------------------------------------------------------------------------------


def test_expect_without_it_is_false():
    assert head(post("Content-Length: 1")).expect_continue is False


# --- Pipelining and the message cycle -----------------------------------------------------------


def test_pipelined_requests_in_one_feed():
    data = post("Content-Length: 3", body=b"abc") + get("/second") + get("/third")
    parser = RequestParser()
    parser.feed(data)
    first = parser.next_event()
    assert first.target == "/submit"
    assert parser.next_event() == b"abc"
    assert parser.next_event() is END_OF_MESSAGE
    assert parser.next_event() is PAUSED  # nothing more until start_next()
    assert parser.buffered == len(get("/second") + get("/third"))
    assert not parser.in_message
    parser.start_next()
    assert parser.in_message  # pipelined bytes of the next request are waiting
    assert parser.next_event().target == "/second"
    assert parser.next_event() is END_OF_MESSAGE
    parser.start_next()
    assert parser.next_event().target == "/third"
    assert parser.next_event() is END_OF_MESSAGE
    parser.start_next()
    assert parser.next_event() is NEED_DATA
    assert parser.buffered == 0


def test_pipelined_chunked_then_get():
    data = chunked(b"3\r\nabc\r\n0\r\n\r\n") + get("/next")
    events = one(data)
    assert [kind for kind, _ in events] == ["request", "data", "end", "request", "end"]
    assert events[3][1]["target"] == "/next"


def test_empty_line_tolerated_between_pipelined_requests():
    events = one(post("Content-Length: 1", body=b"x") + b"\r\n" + get("/after"))
    assert [kind for kind, _ in events] == ["request", "data", "end", "request", "end"]


def test_start_next_before_end_of_message_is_a_programming_error():
    parser = RequestParser()
    parser.feed(post("Content-Length: 5", body=b"ab"))
    parser.next_event()
    with pytest.raises(RuntimeError):
        parser.start_next()


def test_in_message_tracks_the_request():
    parser = RequestParser()
    assert not parser.in_message
    parser.feed(b"G")
    assert parser.in_message
    assert parser.next_event() is NEED_DATA
    parser.feed(b"ET / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n")
    assert isinstance(parser.next_event(), Request)
    assert parser.in_message
    parser.feed(b"ok")
    assert parser.next_event() == b"ok"
    assert parser.in_message  # END_OF_MESSAGE not returned yet
    assert parser.next_event() is END_OF_MESSAGE
    assert not parser.in_message
    parser.start_next()
    assert not parser.in_message


def test_skipped_empty_line_alone_is_not_a_message():
    parser = RequestParser()
    parser.feed(b"\r\n")
    assert parser.next_event() is NEED_DATA
    assert not parser.in_message
    parser.eof()  # a client may send CRLF after a body and close: not an error
    assert parser.next_event() is NEED_DATA


def test_feed_accepts_memoryview_and_bytearray_and_copies():
    source = bytearray(get())
    parser = RequestParser()
    parser.feed(memoryview(source)[:10])
    source[:10] = b"XXXXXXXXXX"  # the caller reuses its receive buffer
    parser.feed(bytearray(get())[10:])
    assert parser.next_event().target == "/"


def test_head_arriving_byte_by_byte():
    data = get("/slow", "X-A: 1", "X-B: 2")
    parser = RequestParser()
    for i in range(len(data) - 1):
        parser.feed(data[i : i + 1])
        assert parser.next_event() is NEED_DATA
    parser.feed(data[-1:])
    request = parser.next_event()
    assert request.headers == [("HOST", "example.com"), ("X-A", "1"), ("X-B", "2")]


# --- EOF ----------------------------------------------------------------------------------------


def test_eof_between_messages_is_a_no_op():
    parser = RequestParser()
    parser.eof()
    assert parser.next_event() is NEED_DATA
    parser = RequestParser()
    parser.feed(get())
    parser.next_event()
    parser.next_event()
    parser.eof()
    assert parser.next_event() is PAUSED


@pytest.mark.parametrize("case", [v for v in VERDICTS if v.half_close], ids=lambda v: v.id)
def test_eof_mid_message_is_400(case):
    """The corpus's requests cut short by EOF: ``eof()`` itself raises once the data is in."""
    parser = RequestParser(Limits(**LIMITS))
    parser.feed(case.raw)
    while parser.next_event() is not NEED_DATA:
        pass
    with pytest.raises(HTTPError) as info:
        parser.eof()
    assert info.value.status == 400


def test_eof_right_after_a_complete_request_half_close():
    # A client may send its request and shut down writing before the server has parsed it.
    parser = RequestParser()
    parser.feed(post("Content-Length: 2", body=b"hi"))
    parser.eof()
    assert isinstance(parser.next_event(), Request)
    assert parser.next_event() == b"hi"
    assert parser.next_event() is END_OF_MESSAGE


def test_eof_with_partial_pipelined_request_fails_after_start_next():
    parser = RequestParser()
    parser.feed(get() + b"GET /partial")
    parser.next_event()
    parser.next_event()
    parser.eof()  # the first request is complete: nothing to complain about yet
    parser.start_next()
    with pytest.raises(HTTPError) as info:
        parser.next_event()
    assert info.value.status == 400


# --- Errors ------------------------------------------------------------------------------------


def test_errors_come_with_their_own_response_bytes():
    parser = RequestParser()
    parser.feed(b"GET / HTTP/2.0\r\n\r\n")
    with pytest.raises(HTTPError) as info:
        parser.next_event()
    assert info.value.response().startswith(b"HTTP/1.1 505 HTTP Version Not Supported\r\n")


def test_a_failed_parser_keeps_raising_the_same_error():
    parser = RequestParser()
    parser.feed(b"GET / HTTP/1.1\r\nHost : a\r\n\r\n" + get())
    with pytest.raises(HTTPError) as info:
        parser.next_event()
    first = info.value
    assert first.status == 400
    parser.feed(get())  # ignored: nothing after an error is parsed
    for _ in range(3):
        with pytest.raises(HTTPError) as again:
            parser.next_event()
        assert again.value is first
    with pytest.raises(HTTPError) as again:
        parser.eof()
    assert again.value is first
    assert parser.buffered == 0


def test_error_mid_body_keeps_raising():
    parser = RequestParser()
    parser.feed(chunked(b"3\r\nabc\r\nzz\r\n"))
    assert isinstance(parser.next_event(), Request)
    assert parser.next_event() == b"abc"
    with pytest.raises(HTTPError):
        parser.next_event()
    with pytest.raises(HTTPError):
        parser.next_event()


# --- Limits -------------------------------------------------------------------------------------


def test_request_line_limit_414():
    target = "/" + "a" * 40
    line_length = len(f"GET {target} HTTP/1.1")
    assert status_of(get(target), max_line=line_length) is None
    assert status_of(get(target), max_line=line_length - 1) == 414


def test_request_line_limit_applies_before_the_line_ends():
    parser = RequestParser(Limits(max_line=20))
    parser.feed(b"GET /" + b"a" * 16)  # 21 bytes, no LF yet: could still end with CR LF
    assert parser.next_event() is NEED_DATA
    parser.feed(b"a")
    with pytest.raises(HTTPError) as info:
        parser.next_event()
    assert info.value.status == 414


def test_request_line_with_bare_lf_inside_the_limit_is_400_not_414():
    assert status_of(b"GET /\n" + b"a" * 100 + b"\r\n\r\n", max_line=20) == 400


def test_field_line_limit_431():
    field = "X-Long: " + "v" * 30
    assert status_of(get("/", field), max_field_size=len(field)) is None
    assert status_of(get("/", field), max_field_size=len(field) - 1) == 431


def test_field_line_limit_applies_before_the_line_ends():
    parser = RequestParser(Limits(max_field_size=10))
    parser.feed(b"GET / HTTP/1.1\r\nX-Long: " + b"v" * 100)
    with pytest.raises(HTTPError) as info:
        parser.next_event()
    assert info.value.status == 431


def test_field_count_limit_431():
    fields = [f"X-{i}: v" for i in range(4)]  # plus Host: 5 fields
    assert status_of(get("/", *fields), max_fields=5) is None
    assert status_of(get("/", *fields), max_fields=4) == 431


def test_trailer_limits_431():
    # The head has two fields (Host, Transfer-Encoding); trailers are counted on their own.
    assert status_of(chunked(b"0\r\nX-A: 1\r\nX-B: 2\r\n\r\n"), max_fields=2) is None
    assert status_of(chunked(b"0\r\nX-A: 1\r\nX-B: 2\r\nX-C: 3\r\n\r\n"), max_fields=2) == 431
    long_trailer = b"0\r\nX-A: " + b"v" * 50 + b"\r\n\r\n"
    assert status_of(chunked(long_trailer), max_field_size=40) == 431


def test_whole_head_is_bounded_by_the_line_and_count_limits():
    # Endless header lines within the per-line limit stop at the field count.
    parser = RequestParser(Limits(max_fields=10, max_field_size=100))
    parser.feed(b"GET / HTTP/1.1\r\n")
    with pytest.raises(HTTPError) as info:
        for _ in range(100):
            parser.feed(b"X-A: " + b"v" * 90 + b"\r\n")
            assert parser.next_event() is NEED_DATA
    assert info.value.status == 431


def test_content_length_over_max_body_is_413_at_the_head():
    assert head(post("Content-Length: 100"), max_body=100).content_length == 100
    parser = RequestParser(Limits(max_body=100))
    parser.feed(post("Content-Length: 101"))  # no body sent: rejected from the head alone
    with pytest.raises(HTTPError) as info:
        parser.next_event()
    assert info.value.status == 413


def test_max_body_zero_means_unlimited():
    assert status_of(post("Content-Length: 5", body=b"12345"), max_body=0) is None


def test_chunked_body_over_max_body_is_413_when_exceeded():
    body = b"5\r\nhello\r\n5\r\nworld\r\n1\r\n!\r\n0\r\n\r\n"
    assert status_of(chunked(body), max_body=11) is None
    events = one(chunked(body), max_body=10)
    assert events[1:] == [("data", b"helloworld"), ("error", 413)]
    # The announced size is enough; the data need not arrive.
    parser = RequestParser(Limits(max_body=10))
    parser.feed(chunked(b"b\r\n"))
    assert isinstance(parser.next_event(), Request)
    with pytest.raises(HTTPError) as info:
        parser.next_event()
    assert info.value.status == 413


def test_chunk_size_line_is_bounded():
    assert status_of(chunked(b"5;x=" + b"a" * 200 + b"\r\nhello\r\n0\r\n\r\n"), max_line=50) == 400
    parser = RequestParser(Limits(max_line=50))
    parser.feed(chunked(b"5;x=" + b"a" * 200))
    parser.next_event()
    with pytest.raises(HTTPError):
        parser.next_event()


# --- Split invariance (style.md rule 4) ---------------------------------------------------------

# Every sixth short rejection of the corpus, run under the small limits below as well.
CORPUS_SAMPLE = [v.raw for v in VERDICTS if v.smuggle and len(v.raw) <= 200][::6]
SPLIT_CASES = [
    get(),
    get("/p?q=1", "X-A: 1", "X-B: \t two words \t", "Connection: close"),
    b"\r\n" + get(),
    b"GET / HTTP/1.0\r\n\r\n",
    post("Content-Length: 11", body=b"hello world"),
    post("Content-Length: 4", body=b"abcd") + get("/next") + b"GET /partial",
    chunked(b"5;a=b\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n") + get("/after"),
    chunked(b'3 ; q="x\\"y"\r\nabc\r\n0\r\n\r\n'),
    post("Expect: 100-continue", "Content-Length: 2", body=b"ok"),
    b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
    get("http://example.com/abs?x"),
    get("/", "Content-Length: 3") + b"abc",
] + CORPUS_SAMPLE + [
    get("/" + "a" * 60),  # with the small max_line: 414 before and after the line ends
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Long: " + b"v" * 40 + b"\r\n\r\n",
    post("Content-Length: 50"),
    post("Content-Length: 5", body=b"abc"),
    chunked(b"5\r\nhello\r\n9\r\n123456789\r\n0\r\n\r\n"),
    chunked(b"5\r\nhel"),
    b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: y\r\n" * 6 + b"\r\n",
    b"GET /\n" + b"a" * 60,
    b"GET /a\rb" + b"c" * 60 + b"\r\n",
    b"GET /a\rb" + b"c" * 20 + b"\r\n",
    b"GET /aaaa HTTP/1.1\r\nHost: abcd\r\nX-1: vvvvv\r\nX-2: vvv\r\n\r\n",
    b"GET /aaaa HTTP/1.1\r\nHost: abcd\r\nX-1: vvvvv\r\nX-2: vvvv\r\n\r\n",
    b"GET /aaaa HTTP/1.1\r\nHost: abcd\r\nX-1: vvvvv\r\nX-2: vvvvv\r\nX-3: v\r\n\r\n",
]
SPLIT_LIMITS = {"max_line": 40, "max_field_size": 30, "max_fields": 5, "max_body": 12}
CAP_LIMITS = {"max_line": 20, "max_fields": 3, "max_field_size": 10}  # head cap: 56 bytes


@pytest.mark.parametrize("data", SPLIT_CASES, ids=range(len(SPLIT_CASES)))
@pytest.mark.parametrize("limits", [{}, SPLIT_LIMITS, CAP_LIMITS],
                         ids=["default", "small-limits", "head-cap"])
def test_every_split_gives_identical_events(data, limits):
    expected = one(data, **limits)
    for cut in range(len(data) + 1):
        assert run([data[:cut], data[cut:]], **limits) == expected, f"cut at {cut}"
    assert run([data[i : i + 1] for i in range(len(data))], **limits) == expected


def test_split_cases_cover_successes_and_every_error_status():
    outcomes = {one(data, **limits)[-1][0] for data in SPLIT_CASES for limits in ({}, SPLIT_LIMITS)}
    assert {"end", "error"} <= outcomes
    statuses = {
        events[-1][1]
        for data in SPLIT_CASES
        for limits in ({}, SPLIT_LIMITS)
        if (events := one(data, **limits))[-1][0] == "error"
    }
    assert {400, 413, 414, 431, 501, 505} <= statuses


def test_whole_head_size_cap_431():
    # max_line + max_fields * (max_field_size + 2) = 20 + 3 * 12 = 56 bytes for the whole head,
    # final CRLF included, even though every line is within its own limit.
    limits = {"max_line": 20, "max_fields": 3, "max_field_size": 10}
    fitting = b"GET /aaaa HTTP/1.1\r\nHost: abcd\r\nX-1: vvvvv\r\nX-2: vvv\r\n\r\n"
    assert len(fitting) == 56
    assert status_of(fitting, **limits) is None
    over = fitting.replace(b"vvv\r\n\r\n", b"vvvv\r\n\r\n")
    assert status_of(over, **limits) == 431
    # Incomplete heads are held to the same cap before they end.
    parser = RequestParser(Limits(**limits))
    parser.feed(over[:56])
    with pytest.raises(HTTPError) as info:
        parser.next_event()
    assert info.value.status == 431
    parser = RequestParser(Limits(**limits))
    parser.feed(over[:55])
    assert parser.next_event() is NEED_DATA


# --- The verdict corpus (tests/corpus/http_verdicts.py) -----------------------------------------
# The live conformance suite sends the same cases to a real server; here the parser alone must
# reach the same verdict, and an accepted request must give the app what the corpus says.

BASE_ENVIRON = base_environ("example.com", "80")
LONG_CASE = 256  # bytes; past this, two-piece cuts in the middle are sampled (every 13th)


def messages(data: bytes) -> tuple[list[tuple[Request, bytes]], int | None]:
    """Each complete request with its body, and the error status that ended parsing, if any."""
    parser = RequestParser(Limits(**LIMITS))
    done: list[tuple[Request, bytes]] = []
    current: list = []

    def drain() -> None:
        while (event := parser.next_event()) is not NEED_DATA:
            if isinstance(event, Request):
                current[:] = [event, b""]
            elif event is END_OF_MESSAGE:
                done.append((current[0], current[1]))
            elif event is PAUSED:
                parser.start_next()
            else:
                current[1] += event

    try:
        parser.feed(data)
        drain()
        parser.eof()
        drain()
    except HTTPError as exc:
        return done, exc.status
    return done, None


def app_view(request: Request, body: bytes) -> dict:
    """The report tests/apps/conformance_app.py would send back for this request."""
    environ = build_environ(request, BASE_ENVIRON, ("127.0.0.1", "40000"), None)
    return report(environ, body)


def verdict_id(case: Verdict) -> str:
    return f"{case.section}:{case.id}"


@pytest.mark.parametrize("case", VERDICTS, ids=verdict_id)
def test_verdict(case: Verdict):
    done, status = messages(case.raw)
    if case.status is None:  # cut short by the client's EOF: the parser says 400, nobody hears
        assert (done, status) == ([], 400)
    elif case.smuggle:
        assert (done, status) == ([], case.status)
        # Whatever follows a rejected request is never parsed.
        assert messages(case.raw + SMUGGLED % b"x") == ([], case.status)
    else:
        assert status is None
        assert len(done) == 1 + case.pipelined
        request, body = done[0]
        check_seen(app_view(request, body), case.sees or {})
        assert request.keep_alive is not case.closes
        assert request.expect_continue is (100 in case.interim)
        assert (request.method == "HEAD") is case.head


def cuts(data: bytes) -> range | list[int]:
    if len(data) <= LONG_CASE:
        return range(len(data) + 1)
    edge = LONG_CASE // 2  # every cut near both ends, a sample in between
    return [*range(edge), *range(edge, len(data) - edge, 13), *range(len(data) - edge,
                                                                      len(data) + 1)]


@pytest.mark.parametrize("case", VERDICTS, ids=verdict_id)
def test_verdict_is_the_same_however_the_bytes_arrive(case: Verdict):
    data = case.raw + (SMUGGLED % b"x" if case.smuggle else b"")
    expected = one(data, **LIMITS)
    for cut in cuts(data):
        assert run([data[:cut], data[cut:]], **LIMITS) == expected, f"cut at {cut}"
    assert run([data[i : i + 1] for i in range(len(data))], **LIMITS) == expected


# --- A connection's repeated head ----------------------------------------------------------------

REPEATED = b"GET /r?q=1 HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\n"


def keep_alive_heads(parser: RequestParser, *heads: bytes) -> list[Request]:
    """Each head fed alone on one keep-alive connection, as a client sends them one by one."""
    requests = []
    for data in heads:
        parser.feed(data)
        request = parser.next_event()
        assert isinstance(request, Request)
        assert parser.next_event() is END_OF_MESSAGE
        parser.start_next()
        requests.append(request)
    return requests


def test_a_repeated_head_is_answered_with_the_same_request():
    first, second, third = keep_alive_heads(RequestParser(), REPEATED, REPEATED, REPEATED)
    assert second is first and third is first  # nothing parsed again
    assert snapshot(first) == snapshot(head(REPEATED))


def test_only_the_last_head_is_remembered_and_a_byte_makes_it_another():
    other = REPEATED.replace(b"q=1", b"q=2")
    a, b, c, d = keep_alive_heads(RequestParser(), REPEATED, other, REPEATED, REPEATED)
    assert b is not a and c is not a and d is c
    assert (a.query, b.query, c.query) == ("q=1", "q=2", "q=1")
    assert snapshot(c) == snapshot(a)


def test_a_repeated_head_with_a_body_still_frames_its_body():
    post = b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n"
    parser = RequestParser()
    out: list = []
    for body in (b"abc", b"xyz"):
        parser.feed(post)
        request = parser.next_event()
        assert request.content_length == 3
        parser.feed(body)
        out.append((request, parser.next_event(), parser.next_event()))
        parser.start_next()
    (first, data1, end1), (second, data2, end2) = out
    assert second is first
    assert (data1, data2) == (b"abc", b"xyz") and end1 is end2 is END_OF_MESSAGE


def test_a_head_followed_by_pipelined_bytes_is_not_remembered_with_them():
    """Two identical heads in one read: both are served, in order, and the remembered text is
    one head, never the buffer holding two."""
    events = run([REPEATED * 2, REPEATED])
    requests = [snapshot_ for kind, snapshot_ in events if kind == "request"]
    assert len(requests) == 3 and requests[0] == requests[1] == requests[2]
    assert [kind for kind, _ in events] == ["request", "end"] * 3


def test_a_remembered_head_is_checked_under_its_own_parsers_limits():
    """What a head means depends on the limits; each parser remembers only its own heads."""
    assert keep_alive_heads(RequestParser(), REPEATED)
    strict = RequestParser(Limits(max_fields=1))
    strict.feed(REPEATED)
    with pytest.raises(HTTPError) as refused:
        strict.next_event()
    assert refused.value.status == 431
