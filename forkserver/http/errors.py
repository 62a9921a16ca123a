"""HTTP errors that carry their own status and a prebuilt response.

The worker handles every protocol failure with one ``except HTTPError`` and sends
``error.response()``: the status travels with the exception, so no caller needs a table or an
``isinstance`` ladder to pick it. The response bytes never vary for a class, so they are built
once, when the class is created, and each send is a plain attribute read.

``detail`` is for logs only. It may quote what the client sent, so it never goes on the wire.
"""

from __future__ import annotations

__all__ = [
    "REASONS",
    "BadRequest",
    "ExpectationFailed",
    "HTTPError",
    "HeaderFieldsTooLarge",
    "InternalServerError",
    "InvalidResponse",
    "NotImplementedCoding",
    "PayloadTooLarge",
    "RequestTimeout",
    "URITooLong",
    "VersionNotSupported",
    "plain_response",
    "simple_response",
]

# Reason phrases (RFC 9110 section 15) for the statuses this server answers with itself.
REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",  # RFC 9110 name; "Payload Too Large" in RFC 7231
    414: "URI Too Long",
    417: "Expectation Failed",
    421: "Misdirected Request",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


def simple_response(status: int, content_type: bytes, body: bytes, *, reason: str = "",
                    extra: bytes = b"", head_only: bool = False) -> bytes:
    """A complete response the server writes itself (never the app's): status line, type,
    length, ``extra`` header lines (each ending in CRLF) and ``Connection: close``.

    The one place such bytes are built: the worker's error answers and the metrics listener's
    pages both come from here. ``reason`` defaults to the one in REASONS; ``head_only`` leaves
    the body out (a HEAD request).
    """
    reason = reason or REASONS[status]
    head = (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%sConnection: close"
            b"\r\n\r\n" % (status, reason.encode("ascii"), content_type, len(body), extra))
    return head if head_only else head + body


def plain_response(status: int, *, reason: str = "", extra: bytes = b"",
                   head_only: bool = False) -> bytes:
    """An error page: ``<status> <reason>`` as text/plain. "Connection: close" because after
    an error the connection is not reused: the request framing may be unknown, so nothing that
    follows can be trusted."""
    reason = reason or REASONS[status]
    text = f"{status} {reason}\n".encode("ascii")
    return simple_response(status, b"text/plain; charset=utf-8", text, reason=reason,
                           extra=extra, head_only=head_only)


class HTTPError(Exception):
    """A request (or response) that must end in an error status and a closed connection."""

    status: int = 400
    reason: str = REASONS[400]  # a subclass gets its own from REASONS, by its status
    _response: bytes = b""
    _before_end: int = 0   # offset of the blank line that ends the head, where Date goes

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail)
        self.detail = detail

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        # Each subclass gets its own bytes, even when it inherits its status. Its reason is
        # the one in REASONS unless it names its own.
        if "reason" not in cls.__dict__:
            cls.reason = REASONS[cls.status]
        cls._response = plain_response(cls.status, reason=cls.reason)
        cls._before_end = cls._response.index(b"\r\n\r\n") + 2

    def response(self, date: bytes = b"") -> bytes:
        """The complete HTTP/1.1 response for this status (same bytes for every instance);
        with ``date`` (an IMF-fixdate), a Date header is added as RFC 9110 section 6.6.1 asks."""
        if not date:
            return self._response
        cut = self._before_end
        return b"".join((self._response[:cut], b"Date: ", date, b"\r\n", self._response[cut:]))

    def __str__(self) -> str:
        if self.detail:
            return f"{self.status} {self.reason}: {self.detail}"
        return f"{self.status} {self.reason}"


HTTPError._response = plain_response(HTTPError.status)
HTTPError._before_end = HTTPError._response.index(b"\r\n\r\n") + 2


class BadRequest(HTTPError):
    status = 400


class RequestTimeout(HTTPError):
    status = 408


class PayloadTooLarge(HTTPError):
    status = 413


class URITooLong(HTTPError):
    status = 414


class ExpectationFailed(HTTPError):
    status = 417


class HeaderFieldsTooLarge(HTTPError):
    status = 431


class InternalServerError(HTTPError):
    status = 500


class NotImplementedCoding(HTTPError):
    """A transfer-coding the server does not implement (RFC 9112 section 6.1 suggests 501)."""

    status = 501


class VersionNotSupported(HTTPError):
    status = 505


class InvalidResponse(InternalServerError):
    """The application produced a status, header or body that must not be sent."""
