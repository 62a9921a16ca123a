"""HTTP errors that carry their own status and a prebuilt response.

The worker handles every protocol failure with one ``except HTTPError`` and sends
``error.response()``: the status travels with the exception, so no caller needs a table or an
``isinstance`` ladder to pick it. The response bytes never vary for a class, so they are built
once, when the class is created, and each send is a plain attribute read.

``detail`` is for logs only. It may quote what the client sent, so it never goes on the wire.
"""

from __future__ import annotations

__all__ = [
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
]


def _build_response(status: int, reason: str) -> bytes:
    body = f"{status} {reason}\n".encode("ascii")
    # "Connection: close" because after any of these errors the connection is not reused: the
    # request framing may be unknown, so nothing that follows can be trusted.
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n"
        "\r\n"
    ).encode("ascii")
    return head + body


class HTTPError(Exception):
    """A request (or response) that must end in an error status and a closed connection."""

    status: int = 400
    reason: str = "Bad Request"
    _response: bytes = b""
    _before_end: int = 0   # offset of the blank line that ends the head, where Date goes

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail)
        self.detail = detail

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        # Each subclass gets its own bytes, even when it inherits status and reason.
        cls._response = _build_response(cls.status, cls.reason)
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


HTTPError._response = _build_response(HTTPError.status, HTTPError.reason)
HTTPError._before_end = HTTPError._response.index(b"\r\n\r\n") + 2


class BadRequest(HTTPError):
    status = 400
    reason = "Bad Request"


class RequestTimeout(HTTPError):
    status = 408
    reason = "Request Timeout"


class PayloadTooLarge(HTTPError):
    status = 413
    reason = "Content Too Large"  # RFC 9110 name; 413 "Payload Too Large" in RFC 7231


class URITooLong(HTTPError):
    status = 414
    reason = "URI Too Long"


class ExpectationFailed(HTTPError):
    status = 417
    reason = "Expectation Failed"


class HeaderFieldsTooLarge(HTTPError):
    status = 431
    reason = "Request Header Fields Too Large"


class InternalServerError(HTTPError):
    status = 500
    reason = "Internal Server Error"


class NotImplementedCoding(HTTPError):
    """A transfer-coding the server does not implement (RFC 9112 section 6.1 suggests 501)."""

    status = 501
    reason = "Not Implemented"


class VersionNotSupported(HTTPError):
    status = 505
    reason = "HTTP Version Not Supported"


class InvalidResponse(InternalServerError):
    """The application produced a status, header or body that must not be sent."""
