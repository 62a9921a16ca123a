"""WSGI apps for the load tests and the benchmark, served unchanged by forkserver and gunicorn.

Two entry points:

- ``hello`` is the benchmark app: a fixed body with Content-Length and nothing else, so the
  figures measure the server's per-request cost rather than the app's.
- ``app`` routes the locust scenarios:

  ====================  ===========  ====================================================
  path                  methods      answer
  ====================  ===========  ====================================================
  ``/`` ``/hello``      GET, HEAD    ``Hello, World!`` (Content-Length)
  ``/json``             POST         the request's JSON document, re-serialised
  ``/download``         GET, HEAD    1 MiB of a repeating 0..255 byte pattern
  ``/upload``           POST, PUT    ``{"bytes": N, "crc32": C}`` of the body, any framing
  ``/slow?ms=N``        GET          sleeps N ms (0..10000), then a short text body
  ====================  ===========  ====================================================

Only the standard library is used, and nothing is imported or allocated per request beyond
what the request itself needs: the constant bodies and header lists are built at import.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

StartResponse = Callable[..., Any]
Environ = dict[str, Any]

HELLO_BODY = b"Hello, World!"
DOWNLOAD_SIZE = 1 << 20
# A counting pattern rather than zeros, so a client can tell a shifted or truncated body.
DOWNLOAD_PATTERN = bytes(range(256))
MAX_SLOW_MS = 10_000
MAX_JSON_BYTES = 1 << 20
READ_BLOCK = 64 * 1024

_HELLO_HEADERS = [("Content-Type", "text/plain"), ("Content-Length", str(len(HELLO_BODY)))]
_DOWNLOAD = DOWNLOAD_PATTERN * (DOWNLOAD_SIZE // len(DOWNLOAD_PATTERN))
# Blocks instead of one 1 MiB bytes object: the server may send it in pieces, as a real
# streaming app would, and a tuple can be returned as is on every request without copying.
_DOWNLOAD_BLOCKS = tuple(_DOWNLOAD[i:i + READ_BLOCK] for i in range(0, DOWNLOAD_SIZE, READ_BLOCK))
_DOWNLOAD_HEADERS = [("Content-Type", "application/octet-stream"),
                     ("Content-Length", str(DOWNLOAD_SIZE))]


def hello(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """The benchmark app: constant body, explicit length, no routing."""
    # A fresh list each time: PEP 3333 does not forbid a server from changing the list it got.
    start_response("200 OK", list(_HELLO_HEADERS))
    return [HELLO_BODY]


def _plain(start_response: StartResponse, status: str, body: bytes,
           content_type: str = "text/plain", extra: list[tuple[str, str]] | None = None
           ) -> list[bytes]:
    headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
    if extra:
        headers.extend(extra)
    start_response(status, headers)
    return [body]


def _read_all(environ: Environ, limit: int | None = None) -> tuple[bytes | None, int, int]:
    """Consume the request body: (data or None when not kept, byte count, running CRC-32).

    Reads in bounded blocks with a size argument, so the same loop works for a Content-Length
    body and a chunked one (no CONTENT_LENGTH: both servers then give EOF-terminated input).
    With ``limit`` the data is kept in memory, and reading stops one byte past the limit so an
    oversized body is detected without buffering all of it; without it nothing is kept, which
    is what an upload sink should do.
    """
    stream = environ["wsgi.input"]
    raw_length = environ.get("CONTENT_LENGTH", "")
    remaining = int(raw_length) if raw_length.isdigit() else None
    keep: list[bytes] | None = [] if limit is not None else None
    total = 0
    crc = 0
    while remaining is None or remaining > 0:
        want = READ_BLOCK if remaining is None else min(READ_BLOCK, remaining)
        if limit is not None:
            want = min(want, limit + 1 - total)
        block = stream.read(want)
        if not block:
            break
        total += len(block)
        crc = zlib.crc32(block, crc)
        if remaining is not None:
            remaining -= len(block)
        if keep is not None:
            keep.append(block)
            if total > limit:
                break
    return (b"".join(keep) if keep is not None else None), total, crc


def _json_echo(environ: Environ, start_response: StartResponse) -> list[bytes]:
    data, total, _ = _read_all(environ, MAX_JSON_BYTES)
    if total > MAX_JSON_BYTES:
        return _plain(start_response, "413 Content Too Large", b"JSON body too large\n")
    try:
        document = json.loads(data or b"")
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both derive from it
        return _plain(start_response, "400 Bad Request", b"body is not JSON\n")
    body = json.dumps(document, separators=(",", ":")).encode()
    return _plain(start_response, "200 OK", body, "application/json")


def _download(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    start_response("200 OK", list(_DOWNLOAD_HEADERS))
    return _DOWNLOAD_BLOCKS


def _upload(environ: Environ, start_response: StartResponse) -> list[bytes]:
    _, total, crc = _read_all(environ)
    body = json.dumps({"bytes": total, "crc32": crc}, separators=(",", ":")).encode()
    return _plain(start_response, "200 OK", body, "application/json")


def _slow(environ: Environ, start_response: StartResponse) -> list[bytes]:
    values = parse_qs(environ.get("QUERY_STRING", "")).get("ms", ["100"])
    try:
        ms = int(values[0])
    except ValueError:
        return _plain(start_response, "400 Bad Request", b"ms must be an integer\n")
    if not 0 <= ms <= MAX_SLOW_MS:
        return _plain(start_response, "400 Bad Request",
                      f"ms must be between 0 and {MAX_SLOW_MS}\n".encode())
    time.sleep(ms / 1000)
    return _plain(start_response, "200 OK", f"slept {ms} ms\n".encode())


_Handler = Callable[[Environ, StartResponse], Iterable[bytes]]
_ROUTES: dict[str, tuple[frozenset[str], _Handler]] = {
    "/": (frozenset({"GET", "HEAD"}), hello),
    "/hello": (frozenset({"GET", "HEAD"}), hello),
    "/json": (frozenset({"POST"}), _json_echo),
    "/download": (frozenset({"GET", "HEAD"}), _download),
    "/upload": (frozenset({"POST", "PUT"}), _upload),
    "/slow": (frozenset({"GET"}), _slow),
}


def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """The locust scenarios' app; see the module docstring for the routes."""
    route = _ROUTES.get(environ.get("PATH_INFO", ""))
    if route is None:
        return _plain(start_response, "404 Not Found", b"not found\n")
    methods, handler = route
    if environ["REQUEST_METHOD"] not in methods:
        return _plain(start_response, "405 Method Not Allowed", b"method not allowed\n",
                      extra=[("Allow", ", ".join(sorted(methods)))])
    return handler(environ, start_response)
