"""Sans-IO HTTP/1.1 request parser: bytes in, events out (RFC 9112, strict).

The parser never touches a socket and knows nothing of the server's configuration beyond a few
integer limits, so it can be tested by feeding it bytes and can run anywhere (the worker, the
metrics listener, tests).

How it stays cheap on the hot path:

* Incoming bytes are appended to one ``bytearray``; a read offset marks what has been consumed
  and the consumed prefix is dropped at the next ``feed`` (CPython deletes a bytearray prefix
  without moving the rest).
* A request head that is complete in the buffer (the usual case: it arrives in one ``recv``) is
  decoded once and split into lines; each line is either one seen before (a dict lookup) or
  checked by a linear regular expression and then remembered. When the buffer ends with the
  head, its end is not even searched for. Only a head that is incomplete, or that this check
  rejects, goes through the line-by-line path. That path is the reference: it reads one line at
  a time, remembers how far it has searched for the end of a line (so a head trickling in byte
  by byte is scanned once), and gives the precise error. The fast path only ever returns a
  request that the line path would return too.

Error reporting is a function of the byte stream alone, however it is split: lines are judged
in order, and a line's length is measured to its first LF, so an over-long line is reported the
same way whether its end has arrived or not. The cap on a whole head works the same way (each
head line's LF must fall within the first ``max_line + max_fields * (max_field_size + 2)``
bytes of the head). Every regular expression here is written so that the character classes of
neighbouring parts do not overlap, which keeps matching linear.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from typing import Any

from forkserver.http.errors import (
    BadRequest,
    ExpectationFailed,
    HeaderFieldsTooLarge,
    HTTPError,
    NotImplementedCoding,
    PayloadTooLarge,
    URITooLong,
    VersionNotSupported,
)

__all__ = [
    "END_OF_MESSAGE",
    "NEED_DATA",
    "PAUSED",
    "EndOfMessage",
    "Request",
    "RequestParser",
]


class _Sentinel:
    """A named marker event; compared with ``is``."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA = _Sentinel("NEED_DATA")
PAUSED = _Sentinel("PAUSED")


class EndOfMessage:
    """The current request's body (if any) is complete."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "END_OF_MESSAGE"


END_OF_MESSAGE = EndOfMessage()


class Request:
    """One parsed request head. Strings are latin-1 decodes of the received bytes.

    Read-only once returned: a parser hands the same Request again when a connection's next
    head repeats its last one byte for byte, so nothing may change it. ``memo`` is the one
    thing a layer above may set, to what it derives from this head alone (the WSGI layer's
    share of the environ); a repeated head then derives nothing again.
    """

    __slots__ = (
        "chunked",
        "content_length",
        "expect_continue",
        "headers",
        "host",
        "keep_alive",
        "memo",
        "method",
        "minor",
        "path",
        "query",
        "target",
        "version",
    )

    method: str
    target: str
    path: str
    query: str
    version: str
    minor: int
    headers: list[tuple[str, str]]
    keep_alive: bool
    content_length: int | None
    chunked: bool
    expect_continue: bool
    host: str | None  # the Host field; for an absolute-form target, the target's authority
    memo: Any  # None until a layer above derives something from this head (see above)

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.target} {self.version}>"


Event = Request | bytes | EndOfMessage | _Sentinel

# --- Grammar (RFC 9110 section 5.6.2, RFC 9112 sections 3, 5 and 7.1) ----------------------------
# Patterns are str patterns applied to latin-1 decoded text, where code point == byte value.

# tchar = "!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" / "-" / "." / "^" / "_" / "`" / "|" /
#         "~" / DIGIT / ALPHA
_TCHAR = r"!#$%&'*+.^_`|~0-9A-Za-z-"
_TOKEN = f"[{_TCHAR}]+"
# request-target as accepted here: visible ASCII without "#" (a fragment is never sent).
_TARGET = r"[\x21\x22\x24-\x7e]+"
# field-value = *field-content; allowed octets are HTAB, SP, VCHAR and obs-text. The OWS around
# the value is trimmed afterwards with str.strip, which keeps the pattern free of backtracking.
_VALUE_CHAR = r"[\t\x20-\x7e\x80-\xff]"
_VALUE = f"{_VALUE_CHAR}*"
_VERSION = r"HTTP/[0-9]\.[0-9]"

# request-line = method SP request-target SP HTTP-version
_REQUEST_LINE = re.compile(f"({_TOKEN}) ({_TARGET}) ({_VERSION})")
# field-line = field-name ":" OWS field-value OWS
_FIELD_LINE = re.compile(f"({_TOKEN}):({_VALUE})")
# The fast path for a head complete in the buffer splits it into lines. Lines seen before are
# looked up (``_KNOWN_LINES``, ``_KNOWN_REQUEST_LINES``: clients send the same lines request
# after request, and matching costs ~4 ns a character); a new field line must match
# _match_field_line whole. A bare CR or LF is in no valid line, so a head with one
# never passes. OWS before the value goes to a possessive [ \t]*+ (no backtracking into it); a
# line with OWS after its value does not match, so the rare head that has one takes the
# line-by-line path, which trims it.
_match_field_line = re.compile(f"({_TOKEN}):[ \t]*+({_VALUE_CHAR}*+)(?<![ \t])").fullmatch

# chunk = chunk-size [ chunk-ext ] CRLF
# chunk-ext = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )
# chunk-ext-val = token / quoted-string
_QDTEXT = r"[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]"
_QUOTED_PAIR = r"\\[\t \x21-\x7e\x80-\xff]"
_QUOTED_STRING = f'"(?:{_QDTEXT}|{_QUOTED_PAIR})*"'
_CHUNK_LINE = re.compile(
    "([0-9A-Fa-f]{1,16})"
    f"(?:[ \t]*;[ \t]*{_TOKEN}(?:[ \t]*=[ \t]*(?:{_TOKEN}|{_QUOTED_STRING}))?)*"
)

# Host = uri-host [ ":" port ] (RFC 3986 host: IP-literal / IPv4address / reg-name).
_REG_NAME_CHAR = r"0-9A-Za-z\-._~%!$&'()*+,;="
_IP_LITERAL = r"\[[0-9A-Za-z:.\-_~!$&'()*+,;=%]+\]"
_HOST = re.compile(f"(?:{_IP_LITERAL}|[{_REG_NAME_CHAR}]*)(?::[0-9]*)?")
# absolute-form: an http(s) URI whose authority is a non-empty host without userinfo.
_ABSOLUTE_FORM = re.compile(
    f"(?i:https?)://((?:{_IP_LITERAL}|[{_REG_NAME_CHAR}]+)(?::[0-9]*)?)(/[^?]*)?(?:\\?(.*))?"
)
# authority-form (CONNECT only): host ":" port, the port required.
_AUTHORITY_FORM = re.compile(f"(?:{_IP_LITERAL}|[{_REG_NAME_CHAR}]+):[0-9]+")
_DIGITS = re.compile("[0-9]{1,18}")
_TOKEN_RE = re.compile(_TOKEN)
_TARGET_RE = re.compile(_TARGET)

# HTTP/1.2 .. HTTP/1.9 are served as HTTP/1.1 (RFC 9110 section 2.5: same major version).
_VERSIONS = {f"HTTP/1.{d}": ("HTTP/1.1", 1) for d in range(1, 10)}
_VERSIONS["HTTP/1.0"] = ("HTTP/1.0", 0)

# Header names the head checks care about, mapped to a small code for one dict lookup per field.
_HOST_FIELD, _LENGTH_FIELD, _CODING_FIELD, _CONNECTION_FIELD, _EXPECT_FIELD = range(5)
# Field name as received -> the upper-case name it is stored under; bounded so that a hostile
# client cannot grow it without end. The stored names are then the same str objects request
# after request, whose hashes are computed once.
_FIELD_KEYS: dict[str, str] = {}
_FIELD_KEYS_MAX = 1024
# Host values that passed _HOST: a server sees the same few again and again. Bounded like
# _FIELD_KEYS; a miss only costs the match.
_VALID_HOSTS: set[str] = set()
_VALID_HOSTS_MAX = 256
# Field lines (each with its CR, as the fast path splits them) that passed _match_field_line ->
# their (stored name, value); lines of dropped names are never kept. Bounded in entries and line
# length (emptied when full).
_KNOWN_LINES: dict[str, tuple[str, str]] = {}
_KNOWN_LINES_MAX = 512
_KNOWN_LINE_MAX = 1024
# Request lines (each with its CR) that passed _request_line_parts -> those parts; bounded the
# same way. Only the fast path reads it: a client asks for the same few targets again and again.
_RequestLineParts = tuple[str, str, str, int, str, str, "str | None"]
_KNOWN_REQUEST_LINES: dict[str, _RequestLineParts] = {}
_KNOWN_REQUEST_LINES_MAX = 256
_SPECIAL_FIELDS = {
    "HOST": _HOST_FIELD,
    "CONTENT-LENGTH": _LENGTH_FIELD,
    "TRANSFER-ENCODING": _CODING_FIELD,
    "CONNECTION": _CONNECTION_FIELD,
    "EXPECT": _EXPECT_FIELD,
}


# --- States -------------------------------------------------------------------------------------


class _State(enum.IntEnum):
    HEAD = 0  # reading a request head
    LENGTH = 1  # Content-Length body
    CHUNK_SIZE = 2  # chunk-size line
    CHUNK_DATA = 3  # chunk data
    CHUNK_CRLF = 4  # the CRLF after chunk data
    TRAILER = 5  # trailer section after the last chunk
    END = 6  # message complete; END_OF_MESSAGE not yet returned
    PAUSED = 7  # END_OF_MESSAGE returned; waiting for start_next()
    ERROR = 8  # a protocol error was raised; it is raised again on every call


_S_HEAD = _State.HEAD
_S_LENGTH = _State.LENGTH
_S_CHUNK_SIZE = _State.CHUNK_SIZE
_S_CHUNK_DATA = _State.CHUNK_DATA
_S_CHUNK_CRLF = _State.CHUNK_CRLF
_S_TRAILER = _State.TRAILER
_S_END = _State.END
_S_PAUSED = _State.PAUSED
_S_ERROR = _State.ERROR

# Every legal transition, indexed by the current state. ERROR is reachable from anywhere and is
# entered directly by the error handler, so it is not listed.
_TRANSITIONS: tuple[tuple[_State, ...], ...] = (
    (_S_LENGTH, _S_CHUNK_SIZE, _S_END),  # HEAD
    (_S_END,),  # LENGTH
    (_S_CHUNK_DATA, _S_TRAILER),  # CHUNK_SIZE
    (_S_CHUNK_CRLF,),  # CHUNK_DATA
    (_S_CHUNK_SIZE,),  # CHUNK_CRLF
    (_S_END,),  # TRAILER
    (_S_PAUSED,),  # END
    (_S_HEAD,),  # PAUSED
    (),  # ERROR
)


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """The size limits one parser enforces; the worker builds one from the settings."""

    max_line: int = 8190  # request line (414 past it)
    max_fields: int = 100  # header fields (431)
    max_field_size: int = 8190  # one field line (431)
    max_body: int = 0  # body bytes (413); 0 is unlimited
    max_head: int = 64 * 1024  # the whole head (431)
    # The most bytes a head may take: ``max_head``, or less if the per-line limits and the
    # field count allow less. It bounds the memory a slow or hostile client can make a
    # connection's unfinished head take. Derived once here: each new parser reads it.
    head_cap: int = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        cap = min(self.max_head, self.max_line + self.max_fields * (self.max_field_size + 2))
        object.__setattr__(self, "head_cap", cap)  # (frozen)


DEFAULT_LIMITS = Limits()


class _Stream:
    """The bytes of one connection not parsed yet: appended by ``feed``, taken as CRLF lines
    or as body bytes. Knows framing limits only as arguments; the grammar is the subclass's."""

    __slots__ = ("_buf", "_drained", "_error", "_pos", "_remaining", "_scan")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0  # first byte not consumed yet
        # No LF in [_pos, _scan): where the search for a line end resumes. Consuming bytes
        # other than by lines (a head taken whole, body bytes) may leave it behind _pos, where
        # it says nothing and is never read as more than max(_pos, _scan).
        self._scan = 0
        self._remaining = 0  # body bytes left in the Content-Length body or the current chunk
        self._drained = False  # the last next_event() returned NEED_DATA and nothing came since
        self._error: HTTPError | None = None  # once set, the stream is dead

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes. The data is copied, so the caller may reuse its buffer."""
        if self._error is not None:
            return  # never parse past an error
        pos = self._pos
        if pos:
            # Drop the consumed prefix. CPython moves the bytearray's start pointer rather than
            # the remaining bytes, so this is cheap even while a large body is streaming.
            del self._buf[:pos]
            self._pos = 0
            self._scan -= pos
        if data:
            self._buf += data
            self._drained = False

    @property
    def buffered(self) -> int:
        """Bytes held but not yet parsed (a partial line, body not yet returned, pipelining)."""
        return len(self._buf) - self._pos

    def unparsed(self) -> bytes:
        """A copy of the bytes fed but not consumed yet (what must travel with a connection
        handed to another worker, to be fed there before anything newer)."""
        return bytes(self._buf[self._pos:])

    def _take_body(self) -> bytes | None:
        """Up to ``_remaining`` buffered body bytes, or None if none are buffered."""
        buf = self._buf
        pos = self._pos
        size = len(buf) - pos
        if not size:
            return None
        remaining = self._remaining
        size = min(size, remaining)
        end = pos + size
        self._pos = end
        self._remaining = remaining - size
        return bytes(buf[pos:end])

    def _read_line(self, limit: int, too_long: type[HTTPError]) -> str | None:
        """The next CRLF-terminated line without its CRLF, or None if it is incomplete.

        A line is measured to its first LF. If that LF lies beyond ``limit`` + 1 (content plus
        CR), or has not arrived within that many bytes, ``too_long`` is raised, whether or not
        the rest of the line has arrived; an LF not preceded by CR is a 400.
        """
        buf = self._buf
        pos = self._pos
        scan = self._scan
        lf = buf.find(b"\n", max(pos, scan))
        if lf < 0:
            if len(buf) - pos > limit + 1:
                raise too_long("line too long")
            self._scan = len(buf)
            return None
        if lf - pos > limit + 1:
            raise too_long("line too long")
        if lf == pos or buf[lf - 1] != 13:
            raise BadRequest("bare LF (lines must end with CRLF)")
        line = buf[pos : lf - 1].decode("latin-1")
        self._pos = self._scan = lf + 1
        return line


class RequestParser(_Stream):
    """Turns the bytes of one connection into a sequence of request events.

    ``next_event()`` returns a ``Request``, then non-empty ``bytes`` pieces of its body, then
    ``END_OF_MESSAGE``, then ``PAUSED`` until ``start_next()``; ``NEED_DATA`` whenever it needs
    more input. Any protocol violation raises an ``HTTPError`` subclass carrying the status to
    answer with; from then on the parser only raises that error again.
    """

    __slots__ = (
        "_eof",
        "_fields",
        "_head_cap",
        "_head_used",
        "_last_head",
        "_last_request",
        "_lines",
        "_max_body",
        "_max_field_size",
        "_max_fields",
        "_max_line",
        "_received",
        "_request_line",
        "_skipped_empty",
        "_state",
        "trailers",
    )

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self._max_line = limits.max_line
        self._max_fields = limits.max_fields
        self._max_field_size = limits.max_field_size
        self._max_body = limits.max_body  # 0: unlimited
        self._head_cap = limits.head_cap
        self._head_used = 0  # bytes of the current head's complete lines, CRLFs included
        super().__init__()
        self._state = _S_HEAD
        # What the request line of the head under way means, once the line path has read it.
        self._request_line: _RequestLineParts | None = None
        self._fields: list[tuple[str, str]] = []
        # The connection's last head taken whole (its text), and its Request: a keep-alive
        # client (a probe, an API client, a benchmark) often sends the same head again. Per
        # connection: a head that varies costs one failed comparison and a connection holds
        # one head at most; and no client's head is compared byte by byte with another's
        # (timing would tell how much of another client's head, cookies included, a guess
        # got right).
        self._last_head = ""
        self._last_request: Request | None = None
        self._lines = 0  # field lines seen in the current head or trailer section
        self._skipped_empty = False  # the one tolerated empty line before a request line
        self._received = 0  # chunked body bytes announced so far (for max_body)
        self._eof = False
        self.trailers: list[tuple[str, str]] = []

    # --- Public interface ------------------------------------------------------------------------

    @property
    def in_message(self) -> bool:
        """True from the first byte of a request until its END_OF_MESSAGE is returned.

        The skipped empty line before a request line does not count: it is not part of any
        request, and a client may send one after a body and then close.
        """
        state = self._state
        if state is _S_HEAD:
            return self._pos < len(self._buf) or self._request_line is not None
        return state is not _S_PAUSED and state is not _S_ERROR

    @property
    def body_left(self) -> int | None:
        """Body bytes of the current request not yet returned as events: 0 when there are none
        (or no request is under way), None when unknown (a chunked body, or after an error)."""
        state = self._state
        if state is _S_LENGTH:
            return self._remaining
        if state is _S_HEAD or state is _S_END or state is _S_PAUSED:
            return 0
        return None

    def start_next(self) -> bool:
        """Begin the next request; bytes already buffered (pipelined) are kept. Returns whether
        there are any: if not, ``next_event()`` would return NEED_DATA and ``in_message`` be
        False until the next ``feed``, so a caller may skip asking (once per keep-alive)."""
        if self._state is _S_PAUSED:
            self._state = _S_HEAD  # the one move from PAUSED (inlined from _go: per request)
        else:
            self._go(_S_HEAD)  # raises
        self._request_line = None  # (the line path zeroes the head's counts there too)
        self._skipped_empty = False
        if self.trailers:  # a fresh list only when the last one was handed out filled
            self.trailers = []
        return self._pos < len(self._buf)

    def eof(self) -> None:
        """The peer shut down its sending side.

        Raises BadRequest if a request is certainly truncated. When buffered bytes may still
        complete it (the caller fed data and EOF together), the error, if any, comes from
        ``next_event()`` once it runs out of bytes.
        """
        error = self._error
        if error is not None:
            raise error.with_traceback(None)
        self._eof = True
        if not self.in_message:
            return
        state = self._state
        if state is _S_END:
            return
        truncated = self._drained
        if not truncated:
            buf = self._buf
            pos = self._pos
            if state is _S_HEAD:
                truncated = not buf.startswith(b"\r\n", pos) and buf.find(b"\r\n\r\n", pos) < 0
            elif state is _S_LENGTH:
                truncated = len(buf) - pos < self._remaining
            else:
                truncated = pos == len(buf)
        if truncated:
            exc = BadRequest("connection closed in the middle of a request")
            self._fail(exc)
            raise exc

    def next_event(self) -> Event:
        """The next event, NEED_DATA, or PAUSED; raises HTTPError on a protocol error."""
        error = self._error
        if error is not None:
            raise error.with_traceback(None)
        try:
            state = self._state
            if state is _S_HEAD:
                if self._request_line is None and self._pos == len(self._buf):
                    # Nothing buffered between requests (after each keep-alive response): what
                    # the line path would conclude, without it. Never an error, even after EOF.
                    self._drained = True
                    return NEED_DATA
                return self._parse_head()
            if state is _S_LENGTH:
                data = self._take_body()
                if data is None:
                    return self._need_data()
                if not self._remaining:
                    self._go(_S_END)
                return data
            if state is _S_END:
                self._state = _S_PAUSED  # the one move from END (inlined from _go: per request)
                return END_OF_MESSAGE
            if state is _S_PAUSED:
                return PAUSED
            return self._parse_chunked()
        except HTTPError as exc:
            self._fail(exc)
            raise

    # --- Internals -------------------------------------------------------------------------------

    def _go(self, state: _State) -> None:
        if state not in _TRANSITIONS[self._state]:
            raise RuntimeError(f"parser cannot go from {self._state.name} to {state.name}")
        self._state = state

    def _fail(self, exc: HTTPError) -> None:
        """Remember the error for good and drop the buffer: nothing after it is parsed."""
        self._error = exc
        self._state = _S_ERROR
        self._buf = bytearray()
        self._pos = self._scan = 0

    def _need_data(self) -> _Sentinel:
        if self._eof and self.in_message:
            raise BadRequest("connection closed in the middle of a request")
        self._drained = True
        return NEED_DATA

    # --- Request head ----------------------------------------------------------------------------

    def _parse_head(self) -> Request | _Sentinel:
        if self._request_line is None:
            buf = self._buf
            pos = self._pos  # something is buffered (next_event answers an empty buffer)
            if buf[pos] == 13 and not self._skipped_empty and buf.startswith(b"\r\n", pos):
                # RFC 9112 section 2.2: ignore at least one empty line before a request line.
                # Exactly one is tolerated; a second one fails as an empty request line.
                pos = self._pos = pos + 2
                self._skipped_empty = True
            if not pos and buf.endswith(b"\r\n\r\n"):
                # The first head since a feed, in a buffer that ends like a head: usually the
                # buffer is that head, so no search. If it holds more, _parse_whole_head finds
                # the head's end; pos is then past 0 for the next head, so at most one buffer
                # per feed is split in vain.
                end = len(buf)
            else:
                scan = self._scan - 1  # no LF before _scan, so no CRLFCRLF before _scan - 1
                end = buf.find(b"\r\n\r\n", max(pos, scan)) + 4
            if end >= 4:
                request = self._parse_whole_head(pos, end)
                if request is not None:
                    return request
        return self._parse_head_lines()

    def _parse_whole_head(self, start: int, end: int) -> Request | None:
        """Fast path for a head complete in the buffer; None sends it to the line-by-line path.

        ``end`` is just past a CRLFCRLF: the head's empty line, or a later one at the end of
        the buffer (the head's own end is then its first empty line).
        """
        buf = self._buf
        text = (buf[start:end] if start or end != len(buf) else buf).decode("latin-1")
        if text == self._last_head:  # the last head again: nothing to check again
            self._pos = end
            return self._finish_head(self._last_request)  # type: ignore[arg-type]
        # Split on LF (cheaper than on CRLF): each line keeps its CR, and one without it (a
        # piece of a line with a bare LF) is no known line and fails _field_lines.
        lines = text.split("\n")
        del lines[-2:]  # the empty line, and what follows its LF
        if "\r" in lines:  # an earlier empty line ends the head (pipelining, or a body)
            del lines[lines.index("\r"):]
            end = start + sum(map(len, lines)) + len(lines) + 2
            if not lines:
                return None  # an empty request line: the line path tells the error
        first = lines.pop(0)  # the request line; the rest are field lines
        if (
            len(first) > self._max_line + 1
            or len(lines) > self._max_fields
            or end - start > self._head_cap
            or (end - start - len(first) - 3 > self._max_field_size + 2
                and max(map(len, lines)) > self._max_field_size + 1)
        ):
            return None
        try:  # every line seen (and validated) before: the usual case
            known = _KNOWN_LINES
            fields = [known[line] for line in lines]
        except KeyError:
            fields = _field_lines(lines)
            if fields is None:
                return None
        parts = _KNOWN_REQUEST_LINES.get(first) or _known_request_line(first)
        if parts is None:
            return None
        self._pos = end
        request = self._finish_head(_head_request(parts, fields, self._max_body))
        if end - start == len(text):  # text is this head and no more
            self._last_head, self._last_request = text, request
        return request

    def _parse_head_lines(self) -> Request | _Sentinel:
        """The reference head parser: one line at a time, resumable after any byte."""
        while True:
            if self._request_line is None:
                self._head_used = self._lines = 0  # a new head (start_next leaves them)
                line = self._read_line(*_head_limit(self._head_cap, self._max_line,
                                                    URITooLong))
                if line is None:
                    return self._need_data()
                self._head_used = len(line) + 2
                parts = _request_line_parts(line, len(line))
                if parts is None:
                    raise BadRequest(_request_line_problem(line))
                self._request_line = parts
                continue
            line = self._read_line(*_head_limit(self._head_cap - self._head_used,
                                                self._max_field_size, HeaderFieldsTooLarge))
            if line is None:
                return self._need_data()
            if not line:
                fields = self._fields
                self._fields = []  # the request keeps this list; the next head gets its own
                return self._finish_head(_head_request(self._request_line, fields,
                                                       self._max_body))
            self._head_used += len(line) + 2
            self._add_field(line, self._fields)

    def _add_field(self, line: str, fields: list[tuple[str, str]]) -> None:
        """Validate one header or trailer line and append it (unless its name has a "_")."""
        self._lines += 1
        if self._lines > self._max_fields:
            raise HeaderFieldsTooLarge(f"more than {self._max_fields} header fields")
        match = _FIELD_LINE.fullmatch(line)
        if match is None:
            raise BadRequest(_field_line_problem(line))
        name, value = match.groups()
        key = _FIELD_KEYS.get(name) or _field_key(name)
        if key is not None:
            fields.append((key, value.strip(" \t")))

    def _finish_head(self, request: Request) -> Request:
        """Move to what follows ``request``'s head: its body, or its end (RFC 9112 section 6)."""
        if request.chunked:
            self._received = 0
            self._go(_S_CHUNK_SIZE)
        elif request.content_length:
            self._remaining = request.content_length
            self._go(_S_LENGTH)
        else:
            self._state = _S_END  # HEAD -> END (inlined from _go: per request)
        return request

    # --- Chunked body (RFC 9112 section 7.1) -----------------------------------------------------

    def _parse_chunked(self) -> bytes | EndOfMessage | _Sentinel:
        while True:
            state = self._state
            if state is _S_CHUNK_DATA:
                data = self._take_body()
                if data is None:
                    return self._need_data()
                if not self._remaining:
                    self._go(_S_CHUNK_CRLF)
                return data
            if state is _S_CHUNK_SIZE:
                line = self._read_line(self._max_line, BadRequest)
                if line is None:
                    return self._need_data()
                match = _CHUNK_LINE.fullmatch(line)
                if match is None:
                    raise BadRequest("invalid chunk-size line")
                size = int(match.group(1), 16)
                if not size:
                    self._lines = 0
                    self._go(_S_TRAILER)
                    continue
                received = self._received + size
                if self._max_body and received > self._max_body:
                    raise PayloadTooLarge(f"chunked body exceeds {self._max_body}")
                self._received = received
                self._remaining = size
                self._go(_S_CHUNK_DATA)
                continue
            if state is _S_CHUNK_CRLF:
                buf = self._buf
                pos = self._pos
                size = len(buf) - pos
                if size >= 2 and buf[pos] == 13 and buf[pos + 1] == 10:
                    self._pos = self._scan = pos + 2
                    self._go(_S_CHUNK_SIZE)
                    continue
                if size == 0 or (size == 1 and buf[pos] == 13):
                    return self._need_data()
                raise BadRequest("chunk data not followed by CRLF")
            # TRAILER: field lines under the header rules, then an empty line.
            line = self._read_line(self._max_field_size, HeaderFieldsTooLarge)
            if line is None:
                return self._need_data()
            if line:
                self._add_field(line, self.trailers)
                continue
            self._go(_S_END)
            self._go(_S_PAUSED)
            return END_OF_MESSAGE


def _head_request(parts: _RequestLineParts, fields: list[tuple[str, str]],
                  max_body: int) -> Request:
    """The Request of a head, after the head-wide checks."""
    request = Request()
    (request.method, request.target, request.version, request.minor, request.path,
     request.query, request.host) = parts
    request.memo = None
    _apply_fields(request, fields, max_body)
    return request


def _head_limit(left: int, limit: int, too_long: type[HTTPError]
                ) -> tuple[int, type[HTTPError]]:
    """The length limit for the next head line, and the error for exceeding it, with ``left``
    bytes of the head cap not taken by the head's complete lines.

    The line's own limit applies unless the head-size cap leaves less room: then the cap
    decides, with a 431. The line's LF must lie within the cap, so the head (which ends with
    the CRLF after it) can still fit.
    """
    room = left - 1  # furthest allowed LF offset in the line
    if room <= limit + 1:
        return room - 1, HeaderFieldsTooLarge
    return limit, too_long


def _known_request_line(line: str) -> _RequestLineParts | None:
    """What a request line taken with its CR means (remembered), or None if it is no valid
    request line; raises for a valid line the server refuses."""
    parts = _request_line_parts(line, len(line) - 1) if line[-1:] == "\r" else None
    if parts is not None and len(line) <= _KNOWN_LINE_MAX:
        if len(_KNOWN_REQUEST_LINES) >= _KNOWN_REQUEST_LINES_MAX:
            _KNOWN_REQUEST_LINES.clear()
        _KNOWN_REQUEST_LINES[line] = parts
    return parts


def _request_line_parts(line: str, end: int) -> _RequestLineParts | None:
    """What the request line ``line[:end]`` means: a Request's method, target, version, minor,
    path, query and host (from the target). None if it fails the grammar; raises for a valid
    line the server refuses."""
    match = _REQUEST_LINE.fullmatch(line, 0, end)
    if match is None:
        return None
    method, target, version = match.groups()
    versions = _VERSIONS.get(version)
    if versions is None:
        raise VersionNotSupported(f"unsupported version {version}")
    if target[0] == "/":  # origin-form, the common case
        if method == "CONNECT":
            raise BadRequest("CONNECT needs an authority-form target")
        path, _, query = target.partition("?")
        return method, target, *versions, path, query, None
    if target == "*":  # asterisk-form
        if method != "OPTIONS":
            raise BadRequest("'*' target is only allowed with OPTIONS")
        return method, target, *versions, "*", "", None
    if method == "CONNECT":  # authority-form
        if _AUTHORITY_FORM.fullmatch(target) is None:
            raise BadRequest("invalid CONNECT target")
        return method, target, *versions, target, "", None
    # absolute-form
    match = _ABSOLUTE_FORM.fullmatch(target)
    if match is None:
        raise BadRequest("invalid request-target")
    authority, path, query = match.groups()
    # The authority is never empty, and _apply_fields keeps it over the Host field. An empty
    # http(s) path means "/" (RFC 9110 section 4.2.3).
    return method, target, *versions, path or "/", query or "", authority


def _apply_fields(request: Request, fields: list[tuple[str, str]], max_body: int) -> None:
    """Check a head's fields as a whole and set what they mean on ``request``: its host,
    framing, keep-alive and expectation (RFC 9112 sections 3.2, 6, 9.3; RFC 9110 10.1.1)."""
    request.headers = fields
    hosts = 0
    host = length_value = codings = connection = expect = None
    for name, value in fields:
        kind = _SPECIAL_FIELDS.get(name)
        if kind is None:
            continue
        if kind == _HOST_FIELD:
            hosts += 1
            host = value
        elif kind == _LENGTH_FIELD:
            if length_value is None:
                length_value = value
            elif value != length_value:
                raise BadRequest("conflicting Content-Length fields")
        elif kind == _CODING_FIELD:
            codings = value if codings is None else f"{codings},{value}"
        elif kind == _CONNECTION_FIELD:
            connection = value if connection is None else f"{connection},{value}"
        else:
            expect = value if expect is None else f"{expect},{value}"
    minor = request.minor

    # RFC 9112 section 3.2: exactly one valid Host on HTTP/1.1; never more than one.
    if hosts != 1:
        if hosts:
            raise BadRequest("more than one Host field")
        if minor:
            raise BadRequest("missing Host field")
    elif host not in _VALID_HOSTS:
        if _HOST.fullmatch(host) is None:  # type: ignore[arg-type]
            raise BadRequest("invalid Host field")
        if len(_VALID_HOSTS) < _VALID_HOSTS_MAX:
            _VALID_HOSTS.add(host)  # type: ignore[arg-type]
    if request.host is None:  # else absolute-form: the target's authority replaces Host
        request.host = host  # (RFC 9112 section 3.2.2)

    if length_value is None and codings is None:  # the usual GET: no body
        request.content_length, request.chunked = None, False
    else:
        request.content_length, request.chunked = _framing(length_value, codings, minor,
                                                           max_body)
    request.expect_continue = expect is not None and _expects_continue(expect, minor)
    if connection is None:
        request.keep_alive = minor == 1
    else:
        keep = _ONE_CONNECTION_OPTION.get(connection)
        request.keep_alive = _keeps_alive(connection, minor) if keep is None else keep


def _framing(length_value: str | None, codings: str | None, minor: int,
             max_body: int) -> tuple[int | None, bool]:
    """(Content-Length or None, chunked) from the framing fields (RFC 9112 section 6)."""
    length = None
    if length_value is not None:
        if _DIGITS.fullmatch(length_value) is None:
            raise BadRequest("invalid Content-Length")
        length = int(length_value)
    chunked = False
    if codings is not None:
        if not minor:
            raise BadRequest("Transfer-Encoding in an HTTP/1.0 request")
        if length_value is not None:
            raise BadRequest("both Transfer-Encoding and Content-Length")
        chunked = _check_codings(codings)
    if length and max_body and length > max_body:
        raise PayloadTooLarge(f"Content-Length {length} exceeds {max_body}")
    return length, chunked


def _expects_continue(expect: str, minor: int) -> bool:
    expect_continue = False
    for item in expect.split(","):
        item = item.strip(" \t").lower()
        if item == "100-continue":
            # RFC 9110 section 10.1.1: ignored in an HTTP/1.0 request.
            expect_continue = minor == 1
        elif item:
            raise ExpectationFailed("unsupported expectation")
    return expect_continue


# The Connection values that say it all alone, whatever the version ("close" ends the
# connection; "keep-alive" keeps an HTTP/1.0 one, and changes nothing in HTTP/1.1).
_ONE_CONNECTION_OPTION = {"close": False, "Close": False, "keep-alive": True,
                          "Keep-Alive": True}


def _keeps_alive(connection: str, minor: int) -> bool:
    tokens = connection.lower().split(",")
    if len(tokens) > 1:
        tokens = [token.strip(" \t") for token in tokens]
    if "close" in tokens:
        return False
    return minor == 1 or "keep-alive" in tokens


def _field_key(name: str) -> str | None:
    """The upper-case name a field is stored under, or None if the field is dropped."""
    # Names with "_" are dropped: in a CGI-style environ "X_Y" and "X-Y" collide, and a proxy
    # that vets one spelling would let the other through.
    if "_" in name:
        return None
    key = name.upper()
    if len(_FIELD_KEYS) < _FIELD_KEYS_MAX:
        _FIELD_KEYS[name] = key
    return key


def _field_lines(lines: list[str]) -> list[tuple[str, str]] | None:
    """The fields of a head's field lines (each with its CR), remembering each valid line; None
    if a line needs the line-by-line path (it is invalid, or has OWS after its value). Every
    new line is matched and remembered on first sight, so a client's steady lines are known
    from its second request on, whatever varies around them."""
    known = _KNOWN_LINES
    keys = _FIELD_KEYS
    fields = []
    for line in lines:
        field = known.get(line)
        if field is None:
            matched = _match_field_line(line, 0, len(line) - 1)
            if matched is None or line[-1:] != "\r":
                return None
            name, value = matched.groups()
            key = keys.get(name) or _field_key(name)
            if key is None:
                continue  # a dropped name: never remembered, so always decided here
            field = (key, value)
            if len(line) <= _KNOWN_LINE_MAX:
                if len(known) >= _KNOWN_LINES_MAX:
                    known.clear()  # a varied mix just misses; a steady one refills it
                known[line] = field
        fields.append(field)
    return fields


def _check_codings(codings: str) -> bool:
    """Validate a combined Transfer-Encoding list; True when the body is chunked."""
    items = [item.strip(" \t").lower() for item in codings.split(",")]
    if "" in items:
        raise BadRequest("empty element in Transfer-Encoding")
    if items.count("chunked") > 1:
        raise BadRequest("chunked applied more than once")
    # RFC 9112 section 6.3: if chunked is present but not final the length is unknowable: 400.
    if "chunked" in items and items[-1] != "chunked":
        raise BadRequest("chunked is not the final transfer-coding")
    for item in items:
        if item != "chunked":
            raise NotImplementedCoding("unsupported transfer-coding")
    return True


def _request_line_problem(line: str) -> str:
    """A log-friendly reason why a request line failed the grammar (always a 400)."""
    if not line:
        return "more than one empty line before the request line"
    parts = line.split(" ")
    if len(parts) != 3:
        return "request line is not 'method SP target SP version'"
    method, target, _ = parts
    if not method or _TOKEN_RE.fullmatch(method) is None:
        return "invalid method"
    if not target or _TARGET_RE.fullmatch(target) is None:
        return "invalid character in request-target"
    return "invalid HTTP version"


def _field_line_problem(line: str) -> str:
    """A log-friendly reason why a field line failed the grammar (always a 400)."""
    if line[:1] in (" ", "\t"):
        return "obsolete line folding"
    name, colon, _ = line.partition(":")
    if not colon:
        return "field line without ':'"
    if name[-1:] in (" ", "\t"):
        return "whitespace before ':'"
    if _TOKEN_RE.fullmatch(name) is None:
        return "invalid field name"
    return "invalid character in field value"
