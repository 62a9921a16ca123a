"""The sans-IO HTTP/1.1 layer: request parsing, response framing and protocol errors.

Nothing here performs I/O or imports the rest of forkserver, so the worker, the metrics
listener and the tests all drive it the same way: feed bytes, take events or bytes back.
"""

from forkserver.http.errors import (
    BadRequest,
    ExpectationFailed,
    HeaderFieldsTooLarge,
    HTTPError,
    InternalServerError,
    InvalidResponse,
    NotImplementedCoding,
    PayloadTooLarge,
    RequestTimeout,
    URITooLong,
    VersionNotSupported,
)
from forkserver.http.parser import (
    END_OF_MESSAGE,
    NEED_DATA,
    PAUSED,
    EndOfMessage,
    Request,
    RequestParser,
)
from forkserver.http.response import Response, http_date

__all__ = [
    "END_OF_MESSAGE",
    "NEED_DATA",
    "PAUSED",
    "BadRequest",
    "EndOfMessage",
    "ExpectationFailed",
    "HTTPError",
    "HeaderFieldsTooLarge",
    "InternalServerError",
    "InvalidResponse",
    "NotImplementedCoding",
    "PayloadTooLarge",
    "Request",
    "RequestParser",
    "RequestTimeout",
    "Response",
    "URITooLong",
    "VersionNotSupported",
    "http_date",
]
