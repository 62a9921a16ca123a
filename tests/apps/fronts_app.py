"""The app behind nginx and HAProxy in tests/ops/test_fronts.py.

Routes:
* ``/ignore-body``: 200 without reading the request body (a lost response shows as a reset/502);
* ``/whoami``: JSON of what the app believes about the client (address, scheme, host);
* ``/upgrade``: a ``101 Switching Protocols`` as the final status, which a WSGI server must not
  pass on (it does not do upgrades);
* anything else (``/secret`` included): 200 with the path, so only the proxy's rules can deny.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

SEEN = ("REMOTE_ADDR", "wsgi.url_scheme", "HTTP_HOST", "HTTP_X_FORWARDED_FOR", "HTTP_FORWARDED",
        "HTTP_X_FORWARDED_PROTO")


def _answer(start_response: Callable[..., Any], body: bytes, status: str = "200 OK",
            content_type: str = "text/plain") -> list[bytes]:
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return [body]


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    if path == "/ignore-body":
        return _answer(start_response, b"ignored")
    if path == "/whoami":
        seen = {key: environ.get(key) for key in SEEN}
        return _answer(start_response, json.dumps(seen).encode(), content_type="application/json")
    if path == "/upgrade":
        # No Upgrade/Connection headers: the server refuses those from an app (hop-by-hop), and
        # a proxy switches to a tunnel on the status alone once the client asked to upgrade.
        start_response("101 Switching Protocols", [("Sec-WebSocket-Accept", "s3pPLMBiTxaQ9k=")])
        return [b""]
    return _answer(start_response, path.encode())
