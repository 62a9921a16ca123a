"""Response heads and body framing, sans-IO: validated input in, bytes out.

Whatever a WSGI application returns is checked here before a byte of it is sent: a CR or LF
smuggled into a header would let the application (or whoever controls the data it echoes)
forge extra headers or a second response, so anything doubtful raises ``InvalidResponse`` and
becomes a 500 instead. The connection-level headers (framing, keep-alive) belong to the server,
so the application may not set them.
"""

from __future__ import annotations

import re
from time import gmtime as _gmtime
from time import time as _now

from forkserver.http.errors import InvalidResponse

__all__ = ["Response", "http_date", "whole_response"]

# --- Date ----------------------------------------------------------------------------------------

# IMF-fixdate (RFC 9110 section 5.6.7) is always in English, so the names are spelled out here
# rather than taken from a locale-dependent strftime.
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("", "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

_date_second = -1
_date_value = b""
_date_line = b""


def _refresh_date(second: int) -> None:
    global _date_second, _date_value, _date_line
    t = _gmtime(second)
    _date_value = (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon]} {t.tm_year:04d} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
    ).encode("ascii")
    _date_line = b"Date: " + _date_value + b"\r\n"
    _date_second = second


def http_date() -> bytes:
    """The current time as an HTTP date; formatted at most once per second."""
    second = int(_now())
    if second != _date_second:
        _refresh_date(second)
    return _date_value


def _http_date_line() -> bytes:
    second = int(_now())
    if second != _date_second:
        _refresh_date(second)
    return _date_line


# --- Validation ---------------------------------------------------------------------------------

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# field-value octets: HTAB, SP, VCHAR, obs-text. Anything above U+00FF is not latin-1 encodable
# and fails here too, so the later encode cannot raise.
_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
# status-code SP reason-phrase. Codes run 100..599 (RFC 9110 section 15), but a 1xx is never a
# final response: sent as one, a 101 would make a proxy tunnel the connection and every later
# answer would belong to the wrong request. The app's status must be 200..599.
_STATUS = re.compile(r"[2-5][0-9][0-9] [\t\x20-\x7e\x80-\xff]*")
_DIGITS = re.compile("[0-9]{1,18}")

# Headers that describe the connection, not the resource: the server decides them.
_HOP_BY_HOP = frozenset(
    {"transfer-encoding", "keep-alive", "upgrade", "te", "trailer", "proxy-connection"}
)
_SPECIAL = frozenset({"content-length", "connection", "server", "date"}) | _HOP_BY_HOP

_CHUNKED = b"Transfer-Encoding: chunked\r\n"
_CLOSE = b"Connection: close\r\n"
_KEEP_ALIVE = b"Connection: keep-alive\r\n"


# Kinds of validated header lines.
_PLAIN, _LENGTH, _CONNECTION, _SERVER, _DATE = range(5)
_KINDS = {"content-length": _LENGTH, "connection": _CONNECTION, "server": _SERVER, "date": _DATE}
_CACHE_LIMIT = 1024        # entries per cache; hostile or varied values just miss it
_CACHE_VALUE_LIMIT = 200   # longer values are not worth remembering

_STATUS_LINES: dict[str, tuple[bytes, int]] = {}
_HEADER_LINES: dict[tuple[str, str], tuple[bytes, int, int]] = {}


def _status_line(status: object) -> tuple[bytes, int]:
    """Validate a status; return the encoded status line and the code."""
    if not isinstance(status, str) or _STATUS.fullmatch(status) is None:
        raise InvalidResponse(f"invalid status {status!r}")
    result = (f"HTTP/1.1 {status}\r\n".encode("latin-1"), int(status[:3]))
    if type(status) is str and len(_STATUS_LINES) < _CACHE_LIMIT:
        _STATUS_LINES[status] = result
    return result


def _header_line(item: object) -> tuple[bytes, int, int]:
    """Validate one (name, value) header from the app: (encoded line, kind, number).

    ``number`` is the length for Content-Length and 1 for a Connection header asking to close.
    """
    if type(item) is not tuple or len(item) != 2:
        raise InvalidResponse(f"header {item!r} is not a (name, value) tuple")
    name, value = item
    if not isinstance(name, str) or _TOKEN.fullmatch(name) is None:
        raise InvalidResponse(f"invalid header name {name!r}")
    if not isinstance(value, str) or _VALUE.fullmatch(value) is None:
        raise InvalidResponse(f"invalid value for header {name!r}")
    lower = name.lower()
    kind = _KINDS.get(lower, _PLAIN)
    number = 0
    if kind == _PLAIN and lower in _HOP_BY_HOP:
        raise InvalidResponse(f"hop-by-hop header {name!r} set by the app")
    if kind == _LENGTH:
        if _DIGITS.fullmatch(value) is None:
            raise InvalidResponse(f"invalid Content-Length {value!r}")
        number = int(value)
    elif kind == _CONNECTION:
        number = int("close" in [token.strip(" \t") for token in value.lower().split(",")])
    result = (f"{name}: {value}\r\n".encode("latin-1"), kind, number)
    if (type(name) is str and type(value) is str and len(value) <= _CACHE_VALUE_LIMIT
            and len(_HEADER_LINES) < _CACHE_LIMIT):
        _HEADER_LINES[item] = result
    return result


def _app_header_lines(headers: object, lines: list[bytes],
                      bodiless_status: bool) -> tuple[int | None, bool, bool, bool]:
    """Validate the app's headers and append their encoded lines to ``lines``.

    Returns (declared Content-Length or None, the app asked to close, the app set Server, the
    app set Date). Apps send the same few headers over and over: a validated, encoded line is
    remembered, so the common case costs one dict lookup per header.
    """
    declared: int | None = None
    close = own_server = own_date = False
    try:
        for item in headers:  # type: ignore[attr-defined]
            try:
                cached = _HEADER_LINES.get(item)
            except TypeError:  # an unhashable item; _header_line says what is wrong
                cached = None
            if cached is None:
                cached = _header_line(item)
            line, kind, number = cached
            if kind == _PLAIN:
                lines.append(line)
            elif kind == _LENGTH:
                if declared is not None:
                    if number != declared:
                        raise InvalidResponse("conflicting Content-Length headers")
                    continue  # send one copy only
                declared = number
                if not bodiless_status:  # must not be sent with 204
                    lines.append(line)
            elif kind == _CONNECTION:
                # The server owns this header; only the app's wish to close is honoured.
                close = close or bool(number)
            elif kind == _SERVER:
                own_server = True
                lines.append(line)
            elif kind == _DATE:
                own_date = True
                lines.append(line)
    except TypeError:  # headers is not iterable
        raise InvalidResponse("headers must be a list of (name, value) tuples") from None
    return declared, close, own_server, own_date


# A response plan: everything about a head that does not change from one response to the next
# with the same status, headers and circumstances: (bytes before the Date line, whether the
# server adds Date, whether Content-Length comes from the body length, the framing line
# otherwise, the bytes after the framing line, keep-alive, chunked, declared length, has body,
# status code).
_Plan = tuple[bytes, bool, bool, bytes, bytes, bool, bool, "int | None", bool, int]
_PLANS: dict[tuple, _Plan] = {}
_PLANS_MAX = 256          # emptied when full: a varied mix just misses, a steady one refills it
_PLAN_HEAD_MAX = 2048     # heads longer than this are built each time


def _plan(status: object, headers: object, minor: int, is_head: bool, keep_alive: bool,
          server: bytes, by_length: bool) -> _Plan:
    """Validate the app's status and headers and lay out the head (see ``_Plan``)."""
    status_line = _STATUS_LINES.get(status) if type(status) is str else None
    if status_line is None:
        status_line = _status_line(status)
    line, code = status_line
    # RFC 9110 sections 6.4.1, 8.6: these never carry content, and 204 no Content-Length.
    bodiless_status = code == 204
    has_body = not (is_head or bodiless_status or code == 304)

    lines = [line]
    declared, close, own_server, own_date = _app_header_lines(headers, lines, bodiless_status)
    if close:
        keep_alive = False  # the app's "Connection: close" is honoured; nothing else of it
    if server and not own_server:
        lines.append(b"Server: " + server + b"\r\n")

    chunked = False
    framing = b""
    length = declared
    if not has_body:
        # HEAD and 304 may announce the length a GET would have had; nothing is enforced.
        length = declared if not bodiless_status else None
        by_length = False
    elif declared is not None:
        by_length = False
    elif by_length:
        pass  # Content-Length: the body's length, filled in per response
    elif minor >= 1:
        chunked = True
        framing = _CHUNKED
    else:
        # An HTTP/1.0 client cannot read chunks: the end of the body is the end of the
        # connection.
        keep_alive = False

    if not keep_alive:
        connection = _CLOSE
    elif minor == 0:
        connection = _KEEP_ALIVE  # HTTP/1.0 closes unless told otherwise
    else:
        connection = b""
    return (b"".join(lines), not own_date, by_length, framing, connection + b"\r\n",
            bool(keep_alive), chunked, length, has_body, code)


def _remember(key: tuple, plan: _Plan) -> None:
    """Keep a plan for reuse if its key is made of plain, immutable values."""
    status, items, server = key[0], key[1], key[5]
    if (type(status) is not str or type(server) is not bytes or len(plan[0]) > _PLAN_HEAD_MAX
            or not all(type(item) is tuple and type(item[0]) is str and type(item[1]) is str
                       for item in items)):
        return
    if len(_PLANS) >= _PLANS_MAX:
        _PLANS.clear()
    _PLANS[key] = plan


def _lookup(status: object, headers: object, minor: int, is_head: bool, keep_alive: bool,
            server: bytes, by_length: bool) -> _Plan:
    """The plan for a head: remembered, or validated and laid out now."""
    try:
        items = tuple(headers)  # type: ignore[arg-type]  # iterated once: the plan uses the copy
        key = (status, items, minor, is_head, keep_alive, server, by_length)
        plan = _PLANS.get(key)
    except TypeError:  # not iterable, or an unhashable part: _plan says what is wrong
        items, key, plan = headers, None, None
    if plan is None:
        plan = _plan(status, items, minor, is_head, keep_alive, server, by_length)
        if key is not None:
            _remember(key, plan)
    return plan


# The last head whole_response made from a remembered plan: (the plan's key, the second of its
# Date, the body's length, the head, whether the body follows it, keep-alive, status code).
# Clients repeat requests, so the next response is often the same again, and comparing its key
# with the last one costs less than hashing it for _PLANS.
_last_head: tuple = (None, -1, 0, b"", False, False, 0)


def whole_response(status: str, headers: list[tuple[str, str]], minor: int, is_head: bool,
                   keep_alive: bool, server: bytes, data: bytes) -> tuple[bytes, bool, int]:
    """``Response(..., body_length=len(data)).whole(data)`` without the object, for the usual
    response (one body in hand): (the bytes to send, the final keep-alive, the status code).
    Raises InvalidResponse as that would."""
    global _last_head
    try:
        key = (status, tuple(headers), minor, is_head, keep_alive, server, True)
    except TypeError:  # headers is not iterable: _lookup says so
        key = None
    size = len(data)
    second = int(_now())
    last_key, last_second, last_size, head, with_body, keep, code = _last_head
    if second == last_second and size == last_size and key == last_key:
        return (head + data if with_body else head), keep, code
    try:
        plan = _PLANS.get(key)
    except TypeError:  # an unhashable part: _lookup says what is wrong
        plan = None
    remembered = plan is not None  # so made of plain values only (see _remember)
    if plan is None:
        plan = _lookup(status, headers, minor, is_head, keep_alive, server, True)
    prefix, send_date, by_length, framing, tail, keep, _, length, has_body, code = plan
    # (never chunked: with the body's length known the server frames it with Content-Length)
    if by_length:
        framing = b"Content-Length: %d\r\n" % size
    elif has_body and length != size:  # a wrong declared length: Response raises, saying how
        response = Response(status, headers, minor=minor, is_head=is_head,
                            keep_alive=keep_alive, server=server, body_length=size)
        return response.whole(data), response.keep_alive, code
    if send_date:
        if second != _date_second:
            _refresh_date(second)
        head = b"".join((prefix, _date_line, framing, tail))
    else:
        head = b"".join((prefix, framing, tail))
    if remembered:
        _last_head = (key, second, size, head, has_body, keep, code)
    return (head + data if has_body else head), keep, code


class Response:
    """Validates and serializes one response head and frames its body. Sans-IO: returns bytes.

    ``keep_alive`` is the final decision, which may be stricter than the one passed in (the
    application said "Connection: close", or the body can only be delimited by closing).
    ``remaining`` counts the bytes still owed under a Content-Length; it is None when no length
    is enforced (chunked, close-delimited, or a response without a body).

    Apps answer with the same few statuses and header lists over and over, so the validated
    layout of a head is remembered (``_PLANS``): the usual response costs one dict lookup, the
    Date line and, when the server frames the body, its Content-Length line.
    """

    __slots__ = ("_has_body", "chunked", "content_length", "head", "keep_alive", "remaining",
                 "status_code")

    head: bytes
    keep_alive: bool
    chunked: bool
    content_length: int | None
    remaining: int | None
    status_code: int

    def __init__(
        self,
        status: str,
        headers: list[tuple[str, str]],
        *,
        minor: int,
        is_head: bool,
        keep_alive: bool,
        server: bytes = b"forkserver",
        body_length: int | None = None,
    ) -> None:
        plan = _lookup(status, headers, minor, is_head, keep_alive, server,
                       body_length is not None)
        prefix, send_date, by_length, framing, tail, keep_alive, chunked, length, has_body, \
            self.status_code = plan
        if by_length:
            framing = b"Content-Length: %d\r\n" % body_length
            length = body_length
        if send_date:
            self.head = b"".join((prefix, _http_date_line(), framing, tail))
        else:
            self.head = b"".join((prefix, framing, tail))
        self.keep_alive = keep_alive
        self.chunked = chunked
        self.content_length = length
        self.remaining = length if has_body else None
        self._has_body = has_body

    def body(self, data: bytes) -> bytes:
        """The bytes to send for one piece of the body.

        Raises InvalidResponse, consuming nothing, when the piece would overrun the declared
        Content-Length; the caller may then send the first ``remaining`` bytes and close.
        """
        if not isinstance(data, (bytes, bytearray)):
            raise InvalidResponse(f"body pieces must be bytes, not {type(data).__name__}")
        if not self._has_body:
            return b""
        size = len(data)
        if not size:
            return b""  # an empty chunk would end a chunked body
        if self.chunked:
            return b"%x\r\n%b\r\n" % (size, data)
        remaining = self.remaining
        if remaining is not None:
            if size > remaining:
                raise InvalidResponse(
                    f"body exceeds Content-Length by {size - remaining} bytes"
                )
            self.remaining = remaining - size
        return data

    def whole(self, data: bytes) -> bytes:
        """The head, a body that is all of ``data``, and its end: one send's worth. Raises
        InvalidResponse as ``body`` and ``end`` would."""
        if type(data) is bytes and self.remaining == len(data) and self._has_body:
            self.remaining = 0  # the usual case: exactly the length the head announced
            return self.head + data
        return self.head + self.body(data) + self.end()

    def end(self) -> bytes:
        """The bytes that finish the body; raises InvalidResponse if it fell short."""
        if self.chunked:
            return b"0\r\n\r\n"
        if self.remaining:
            raise InvalidResponse(f"body is {self.remaining} bytes short of Content-Length")
        return b""
