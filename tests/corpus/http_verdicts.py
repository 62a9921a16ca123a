"""One corpus of HTTP verdicts: raw request bytes and what the server must make of them.

Every case is data: the bytes a client sends and the verdict, either a status the server answers
itself (then ``Connection: close``, and nothing after the bytes is ever parsed), no answer at all
(the client's EOF cuts the request short), or "accepted": the app answers 200 and ``sees`` is a
subset of what it saw (method, PATH_INFO, query, RAW_URI, protocol, headers as environ keys,
body). Two runners read it, so one table is kept instead of three:

* ``tests/unit/test_parser.py`` feeds each case to the sans-IO parser (whole, at every two-piece
  cut and byte by byte) and builds the environ the app would get;
* ``tests/conformance/test_conformance.py`` sends each case to a live server over a raw socket
  (whole and split), with a hidden ``/smuggled`` request behind every rejected one.

Both use ``LIMITS``: the server's default line and field limits and a 1 KiB body limit
(``SERVER_ARGS``), so the 413 cases stay small. References: RFC 9112 sections 2.2, 3, 5, 6, 7.1;
RFC 9110 section 5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BODY_LIMIT = 1024
LINE_LIMIT = 8190          # the server's default limit_request_line
FIELD_SIZE_LIMIT = 8190    # default limit_request_field_size
FIELD_COUNT_LIMIT = 100    # default limit_request_fields
LIMITS = {"max_line": LINE_LIMIT, "max_fields": FIELD_COUNT_LIMIT,
          "max_field_size": FIELD_SIZE_LIMIT, "max_body": BODY_LIMIT}
SERVER_ARGS = ("--limit-request-body", str(BODY_LIMIT))

CRLF = b"\r\n"
HOST = b"Host: example.com"
SMUGGLED = b"GET /smuggled?case=%s HTTP/1.1\r\nHost: example.com\r\n\r\n"
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
class Verdict:
    id: str
    raw: bytes
    status: int | None            # None: no response at all (a truncated request)
    closes: bool                  # the server ends the connection after the response
    sees: dict[str, Any] | None = None   # subset of the app's report (accepted requests)
    app_called: bool = False
    smuggle: bool = False         # a hidden /smuggled request follows ``raw``
    half_close: bool = False      # the client shuts down its sending side after ``raw``
    interim: tuple[int, ...] = ()  # 1xx responses expected before the final one
    head: bool = False            # a HEAD request: the response has no body
    pipelined: int = 0            # further requests inside ``raw``, each answered 200
    section: str = ""


VERDICTS: list[Verdict] = []
_section = ""


def section(name: str) -> None:
    global _section
    _section = name


def accept(case_id: str, raw: bytes, sees: dict[str, Any] | None = None, *,
           closes: bool = False, interim: tuple[int, ...] = (), head: bool = False,
           pipelined: int = 0) -> None:
    """The app answers 200; unless ``closes``, the connection carries a follow-up request."""
    VERDICTS.append(Verdict(case_id, raw, 200, closes, sees or {}, app_called=True,
                            interim=interim, head=head, pipelined=pipelined, section=_section))


def reject(case_id: str, raw: bytes, status: int = 400) -> None:
    """The server answers ``status`` itself, closes, and parses nothing after it."""
    VERDICTS.append(Verdict(case_id, raw, status, True, smuggle=True, section=_section))


def dropped(case_id: str, raw: bytes) -> None:
    """A request cut short by the client's EOF: no answer, no app call, connection closed."""
    VERDICTS.append(Verdict(case_id, raw, None, True, half_close=True, section=_section))


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
accept("http10-closes-host-optional", msg(b"GET / HTTP/1.0"),
       {"protocol": "HTTP/1.0", "headers": {"HTTP_HOST": ABSENT}}, closes=True)
accept("http10-keep-alive", msg(b"GET / HTTP/1.0", b"Connection: keep-alive"),
       {"protocol": "HTTP/1.0"})
accept("http11-connection-close", msg(b"GET / HTTP/1.1", HOST, b"Connection: close"),
       closes=True)
accept("connection-close-in-list", msg(b"GET / HTTP/1.1", HOST,
                                       b"Connection: keep-alive, close"), closes=True)
accept("connection-close-any-case", msg(b"GET / HTTP/1.1", HOST, b"Connection: CLOSE"),
       closes=True)
accept("connection-close-capitalised", msg(b"GET / HTTP/1.1", HOST, b"Connection: Close"),
       closes=True)
accept("http10-keep-alive-capitalised", msg(b"GET / HTTP/1.0", b"Connection: Keep-Alive"),
       {"protocol": "HTTP/1.0"})
accept("http10-connection-close", msg(b"GET / HTTP/1.0", b"Connection: close"),
       {"protocol": "HTTP/1.0"}, closes=True)
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
# The parser's own EOF table (terse requests: `Host: a`, `POST /submit`).
dropped("truncated-first-byte", b"G")
dropped("truncated-head-terse", b"GET / HTTP/1.1\r\nHost: a\r\n")
dropped("truncated-final-cr", b"GET / HTTP/1.1\r\nHost: a\r\n\r")
dropped("truncated-lone-cr", b"\r")
dropped("truncated-length-body-terse",
        b"POST /submit HTTP/1.1\r\nHost: example.com\r\nContent-Length: 5\r\n\r\nabcd")
_submit = b"POST /submit HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\n"
dropped("truncated-before-first-chunk", _submit)
dropped("truncated-chunk-data-terse", _submit + b"5\r\nab")
dropped("truncated-after-chunk-data", _submit + b"5\r\nabcde")
dropped("truncated-after-chunk-cr", _submit + b"5\r\nabcde\r")
dropped("truncated-before-final-crlf-terse", _submit + b"5\r\nabcde\r\n0\r\n")
dropped("truncated-in-trailer-terse", _submit + b"5\r\nabcde\r\n0\r\nX-T: 1\r\n")

# ---------------------------------------------------------------------------------------------
section("limits")  # 414, 431 and 413 are settings (docs/architecture.md, section 5)

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

# ---------------------------------------------------------------------------------------------
# The parser's own rejection table (terse requests: `Host: a`, `POST /submit`).
section("request-line")
reject("bare-lf-ends-request-line", b'GET / HTTP/1.1\nHost: a\r\n\r\n')
reject("bare-lf-ends-header", b'GET / HTTP/1.1\r\nHost: a\n\r\n')
reject("bare-lf-as-empty-line", b'GET / HTTP/1.1\r\nHost: a\r\n\n')
reject("all-bare-lf", b'GET / HTTP/1.1\nHost: a\n\n')
reject("bare-lf-first", b'\nGET / HTTP/1.1\r\nHost: a\r\n\r\n')
reject("bare-cr-in-request-line", b'GET /\r HTTP/1.1\r\nHost: a\r\n\r\n')
reject("bare-cr-in-value", b'GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n')
reject("cr-cr-lf", b'GET / HTTP/1.1\r\r\nHost: a\r\n\r\n')
reject("bare-cr-as-terminator", b'GET / HTTP/1.1\rHost: a\r\n\r\n')
reject("two-empty-lines-first", b'\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n')
reject("empty-line-only-twice", b'\r\n\r\n')
reject("double-space", b'GET  / HTTP/1.1\r\nHost: a\r\n\r\n')
reject("space-before-version-twice", b'GET /  HTTP/1.1\r\nHost: a\r\n\r\n')
reject("trailing-space", b'GET / HTTP/1.1 \r\nHost: a\r\n\r\n')
reject("leading-space", b' GET / HTTP/1.1\r\nHost: a\r\n\r\n')
reject("tab-separator", b'GET\t/ HTTP/1.1\r\nHost: a\r\n\r\n')
reject("missing-target", b'GET HTTP/1.1\r\nHost: a\r\n\r\n')
reject("missing-version", b'GET /\r\nHost: a\r\n\r\n')
reject("method-not-a-token", b'GE(T / HTTP/1.1\r\nHost: a\r\n\r\n')
reject("method-with-obs-text", b'G\xc9T / HTTP/1.1\r\nHost: a\r\n\r\n')
reject("target-with-fragment", b'GET /a#b HTTP/1.1\r\nHost: a\r\n\r\n')
reject("target-with-del", b'GET /a\x7f HTTP/1.1\r\nHost: a\r\n\r\n')
reject("target-with-obs-text", b'GET /caf\xe9 HTTP/1.1\r\nHost: a\r\n\r\n')
reject("target-with-nul", b'GET /\x00 HTTP/1.1\r\nHost: a\r\n\r\n')
reject("target-relative-terse", b'GET index.html HTTP/1.1\r\nHost: a\r\n\r\n')
reject("asterisk-with-get", b'GET * HTTP/1.1\r\nHost: a\r\n\r\n')
reject("authority-with-get", b'GET a.com:80 HTTP/1.1\r\nHost: a\r\n\r\n')
reject("connect-origin-form", b'CONNECT / HTTP/1.1\r\nHost: a\r\n\r\n')
reject("connect-without-port", b'CONNECT a.com HTTP/1.1\r\nHost: a\r\n\r\n')
reject("connect-absolute", b'CONNECT http://a.com:80/ HTTP/1.1\r\nHost: a\r\n\r\n')
reject("connect-asterisk", b'CONNECT * HTTP/1.1\r\nHost: a\r\n\r\n')
reject("other-scheme", b'GET ftp://a.com/ HTTP/1.1\r\nHost: a\r\n\r\n')
reject("empty-host-in-uri", b'GET http:///p HTTP/1.1\r\nHost: a\r\n\r\n')
reject("userinfo-in-uri", b'GET http://u@a.com/ HTTP/1.1\r\nHost: a\r\n\r\n')
reject("garbage-after-authority", b'GET http://a.com"x HTTP/1.1\r\nHost: a\r\n\r\n')
reject("version-lower-case", b'GET / http/1.1\r\nHost: a\r\n\r\n')
reject("version-without-minor", b'GET / HTTP/1\r\nHost: a\r\n\r\n')
reject("version-two-digit-major", b'GET / HTTP/11.1\r\nHost: a\r\n\r\n')
reject("version-two-digit-minor-terse", b'GET / HTTP/1.10\r\nHost: a\r\n\r\n')
reject("version-extra", b'GET / HTTP/1.1.1\r\nHost: a\r\n\r\n')
reject("version-letters", b'GET / HTTP/1.x\r\nHost: a\r\n\r\n')
reject("version-2-0", b'GET / HTTP/2.0\r\nHost: a\r\n\r\n', 505)
reject("version-0-9", b'GET / HTTP/0.9\r\nHost: a\r\n\r\n', 505)
reject("version-3-1", b'GET / HTTP/3.1\r\nHost: a\r\n\r\n', 505)
section("fields")
reject("space-before-colon-terse", b'GET / HTTP/1.1\r\nHost : a\r\n\r\n')
reject("tab-before-colon-terse", b'GET / HTTP/1.1\r\nHost\t: a\r\n\r\n')
reject("obs-fold", b'GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n')
reject("obs-fold-tab-terse", b'GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n\tc\r\n\r\n')
reject("fold-first-line", b'GET / HTTP/1.1\r\n Host: a\r\n\r\n')
reject("no-colon", b'GET / HTTP/1.1\r\nHost: a\r\nX-A\r\n\r\n')
reject("empty-name", b'GET / HTTP/1.1\r\nHost: a\r\n: x\r\n\r\n')
reject("name-not-a-token", b'GET / HTTP/1.1\r\nHost: a\r\nX(A): b\r\n\r\n')
reject("name-with-obs-text", b'GET / HTTP/1.1\r\nHost: a\r\nX\xe9: b\r\n\r\n')
reject("nul-in-value", b'GET / HTTP/1.1\r\nHost: a\r\nX-A: b\x00c\r\n\r\n')
reject("ctl-in-value", b'GET / HTTP/1.1\r\nHost: a\r\nX-A: b\x01\r\n\r\n')
reject("vt-in-value", b'GET / HTTP/1.1\r\nHost: a\r\nX-A: b\x0bc\r\n\r\n')
reject("esc-in-value", b'GET / HTTP/1.1\r\nHost: a\r\nX-A: \x1b[1m\r\n\r\n')
reject("del-in-value", b'GET / HTTP/1.1\r\nHost: a\r\nX-A: b\x7f\r\n\r\n')
reject("missing-host", b'GET / HTTP/1.1\r\nX-A: b\r\n\r\n')
reject("repeated-host", b'GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n')
reject("repeated-host-1-0", b'GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n')
reject("host-with-space-terse", b'GET / HTTP/1.1\r\nHost: a b\r\n\r\n')
reject("host-with-slash-terse", b'GET / HTTP/1.1\r\nHost: a/b\r\n\r\n')
reject("host-with-userinfo-terse", b'GET / HTTP/1.1\r\nHost: u@a\r\n\r\n')
reject("host-bad-port", b'GET / HTTP/1.1\r\nHost: a:8x\r\n\r\n')
section("framing")
reject("cl-sign", b'POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\nx')
reject("cl-negative", b'POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n')
reject("cl-inner-space", b'POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1 1\r\n\r\n')
reject("cl-list", b'POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1,1\r\n\r\nx')
reject("cl-hex", b'POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x1\r\n\r\nx')
reject("cl-empty", b'POST / HTTP/1.1\r\nHost: a\r\nContent-Length:\r\n\r\n')
reject("cl-decimal", b'POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1.0\r\n\r\nx')
reject("cl-superscript", b'POST / HTTP/1.1\r\nHost: a\r\nContent-Length: \xb2\r\n\r\nxx')
reject("cl-19-digits", (b'POST / HTTP/1.1\r\nHost: a\r\n'
                        b'Content-Length: 1000000000000000000\r\n\r\n'))
reject("cl-differing", (b'POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n'
                        b'Content-Length: 2\r\n\r\nxx'))
reject("cl-differing-spelling", (b'POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n'
                                 b'Content-Length: 01\r\n\r\nx'))
reject("te-and-cl", (b'POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n'
                     b'Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n'))
reject("te-gzip", b'POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n', 501)
reject("te-identity", b'POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n', 501)
reject("te-gzip-then-chunked", (b'POST / HTTP/1.1\r\nHost: a\r\n'
                                b'Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n'), 501)
reject("te-two-fields", (b'POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n'
                         b'Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n'), 501)
reject("te-chunked-with-parameter", (b'POST / HTTP/1.1\r\nHost: a\r\n'
                                     b'Transfer-Encoding: chunked;x=1\r\n\r\n0\r\n\r\n'), 501)
reject("te-chunked-not-last", (b'POST / HTTP/1.1\r\nHost: a\r\n'
                               b'Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n'))
reject("te-chunked-twice", (b'POST / HTTP/1.1\r\nHost: a\r\n'
                            b'Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n'))
reject("te-chunked-twice-in-fields", (b'POST / HTTP/1.1\r\nHost: a\r\n'
                                      b'Transfer-Encoding: chunked\r\n'
                                      b'Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n'))
reject("te-empty-element", (b'POST / HTTP/1.1\r\nHost: a\r\n'
                            b'Transfer-Encoding: ,chunked\r\n\r\n0\r\n\r\n'))
reject("te-empty-element-after", (b'POST / HTTP/1.1\r\nHost: a\r\n'
                                  b'Transfer-Encoding: chunked,\r\n\r\n0\r\n\r\n'))
reject("te-empty", b'POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n\r\n0\r\n\r\n')
section("chunked")
reject("chunk-size-0x", (b'POST /submit HTTP/1.1\r\nHost: example.com\r\n'
                         b'Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n'))
reject("chunk-size-sign", (b'POST /submit HTTP/1.1\r\nHost: example.com\r\n'
                           b'Transfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n'))
reject("chunk-size-negative", (b'POST /submit HTTP/1.1\r\nHost: example.com\r\n'
                               b'Transfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n'
                               b'\r\n'))
reject("chunk-size-leading-space-terse", (b'POST /submit HTTP/1.1\r\nHost: example.com\r\n'
                                          b'Transfer-Encoding: chunked\r\n\r\n 5\r\n'
                                          b'hello\r\n0\r\n\r\n'))
reject("chunk-size-trailing-space-terse", (b'POST /submit HTTP/1.1\r\n'
                                           b'Host: example.com\r\n'
                                           b'Transfer-Encoding: chunked\r\n\r\n5 \r\n'
                                           b'hello\r\n0\r\n\r\n'))
reject("chunk-size-empty-terse", (b'POST /submit HTTP/1.1\r\nHost: example.com\r\n'
                                  b'Transfer-Encoding: chunked\r\n\r\n\r\nhello\r\n0\r\n'
                                  b'\r\n'))
reject("chunk-size-not-hex-terse", (b'POST /submit HTTP/1.1\r\nHost: example.com\r\n'
                                    b'Transfer-Encoding: chunked\r\n\r\ng\r\nhello\r\n'
                                    b'0\r\n\r\n'))
reject("chunk-size-17-digits-terse", (b'POST /submit HTTP/1.1\r\nHost: example.com\r\n'
                                      b'Transfer-Encoding: chunked\r\n\r\n'
                                      b'00000000000000005\r\nhello\r\n0\r\n\r\n'))
reject("chunk-size-bare-lf-terse", (b'POST /submit HTTP/1.1\r\nHost: example.com\r\n'
                                    b'Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n'
                                    b'\r\n'))
reject("chunk-ext-bare-semicolon", (b'POST /submit HTTP/1.1\r\nHost: example.com\r\n'
                                    b'Transfer-Encoding: chunked\r\n\r\n5;\r\nhello\r\n'
                                    b'0\r\n\r\n'))
reject("chunk-ext-no-value", (b'POST /submit HTTP/1.1\r\nHost: example.com\r\n'
                              b'Transfer-Encoding: chunked\r\n\r\n5;a=\r\nhello\r\n0\r\n'
                              b'\r\n'))
reject("chunk-ext-bad-name", (b'POST /submit HTTP/1.1\r\nHost: example.com\r\n'
                              b'Transfer-Encoding: chunked\r\n\r\n5;a(b)\r\nhello\r\n0\r\n'
                              b'\r\n'))
reject("chunk-ext-unterminated-quote", (b'POST /submit HTTP/1.1\r\nHost: example.com\r\n'
                                        b'Transfer-Encoding: chunked\r\n\r\n5;a="b\r\n'
                                        b'hello\r\n0\r\n\r\n'))
reject("chunk-ext-ctl", (b'POST /submit HTTP/1.1\r\nHost: example.com\r\n'
                         b'Transfer-Encoding: chunked\r\n\r\n5;a=\x01\r\nhello\r\n0\r\n'
                         b'\r\n'))
reject("chunk-ext-trailing-bws", (b'POST /submit HTTP/1.1\r\nHost: example.com\r\n'
                                  b'Transfer-Encoding: chunked\r\n\r\n5;a=b \r\nhello\r\n'
                                  b'0\r\n\r\n'))
reject("chunk-ext-bare-cr", (b'POST /submit HTTP/1.1\r\nHost: example.com\r\n'
                             b'Transfer-Encoding: chunked\r\n\r\n5;a=b\r\r\nhello\r\n0\r\n'
                             b'\r\n'))
reject("chunk-data-too-long", (b'POST /submit HTTP/1.1\r\nHost: example.com\r\n'
                               b'Transfer-Encoding: chunked\r\n\r\n5\r\nhelloX\r\n0\r\n'
                               b'\r\n'))
reject("chunk-data-bare-lf-terse", (b'POST /submit HTTP/1.1\r\nHost: example.com\r\n'
                                    b'Transfer-Encoding: chunked\r\n\r\n5\r\nhello\n0\r\n'
                                    b'\r\n'))
reject("chunk-data-cr-only", (b'POST /submit HTTP/1.1\r\nHost: example.com\r\n'
                              b'Transfer-Encoding: chunked\r\n\r\n5\r\nhello\rX0\r\n\r\n'))
reject("last-chunk-bare-lf-terse", (b'POST /submit HTTP/1.1\r\nHost: example.com\r\n'
                                    b'Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n'
                                    b'0\n\r\n'))
reject("final-crlf-bare-lf-terse", (b'POST /submit HTTP/1.1\r\nHost: example.com\r\n'
                                    b'Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n'
                                    b'0\r\n\n'))
reject("trailer-fold", (b'POST /submit HTTP/1.1\r\nHost: example.com\r\n'
                        b'Transfer-Encoding: chunked\r\n\r\n0\r\nX-A: b\r\n c\r\n\r\n'))
reject("trailer-no-colon", (b'POST /submit HTTP/1.1\r\nHost: example.com\r\n'
                            b'Transfer-Encoding: chunked\r\n\r\n0\r\nX-A\r\n\r\n'))
reject("trailer-nul", (b'POST /submit HTTP/1.1\r\nHost: example.com\r\n'
                       b'Transfer-Encoding: chunked\r\n\r\n0\r\nX-A: \x00\r\n\r\n'))
reject("trailer-space-before-colon", (b'POST /submit HTTP/1.1\r\nHost: example.com\r\n'
                                      b'Transfer-Encoding: chunked\r\n\r\n0\r\nX-A : b\r\n'
                                      b'\r\n'))

# ---------------------------------------------------------------------------------------------
# Connection handling: an accepted request closes exactly when the parser says it is not
# keep-alive (HTTP/1.1 keeps alive unless `close`; HTTP/1.0 closes unless `keep-alive`).
section("request-line")
# (Rows whose bytes equal a case above are kept there: origin-form-root, http11-connection-close,
# connection-close-any-case, connection-close-in-list.)
for _id, _version, _fields, _closes in [
    ("keep-alive-explicit-http11", b"HTTP/1.1", [b"Connection: keep-alive"], False),
    ("keep-alive-upgrade-token", b"HTTP/1.1", [b"Connection: Upgrade"], False),
    ("keep-alive-close-with-ows", b"HTTP/1.1", [b"Connection: x-a ,\tClose "], True),
    ("keep-alive-close-in-second-field", b"HTTP/1.1",
     [b"Connection: x-a", b"Connection: close"], True),
    ("keep-alive-closed-is-not-close", b"HTTP/1.1", [b"Connection: closed"], False),
    ("keep-alive-http10-default", b"HTTP/1.0", [], True),
    ("keep-alive-http10-explicit", b"HTTP/1.0", [b"Connection: keep-alive"], False),
    ("keep-alive-http10-any-case", b"HTTP/1.0", [b"Connection: Keep-Alive"], False),
    ("keep-alive-http10-in-list", b"HTTP/1.0", [b"Connection: foo, keep-alive"], False),
    ("keep-alive-http10-then-close", b"HTTP/1.0", [b"Connection: keep-alive, close"], True),
    ("keep-alive-http10-misspelt", b"HTTP/1.0", [b"Connection: keep-alives"], True),
]:
    accept(_id, msg(b"GET / " + _version, HOST, *_fields), {"protocol": _version.decode()},
           closes=_closes)
for _minor in b"345678":
    accept(f"version-1.{chr(_minor)}-served-as-1.1",
           msg(b"GET / HTTP/1.%c" % _minor, HOST), {"protocol": "HTTP/1.1"})

section("fields")
for _id, _value in [("host-name-port", b"example.com:80"),
                    ("host-ipv6-port", b"[::1]:8000"), ("host-ipv4", b"127.0.0.1"),
                    ("host-underscore", b"a_b.example"), ("host-empty-port", b"x:"),
                    ("host-empty-after-space", b"")]:
    accept(_id, msg(b"GET / HTTP/1.1", b"Host: " + _value),
           {"headers": {"HTTP_HOST": _value.decode()}})
# Expect: only an exact `100-continue` (any case, OWS trimmed) on HTTP/1.1 earns a 100.
accept("expect-100-continue-one-byte",
       post(b"Content-Length: 1", b"Expect: 100-continue", body=b"x"), interim=(100,))
accept("expect-100-continue-mixed-case",
       post(b"Content-Length: 1", b"Expect: 100-Continue", body=b"x"), interim=(100,))
accept("expect-100-continue-upper-ows",
       post(b"Content-Length: 1", b"Expect:  100-CONTINUE ", body=b"x"), interim=(100,))
accept("expect-100-continue-ignored-http10-host",
       msg(b"POST /upload HTTP/1.0", HOST, b"Content-Length: 1", b"Expect: 100-continue",
           body=b"x"), closes=True)
accept("expect-empty-is-no-expectation", post(b"Content-Length: 1", b"Expect: ", body=b"x"))
for _id, _value in [("expect-other-status", b"200-ok"), ("expect-list", b"100-continue, foo"),
                    ("expect-suffix", b"100-continuex"), ("expect-bare-word", b"continue")]:
    reject(_id, post(b"Expect: " + _value), 417)

# ---------------------------------------------------------------------------------------------
# Verdicts the integration suite used to check one by one (terse requests: `Host: t`).
section("request-line")
reject("version-2.0-terse", b"GET / HTTP/2.0\r\nHost: t\r\n\r\n", 505)
section("fields")
reject("malformed-field-name-with-space", b"GET / HTTP/1.1\r\nHost: t\r\nBad Header: x\r\n\r\n")
section("framing")
reject("coding-gzip-then-chunked-no-body",
       b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501)
section("limits")
reject("request-line-10000-bytes", b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414)
reject("fields-150", b"GET / HTTP/1.1\r\nHost: t\r\n"
       + b"".join(b"X-H%d: v\r\n" % i for i in range(150)) + b"\r\n", 431)
reject("content-length-5000-over-limit",
       b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000, 413)
reject("chunked-2048-over-limit",
       b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
       + b"".join(b"100\r\n" + b"y" * 256 + b"\r\n" for _ in range(8)) + b"0\r\n\r\n", 413)


_ids = [case.id for case in VERDICTS]
if len(_ids) != len(set(_ids)):
    raise RuntimeError(f"duplicate case ids: {sorted({i for i in _ids if _ids.count(i) > 1})}")
_raws = [case.raw for case in VERDICTS]
if len(_raws) != len(set(_raws)):
    raise RuntimeError("two cases send the same bytes: keep one")


def check_seen(seen: dict[str, Any], expected: dict[str, Any]) -> None:
    """Fail unless the app's report ``seen`` agrees with every key of a case's ``sees``."""
    for key, want in expected.items():
        if key == "headers":
            for name, value in want.items():
                if value is ABSENT:
                    assert name not in seen["headers"], f"app saw {name}={seen['headers'][name]!r}"
                else:
                    assert seen["headers"].get(name) == value, (name, seen["headers"])
        else:
            assert seen[key] == want, (key, seen[key], want)
