"""WSGI apps the integration tests serve: one route per behaviour under test."""

from __future__ import annotations

import json
import os
import time
from wsgiref.validate import validator


def _json(start_response, data, status="200 OK"):
    body = json.dumps(data).encode()
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(body)))])
    return [body]


def _read_body(environ) -> bytes:
    """Read the whole body with sized reads only (wsgiref's validator rejects read())."""
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH")
    if length:
        return stream.read(int(length))
    pieces = []
    while piece := stream.read(65536):
        pieces.append(piece)
    return b"".join(pieces)


def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"Hello, world!"]
    if path == "/environ":
        data = {key: value for key, value in environ.items() if isinstance(value, str)}
        data["wsgi.multiprocess"] = environ["wsgi.multiprocess"]
        data["wsgi.input_terminated"] = environ.get("wsgi.input_terminated")
        data["pid"] = os.getpid()
        return _json(start_response, data)
    if path == "/echo":
        body = _read_body(environ)
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(len(body))),
                                  ("X-Method", environ["REQUEST_METHOD"])])
        return [body]
    if path == "/echo-lines":
        lines = list(environ["wsgi.input"])
        return _json(start_response, {"lines": [line.decode("latin-1") for line in lines]})
    if path == "/ignore-body":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]
    if path == "/slow":
        query = environ.get("QUERY_STRING", "")
        seconds = float(query.split("=", 1)[1]) if "=" in query else 1.0
        time.sleep(seconds)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"slept"]
    if path == "/crash":
        raise RuntimeError("this app crashes on purpose")
    if path == "/crash-midway":
        start_response("200 OK", [("Content-Type", "text/plain")])

        def broken():
            yield b"first part"
            raise RuntimeError("the body iterator breaks on purpose")
        return broken()
    if path == "/stream":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return (f"part {i}\n".encode() for i in range(5))
    if path == "/write":
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"written ")
        return [b"and returned"]
    if path == "/download":
        size = int(environ.get("QUERY_STRING", "size=1048576").split("=", 1)[1])
        block = bytes(range(256)) * 256
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(size))])

        def blocks():
            left = size
            while left > 0:
                piece = block[:min(left, len(block))]
                left -= len(piece)
                yield piece
        return blocks()
    if path == "/file":
        name = environ["QUERY_STRING"].split("=", 1)[1]
        handle = open(name, "rb")  # noqa: SIM115 - the file wrapper closes it
        size = os.fstat(handle.fileno()).st_size
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(size))])
        return environ["wsgi.file_wrapper"](handle, 65536)
    if path == "/file-nolength":
        name = environ["QUERY_STRING"].split("=", 1)[1]
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return environ["wsgi.file_wrapper"](open(name, "rb"), 65536)
    if path == "/bad-header":
        start_response("200 OK", [("X-Injected", "a\r\nSet-Cookie: evil=1")])
        return [b"never sent"]
    if path == "/errors":
        environ["wsgi.errors"].write("a message from the app via wsgi.errors\n")
        environ["wsgi.errors"].flush()
        start_response("200 OK", [("Content-Length", "0")])
        return []
    if path == "/informational":
        # A 1xx is never a final response: the server must answer 500 instead.
        start_response("101 Switching Protocols", [("Content-Type", "text/plain")])
        return [b""]
    if path == "/oserror":
        # An OSError of the app's own (not the client's socket): a logged 500.
        raise FileNotFoundError(2, "No such file or directory", "/missing/app-config.json")
    if path == "/close-stdio":
        # A badly behaved app (or a daemonising library) closing the process's fds 0-2.
        for fd in (0, 1, 2):
            try:
                os.close(fd)
            except OSError:
                pass
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "6")])
        return [b"closed"]
    if path == "/no-content":
        start_response("204 No Content", [])
        return []
    if path == "/pid":
        body = str(os.getpid()).encode()
        start_response("200 OK", [("Content-Type", "text/plain"),
                                  ("Content-Length", str(len(body)))])
        return [body]
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"not found"]


# The same app under wsgiref's PEP 3333 checker: any contract breach on either side raises.
validated = validator(app)
