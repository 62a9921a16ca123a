"""Locust scenarios against ``load.apps:app``.

Run through ``load/run.py`` (``make load``), which starts the server and gates on the result;
or by hand against a running server::

    locust -f load/locustfile.py --headless -H http://127.0.0.1:8000 -u 20 -r 10 -t 30s

Each scenario is one ``FastHttpUser`` class whose tasks all carry the scenario's tag, so a run
can be narrowed either way: by class name (``HelloUser JsonEchoUser``) or by tag
(``--tags hello json``). A class left without tasks by ``--tags`` is dropped before the run
(locust would otherwise fail to start it).

Responses are checked for content, not only for status: a server that answers 200 with the
wrong body is a failure here. The run's exit status is decided in the ``quitting`` listener at
the bottom: non-zero on any failed request or task exception, or when the overall 95th
percentile exceeds ``--max-p95-ms``.

This module imports locust, which monkey-patches the process with gevent: never import it
from pytest or from the server; start locust as a subprocess.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterator
from typing import Any, ClassVar

from locust import FastHttpUser, constant, events, tag, task
from locust.runners import WorkerRunner

# Kept in step with load/apps.py by hand rather than imported: the locustfile must stay
# loadable when locust runs from another checkout or machine than the server.
HELLO_BODY = b"Hello, World!"
DOWNLOAD_SIZE = 1 << 20
DOWNLOAD_PATTERN = bytes(range(256))

UPLOAD_BLOCK = 64 * 1024
UPLOAD_BLOCKS = 16  # 1 MiB per upload
_UPLOAD_DATA = os.urandom(UPLOAD_BLOCK)
_UPLOAD_CRC = zlib.crc32(_UPLOAD_DATA * UPLOAD_BLOCKS)

_DOWNLOAD_BODY = DOWNLOAD_PATTERN * (DOWNLOAD_SIZE // len(DOWNLOAD_PATTERN))

SLOW_MS = 200


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    parser.add_argument("--max-p95-ms", type=float, default=0.0, include_in_web_ui=False,
                        help="fail the run when the overall 95th percentile exceeds this "
                             "many milliseconds (0: no latency gate)")


class _Checked(FastHttpUser):
    """Base for the scenarios: no think time, and failures recorded with a reason."""

    abstract = True
    # No think time: the run measures the server under pressure, and with 2 cores locust
    # itself is the throughput ceiling anyway (see issue 6); wrk measures peak rates.
    wait_time = constant(0)
    network_timeout = 30.0
    connection_timeout = 10.0

    def _expect(self, response: Any, ok: bool, why: str) -> None:
        if ok:
            response.success()
        else:
            response.failure(why)


class HelloUser(_Checked):
    """Hello world over one keep-alive connection per user."""

    @tag("hello")
    @task
    def hello(self) -> None:
        with self.client.get("/hello", catch_response=True) as r:
            self._expect(r, r.status_code == 200 and r.content == HELLO_BODY,
                         f"status {r.status_code}, body {r.content[:40]!r}")


class JsonEchoUser(_Checked):
    """POST a small JSON document and expect the same document back."""

    document: ClassVar[dict[str, Any]] = {
        "user": 12345,
        "items": [{"sku": f"item-{i}", "qty": i} for i in range(10)],
        "note": "caf\u00e9 \u2615",  # non-ASCII, so both directions must keep UTF-8 intact
    }

    @tag("json")
    @task
    def echo(self) -> None:
        with self.client.post("/json", json=self.document, catch_response=True) as r:
            try:
                same = r.status_code == 200 and json.loads(r.content) == self.document
            except ValueError:
                same = False
            self._expect(r, same, f"status {r.status_code}, body {r.content[:60]!r}")


class DownloadUser(_Checked):
    """GET 1 MiB with Content-Length and compare every byte (a memcmp: cheap for the client)."""

    @tag("download")
    @task
    def download(self) -> None:
        with self.client.get("/download", catch_response=True) as r:
            body = r.content or b""
            ok = r.status_code == 200 and body == _DOWNLOAD_BODY
            self._expect(r, ok, f"status {r.status_code}, {len(body)} bytes")


def _upload_body() -> Iterator[bytes]:
    # A generator has no length, so the client sends Transfer-Encoding: chunked.
    for _ in range(UPLOAD_BLOCKS):
        yield _UPLOAD_DATA


class ChunkedUploadUser(_Checked):
    """POST 1 MiB with chunked framing; the server reports the byte count and CRC-32."""

    @tag("upload")
    @task
    def upload(self) -> None:
        with self.client.post("/upload", data=_upload_body(), catch_response=True,
                              headers={"Content-Type": "application/octet-stream"}) as r:
            try:
                reply = json.loads(r.content) if r.status_code == 200 else None
            except ValueError:
                reply = None
            expected = {"bytes": UPLOAD_BLOCK * UPLOAD_BLOCKS, "crc32": _UPLOAD_CRC}
            self._expect(r, reply == expected, f"status {r.status_code}, reply {reply!r}")


class SlowMixUser(_Checked):
    """Mostly fast requests with an occasional slow one on the same keep-alive connection.

    A worker runs one request at a time, so while a slow request runs, the keep-alive
    connections parked in that worker wait (design.md, "the known trade-off"). The fast
    requests of this scenario are named separately so their latency shows that cost.
    """

    @tag("slow")
    @task(9)
    def fast(self) -> None:
        with self.client.get("/hello", name="/hello (slow mix)", catch_response=True) as r:
            self._expect(r, r.status_code == 200 and r.content == HELLO_BODY,
                         f"status {r.status_code}")

    @tag("slow")
    @task(1)
    def slow(self) -> None:
        expected = f"slept {SLOW_MS} ms\n".encode()
        with self.client.get(f"/slow?ms={SLOW_MS}", name="/slow", catch_response=True) as r:
            self._expect(r, r.status_code == 200 and r.content == expected,
                         f"status {r.status_code}, body {r.content[:40]!r}")


class NewConnectionUser(_Checked):
    """One TCP connection per request: the client asks for ``Connection: close``.

    The response must say ``Connection: close`` too (RFC 9112 section 9.6): the client then
    drops the socket, so every request of this user pays for a new connection, the way
    gunicorn's sync worker serves everyone.
    """

    @tag("close")
    @task
    def hello_close(self) -> None:
        with self.client.get("/hello", name="/hello (close)", catch_response=True,
                             headers={"Connection": "close"}) as r:
            closes = (r.headers.get("Connection") or "").lower() == "close"
            self._expect(r, r.status_code == 200 and r.content == HELLO_BODY and closes,
                         f"status {r.status_code}, Connection: {r.headers.get('Connection')}")


def _has_tagged_task(user_class: type, tags: set[str] | None, exclude: set[str] | None) -> bool:
    for function in user_class.tasks:
        own = getattr(function, "locust_tag_set", set())
        if tags is not None and not own & tags:
            continue
        if exclude is not None and own & exclude:
            continue
        return True
    return False


@events.init.add_listener
def _drop_untagged_users(environment: Any, **_: Any) -> None:
    """Remove user classes that ``--tags``/``--exclude-tags`` would leave without a task."""
    options = environment.parsed_options
    tags = set(options.tags) if options is not None and options.tags else None
    exclude = set(options.exclude_tags) if options is not None and options.exclude_tags else None
    if tags is None and exclude is None:
        return
    kept = [u for u in environment.user_classes if _has_tagged_task(u, tags, exclude)]
    if kept:
        # In place: the runner reads this same list when it dispatches users.
        environment.user_classes[:] = kept


@events.quitting.add_listener
def _decide_exit_code(environment: Any, **_: Any) -> None:
    """Turn the aggregated statistics into the process exit status (the run's verdict)."""
    # Under --processes each worker quits too, with only its share of the statistics; the
    # master's view is the one that counts.
    if isinstance(environment.runner, WorkerRunner):
        return
    total = environment.stats.total
    reasons = []
    if total.num_requests == 0:
        reasons.append("no request was made")
    if total.num_failures:
        reasons.append(f"{total.num_failures} of {total.num_requests} requests failed")
    if environment.runner is not None and environment.runner.exceptions:
        reasons.append(f"{len(environment.runner.exceptions)} task exception(s)")
    options = environment.parsed_options
    limit = getattr(options, "max_p95_ms", 0.0) if options is not None else 0.0
    if limit and total.num_requests:
        p95 = total.get_response_time_percentile(0.95)
        if p95 > limit:
            reasons.append(f"p95 {p95:.0f} ms exceeds --max-p95-ms {limit:g}")
    if reasons:
        print("load gate FAILED: " + "; ".join(reasons), flush=True)
        environment.process_exit_code = 1
    else:
        print("load gate passed", flush=True)
        environment.process_exit_code = 0
