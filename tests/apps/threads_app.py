"""The app and hooks of the threaded-worker tests (tests/integration/test_threads.py).

Every response body is ``pid thread-name`` (plus the route's own fields), so a test can tell
which process and which of its threads served a request.
"""

from __future__ import annotations

import os
import threading
import time
from urllib.parse import parse_qs

HOOK_LOG = os.environ.get("THREADS_APP_HOOK_LOG", "")


def _who() -> str:
    return f"{os.getpid()} {threading.current_thread().name}"


def app(environ, start_response):
    path = environ["PATH_INFO"]
    query = parse_qs(environ["QUERY_STRING"])
    if path == "/sleep":
        time.sleep(float(query.get("s", ["1"])[0]))
    fields = [_who()]
    if path == "/flags":
        fields.append(f"multithread={environ['wsgi.multithread']}")
    if path == "/hooked":
        fields.append(f"pre_request_thread={environ.get('threads_app.pre_request', '-')}")
    body = " ".join(fields).encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]


def pre_request(environ):
    environ["threads_app.pre_request"] = threading.current_thread().name


def post_request(environ, status):
    if HOOK_LOG:
        with open(HOOK_LOG, "a") as log:
            log.write(f"{environ['PATH_INFO']} {status} {_who()}\n")
