"""The parser's fast paths give exactly the line-by-line path's answer, and are really taken.

A head that arrives whole is split on LF (each line keeping its CR) and its lines looked up
among the lines seen before, or matched one by one (``_parse_whole_head``); fed one byte at a
time, the same head goes through the reference line-by-line path. Each case here is one the fast
path treats specially (OWS after a value, dropped names, the caches, long lines, stray CR/LF, a
buffer holding more than the head), checked against the reference, with a spy proving which
path produced the request.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forkserver.http import parser as parser_module
from forkserver.http.parser import END_OF_MESSAGE, NEED_DATA, Limits, Request, RequestParser
from tests.unit.test_parser import run

BROWSER = (
    b"GET /catalogue?page=2 HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n"
    b"Accept: text/html,application/xhtml+xml,*/*;q=0.8\r\nAccept-Language: en-GB,en;q=0.7\r\n"
    b"Cookie: sessionid=3k9x; csrftoken=Zx81_kLm; theme=dark\r\nSec-Fetch-Mode: navigate\r\n\r\n"
)


@pytest.fixture
def fast_requests(monkeypatch) -> list[Request]:
    """Requests returned by the whole-head fast path during the test."""
    taken: list[Request] = []
    original = RequestParser._parse_whole_head

    def spy(self, start: int, end: int):
        request = original(self, start, end)
        if request is not None:
            taken.append(request)
        return request

    monkeypatch.setattr(RequestParser, "_parse_whole_head", spy)
    return taken


def same_both_ways(raw: bytes, **limits: int) -> list:
    """The events for ``raw`` sent whole, checked equal to those for ``raw`` byte by byte."""
    whole = run([raw], **limits)
    assert whole == run([raw[i:i + 1] for i in range(len(raw))], **limits)
    return whole


def headers(events: list) -> list[tuple[str, str]]:
    assert events[0][0] == "request", events
    return events[0][1]["headers"]


def test_a_browser_head_takes_the_fast_path(fast_requests) -> None:
    events = same_both_ways(BROWSER)
    assert len(fast_requests) == 1  # the whole send; byte by byte never reaches it
    assert headers(events)[4] == ("COOKIE", "sessionid=3k9x; csrftoken=Zx81_kLm; theme=dark")
    assert events[0][1]["path"] == "/catalogue" and events[0][1]["query"] == "page=2"


def test_field_names_are_interned(fast_requests) -> None:
    first, second = RequestParser(), RequestParser()
    first.feed(BROWSER)
    second.feed(BROWSER.replace(b"Sec-Fetch-Mode", b"sec-fetch-MODE"))
    a, b = first.next_event(), second.next_event()
    assert [name for name, _ in a.headers] == [name for name, _ in b.headers]
    assert all(x[0] is y[0] for x, y in zip(a.headers, b.headers, strict=True)
               if x[0] != "SEC-FETCH-MODE")


@pytest.mark.parametrize("line", [b"X-A: v \r\n", b"X-A: v\t\r\n", b"X-A:  \r\n", b"X-A:\t\r\n"])
def test_ows_after_a_value_goes_the_line_way_and_is_trimmed(fast_requests, line) -> None:
    events = same_both_ways(b"GET / HTTP/1.1\r\nHost: h\r\n" + line + b"\r\n")
    assert headers(events)[1] == ("X-A", line[4:-2].strip(b" \t").decode())
    assert not fast_requests


def test_an_empty_value_without_ows_stays_on_the_fast_path(fast_requests) -> None:
    events = same_both_ways(b"GET / HTTP/1.1\r\nHost: h\r\nX-Empty:\r\n\r\n")
    assert headers(events) == [("HOST", "h"), ("X-EMPTY", "")]
    assert len(fast_requests) == 1


def test_names_with_underscores_are_dropped_on_first_and_later_sight(fast_requests) -> None:
    raw = b"GET / HTTP/1.1\r\nHost: h\r\nX_Fresh_%d: 1\r\nX-Kept: 2\r\n\r\n"
    for attempt in range(2):
        events = same_both_ways(raw % attempt)
        assert headers(events) == [("HOST", "h"), ("X-KEPT", "2")]
    assert len(fast_requests) == 2
    assert not any("_" in name for name in parser_module._FIELD_KEYS)


def test_a_full_name_cache_changes_nothing(monkeypatch, fast_requests) -> None:
    monkeypatch.setattr(parser_module, "_FIELD_KEYS",
                        {f"junk{i}": f"JUNK{i}" for i in range(parser_module._FIELD_KEYS_MAX)})
    events = same_both_ways(BROWSER)
    assert headers(events)[0] == ("HOST", "127.0.0.1:8000")
    assert len(parser_module._FIELD_KEYS) == parser_module._FIELD_KEYS_MAX
    assert len(fast_requests) == 1


@pytest.mark.parametrize("host", [b"bad host", b"a@b", b"[::1", b"h:8x"])
def test_a_full_host_cache_still_rejects_invalid_hosts(monkeypatch, host) -> None:
    monkeypatch.setattr(parser_module, "_VALID_HOSTS",
                        {f"h{i}" for i in range(parser_module._VALID_HOSTS_MAX)})
    raw = b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
    assert same_both_ways(raw)[-1] == ("error", 400)
    assert host.decode() not in parser_module._VALID_HOSTS


def test_an_invalid_host_never_enters_the_cache() -> None:
    raw = b"GET / HTTP/1.1\r\nHost: in valid\r\n\r\n"
    for _ in range(2):
        assert same_both_ways(raw)[-1] == ("error", 400)
    assert "in valid" not in parser_module._VALID_HOSTS


@pytest.mark.parametrize("inside", [b"X-A: a\nb", b"X-A: a\rb", b"X-A\n: b", b"X-A: a\x00",
                                    b"X A: b", b"X-A : b", b" X-A: b", b"X-A\x7f: b"])
def test_stray_bytes_inside_a_field_line_get_the_reference_error(inside) -> None:
    events = same_both_ways(b"GET / HTTP/1.1\r\nHost: h\r\n" + inside + b"\r\n\r\n")
    assert events[-1] == ("error", 400)


def test_line_limits_hold_when_the_head_exceeds_one_field_size(fast_requests) -> None:
    short_lines = b"GET / HTTP/1.1\r\nHost: h\r\n" + b"".join(
        b"X-%d: %s\r\n" % (i, b"v" * 20) for i in range(6)) + b"\r\n"
    assert headers(same_both_ways(short_lines, max_field_size=40))[6] == ("X-5", "v" * 20)
    assert len(fast_requests) == 1
    one_long = short_lines.replace(b"X-3: " + b"v" * 20, b"X-3: " + b"v" * 40)
    assert same_both_ways(one_long, max_field_size=40)[-1] == ("error", 431)
    assert same_both_ways(short_lines, max_line=13)[-1] == ("error", 414)
    assert same_both_ways(short_lines, max_fields=6)[-1] == ("error", 431)


def test_an_empty_buffer_is_need_data_at_once(monkeypatch) -> None:
    parser = RequestParser(Limits())
    parser.feed(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    parser.next_event(), parser.next_event()
    parser.start_next()

    def fail(self):
        raise AssertionError("the line path ran for an empty buffer")

    monkeypatch.setattr(RequestParser, "_parse_head_lines", fail)
    assert parser.next_event() is NEED_DATA
    assert not parser.in_message
    parser.eof()  # a clean end between requests: no error
    assert parser.next_event() is NEED_DATA


def test_lists_handed_out_are_never_reused() -> None:
    parser = RequestParser(Limits())
    parser.feed(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"0\r\nX-Sum: 1\r\n\r\n")
    first = parser.next_event()
    while parser.next_event() is not parser_module.END_OF_MESSAGE:
        pass
    trailers = parser.trailers
    parser.start_next()
    for chunk in (b"GET / HTTP/1.1\r\n", b"Host: other\r\n", b"\r\n"):  # the line path
        parser.feed(chunk)
        second = parser.next_event()
    assert trailers == [("X-SUM", "1")] and parser.trailers == []
    assert first.headers == [("HOST", "h"), ("TRANSFER-ENCODING", "chunked")]
    assert second.headers == [("HOST", "other")]
    parser.next_event()
    parser.start_next()
    parser.feed(b"GET / HTTP/1.1\r\n")
    parser.next_event()
    parser.feed(b"Host: third\r\n\r\n")
    assert parser.next_event().headers == [("HOST", "third")]
    assert second.headers == [("HOST", "other")]


def test_known_lines_are_looked_up_not_matched(monkeypatch, fast_requests) -> None:
    first = same_both_ways(BROWSER)
    calls = []
    original = parser_module._field_lines
    monkeypatch.setattr(parser_module, "_field_lines", lambda lines: calls.append(lines)
                        or original(lines))
    parser = RequestParser()
    parser.feed(BROWSER)
    request = parser.next_event()
    assert headers(first) == request.headers and not calls  # every line was known
    assert parser.next_event() is parser_module.END_OF_MESSAGE
    parser.start_next()
    parser.feed(BROWSER.replace(b"theme=dark", b"theme=light"))
    assert parser.next_event().headers[4][1].endswith("theme=light")
    assert len(calls) == 1  # one new line: matched, then remembered


@pytest.mark.parametrize("inside", [b"X-A: a\nHost: h", b"Host: h\rX-A: a", b"Host: h\r\r"])
def test_a_known_line_glued_to_a_stray_cr_or_lf_is_not_known(inside) -> None:
    same_both_ways(b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\r\n\r\n")  # both lines now known
    events = same_both_ways(b"GET / HTTP/1.1\r\n" + inside + b"\r\n\r\n")
    assert events[-1] == ("error", 400)


def test_a_known_line_still_counts_against_a_smaller_field_size(fast_requests) -> None:
    raw = b"GET / HTTP/1.1\r\nHost: h\r\nX-Long: " + b"v" * 60 + b"\r\n\r\n"
    assert headers(same_both_ways(raw))[1] == ("X-LONG", "v" * 60)
    assert same_both_ways(raw, max_field_size=40)[-1] == ("error", 431)


def test_known_lines_are_bounded_and_skip_dropped_names(monkeypatch) -> None:
    monkeypatch.setattr(parser_module, "_KNOWN_LINES", {})
    for n in range(parser_module._KNOWN_LINES_MAX + 5):
        raw = b"GET / HTTP/1.1\r\nHost: h\r\nX-N: %d\r\nX_Drop: 1\r\n\r\n" % n
        assert headers(same_both_ways(raw)) == [("HOST", "h"), ("X-N", str(n))]
    known = parser_module._KNOWN_LINES
    assert 0 < len(known) <= parser_module._KNOWN_LINES_MAX
    assert not any(line.startswith("X_Drop") for line in known)
    long_line = "X-Big: " + "v" * parser_module._KNOWN_LINE_MAX
    same_both_ways(b"GET / HTTP/1.1\r\nHost: h\r\n" + long_line.encode() + b"\r\n\r\n")
    assert long_line + "\r" not in known and long_line not in known


def test_a_pipelined_head_without_fields_under_a_small_field_size() -> None:
    raw = b"GET / HTTP/1.0\r\n\r\n" * 2
    events = same_both_ways(raw, max_field_size=5)
    assert [event[0] for event in events].count("request") == 2


def test_unparsed_is_what_was_fed_and_not_consumed() -> None:
    parser = RequestParser()
    parser.feed(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHo")
    assert parser.unparsed().startswith(b"GET /a")
    assert parser.next_event().target == "/a"
    assert parser.next_event() is END_OF_MESSAGE
    parser.start_next()
    copy = parser.unparsed()
    assert copy == b"GET /b HTTP/1.1\r\nHo"
    parser.feed(b"st: h\r\n\r\n")
    assert copy == b"GET /b HTTP/1.1\r\nHo"  # a copy, not a view of the buffer
    assert parser.next_event().target == "/b"


def test_a_buffer_ending_like_a_head_may_hold_more_than_one(fast_requests) -> None:
    # Split whole because it ends with CRLFCRLF: the first empty line still ends the head.
    pipelined = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n"
    events = same_both_ways(pipelined)
    assert [e[1]["target"] for e in events if e[0] == "request"] == ["/a", "/b"]
    assert len(fast_requests) == 2
    body = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\n\r\nab\r\n\r\n"
    assert ("data", b"ab\r\n\r\n") in same_both_ways(body)
    assert same_both_ways(b"\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n")[-1] == ("error", 400)


@pytest.mark.parametrize("line, status", [
    (b"GET / HTTP/2.0", 505), (b"CONNECT / HTTP/1.1", 400), (b"GET * HTTP/1.1", 400),
    (b"GET h:1 HTTP/1.1", 400), (b"GET / HTTP/1.1 ", 400),
])
def test_a_refused_request_line_is_never_remembered(line, status) -> None:
    for _ in range(2):
        assert same_both_ways(line + b"\r\nHost: h\r\n\r\n")[-1] == ("error", status)
    assert line.decode() + "\r" not in parser_module._KNOWN_REQUEST_LINES


@pytest.mark.parametrize("target, path, query, host", [
    (b"/p?q=1?2", "/p", "q=1?2", "h"), (b"*", "*", "", "h"),
    (b"http://a.example:8/x?y", "/x", "y", "a.example:8"), (b"HTTP://a", "/", "", "a"),
])
def test_a_known_request_line_means_what_it_meant(target, path, query, host) -> None:
    method = b"OPTIONS" if target == b"*" else b"GET"
    raw = method + b" " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n"
    for _ in range(2):  # matched, then looked up
        request = same_both_ways(raw)[0][1]
        assert (request["path"], request["query"], request["host"]) == (path, query, host)
    assert (method + b" " + target + b" HTTP/1.1\r").decode() in parser_module._KNOWN_REQUEST_LINES


def test_known_request_lines_are_bounded(monkeypatch) -> None:
    monkeypatch.setattr(parser_module, "_KNOWN_REQUEST_LINES", {})
    for n in range(parser_module._KNOWN_REQUEST_LINES_MAX + 5):
        assert same_both_ways(b"GET /%d HTTP/1.1\r\nHost: h\r\n\r\n" % n)[0][1]["path"] == f"/{n}"
    assert 0 < len(parser_module._KNOWN_REQUEST_LINES) <= parser_module._KNOWN_REQUEST_LINES_MAX


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_known_lines_with_stray_bytes_anywhere_get_the_reference_answer(data) -> None:
    # Every line below is known (seen whole before); a stray CR, LF, CRLF or space put anywhere
    # must give what the line-by-line path gives, however the caches are keyed.
    base = BROWSER + b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n"
    same_both_ways(base)
    at = data.draw(st.integers(0, len(base)))
    stray = data.draw(st.sampled_from([b"\r", b"\n", b"\r\n", b" ", b"\r\r\n", b"\n\r"]))
    same_both_ways(base[:at] + stray + base[at:])


@pytest.mark.parametrize("raw", [b"GET / HTTP/1.1X\nHost: h\r\n\r\n",
                                 b"GET / HTTP/1.1\r\nHost: hX\nX-A: a\r\n\r\n"])
def test_a_line_ended_by_a_bare_lf_is_never_read_as_one_ended_by_crlf(raw) -> None:
    # The fast path splits on LF and takes each line's last byte for its CR: it must be one.
    assert same_both_ways(raw)[-1] == ("error", 400)


def test_the_line_path_counts_each_head_from_zero() -> None:
    # The second head's request line is measured against max_line (414), not against what
    # is left of a cap the first head used up (431).
    raw = b"0 / HTTP/1.0\r\n\r\n00 / HTTP/1.0\r\n\r\n"
    limits = {"max_line": 12, "max_fields": 1, "max_field_size": 5}
    assert run([raw[:14], raw[14:]], **limits) == run([raw], **limits)
    assert run([raw], **limits)[-1] == ("error", 414)


def test_start_next_says_whether_a_next_request_is_buffered() -> None:
    parser = RequestParser()
    parser.feed(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHo")
    parser.next_event(), parser.next_event()
    assert parser.start_next() is True  # part of /b is pipelined
    assert parser.in_message and parser.next_event() is NEED_DATA
    parser.feed(b"st: h\r\n\r\n")
    assert parser.next_event().target == "/b" and parser.next_event() is END_OF_MESSAGE
    assert parser.start_next() is False  # nothing left: what next_event and in_message say
    assert not parser.in_message and parser.next_event() is NEED_DATA
    parser.eof()  # a clean end between requests
