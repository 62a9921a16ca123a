"""Property tests for the request parser.

Three claims, each over generated input:
* whatever the bytes, the parser answers with events or an HTTPError, never another exception;
* valid requests (any framing, pipelined) come out exactly as they were generated;
* cutting the input anywhere changes nothing: the events, body bytes, trailers and the final
  error are those of a one-shot parse (style.md rule 4).
"""

from __future__ import annotations

import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forkserver.http.parser import RequestParser
from tests.unit.test_parser import one, run

SETTINGS = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

TCHARS = "!#$%&'*+-.^_`|~" + string.digits + string.ascii_letters
VALUE_CHARS = "\t" + "".join(map(chr, range(0x20, 0x7F))) + "".join(map(chr, range(0x80, 0x100)))
TARGET_CHARS = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in "#?")
SPECIAL = {"HOST", "CONTENT-LENGTH", "TRANSFER-ENCODING", "CONNECTION", "EXPECT"}

tokens = st.text(TCHARS, min_size=1, max_size=8)
field_names = tokens.filter(lambda name: name.upper() not in SPECIAL)
field_values = st.text(VALUE_CHARS, max_size=16)
ext_values = st.one_of(tokens, st.text(VALUE_CHARS.replace('"', "").replace("\\", ""),
                                       max_size=6).map(lambda s: f'"{s}"'))
chunk_exts = st.lists(
    st.tuples(tokens, st.none() | ext_values).map(
        lambda pair: f";{pair[0]}" + (f"={pair[1]}" if pair[1] is not None else "")
    ),
    max_size=2,
).map("".join)

# Bytes a mutation inserts: mostly the ones the grammar cares about.
INTERESTING = b"\r\n\t :;,=\"\\/?#*0aF-_\x00\x01\x7f\x80\xff"
limits = st.fixed_dictionaries(
    {
        "max_line": st.integers(10, 80),
        "max_fields": st.integers(1, 8),
        "max_field_size": st.integers(5, 40),
        "max_body": st.integers(0, 40),
    }
)


@st.composite
def requests(draw):
    """(wire bytes, expected events) for one valid request."""
    method = draw(tokens.filter(lambda m: m != "CONNECT"))  # CONNECT needs host:port
    target = "/" + draw(st.text(TARGET_CHARS, max_size=12))
    query = draw(st.none() | st.text(TARGET_CHARS + "?", max_size=8))
    if query is not None:
        target += "?" + query
    minor = draw(st.sampled_from([0, 1]))
    fields = draw(st.lists(st.tuples(field_names, field_values), max_size=5))
    framing = draw(st.sampled_from(["none", "length", "chunked"] if minor else ["none", "length"]))
    lines = [f"{method} {target} HTTP/1.{minor}"]
    if minor or draw(st.booleans()):
        lines.append("Host: example.com")
    for name, value in fields:
        lines.append(f"{name}:{value}")
    body = b""
    trailers: list[tuple[str, str]] = []
    tail = b""
    if framing == "length":
        body = draw(st.binary(max_size=30))
        lines.append(f"Content-Length: {len(body)}")
        tail = body
    elif framing == "chunked":
        lines.append("Transfer-Encoding: chunked")
        chunks = draw(st.lists(st.binary(min_size=1, max_size=12), max_size=4))
        for chunk in chunks:
            tail += f"{len(chunk):x}{draw(chunk_exts)}\r\n".encode() + chunk + b"\r\n"
        tail += f"0{draw(chunk_exts)}\r\n".encode()
        trailer_fields = draw(st.lists(st.tuples(field_names, field_values), max_size=2))
        for name, value in trailer_fields:
            tail += f"{name}:{value}\r\n".encode("latin-1")
        tail += b"\r\n"
        body = b"".join(chunks)
        trailers = [(n.upper(), v.strip(" \t")) for n, v in trailer_fields if "_" not in n]
    wire = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + tail
    expected_fields = [(n.upper(), v.strip(" \t")) for n, v in fields if "_" not in n]
    expected = {
        "method": method,
        "target": target,
        "path": target.partition("?")[0],
        "query": target.partition("?")[2],
        "minor": minor,
        "fields": expected_fields,
        "body": body,
        "trailers": trailers,
    }
    return wire, expected


@st.composite
def mutated(draw):
    """A valid request (or two, pipelined) with a few bytes inserted, deleted or replaced."""
    wire = draw(requests())[0]
    if draw(st.booleans()):
        wire += draw(requests())[0]
    data = bytearray(wire)
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["insert", "delete", "replace", "duplicate"]))
        byte = draw(st.sampled_from(INTERESTING) | st.integers(0, 255))
        if action == "insert":
            data[at:at] = bytes([byte])
        elif at < len(data):
            if action == "delete":
                del data[at]
            elif action == "replace":
                data[at] = byte
            else:
                data[at:at] = data[at : at + draw(st.integers(1, 20))]
    return bytes(data)


def cuts(data: bytes, positions: list[int]) -> list[bytes]:
    points = sorted({p % (len(data) + 1) for p in positions})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


def check_events(events: list, expected: dict) -> list:
    """Match the leading events against one expected request; return the rest."""
    kind, request = events[0]
    assert kind == "request"
    assert request["method"] == expected["method"]
    assert request["target"] == expected["target"]
    assert request["path"] == expected["path"]
    assert request["query"] == expected["query"]
    assert request["minor"] == expected["minor"]
    assert [f for f in request["headers"] if f[0] not in SPECIAL] == expected["fields"]
    rest = events[1:]
    if expected["body"]:
        assert rest[0] == ("data", expected["body"])
        rest = rest[1:]
    assert rest[0] == ("end", expected["trailers"])
    return rest[1:]


@SETTINGS
@given(st.binary(max_size=200), st.lists(st.integers(0, 400), max_size=4))
def test_random_bytes_raise_only_http_errors(data, positions):
    # run() catches HTTPError only; anything else fails the test.
    assert run(cuts(data, positions)) == one(data)


@SETTINGS
@given(st.lists(requests(), min_size=1, max_size=3), st.lists(st.integers(0, 2000), max_size=5))
def test_valid_requests_parse_to_what_was_sent(generated, positions):
    wire = b"".join(w for w, _ in generated)
    events = run(cuts(wire, positions))
    for _, expected in generated:
        events = check_events(events, expected)
    assert events == []


@SETTINGS
@given(mutated(), st.lists(st.integers(0, 2000), max_size=6))
def test_mutated_requests_split_anywhere_match_one_shot(data, positions):
    assert run(cuts(data, positions)) == one(data)


@SETTINGS
@given(mutated(), limits, st.lists(st.integers(0, 2000), max_size=4))
def test_limits_split_anywhere_match_one_shot(data, limit_values, positions):
    expected = one(data, **limit_values)
    assert run(cuts(data, positions), **limit_values) == expected


@settings(max_examples=60, deadline=None)
@given(mutated())
def test_byte_by_byte_matches_one_shot(data):
    assert run([data[i : i + 1] for i in range(len(data))]) == one(data)


@SETTINGS
@given(mutated())
def test_a_failed_parser_stays_failed(data):
    parser = RequestParser()
    parser.feed(data)
    error = None
    for _ in range(50):
        try:
            event = parser.next_event()
        except Exception as exc:  # noqa: BLE001 - any exception is checked below
            error = exc
            break
        if repr(event) == "PAUSED":
            parser.start_next()
        elif repr(event) == "NEED_DATA":
            break
    if error is not None:
        for _ in range(2):
            try:
                parser.next_event()
            except Exception as again:  # noqa: BLE001
                assert again is error
            else:
                raise AssertionError("a failed parser returned an event")
