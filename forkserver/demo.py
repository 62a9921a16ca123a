"""The built-in WSGI application, served when no APP is given.

It exists so that `forkserver` with no arguments answers something useful, and so that tests and
load runs have a dependency-free app: `/` is a small page, `/echo` reflects the request as JSON.
Plain PEP 3333 with no imports from the server, so it behaves the same under any WSGI server.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable

__all__ = ["app"]

_READ_CHUNK = 64 * 1024

_INDEX = b"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>forkserver</title></head>
<body>
<h1>forkserver is running</h1>
<p>This is the built-in demo application of forkserver, a preforking WSGI HTTP/1.1 server.
Start it with your own application as <code>forkserver module:callable</code>.</p>
<p><a href="/echo">/echo</a> returns the request it receives (method, path, query string,
headers and body) as JSON, for example <a href="/echo?hello=world">/echo?hello=world</a>.
Try <code>curl -d 'some body' http://HOST:PORT/echo</code>.</p>
</body>
</html>
"""

StartResponse = Callable[..., object]


def _respond(start_response: StartResponse, status: str, content_type: str, body: bytes,
             extra: list[tuple[str, str]] | None = None) -> list[bytes]:
    headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
    if extra:
        headers.extend(extra)
    start_response(status, headers)
    return [body]


def _read_body(environ: dict) -> bytes:
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH", "")
    if length.isascii() and length.isdigit():
        remaining = int(length)
        parts = []
        while remaining > 0:
            chunk = stream.read(min(remaining, _READ_CHUNK))
            if not chunk:
                break  # client went away early; echo what arrived
            parts.append(chunk)
            remaining -= len(chunk)
        return b"".join(parts)
    if environ.get("wsgi.input_terminated"):
        # A chunked request has no Content-Length; servers that set this flag promise that
        # reading until b"" is safe. Without it, PEP 3333 says an absent length means no body.
        parts = []
        while chunk := stream.read(_READ_CHUNK):
            parts.append(chunk)
        return b"".join(parts)
    return b""


def _wire(text: str) -> str:
    # PEP 3333 hands over path and header bytes as latin-1 code points; undo that so UTF-8
    # paths show as the characters the client meant.
    return text.encode("latin-1", "replace").decode("utf-8", "replace")


def _headers(environ: dict) -> dict[str, str]:
    headers = {}
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            name = key[5:]
        elif key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            name = key
        else:
            continue
        if key.startswith("CONTENT_") and not value:
            continue  # wsgiref and others set empty CONTENT_* when the header was absent
        headers[name.replace("_", "-").title()] = _wire(value)
    return dict(sorted(headers.items()))


def _echo(environ: dict) -> bytes:
    body = _read_body(environ)
    document = {
        "method": environ["REQUEST_METHOD"],
        "path": _wire(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")),
        "query_string": _wire(environ.get("QUERY_STRING", "")),
        "headers": _headers(environ),
        "body": body.decode("utf-8", errors="replace"),
        "body_length": len(body),
    }
    return json.dumps(document, indent=2).encode("ascii") + b"\n"


def app(environ: dict, start_response: StartResponse) -> Iterable[bytes]:
    """The demo WSGI application (PEP 3333)."""
    path = environ.get("PATH_INFO", "") or "/"
    if path == "/echo":
        return _respond(start_response, "200 OK", "application/json", _echo(environ))
    if path == "/":
        if environ["REQUEST_METHOD"] not in ("GET", "HEAD"):
            return _respond(start_response, "405 Method Not Allowed", "text/plain; charset=utf-8",
                            b"405 Method Not Allowed\n", [("Allow", "GET, HEAD")])
        return _respond(start_response, "200 OK", "text/html; charset=utf-8", _INDEX)
    return _respond(start_response, "404 Not Found", "text/plain; charset=utf-8",
                    b"404 Not Found\n")
