"""HTTP/1.1 conformance and request-smuggling table, run against one real server over raw sockets.

Each case is raw request bytes and the outcome the server must produce: the status (or no
response at all), whether the connection ends afterwards, and, for requests the app answers,
what the app saw (``tests/apps/conformance_app.py`` reports method, path, query, headers and a
digest of the body, and records every call in a file this module reads back).

Every rejected request is followed in the same send by a hidden second request for
``/smuggled``. The server must answer the first with an error and ``Connection: close`` and never
parse what follows, so exactly one response comes back and the app never records ``/smuggled``.

References: RFC 9112 section 2.2 (message parsing), 3 (request line and target forms), 5 (field
lines), 6 (message body and framing), 7.1 (chunked coding); RFC 9110 section 5 (field syntax).
The server runs with ``--limit-request-body 1024`` so the 413 cases stay small.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ResponseReader, Server

BODY_LIMIT = 1024
LINE_LIMIT = 8190          # the server's default limit_request_line
FIELD_SIZE_LIMIT = 8190    # default limit_request_field_size
FIELD_COUNT_LIMIT = 100    # default limit_request_fields

CRLF = b"\r\n"
HOST = b"Host: example.com"
SMUGGLED = b"GET /smuggled?case=%s HTTP/1.1\r\nHost: example.com\r\n\r\n"
FOLLOW_UP = b"GET /after HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n"
ABSENT = None  # in an expected header map: the app must not see this header at all


def msg(line: bytes, *fields: bytes, body: bytes = b"") -> bytes:
    """A request from its request line, field lines and body, joined with CRLF."""
    return line + CRLF + b"".join(f + CRLF for f in fields) + CRLF + body


def post(*fields: bytes, body: bytes = b"", target: bytes = b"/upload") -> bytes:
    return msg(b"POST " + target + b" HTTP/1.1", HOST, *fields, body=body)


def chunked(body: bytes, *fields: bytes) -> bytes:
    """A POST with ``Transfer-Encoding: chunked`` and the given (raw) chunked body."""
    return post(b"Transfer-Encoding: chunked", *fields, body=body)


@dataclass(frozen=True)
class Case:
    id: str
    raw: bytes
    status: int | None            # None: no response at all (a truncated request)
    closes: bool                  # the server ends the connection after the response
    sees: dict[str, Any] | None = None   # subset of the app's report (accepted requests)
    app_called: bool = False
    smuggle: bool = False         # append a hidden /smuggled request after ``raw``
    half_close: bool = False      # shut down our sending side after ``raw``
    interim: tuple[int, ...] = ()  # 1xx responses expected before the final one
    head: bool = False            # a HEAD request: the response has no body
    pipelined: int = 0            # further requests inside ``raw``, each answered 200
    section: str = ""


CASES: list[Case] = []
_section = ""


def section(name: str) -> None:
    global _section
    _section = name


def accept(case_id: str, raw: bytes, sees: dict[str, Any] | None = None, *,
           closes: bool = False, interim: tuple[int, ...] = (), head: bool = False,
           pipelined: int = 0) -> None:
    """The app answers 200; unless ``closes``, the connection carries a follow-up request."""
    CASES.append(Case(case_id, raw, 200, closes, sees or {}, app_called=True, interim=interim,
                      head=head, pipelined=pipelined, section=_section))


def reject(case_id: str, raw: bytes, status: int = 400) -> None:
    """The server answers ``status`` itself, closes, and parses nothing after it."""
    CASES.append(Case(case_id, raw, status, True, smuggle=True, section=_section))


def dropped(case_id: str, raw: bytes) -> None:
    """A request cut short by the client's EOF: no answer, no app call, connection closed."""
    CASES.append(Case(case_id, raw, None, True, half_close=True, section=_section))


# ---------------------------------------------------------------------------------------------
section("request-line")  # RFC 9112 section 3 and 2.2

accept("origin-form-root", msg(b"GET / HTTP/1.1", HOST),
       {"method": "GET", "path": "/", "query": "", "protocol": "HTTP/1.1", "body_len": 0})
accept("origin-form-query", msg(b"GET /a/b?x=1&y=2 HTTP/1.1", HOST),
       {"path": "/a/b", "query": "x=1&y=2", "raw_uri": "/a/b?x=1&y=2"})
accept("origin-form-empty-query", msg(b"GET /p? HTTP/1.1", HOST), {"path": "/p", "query": ""})
accept("origin-form-second-question-mark", msg(b"GET /p?a?b HTTP/1.1", HOST),
       {"path": "/p", "query": "a?b"})
accept("origin-form-percent-utf8", msg(b"GET /caf%C3%A9 HTTP/1.1", HOST),
       {"path": "/caf\u00c3\u00a9", "raw_uri": "/caf%C3%A9"})
accept("origin-form-encoded-slash", msg(b"GET /a%2Fb HTTP/1.1", HOST),
       {"path": "/a/b", "raw_uri": "/a%2Fb"})
accept("absolute-form", msg(b"GET http://example.com/abs?q=1 HTTP/1.1", HOST),
       {"path": "/abs", "query": "q=1", "raw_uri": "http://example.com/abs?q=1"})
accept("absolute-form-empty-path", msg(b"GET http://example.com HTTP/1.1", HOST),
       {"path": "/", "query": ""})
accept("absolute-form-scheme-case", msg(b"GET HTTPS://example.com:8443/x HTTP/1.1", HOST),
       {"path": "/x"})
reject("absolute-form-other-scheme", msg(b"GET ftp://example.com/x HTTP/1.1", HOST))
reject("absolute-form-userinfo", msg(b"GET http://user@example.com/ HTTP/1.1", HOST))
accept("asterisk-form-options", msg(b"OPTIONS * HTTP/1.1", HOST),
       {"method": "OPTIONS", "path": "*"})
reject("asterisk-form-with-get", msg(b"GET * HTTP/1.1", HOST))
accept("authority-form-connect", msg(b"CONNECT example.com:443 HTTP/1.1", HOST,
                                     b"Connection: close"),
       {"method": "CONNECT", "path": "example.com:443"}, closes=True)
reject("authority-form-without-port", msg(b"CONNECT example.com HTTP/1.1", HOST))
reject("connect-with-origin-form", msg(b"CONNECT / HTTP/1.1", HOST))
reject("target-relative", msg(b"GET foo HTTP/1.1", HOST))
reject("target-fragment", msg(b"GET /a#frag HTTP/1.1", HOST))
reject("target-space", msg(b"GET /a b HTTP/1.1", HOST))
reject("target-non-ascii", msg(b"GET /caf\xc3\xa9 HTTP/1.1", HOST))
reject("target-ctl", msg(b"GET /a\x01b HTTP/1.1", HOST))
reject("target-del", msg(b"GET /a\x7fb HTTP/1.1", HOST))
reject("target-nul", msg(b"GET /a\x00b HTTP/1.1", HOST))
accept("method-extension-token", msg(b"PURGE /x HTTP/1.1", HOST), {"method": "PURGE"})
accept("method-case-preserved", msg(b"get / HTTP/1.1", HOST), {"method": "get"})
reject("method-separator-char", msg(b"GE(T / HTTP/1.1", HOST))
reject("method-non-ascii", msg(b"G\xc9T / HTTP/1.1", HOST))
reject("method-empty", msg(b" / HTTP/1.1", HOST))
reject("double-space-after-method", msg(b"GET  / HTTP/1.1", HOST))
reject("tab-as-separator", msg(b"GET\t/ HTTP/1.1", HOST))
reject("trailing-space-after-version", msg(b"GET / HTTP/1.1 ", HOST))
reject("method-only", msg(b"GET", HOST))
reject("http09-simple-request", b"GET /\r\n\r\n")
reject("version-0.9", msg(b"GET / HTTP/0.9", HOST), 505)
reject("version-2.0", msg(b"GET / HTTP/2.0", HOST), 505)
reject("version-3.0", msg(b"GET / HTTP/3.0", HOST), 505)
reject("h2-prior-knowledge-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505)
accept("version-1.2-served-as-1.1", msg(b"GET / HTTP/1.2", HOST), {"protocol": "HTTP/1.1"})
accept("version-1.9-served-as-1.1", msg(b"GET / HTTP/1.9", HOST), {"protocol": "HTTP/1.1"})
reject("version-lowercase", msg(b"GET / http/1.1", HOST))
reject("version-two-digit-minor", msg(b"GET / HTTP/1.10", HOST))
reject("version-leading-zero", msg(b"GET / HTTP/01.1", HOST))
reject("version-no-minor", msg(b"GET / HTTP/1", HOST))
reject("version-wrong-name", msg(b"GET / HTTX/1.1", HOST))
accept("http10-closes", msg(b"GET / HTTP/1.0"), {"protocol": "HTTP/1.0"}, closes=True)
accept("http10-keep-alive", msg(b"GET / HTTP/1.0", b"Connection: keep-alive"),
       {"protocol": "HTTP/1.0"})
accept("http11-connection-close", msg(b"GET / HTTP/1.1", HOST, b"Connection: close"),
       closes=True)
accept("connection-close-in-list", msg(b"GET / HTTP/1.1", HOST,
                                       b"Connection: keep-alive, close"), closes=True)
accept("connection-close-any-case", msg(b"GET / HTTP/1.1", HOST, b"Connection: CLOSE"),
       closes=True)
accept("head-request", msg(b"HEAD /h HTTP/1.1", HOST), {"method": "HEAD", "path": "/h"},
       head=True)
accept("one-empty-line-before-request", CRLF + msg(b"GET /e HTTP/1.1", HOST), {"path": "/e"})
reject("two-empty-lines-before-request", CRLF + CRLF + msg(b"GET / HTTP/1.1", HOST))
reject("bare-lf-before-request", b"\n" + msg(b"GET / HTTP/1.1", HOST))
reject("request-line-bare-lf", b"GET / HTTP/1.1\nHost: example.com\r\n\r\n")
reject("request-line-bare-cr", b"GET / HTTP/1.1\rHost: example.com\r\n\r\n")
reject("request-line-nul", msg(b"GET / HTTP/1.1\x00", HOST))

# ---------------------------------------------------------------------------------------------
section("fields")  # RFC 9110 section 5, RFC 9112 section 5

accept("field-ows-trimmed", msg(b"GET / HTTP/1.1", HOST, b"X-Pad:  \t v a l \t "),
       {"headers": {"HTTP_X_PAD": "v a l"}})
accept("field-without-ows", msg(b"GET / HTTP/1.1", HOST, b"X-Tight:v"),
       {"headers": {"HTTP_X_TIGHT": "v"}})
accept("field-empty-value", msg(b"GET / HTTP/1.1", HOST, b"X-Empty:"),
       {"headers": {"HTTP_X_EMPTY": ""}})
accept("field-htab-inside-value", msg(b"GET / HTTP/1.1", HOST, b"X-Tab: a\tb"),
       {"headers": {"HTTP_X_TAB": "a\tb"}})
accept("field-obs-text-latin1", msg(b"GET / HTTP/1.1", HOST, b"X-Latin: caf\xe9"),
       {"headers": {"HTTP_X_LATIN": "caf\u00e9"}})
accept("field-utf8-bytes-as-latin1", msg(b"GET / HTTP/1.1", HOST, b"X-Utf8: \xe2\x98\x83"),
       {"headers": {"HTTP_X_UTF8": "\u00e2\u0098\u0083"}})
accept("field-name-case-insensitive", msg(b"GET / HTTP/1.1", HOST, b"x-LoWeR: v"),
       {"headers": {"HTTP_X_LOWER": "v"}})
accept("field-name-all-tchars", msg(b"GET / HTTP/1.1", HOST, b"X!#$%&'*+.^`|~9: v"),
       {"headers": {"HTTP_X!#$%&'*+.^`|~9": "v"}})
accept("field-repeated-combined", msg(b"GET / HTTP/1.1", HOST, b"X-Dup: a", b"X-Dup: b"),
       {"headers": {"HTTP_X_DUP": "a, b"}})
accept("cookie-repeated-joined-with-semicolon",
       msg(b"GET / HTTP/1.1", HOST, b"Cookie: a=1", b"Cookie: b=2"),
       {"headers": {"HTTP_COOKIE": "a=1; b=2"}})
accept("underscore-field-dropped", msg(b"GET / HTTP/1.1", HOST, b"X_Secret: evil"),
       {"headers": {"HTTP_X_SECRET": ABSENT}})
accept("underscore-cannot-override-dash-after",
       msg(b"GET / HTTP/1.1", HOST, b"X-Forwarded-For: 10.0.0.1", b"X_Forwarded_For: 6.6.6.6"),
       {"headers": {"HTTP_X_FORWARDED_FOR": "10.0.0.1"}})
accept("underscore-cannot-override-dash-before",
       msg(b"GET / HTTP/1.1", HOST, b"X_Forwarded_For: 6.6.6.6", b"X-Forwarded-For: 10.0.0.1"),
       {"headers": {"HTTP_X_FORWARDED_FOR": "10.0.0.1"}})
accept("underscore-content-length-ignored",
       msg(b"GET / HTTP/1.1", HOST, b"Content_Length: 5"),
       {"body_len": 0, "headers": {"CONTENT_LENGTH": ABSENT}})
_disguised = b"0\r\n\r\n" + SMUGGLED % b"underscore-te"
accept("underscore-transfer-encoding-ignored",
       post(b"Transfer_Encoding: chunked", b"Content-Length: %d" % len(_disguised),
            body=_disguised),
       {"body_len": len(_disguised), "body": _disguised.decode(),
        "headers": {"HTTP_TRANSFER_ENCODING": ABSENT}})
reject("field-without-colon", msg(b"GET / HTTP/1.1", HOST, b"X-No-Colon"))
reject("space-before-colon", msg(b"GET / HTTP/1.1", b"Host : example.com"))
reject("tab-before-colon", msg(b"GET / HTTP/1.1", HOST, b"X-A\t: v"))
reject("space-inside-name", msg(b"GET / HTTP/1.1", HOST, b"X A: v"))
reject("whitespace-before-first-field", msg(b"GET / HTTP/1.1", b" Host: example.com"))
reject("obs-fold-space", msg(b"GET / HTTP/1.1", HOST, b"X-A: a", b" b"))
reject("obs-fold-tab", msg(b"GET / HTTP/1.1", HOST, b"X-A: a", b"\tb"))
reject("empty-field-name", msg(b"GET / HTTP/1.1", HOST, b": v"))
reject("field-name-separator-char", msg(b"GET / HTTP/1.1", HOST, b"X@A: v"))
reject("field-name-quote", msg(b"GET / HTTP/1.1", HOST, b'X"A: v'))
reject("field-name-latin1", msg(b"GET / HTTP/1.1", HOST, b"X-\xe9: v"))
reject("field-name-utf8", msg(b"GET / HTTP/1.1", HOST, b"X-\xe2\x98\x83: v"))
reject("field-value-nul", msg(b"GET / HTTP/1.1", HOST, b"X-A: a\x00b"))
reject("field-value-bare-cr", msg(b"GET / HTTP/1.1", HOST, b"X-A: a\rb"))
reject("field-value-ctl-soh", msg(b"GET / HTTP/1.1", HOST, b"X-A: a\x01b"))
reject("field-value-ctl-esc", msg(b"GET / HTTP/1.1", HOST, b"X-A: a\x1bb"))
reject("field-value-vertical-tab", msg(b"GET / HTTP/1.1", HOST, b"X-A: a\x0bb"))
reject("field-value-form-feed", msg(b"GET / HTTP/1.1", HOST, b"X-A: a\x0cb"))
reject("field-value-del", msg(b"GET / HTTP/1.1", HOST, b"X-A: a\x7fb"))
reject("field-line-bare-lf", b"GET / HTTP/1.1\r\nHost: example.com\nX-A: b\r\n\r\n")
reject("bare-lf-splits-transfer-encoding",
       b"POST / HTTP/1.1\r\nHost: example.com\r\nX-A: a\nTransfer-Encoding: chunked\r\n"
       b"Content-Length: 3\r\n\r\n0\r\n\r\n")
reject("bare-cr-splits-transfer-encoding",
       b"POST / HTTP/1.1\r\nHost: example.com\r\nX-A: a\rTransfer-Encoding: chunked\r\n"
       b"Content-Length: 3\r\n\r\n0\r\n\r\n")
reject("head-ends-with-bare-lf", b"GET / HTTP/1.1\r\nHost: example.com\r\n\n")
reject("head-ends-with-bare-cr", b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\r\n")
reject("host-missing-http11", msg(b"GET / HTTP/1.1"))
reject("host-repeated-same", msg(b"GET / HTTP/1.1", HOST, HOST))
reject("host-repeated-different", msg(b"GET / HTTP/1.1", HOST, b"Host: evil.example"))
reject("host-repeated-http10", msg(b"GET / HTTP/1.0", HOST, HOST))
reject("host-with-space", msg(b"GET / HTTP/1.1", b"Host: exa mple.com"))
reject("host-with-slash", msg(b"GET / HTTP/1.1", b"Host: example.com/evil"))
reject("host-with-userinfo", msg(b"GET / HTTP/1.1", b"Host: user@example.com"))
accept("host-empty-value", msg(b"GET / HTTP/1.1", b"Host:"), {"headers": {"HTTP_HOST": ""}})
accept("host-ipv6-literal", msg(b"GET / HTTP/1.1", b"Host: [::1]:8080"),
       {"headers": {"HTTP_HOST": "[::1]:8080"}})
accept("host-optional-http10", msg(b"GET / HTTP/1.0"), {"headers": {"HTTP_HOST": ABSENT}},
       closes=True)
accept("expect-100-continue", post(b"Content-Length: 5", b"Expect: 100-continue",
                                   body=b"hello"),
       {"body": "hello"}, interim=(100,))
accept("expect-100-continue-ignored-http10",
       msg(b"POST / HTTP/1.0", b"Content-Length: 5", b"Expect: 100-continue", body=b"hello"),
       {"body": "hello"}, closes=True)
reject("expect-unknown", msg(b"GET / HTTP/1.1", HOST, b"Expect: teapot"), 417)

# ---------------------------------------------------------------------------------------------
section("framing")  # RFC 9112 section 6

accept("content-length-body", post(b"Content-Length: 5", body=b"hello"),
       {"method": "POST", "body": "hello",
        "headers": {"CONTENT_LENGTH": "5", "HTTP_CONTENT_LENGTH": ABSENT}})
accept("content-length-zero", post(b"Content-Length: 0"), {"body_len": 0})
accept("no-length-means-no-body", post(), {"body_len": 0})
accept("get-with-body", msg(b"GET / HTTP/1.1", HOST, b"Content-Length: 3", body=b"abc"),
       {"method": "GET", "body": "abc"})
accept("content-length-leading-zeros", post(b"Content-Length: 005", body=b"hello"),
       {"body": "hello"})
accept("content-length-ows", post(b"Content-Length: \t5 ", body=b"hello"), {"body": "hello"})
accept("content-length-repeated-identical",
       post(b"Content-Length: 5", b"Content-Length: 5", body=b"hello"), {"body": "hello"})
_request_as_body = SMUGGLED % b"in-body"
accept("content-length-body-looks-like-request",
       post(b"Content-Length: %d" % len(_request_as_body), body=_request_as_body),
       {"body": _request_as_body.decode()})
accept("pipelined-after-body",
       post(b"Content-Length: 5", body=b"hello") + msg(b"GET /second HTTP/1.1", HOST),
       {"body": "hello"}, pipelined=1)
reject("content-length-plus-sign", post(b"Content-Length: +5", body=b"hello"))
reject("content-length-minus-sign", post(b"Content-Length: -5", body=b"hello"))
reject("content-length-list-same", post(b"Content-Length: 5, 5", body=b"hello"))
reject("content-length-list-different", post(b"Content-Length: 5, 0", body=b"hello"))
reject("content-length-list-empty-member", post(b"Content-Length: 5,", body=b"hello"))
reject("content-length-repeated-different",
       post(b"Content-Length: 5", b"Content-Length: 0", body=b"hello"))
reject("content-length-hex", post(b"Content-Length: 0x5", body=b"hello"))
reject("content-length-trailing-letter", post(b"Content-Length: 5a", body=b"hello"))
reject("content-length-decimal-point", post(b"Content-Length: 5.0", body=b"hello"))
reject("content-length-underscore", post(b"Content-Length: 0_5", body=b"hello"))
reject("content-length-inner-space", post(b"Content-Length: 5 5", body=b"hello"))
reject("content-length-empty", post(b"Content-Length:", body=b"hello"))
reject("content-length-unicode-digit", post(b"Content-Length: \xd9\xa5", body=b"hello"))
reject("content-length-19-digits", post(b"Content-Length: " + b"1" * 19, body=b"hello"))
reject("content-length-over-limit", post(b"Content-Length: %d" % (BODY_LIMIT + 1)), 413)
reject("content-length-huge", post(b"Content-Length: " + b"9" * 18), 413)
reject("content-length-and-chunked",
       post(b"Content-Length: 5", b"Transfer-Encoding: chunked", body=b"0\r\n\r\n"))
reject("chunked-and-content-length",
       post(b"Transfer-Encoding: chunked", b"Content-Length: 5", body=b"0\r\n\r\n"))
reject("content-length-zero-and-chunked",
       post(b"Content-Length: 0", b"Transfer-Encoding: chunked", body=b"0\r\n\r\n"))
reject("chunked-on-http10",
       msg(b"POST / HTTP/1.0", b"Transfer-Encoding: chunked", body=b"0\r\n\r\n"))
reject("chunked-and-length-on-http10",
       msg(b"POST / HTTP/1.0", b"Transfer-Encoding: chunked", b"Content-Length: 5",
           body=b"0\r\n\r\n"))
accept("chunked", chunked(b"5\r\nhello\r\n0\r\n\r\n"),
       {"body": "hello", "headers": {"CONTENT_LENGTH": ABSENT,
                                     "HTTP_TRANSFER_ENCODING": "chunked"}})
accept("chunked-uppercase-coding", post(b"Transfer-Encoding: CHUNKED",
                                        body=b"5\r\nhello\r\n0\r\n\r\n"), {"body": "hello"})
accept("chunked-ows-around-coding", post(b"Transfer-Encoding:   chunked  ",
                                         body=b"5\r\nhello\r\n0\r\n\r\n"), {"body": "hello"})
accept("chunked-htab-before-coding", post(b"Transfer-Encoding:\tchunked",
                                          body=b"5\r\nhello\r\n0\r\n\r\n"), {"body": "hello"})
reject("chunked-obs-folded", post(b"Transfer-Encoding:", b" chunked", body=b"0\r\n\r\n"))
reject("chunked-folded-under-other-field",
       post(b"X-A: a", b" Transfer-Encoding: chunked", body=b"0\r\n\r\n"))
reject("chunked-space-before-colon", post(b"Transfer-Encoding : chunked", body=b"0\r\n\r\n"))
reject("chunked-twice-in-list", post(b"Transfer-Encoding: chunked, chunked",
                                     body=b"0\r\n\r\n"))
reject("chunked-twice-as-fields",
       post(b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked", body=b"0\r\n\r\n"))
reject("coding-xchunked", post(b"Transfer-Encoding: xchunked", body=b"0\r\n\r\n"), 501)
reject("coding-chunked-suffix", post(b"Transfer-Encoding: chunkedx", body=b"0\r\n\r\n"), 501)
reject("coding-chunked-with-parameter",
       post(b"Transfer-Encoding: chunked;q=1", body=b"0\r\n\r\n"), 501)
reject("coding-quoted-chunked", post(b'Transfer-Encoding: "chunked"', body=b"0\r\n\r\n"), 501)
reject("coding-gzip-then-chunked", post(b"Transfer-Encoding: gzip, chunked",
                                        body=b"0\r\n\r\n"), 501)
reject("coding-gzip-then-chunked-as-fields",
       post(b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked", body=b"0\r\n\r\n"), 501)
reject("coding-chunked-not-final", post(b"Transfer-Encoding: chunked, gzip",
                                        body=b"0\r\n\r\n"))
reject("coding-identity", post(b"Transfer-Encoding: identity", body=b"0\r\n\r\n"), 501)
reject("coding-gzip-only", post(b"Transfer-Encoding: gzip", body=b"0\r\n\r\n"), 501)
reject("coding-empty", post(b"Transfer-Encoding:", body=b"0\r\n\r\n"))
reject("coding-empty-list-member", post(b"Transfer-Encoding: , chunked", body=b"0\r\n\r\n"))
reject("coding-vertical-tab", post(b"Transfer-Encoding:\x0bchunked", body=b"0\r\n\r\n"))
reject("coding-trailing-nul", post(b"Transfer-Encoding: chunked\x00", body=b"0\r\n\r\n"))
reject("coding-unicode-lookalike",
       post(b"Transfer-Encoding: chun\xe2\x84\xaaed", body=b"0\r\n\r\n"), 501)

# ---------------------------------------------------------------------------------------------
section("chunked")  # RFC 9112 section 7.1

accept("chunked-several-chunks", chunked(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
       {"body": "hello world"})
accept("chunk-size-uppercase-hex", chunked(b"A\r\n0123456789\r\n0\r\n\r\n"),
       {"body": "0123456789"})
accept("chunk-size-lowercase-hex", chunked(b"a\r\n0123456789\r\n0\r\n\r\n"),
       {"body": "0123456789"})
accept("chunk-size-leading-zeros", chunked(b"0005\r\nhello\r\n000\r\n\r\n"),
       {"body": "hello"})
accept("chunk-size-16-digits", chunked(b"0000000000000005\r\nhello\r\n0\r\n\r\n"),
       {"body": "hello"})
accept("chunk-extension", chunked(b"5;name=value\r\nhello\r\n0;last\r\n\r\n"),
       {"body": "hello"})
accept("chunk-extension-quoted", chunked(b'5;name="a b;\\"c"\r\nhello\r\n0\r\n\r\n'),
       {"body": "hello"})
accept("chunk-extension-bws", chunked(b"5 ; name = value\r\nhello\r\n0\r\n\r\n"),
       {"body": "hello"})
accept("chunked-empty-body", chunked(b"0\r\n\r\n"), {"body_len": 0})
accept("chunked-with-trailer", chunked(b"5\r\nhello\r\n0\r\nX-Trailer: v\r\n\r\n"),
       {"body": "hello", "headers": {"HTTP_X_TRAILER": ABSENT}})
_chunked_request = SMUGGLED % b"in-chunk"
accept("chunk-data-looks-like-request",
       chunked(b"%x\r\n%s\r\n0\r\n\r\n" % (len(_chunked_request), _chunked_request)),
       {"body": _chunked_request.decode()})
accept("chunk-data-holds-crlf", chunked(b"7\r\nab\r\n0\r\n\r\n0\r\n\r\n"),
       {"body": "ab\r\n0\r\n"})
reject("trailer-invalid-name", chunked(b"5\r\nhello\r\n0\r\nX Bad: v\r\n\r\n"))
reject("trailer-obs-fold", chunked(b"5\r\nhello\r\n0\r\nX-T: a\r\n b\r\n\r\n"))
reject("trailer-bare-lf", chunked(b"5\r\nhello\r\n0\r\nX-T: a\n\r\n"))
reject("chunk-size-0x-prefix", chunked(b"0x5\r\nhello\r\n0\r\n\r\n"))
reject("chunk-size-plus", chunked(b"+5\r\nhello\r\n0\r\n\r\n"))
reject("chunk-size-minus", chunked(b"-5\r\nhello\r\n0\r\n\r\n"))
reject("chunk-size-leading-space", chunked(b" 5\r\nhello\r\n0\r\n\r\n"))
reject("chunk-size-trailing-space", chunked(b"5 \r\nhello\r\n0\r\n\r\n"))
reject("chunk-size-trailing-tab", chunked(b"5\t\r\nhello\r\n0\r\n\r\n"))
reject("chunk-size-underscore", chunked(b"0_5\r\nhello\r\n0\r\n\r\n"))
reject("chunk-size-not-hex", chunked(b"g\r\nhello\r\n0\r\n\r\n"))
reject("chunk-size-unicode-digit", chunked(b"\xd9\xa5\r\nhello\r\n0\r\n\r\n"))
reject("chunk-size-empty", chunked(b"\r\nhello\r\n0\r\n\r\n"))
reject("chunk-size-17-digits", chunked(b"00000000000000005\r\nhello\r\n0\r\n\r\n"))
reject("chunk-size-overflows-64-bits", chunked(b"1" + b"0" * 16 + b"\r\nhello\r\n0\r\n\r\n"))
reject("chunk-size-over-limit", chunked(b"%x\r\n" % (BODY_LIMIT + 1)), 413)
reject("chunk-size-huge", chunked(b"FFFFFFFFFFFFFFFF\r\nhello\r\n0\r\n\r\n"), 413)
reject("chunked-body-over-limit-in-total",
       chunked(b"200\r\n" + b"a" * 512 + b"\r\n200\r\n" + b"b" * 512 + b"\r\n1\r\nc\r\n"), 413)
reject("chunk-data-longer-than-size", chunked(b"5\r\nhelloXX\r\n0\r\n\r\n"))
reject("chunk-data-missing-crlf", chunked(b"5\r\nhello0\r\n\r\n"))
reject("chunk-data-bare-lf", chunked(b"5\r\nhello\n0\r\n\r\n"))
reject("chunk-data-bare-cr", chunked(b"5\r\nhello\r0\r\n\r\n"))
reject("chunk-size-bare-lf", chunked(b"5\nhello\r\n0\r\n\r\n"))
reject("chunk-size-bare-cr", chunked(b"5\rhello\r\n0\r\n\r\n"))
reject("last-chunk-bare-lf", chunked(b"5\r\nhello\r\n0\n\r\n"))
reject("final-crlf-bare-lf", chunked(b"5\r\nhello\r\n0\r\n\n"))
reject("chunk-extension-without-name", chunked(b"5;=x\r\nhello\r\n0\r\n\r\n"))
reject("chunk-extension-space-in-name", chunked(b"5;a b\r\nhello\r\n0\r\n\r\n"))
reject("chunk-extension-ctl", chunked(b"5;a=\x01\r\nhello\r\n0\r\n\r\n"))
reject("chunk-extension-unterminated-quote", chunked(b'5;a="x\r\nhello\r\n0\r\n\r\n'))
reject("chunk-size-line-too-long", chunked(b"5;a=" + b"x" * (LINE_LIMIT + 10) + b"\r\n"))
dropped("truncated-head", b"GET / HTTP/1.1\r\nHost: example.com\r\n")
dropped("truncated-content-length-body", post(b"Content-Length: 10", body=b"hello"))
dropped("truncated-chunk-data", chunked(b"5\r\nhel"))
dropped("truncated-before-last-chunk", chunked(b"5\r\nhello\r\n"))
dropped("truncated-before-final-crlf", chunked(b"5\r\nhello\r\n0\r\n"))
dropped("truncated-in-trailer", chunked(b"5\r\nhello\r\n0\r\nX-T: v\r\n"))

# ---------------------------------------------------------------------------------------------
section("limits")  # 414, 431 and 413 are settings (design.md, "HTTP rules")

_long_path = b"/" + b"a" * (LINE_LIMIT - len(b"GET  HTTP/1.1") - 1)
accept("request-line-at-limit", msg(b"GET " + _long_path + b" HTTP/1.1", HOST),
       {"path": _long_path.decode()})
reject("request-line-over-limit",
       msg(b"GET " + _long_path + b"a HTTP/1.1", HOST), 414)
reject("request-line-far-over-limit", msg(b"GET /" + b"a" * 20000 + b" HTTP/1.1", HOST), 414)
reject("request-line-without-end", b"GET /" + b"a" * (LINE_LIMIT + 10), 414)
_fields = [b"X-F%d: v" % i for i in range(FIELD_COUNT_LIMIT - 1)]
accept("field-count-at-limit", msg(b"GET / HTTP/1.1", HOST, *_fields),
       {"headers": {f"HTTP_X_F{FIELD_COUNT_LIMIT - 2}": "v"}})
reject("field-count-over-limit", msg(b"GET / HTTP/1.1", HOST, *_fields, b"X-Last: v"), 431)
_value = b"v" * (FIELD_SIZE_LIMIT - len(b"X-Big: "))
accept("field-size-at-limit", msg(b"GET / HTTP/1.1", HOST, b"X-Big: " + _value),
       {"headers": {"HTTP_X_BIG": _value.decode()}})
reject("field-size-over-limit", msg(b"GET / HTTP/1.1", HOST, b"X-Big: v" + _value), 431)
reject("trailer-over-size-limit",
       chunked(b"0\r\nX-T: " + b"v" * FIELD_SIZE_LIMIT + b"\r\n\r\n"), 431)
accept("body-at-limit", post(b"Content-Length: %d" % BODY_LIMIT, body=b"z" * BODY_LIMIT),
       {"body_len": BODY_LIMIT})
accept("chunked-body-at-limit",
       chunked(b"200\r\n" + b"a" * 512 + b"\r\n200\r\n" + b"b" * 512 + b"\r\n0\r\n\r\n"),
       {"body_len": BODY_LIMIT})

# ---------------------------------------------------------------------------------------------
section("smuggling")  # classic desync pairs; each is followed by a hidden /smuggled request

reject("cl-te-classic",
       post(b"Content-Length: 6", b"Transfer-Encoding: chunked", body=b"0\r\n\r\nG"))
reject("te-cl-classic",
       post(b"Transfer-Encoding: chunked", b"Content-Length: 4", body=b"5c\r\nGPOS"))
reject("te-cl-obfuscated-coding",
       post(b"Transfer-Encoding: xchunked", b"Content-Length: 4", body=b"5c\r\nGPOS"))
reject("cl-te-coding-with-leading-comma",
       post(b"Content-Length: 5", b"Transfer-Encoding: ,chunked", body=b"0\r\n\r\n"))
reject("cl-list-hides-second-length", post(b"Content-Length: 0, 44", body=b"x" * 44))
reject("cl-cl-first-wins-elsewhere",
       post(b"Content-Length: 0", b"Content-Length: 44", body=b"x" * 44))
reject("te-header-name-with-trailing-space",
       post(b"Transfer-Encoding : chunked", b"Content-Length: 5", body=b"0\r\n\r\n"))
reject("te-header-name-with-leading-space",
       msg(b"POST / HTTP/1.1", b" Transfer-Encoding: chunked", HOST, b"Content-Length: 5",
           body=b"0\r\n\r\n"))
reject("te-value-with-nul",
       post(b"Transfer-Encoding: chunked\x00", b"Content-Length: 5", body=b"0\r\n\r\n"))
reject("host-duplicated-to-confuse-routing",
       msg(b"GET / HTTP/1.1", b"Host: public.example", b"Host: internal.example"))
reject("chunk-size-parsed-as-int-elsewhere",
       chunked(b"0x0\r\n\r\n"))
reject("chunk-size-wraps-32-bits-elsewhere",
       chunked(b"100000005\r\nhello\r\n0\r\n\r\n"), 413)
reject("zero-chunk-bare-lf-terminator", chunked(b"0\n\n"))
reject("chunk-size-lf-only-body-desync",
       chunked(b"2\nxx\r\n0\r\n\r\n"))

_ids = [case.id for case in CASES]
if len(_ids) != len(set(_ids)):
    raise RuntimeError(f"duplicate case ids: {sorted({i for i in _ids if _ids.count(i) > 1})}")


# ---------------------------------------------------------------------------------------------
# The server and the harness


@pytest.fixture(scope="module")
def conformance_server(tmp_path_factory):
    """One 2-worker server for the whole table; the app records into ``records_dir``."""
    records_dir = tmp_path_factory.mktemp("conformance-records")
    server = Server(tmp_path_factory.mktemp("conformance"), "tests.apps.conformance_app:app",
                    "--limit-request-body", str(BODY_LIMIT),
                    env={"CONFORMANCE_DIR": str(records_dir)})
    server.start()
    server.records_dir = records_dir
    server.first_workers = sorted(server.worker_pids())
    yield server
    server.stop()


def _records(directory: Path) -> list[dict[str, Any]]:
    try:
        text = (directory / "records.jsonl").read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines()]


def _read_to_eof(sock: socket.socket, buffered: bytes, timeout: float) -> bytes:
    """Everything the server still sends until it closes; fails if it does not close in time."""
    sock.settimeout(timeout)
    data = buffered
    while True:
        try:
            piece = sock.recv(65536)
        except ConnectionResetError:
            return data
        except TimeoutError:
            raise AssertionError(f"connection still open after {timeout}s; got {data!r}") from None
        if not piece:
            return data
        data += piece


def _check_seen(seen: dict[str, Any], expected: dict[str, Any]) -> None:
    for key, want in expected.items():
        if key == "headers":
            for name, value in want.items():
                if value is ABSENT:
                    assert name not in seen["headers"], f"app saw {name}={seen['headers'][name]!r}"
                else:
                    assert seen["headers"].get(name) == value, (name, seen["headers"])
        else:
            assert seen[key] == want, (key, seen[key], want)


def run_case(server: Server, case: Case, split: bool = False) -> None:
    """Send the case (in two pieces if ``split``) and check every promise the table makes."""
    before = len(_records(server.records_dir))
    raw = case.raw + (SMUGGLED % case.id.encode() if case.smuggle else b"")
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        if split:
            # Half now, half after a pause: the worker sees a partial message first, so its
            # incremental path (NEED_DATA, deadlines) must reach the same verdict.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            middle = len(case.raw) // 2
            sock.sendall(raw[:middle])
            time.sleep(0.01)
            raw_rest = raw[middle:]
        else:
            raw_rest = raw
        sock.sendall(raw_rest)
        if case.half_close:
            sock.shutdown(socket.SHUT_WR)
        reader = ResponseReader(sock)
        if case.status is None:
            rest = _read_to_eof(sock, b"", 5)
            assert rest == b"", f"expected no response, got {rest!r}"
        else:
            interim = []
            status, headers, body = reader.read(head_request=case.head)
            while status < 200:
                interim.append(status)
                status, headers, body = reader.read(head_request=case.head)
            assert tuple(interim) == case.interim
            assert status == case.status, body
            if case.status >= 400:
                assert headers.get("connection") == "close"
            if case.closes:
                rest = _read_to_eof(sock, reader.buf, 3)
                assert rest == b"", f"more than one response: {rest!r}"
            else:
                for _ in range(case.pipelined):
                    assert reader.read()[0] == 200
                sock.sendall(FOLLOW_UP)
                status, _, body = reader.read()
                assert status == 200 and json.loads(body)["path"] == "/after"
                assert _read_to_eof(sock, reader.buf, 3) == b""

    records = _records(server.records_dir)[before:]
    smuggled = [r for r in records if r["path"] == "/smuggled"]
    assert not smuggled, f"a hidden request reached the app: {smuggled}"
    mine = [r for r in records if r["path"] not in ("/after", "/second")]
    if case.app_called:
        assert len(mine) == 1, mine
        _check_seen(mine[0], case.sees or {})
    else:
        assert mine == [], f"the app was called for a rejected request: {mine}"


CASE_IDS = [f"{c.section}:{c.id}" for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_case(conformance_server, case: Case) -> None:
    run_case(conformance_server, case)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_case_split(conformance_server, case: Case) -> None:
    run_case(conformance_server, case, split=True)


SELF_CHECK = "harness-self-check"


def test_harness_notices_a_parsed_hidden_request(conformance_server) -> None:
    """The smuggling check must be able to fail: pipeline /smuggled behind a valid request."""
    case = Case(SELF_CHECK, msg(b"GET / HTTP/1.1", HOST), 200, False, {}, app_called=True,
                smuggle=True, pipelined=1)
    with pytest.raises(AssertionError, match="hidden request reached the app"):
        run_case(conformance_server, case)


def test_harness_notices_a_wrong_verdict(conformance_server) -> None:
    case = Case("harness-wrong-verdict", msg(b"GET / HTTP/1.1", HOST), 400, True, smuggle=True)
    with pytest.raises(AssertionError):
        run_case(conformance_server, case)


def test_table_is_large_enough_and_covers_every_section() -> None:
    counts = {name: sum(c.section == name for c in CASES)
              for name in ("request-line", "fields", "framing", "chunked", "limits",
                           "smuggling")}
    assert sum(counts.values()) == len(CASES) >= 100, counts
    assert all(counts.values()), counts
    # Every rejected case hides a second request; every accepted one proves reuse or close.
    assert all(c.smuggle for c in CASES if c.status is not None and c.status >= 400)


def test_no_smuggled_request_ever_reached_the_app(conformance_server) -> None:
    """Runs after the table (pytest keeps file order): the app's own tally must be empty."""
    hits = conformance_server.records_dir / "smuggled.log"
    lines = hits.read_text().splitlines() if hits.exists() else []
    # Only the harness self-checks above may have reached /smuggled (on purpose).
    assert [line for line in lines if "harness-" not in line] == []
    # And the server is still healthy: the workers it booted with, nothing crashed.
    assert sorted(conformance_server.worker_pids()) == conformance_server.first_workers
    assert "crash" not in conformance_server.log()
    assert "Traceback" not in conformance_server.log()
