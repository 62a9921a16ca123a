"""An app that reports what it saw, plus routes that misbehave on purpose.

The conformance suite asserts on "what the app sees", so every request is answered with a JSON
report (method, path, query, headers, body length and digest) and the same report is appended to
``records.jsonl`` in the directory named by ``CONFORMANCE_DIR``. A request for ``/smuggled`` is
also appended to ``smuggled.log`` there: those requests are only ever sent hidden behind a request
the server must reject, so any line in that file is a request-smuggling hole.

Routes under ``/hostile/`` break the WSGI contract in one way each (bad status, injected header,
wrong length, ...); the hostile-client tests check that each ends in a 500 or a closed
connection, a log line, and a worker that keeps serving.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

RECORD_ENV = "CONFORMANCE_DIR"
RECORDS = "records.jsonl"
SMUGGLED = "smuggled.log"

StartResponse = Callable[..., Any]


def _append(name: str, line: bytes) -> None:
    """Append one line in one write: O_APPEND keeps lines from two workers from interleaving."""
    directory = os.environ.get(RECORD_ENV)
    if not directory:
        return
    fd = os.open(os.path.join(directory, name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _read_body(environ: dict[str, Any]) -> bytes:
    # Sized reads until EOF work for both Content-Length and chunked bodies.
    stream = environ["wsgi.input"]
    pieces = []
    while piece := stream.read(65536):
        pieces.append(piece)
    return b"".join(pieces)


def report(environ: dict[str, Any], body: bytes) -> dict[str, Any]:
    """What the app saw, in a form JSON can carry and a test can compare."""
    headers = {key: value for key, value in environ.items()
               if key.startswith("HTTP_") or key in ("CONTENT_TYPE", "CONTENT_LENGTH")}
    return {
        "method": environ["REQUEST_METHOD"],
        "path": environ["PATH_INFO"],
        "query": environ.get("QUERY_STRING", ""),
        "raw_uri": environ.get("RAW_URI", ""),
        "protocol": environ["SERVER_PROTOCOL"],
        "headers": headers,
        "body_len": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
        # Short bodies verbatim (latin-1 maps bytes 1:1 to code points) for readable failures.
        "body": body.decode("latin-1") if len(body) <= 256 else None,
        "pid": os.getpid(),
    }


def _reporting(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
    seen = report(environ, _read_body(environ))
    line = json.dumps(seen, sort_keys=True).encode() + b"\n"
    _append(RECORDS, line)
    if seen["path"] == "/smuggled":
        _append(SMUGGLED, line)
    payload = json.dumps(seen).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(payload)))])
    return [payload]


# ---------------------------------------------------------------------------------------------
# /hostile/*: well-behaved helpers first, then one contract breach per route.


def _query_int(environ: dict[str, Any], default: int) -> int:
    _, _, value = environ.get("QUERY_STRING", "").partition("=")
    return int(value) if value else default


def _text(start_response: StartResponse, text: str) -> list[bytes]:
    body = text.encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]


def pid(environ, start_response):
    return _text(start_response, str(os.getpid()))


def big(environ, start_response):
    """A large response sent in blocks, so a client that stops reading stalls the sender."""
    size = _query_int(environ, 64 * 1024 * 1024)
    block = b"x" * 65536
    start_response("200 OK", [("Content-Type", "application/octet-stream"),
                              ("Content-Length", str(size)), ("X-Pid", str(os.getpid()))])

    def blocks() -> Iterable[bytes]:
        left = size
        while left > 0:
            piece = block[:min(left, len(block))]
            left -= len(piece)
            yield piece
    return blocks()


def slow(environ, start_response):
    time.sleep(_query_int(environ, 1000) / 1000)
    return _text(start_response, "slept")


def read_body(environ, start_response):
    """Reads the whole body; a client that vanishes midway makes the read raise."""
    body = _read_body(environ)
    return _text(start_response, str(len(body)))


def status_crlf(environ, start_response):
    start_response("200 OK\r\nX-Injected: 1", [("Content-Length", "2")])
    return [b"no"]


def status_nul(environ, start_response):
    start_response("200 O\x00K", [("Content-Length", "2")])
    return [b"no"]


def status_garbage(environ, start_response):
    start_response("OK 200", [("Content-Length", "2")])
    return [b"no"]


def header_cr(environ, start_response):
    start_response("200 OK", [("X-Injected", "a\rSet-Cookie: evil=1"), ("Content-Length", "2")])
    return [b"no"]


def header_lf(environ, start_response):
    start_response("200 OK", [("X-Injected", "a\nSet-Cookie: evil=1"), ("Content-Length", "2")])
    return [b"no"]


def header_crlf(environ, start_response):
    start_response("200 OK", [("X-Injected", "a\r\nSet-Cookie: evil=1"),
                              ("Content-Length", "2")])
    return [b"no"]


def header_nul(environ, start_response):
    start_response("200 OK", [("X-Injected", "a\x00b"), ("Content-Length", "2")])
    return [b"no"]


def header_name_crlf(environ, start_response):
    start_response("200 OK", [("X-A\r\nSet-Cookie", "evil=1"), ("Content-Length", "2")])
    return [b"no"]


def header_name_colon(environ, start_response):
    start_response("200 OK", [("X-A: b\r\nX-C", "d"), ("Content-Length", "2")])
    return [b"no"]


def header_non_latin1(environ, start_response):
    start_response("200 OK", [("X-Snowman", "\u2603"), ("Content-Length", "2")])
    return [b"no"]


def start_twice(environ, start_response):
    start_response("200 OK", [("Content-Length", "2")])
    start_response("201 Created", [("Content-Length", "2")])
    return [b"no"]


def body_longer(environ, start_response):
    start_response("200 OK", [("Content-Length", "5")])
    return [b"0123456789"]


def body_longer_iter(environ, start_response):
    start_response("200 OK", [("Content-Length", "5")])
    return iter([b"012", b"345", b"6789"])


def body_shorter(environ, start_response):
    start_response("200 OK", [("Content-Length", "10")])
    return [b"01234"]


def body_shorter_iter(environ, start_response):
    start_response("200 OK", [("Content-Length", "10")])
    return iter([b"012", b"34"])


def non_bytes(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return ["a str, not bytes"]


def non_bytes_later(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return iter([b"bytes first, ", 42])


def raise_midway(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])

    def broken() -> Iterable[bytes]:
        yield b"first part, "
        raise RuntimeError("the body iterator breaks on purpose")
    return broken()


def raise_before(environ, start_response):
    raise RuntimeError("this app fails before start_response on purpose")


def no_start_response(environ, start_response):
    return [b"start_response never called"]


HOSTILE: dict[str, Callable[[dict[str, Any], StartResponse], Iterable[bytes]]] = {
    "pid": pid,
    "big": big,
    "slow": slow,
    "read-body": read_body,
    "status-crlf": status_crlf,
    "status-nul": status_nul,
    "status-garbage": status_garbage,
    "header-cr": header_cr,
    "header-lf": header_lf,
    "header-crlf": header_crlf,
    "header-nul": header_nul,
    "header-name-crlf": header_name_crlf,
    "header-name-colon": header_name_colon,
    "header-non-latin1": header_non_latin1,
    "start-twice": start_twice,
    "body-longer": body_longer,
    "body-longer-iter": body_longer_iter,
    "body-shorter": body_shorter,
    "body-shorter-iter": body_shorter_iter,
    "non-bytes": non_bytes,
    "non-bytes-later": non_bytes_later,
    "raise-midway": raise_midway,
    "raise-before": raise_before,
    "no-start-response": no_start_response,
}


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    if path.startswith("/hostile/"):
        handler = HOSTILE.get(path[len("/hostile/"):])
        if handler is not None:
            return handler(environ, start_response)
    return _reporting(environ, start_response)
