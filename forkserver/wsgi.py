"""PEP 3333 glue: the environ, ``start_response``, ``wsgi.input`` and the one place an app is called.

The worker owns sockets and the event loop; this module only needs a *channel* from it (see
``Channel``): a parser to pull body events from, and blocking-with-timeout send/receive used while
the app runs. Everything here runs once per request, so the constant part of the environ is built
once per listener (``base_environ``) and copied, and a bodiless request shares one empty input.
"""

from __future__ import annotations

import enum
import os
import stat
import sys
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Protocol
from urllib.parse import unquote_to_bytes

from forkserver.http.errors import HTTPError, InternalServerError, InvalidResponse
from forkserver.http.parser import END_OF_MESSAGE, NEED_DATA, Request, RequestParser
from forkserver.http.response import Response, http_date, whole_response
from forkserver.proxy import TrustedProxies

# Bodies up to this size travel as one send together with the head.
SMALL_BODY = 64 * 1024
PREREAD_LIMIT = 64 * 1024  # request bodies up to this size are read before the app is called
DISCARD_LIMIT = 64 * 1024  # an unread rest up to this size is read and dropped (keep-alive)
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Channel(Protocol):
    """What the worker's connection offers while an app runs (blocking, bounded by timeouts)."""

    parser: RequestParser

    def receive(self) -> bool:
        """Read more bytes into ``parser``; False when the peer has closed. Raises
        ClientDisconnected, or RequestTimeout when the body arrives too slowly."""

    def send_all(self, data: bytes) -> None:
        """Send everything or raise ClientDisconnected (including a timeout)."""

    def send_file(self, fd: int, offset: int, count: int) -> int:
        """Send ``count`` bytes of ``fd`` from ``offset`` with sendfile; return bytes sent.
        Raises ClientDisconnected."""


class ClientDisconnected(OSError):
    """The client's own socket failed: it went away, reset, or stopped reading or sending.

    The channel raises only this for failures of the client's socket, so anything else the app
    raises (an ``OSError`` from its own files or connections included) is the app's fault.
    """


class AppError(Exception):
    """The application broke the WSGI contract; the message says how (for the error log)."""


class Verdict(enum.Enum):
    """What becomes of the connection after one exchange: decided once, in ``handle``."""

    KEEP = "keep"      # request consumed, response said keep-alive: read the next request
    CLOSE = "close"    # response said close and the client owes nothing more: close now
    LINGER = "linger"  # the client may still be sending: stop writing, drain a while, close
    ABORT = "abort"    # the client is gone or stuck, or the response broke off: close at once


# Plain module names for the hot path (an Enum member lookup through its class costs ~60 ns).
KEEP, CLOSE, LINGER, ABORT = Verdict.KEEP, Verdict.CLOSE, Verdict.LINGER, Verdict.ABORT


# ---------------------------------------------------------------------------------------------
# the request body (wsgi.input)


class EmptyInput:
    """``wsgi.input`` for requests without a body: stateless, so one instance serves all."""

    __slots__ = ()
    complete = True
    owes_continue = False

    def preread(self) -> bool:
        return True

    def small_rest(self, limit: int = 0) -> bool:
        return True

    def settle(self, limit: int = 0) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        return b""

    def readline(self, size: int | None = -1) -> bytes:
        return b""

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        return []

    def __iter__(self):
        return iter(())


EMPTY_INPUT = EmptyInput()


def open_body(channel: Channel, request: Request) -> Body | EmptyInput:
    """The body of ``request``, just returned by the channel's parser."""
    if request.content_length or request.chunked:
        return Body(channel, request.expect_continue)
    channel.parser.next_event()  # END_OF_MESSAGE: a bodiless request ends with its head
    return EMPTY_INPUT


class Body:
    """A request body, and the app's ``wsgi.input``: the only consumer of its body events.

    Before the app runs, the worker feeds the parser and asks ``preread`` (which never blocks)
    whether the app can start: small bodies arrive whole first, larger ones and those behind
    ``Expect: 100-continue`` stream while the app reads, through the channel's blocking,
    deadline-bound ``receive``. After the response, ``settle`` consumes a small unread rest so
    the connection can carry the next request. The parser stops at the message boundary, so a
    read never takes bytes of a pipelined request.
    """

    __slots__ = ("_buf", "_channel", "_continue", "_parser", "_parts", "_size", "complete")

    def __init__(self, channel: Channel, expect_continue: bool) -> None:
        self._channel = channel
        self._parser = channel.parser
        self._parts: deque = deque()
        self._size = 0
        self._buf = b""
        self.complete = False             # the parser has returned END_OF_MESSAGE
        self._continue = expect_continue  # "100 Continue" still owed before the first read

    @property
    def owes_continue(self) -> bool:
        """The client still waits for "100 Continue": it may never send the body."""
        return self._continue

    def preread(self, limit: int = PREREAD_LIMIT) -> bool:
        """Take the body events the parser has, without blocking. True when the app can start:
        the body is complete, larger than ``limit``, or held back until "100 Continue"."""
        if self._continue:
            return True
        parser = self._parser
        while True:
            event = parser.next_event()
            if event is NEED_DATA:
                return False
            if event is END_OF_MESSAGE:
                self.complete = True
                return True
            self._parts.append(event)
            self._size += len(event)
            if self._size > limit:
                return True

    def small_rest(self, limit: int = DISCARD_LIMIT) -> bool:
        """Whether what the app left unread is known and small enough to read and drop, so the
        response may promise keep-alive."""
        if self.complete:
            return True
        if self._continue:
            return False
        left = self._parser.body_left
        return left is not None and left <= limit

    def settle(self, limit: int = DISCARD_LIMIT) -> bool:
        """Consume the unread rest (up to ``limit``; blocking, bounded by the channel's
        deadlines). True when the body is done and the next request may follow."""
        self._buf = b""
        self._parts.clear()
        if self.complete:
            return True
        if not self.small_rest(limit):
            return False
        while self._pull():
            pass
        return True

    def _pull(self) -> bytes:
        """The next piece of body, or b"" at the end of the body."""
        if self._parts:
            return self._parts.popleft()
        if self.complete:
            return b""
        channel = self._channel
        if self._continue:
            self._continue = False
            channel.send_all(_CONTINUE)
        parser = self._parser
        while True:
            event = parser.next_event()
            if event is NEED_DATA:
                if not channel.receive():
                    parser.eof()  # raises BadRequest mid-body
                    raise ClientDisconnected("client closed the connection mid-body")
                continue
            if event is END_OF_MESSAGE:
                self.complete = True
                return b""
            return event

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            pieces = [self._buf]
            self._buf = b""
            while piece := self._pull():
                pieces.append(piece)
            return b"".join(pieces)
        buf = self._buf
        while len(buf) < size:
            piece = self._pull()
            if not piece:
                break
            buf = buf + piece if buf else piece
        self._buf = buf[size:]
        return buf[:size]

    def readline(self, size: int | None = -1) -> bytes:
        limit = size if size is not None and size >= 0 else None
        buf = self._buf
        start = 0
        while True:
            newline = buf.find(b"\n", start)
            if newline >= 0:
                end = newline + 1
                break
            if limit is not None and len(buf) >= limit:
                end = limit
                break
            start = len(buf)
            piece = self._pull()
            if not piece:
                end = len(buf)
                break
            buf += piece
        if limit is not None:
            end = min(end, limit)
        self._buf = buf[end:]
        return buf[:end]

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        lines = []
        total = 0
        while line := self.readline():
            lines.append(line)
            total += len(line)
            if hint is not None and 0 < hint <= total:
                break
        return lines

    def __iter__(self):
        while line := self.readline():
            yield line


# ---------------------------------------------------------------------------------------------
# wsgi.file_wrapper


class FileWrapper:
    """``wsgi.file_wrapper``: iterable over a file; the worker sends real files with sendfile."""

    __slots__ = ("blksize", "filelike")

    def __init__(self, filelike: Any, blksize: int = 8192) -> None:
        self.filelike = filelike
        self.blksize = blksize

    def __iter__(self):
        read = self.filelike.read
        while data := read(self.blksize):
            yield data

    def close(self) -> None:
        close = getattr(self.filelike, "close", None)
        if close is not None:
            close()

    def sendfile_span(self) -> tuple[int, int, int] | None:
        """(fd, offset, size) when the file is a regular OS file, else None (iterate instead)."""
        try:
            fd = self.filelike.fileno()
            info = os.fstat(fd)
        except (AttributeError, OSError, ValueError):
            return None
        if not stat.S_ISREG(info.st_mode):
            return None
        try:
            offset = self.filelike.tell()
        except (AttributeError, OSError, ValueError):
            offset = 0
        return fd, offset, max(0, info.st_size - offset)


# ---------------------------------------------------------------------------------------------
# environ


class ErrorsGuard:
    """``wsgi.errors`` around the real stream: an app's message that cannot be written (the
    log's disk is full, the stream is closed) is dropped, never raised into the request."""

    __slots__ = ("_stream",)

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (OSError, ValueError):
            return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (OSError, ValueError):
            pass


def base_environ(server_name: str, server_port: str, url_scheme: str = "http",
                 errors: Any = None) -> dict[str, Any]:
    """The keys that are the same for every request on one listener."""
    return {
        "SERVER_NAME": server_name,
        "SERVER_PORT": server_port,
        "SCRIPT_NAME": "",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": url_scheme,
        "wsgi.errors": ErrorsGuard(errors if errors is not None else sys.stderr),
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.input_terminated": True,
        "wsgi.file_wrapper": FileWrapper,
    }


def trusted_proxies(allow: Iterable[str],
                    headers: Iterable[str] | None = None) -> TrustedProxies | None:
    """The rules deciding whose forwarding headers (``headers``: the forwarded_headers setting;
    None: the proxy module's default) are believed; None = nobody."""
    allow = list(allow)
    if not allow:
        return None
    return TrustedProxies(allow) if headers is None else TrustedProxies(allow, headers)


# Header name -> environ key; bounded so hostile clients cannot grow it without end.
_ENVIRON_KEYS: dict[str, str] = {"CONTENT-TYPE": "CONTENT_TYPE", "CONTENT-LENGTH": "CONTENT_LENGTH"}
_ENVIRON_KEYS_MAX = 1024


def _environ_key(name: str) -> str:
    key = _ENVIRON_KEYS.get(name)
    if key is None:
        key = "HTTP_" + name.replace("-", "_")
        if len(_ENVIRON_KEYS) < _ENVIRON_KEYS_MAX:
            _ENVIRON_KEYS[name] = key
    return key


def build_environ(request: Request, base: dict[str, Any], remote: tuple[str, str],
                  wsgi_input: Any, proxies: TrustedProxies | None = None) -> dict[str, Any]:
    environ = base.copy()
    # What the head alone decides: derived into the environ itself for a head seen once, and
    # kept as the Request's memo once the parser hands the same Request again (a repeated
    # head), so that every later use is one update.
    memo = request.memo
    if memo is None:
        _add_head(request, environ)
        request.memo = _ONCE
    elif memo is _ONCE:
        memo = request.memo = {}
        _add_head(request, memo)
        environ.update(memo)
    else:
        environ.update(memo)
    environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = remote
    environ["wsgi.input"] = wsgi_input
    if proxies is not None and (
            "HTTP_X_FORWARDED_FOR" in environ or "HTTP_X_FORWARDED_PROTO" in environ
            or "HTTP_FORWARDED" in environ or "HTTP_X_FORWARDED_HOST" in environ):
        # (proxy.HEADERS are all of these: without one, resolve() keeps the peer's own)
        address, scheme, host = proxies.resolve(remote[0], request.headers)
        if address != remote[0]:
            # The client is the one the trusted proxy names; its port is unknown.
            environ["REMOTE_ADDR"] = address
            environ["REMOTE_PORT"] = ""
        if scheme is not None:
            environ["wsgi.url_scheme"] = scheme
        if host is not None:
            environ["HTTP_HOST"] = host
    return environ


_ONCE: dict[str, str] = {}  # a Request's memo after its first environ (compared by identity)


def _add_head(request: Request, environ: dict[str, Any]) -> None:
    """Add the environ's keys that the request head alone decides (PEP 3333, CGI). None of
    them is in a listener's base environ, so ``environ`` may be that copy or an empty dict."""
    path = request.path
    if "%" in path:
        path = unquote_to_bytes(path).decode("latin-1")
    environ["REQUEST_METHOD"] = request.method
    environ["PATH_INFO"] = path
    environ["QUERY_STRING"] = request.query
    environ["RAW_URI"] = environ["REQUEST_URI"] = request.target
    environ["SERVER_PROTOCOL"] = request.version
    for name, value in request.headers:
        key = _ENVIRON_KEYS.get(name) or _environ_key(name)  # (the call only for a new name)
        if key in environ and key.startswith("HTTP_"):
            separator = "; " if key == "HTTP_COOKIE" else ", "
            environ[key] = environ[key] + separator + value
        else:
            environ[key] = value
    if request.chunked:
        environ.pop("CONTENT_LENGTH", None)
    target = request.target
    if target[0] != "/" and "://" in target:
        environ["HTTP_HOST"] = request.host  # absolute-form: RFC 9112 section 3.2.2


# ---------------------------------------------------------------------------------------------
# the app call


class Exchange:
    """One request/response: ``start_response``, ``write`` and the sending of the body (the
    usual response is sent by ``handle`` itself)."""

    __slots__ = (
        "body",
        "bytes_sent",
        "channel",
        "close_reason",
        "head_sent",
        "headers",
        "keep_alive",
        "request",
        "response",
        "server",
        "status",
        "status_code",
        "verdict",
    )

    def __init__(self, channel: Channel, request: Request, body: Body | EmptyInput,
                 keep_alive: bool, server: bytes) -> None:
        self.channel = channel
        self.request = request
        self.body = body
        self.keep_alive = keep_alive
        self.server = server
        self.status: str | None = None
        self.headers: list | None = None
        self.response: Response | None = None
        self.head_sent = False
        self.bytes_sent = 0
        self.status_code = 0
        self.close_reason = ""
        self.verdict = ABORT

    # -- PEP 3333 callables ------------------------------------------------------------------
    def start_response(self, status: str, headers: list, exc_info: Any = None) -> Callable:
        if exc_info is not None:
            try:
                if self.head_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
            self.response = None  # a head framed but not sent yet is framed anew
        elif self.status is not None:
            raise AppError("start_response called a second time without exc_info")
        if type(status) is not str:
            raise AppError(f"status must be str, not {type(status).__name__}")
        if type(headers) is not list:
            raise AppError(f"headers must be a list, not {type(headers).__name__}")
        self.status = status
        self.headers = headers
        return self.write

    def write(self, data: bytes) -> None:
        if self.status is None:
            raise AppError("write() called before start_response")
        if not self.head_sent:
            self._start(None)
        self._send_body(data)

    # -- sending -----------------------------------------------------------------------------
    def _start(self, body_length: int | None) -> Response:
        """Validate and frame the head; it is sent with the first body bytes."""
        if self.status is None:
            raise AppError("the application returned without calling start_response")
        request = self.request
        self.keep_alive = self.offer_keep_alive()
        response = Response(self.status, self.headers, minor=request.minor,
                            is_head=request.method == "HEAD", keep_alive=self.keep_alive,
                            server=self.server, body_length=body_length)
        self.response = response
        self.keep_alive = response.keep_alive  # from here on, what the head says
        self.status_code = response.status_code
        return response

    def offer_keep_alive(self) -> bool:
        """Whether the response head may offer keep-alive: not when the app answers without
        reading a body (or one held back behind 100-continue) too large to read and drop; the
        connection then says close and drains it (LINGER)."""
        body = self.body
        return self.keep_alive and (body.complete or body.small_rest())

    def _send(self, data: bytes) -> None:
        self.channel.send_all(data)
        self.head_sent = True
        self.bytes_sent += len(data)

    def _send_body(self, data: bytes) -> None:
        if type(data) is not bytes:
            if isinstance(data, (bytearray, memoryview)):
                data = bytes(data)
            else:
                raise AppError(f"body items must be bytes, not {type(data).__name__}")
        response = self.response
        framed = response.body(data) if data else b""
        if not self.head_sent:
            self._send(response.head + framed)
        elif framed:
            self._send(framed)

    def _finish(self) -> None:
        response = self.response
        tail = response.end()
        if not self.head_sent:
            self._send(response.head + tail)
        elif tail:
            self._send(tail)

    def respond(self, result: Any) -> None:
        """Send the response to the app's ``result`` (any but the usual one, which ``handle``
        sends itself), then close it. Raises on failures the caller must handle."""
        try:
            if type(result) is list and len(result) == 1 and type(result[0]) is bytes:
                # The whole body in hand, so one send with the head if it is small.
                body = result[0]
                if self.head_sent:
                    response = self.response
                    self._send(response.body(body) + response.end())
                elif len(body) <= SMALL_BODY:
                    self._send((self.response or self._start(len(body))).whole(body))
                else:  # not worth copying a large body just to save one send
                    response = self.response or self._start(len(body))
                    framed = response.body(body)
                    tail = response.end()  # a body short of its Content-Length fails here
                    self._send(response.head)
                    self._send(framed)
                    if tail:
                        self._send(tail)
                return
            if isinstance(result, FileWrapper) and not self.head_sent \
                    and self._send_file(result):
                return
            for data in result:
                if data:
                    if not self.head_sent and self.response is None:
                        self._start(None)
                    self._send_body(data)
            if self.response is None:
                self._start(0)
            self._finish()
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()

    def _send_file(self, wrapper: FileWrapper) -> bool:
        """Send a real file with sendfile; False when the file must be iterated instead."""
        span = wrapper.sendfile_span()
        if span is None:
            return False
        fd, offset, size = span
        response = self.response or self._start(size)
        length = response.content_length
        if response.chunked or length is None:
            return False
        self._send(response.head)
        if self.request.method == "HEAD" or not length:
            return True
        count = min(size, length)
        while count > 0:
            sent = self.channel.send_file(fd, offset, count)
            if sent == 0:
                break
            offset += sent
            count -= sent
            self.bytes_sent += sent
        if count or size < length:
            # The file was shorter than the declared length: the body cannot be completed.
            raise InvalidResponse(f"file ended {length - (size - count)} bytes short of Content-Length")
        return True

    # -- failures ----------------------------------------------------------------------------
    def send_error(self, error: HTTPError) -> Verdict:
        """Answer with a prebuilt error response if nothing was sent yet (then drain what the
        client may still send); a response already under way can only be broken off."""
        if self.head_sent:
            return ABORT
        self.status_code = error.status
        self._send(error.response(http_date()))
        return LINGER

    def conclude(self) -> Verdict:
        """The verdict after a response that went out whole."""
        body = self.body
        if body.complete:
            return KEEP if self.keep_alive else CLOSE
        if self.keep_alive:
            # Promised keep-alive: the unread rest is small (see _start), so read and drop it.
            return KEEP if body.settle() else LINGER
        return CLOSE if body.small_rest(0) else LINGER

    def fail(self, error: Exception, log_error: Callable[[str, bool], None]) -> None:
        """Settle the verdict after ``error`` stopped the exchange (called while it is being
        handled, so a logged traceback is its own)."""
        request = self.request
        try:
            if isinstance(error, HTTPError):
                # A protocol error while the app read the body (e.g. 413 mid-chunk), or an
                # invalid response from the app (500): both answerable if nothing was sent yet.
                if isinstance(error, InvalidResponse):
                    log_error(f"invalid response from app to {request.method} "
                              f"{request.target}: {error}", False)
                self.verdict = self.send_error(error)
                return
            if not isinstance(error, ClientDisconnected):
                # OSErrors included: the app's own files and connections are not the client's.
                log_error(f"error handling {request.method} {request.target}: {error!r}", True)
                self.verdict = self.send_error(InternalServerError())
                return
        except ClientDisconnected as failure:
            error = failure
        # The client's own socket failed: nothing more can be sent.
        self.verdict = ABORT
        self.close_reason = f"client I/O: {error}"


def handle(app: Callable, channel: Channel, request: Request, body: Body | EmptyInput,
           environ: dict[str, Any], keep_alive: bool, server: bytes,
           log_error: Callable[[str, bool], None]) -> Exchange:
    """Run one request through the app and decide the connection's fate (``verdict``): the
    only place forkserver calls an application. Never raises: every app fault is logged and
    answered with a 500 when still possible."""
    if request.method == "CONNECT":
        # A 2xx would turn the connection into a tunnel (RFC 9110 section 9.3.6), which this
        # server does not provide: never let it carry another HTTP request.
        keep_alive = False
    exchange = Exchange(channel, request, body, keep_alive, server)
    try:
        result = app(environ, exchange.start_response)
        if (type(result) is list and len(result) == 1 and exchange.response is None
                and exchange.status is not None and type(data := result[0]) is bytes
                and len(data) <= SMALL_BODY):
            # The usual response: one small body in hand and no write(), so one send with the
            # head and no Response object (a list has no close()).
            data, exchange.keep_alive, exchange.status_code = whole_response(
                exchange.status, exchange.headers, request.minor, request.method == "HEAD",
                exchange.offer_keep_alive(), server, data)
            channel.send_all(data)
            exchange.head_sent = True
            exchange.bytes_sent = len(data)
        else:
            exchange.respond(result)
        if body.complete:  # the usual case, decided here without a call
            exchange.verdict = KEEP if exchange.keep_alive else CLOSE
        else:
            exchange.verdict = exchange.conclude()
    except Exception as error:  # noqa: BLE001 - an app fault is a 500, not a dead worker
        exchange.fail(error, log_error)
    return exchange
