"""A bounded client load loop for the operations tests: keep-alive threads counting failures.

As real HTTP clients do, an idempotent request on a *reused* keep-alive connection that the
server closed while idle is retried once on a fresh connection. Any failure on a fresh
connection, any 5xx and any timeout counts as failed.
"""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass, field
from typing import Self


@dataclass
class LoadResult:
    sent: int = 0
    failed: int = 0
    retried: int = 0
    refused: int = 0      # fresh connections refused: the server was no longer listening
    bodies: list[bytes] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class LoadLoop:
    def __init__(self, port: int, path: str = "/", threads: int = 4,
                 max_seconds: float = 60.0, max_requests: int = 200_000,
                 timeout: float = 10.0) -> None:
        self.port = port
        self.path = path
        self.threads = threads
        self.max_seconds = max_seconds
        self.max_requests = max_requests
        self.timeout = timeout
        self.result = LoadResult()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []

    def __enter__(self) -> Self:
        deadline = time.monotonic() + self.max_seconds
        for _ in range(self.threads):
            thread = threading.Thread(target=self._run, args=(deadline,), daemon=True)
            thread.start()
            self._workers.append(thread)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> LoadResult:
        self._stop.set()
        for thread in self._workers:
            thread.join(self.timeout + 5)
        return self.result

    def wait_for(self, requests: int, timeout: float = 10.0) -> None:
        """Block until at least this many more requests were sent (the load is really flowing)."""
        target = self.result.sent + requests
        deadline = time.monotonic() + timeout
        while self.result.sent < target and time.monotonic() < deadline:
            time.sleep(0.01)

    def _record(self, ok: bool, body: bytes = b"", error: str = "", retried: bool = False) -> None:
        with self._lock:
            self.result.sent += 1
            if retried:
                self.result.retried += 1
            if ok:
                if len(self.result.bodies) < 100_000:
                    self.result.bodies.append(body)
            elif "ConnectionRefusedError" in error:
                self.result.refused += 1
            else:
                self.result.failed += 1
                if len(self.result.errors) < 20:
                    self.result.errors.append(error)

    def _run(self, deadline: float) -> None:
        conn: http.client.HTTPConnection | None = None
        used = False
        while not self._stop.is_set() and time.monotonic() < deadline \
                and self.result.sent < self.max_requests:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
                used = False
            try:
                status, body, will_close = self._request(conn)
            except (ConnectionError, http.client.RemoteDisconnected,
                    http.client.BadStatusLine) as error:
                conn.close()
                conn = None
                if used:
                    # The server closed an idle keep-alive connection: retry once, fresh.
                    fresh = http.client.HTTPConnection("127.0.0.1", self.port,
                                                       timeout=self.timeout)
                    try:
                        status, body, will_close = self._request(fresh)
                    except Exception as retry_error:  # noqa: BLE001 - count every failure
                        fresh.close()
                        self._record(False, error=f"retry after {error!r}: {retry_error!r}")
                        continue
                    conn, used = fresh, True
                    self._finish(status, body, retried=True)
                    if will_close:
                        conn.close()
                        conn = None
                    continue
                self._record(False, error=f"fresh connection: {error!r}")
                continue
            except Exception as error:  # noqa: BLE001 - timeouts and the rest all count
                conn.close()
                conn = None
                self._record(False, error=repr(error))
                continue
            used = True
            self._finish(status, body)
            if will_close:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def _request(self, conn: http.client.HTTPConnection) -> tuple[int, bytes, bool]:
        conn.request("GET", self.path)
        response = conn.getresponse()
        body = response.read()
        return response.status, body, response.will_close

    def _finish(self, status: int, body: bytes, retried: bool = False) -> None:
        if status >= 500:
            self._record(False, error=f"status {status}: {body[:100]!r}", retried=retried)
        else:
            self._record(True, body, retried=retried)
