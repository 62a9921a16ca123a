"""The HTTP verdict corpus (tests/corpus/http_verdicts.py) against one real server, raw sockets.

Each case is sent whole and split in two (with a pause, so the worker sees a partial message
first). The server must give the case's verdict: its status (or no response at all), the
connection closed or reused, and for requests the app answers, what the app saw
(``tests/apps/conformance_app.py`` reports method, path, query, headers and the body, and records
every call in a file this module reads back).

Every rejected request is followed in the same send by a hidden second request for
``/smuggled``. The server must answer the first with an error and ``Connection: close`` and never
parse what follows, so exactly one response comes back and the app never records ``/smuggled``.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ResponseReader, Server
from tests.corpus.http_verdicts import (
    HOST,
    SERVER_ARGS,
    SMUGGLED,
    VERDICTS,
    Verdict,
    check_seen,
    msg,
)

FOLLOW_UP = b"GET /after HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n"
CASES = VERDICTS  # tests/fuzz_live.py seeds its mutations with these


# ---------------------------------------------------------------------------------------------
# The server and the harness


@pytest.fixture(scope="module")
def conformance_server(tmp_path_factory):
    """One 2-worker server for the whole table; the app records into ``records_dir``."""
    records_dir = tmp_path_factory.mktemp("conformance-records")
    server = Server(tmp_path_factory.mktemp("conformance"), "tests.apps.conformance_app:app",
                    *SERVER_ARGS,
                    env={"CONFORMANCE_DIR": str(records_dir)})
    server.start()
    server.records_dir = records_dir
    server.first_workers = sorted(server.worker_pids())
    yield server
    server.stop()


def _records(directory: Path) -> list[dict[str, Any]]:
    try:
        text = (directory / "records.jsonl").read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines()]


def _read_to_eof(sock: socket.socket, buffered: bytes, timeout: float) -> bytes:
    """Everything the server still sends until it closes; fails if it does not close in time."""
    sock.settimeout(timeout)
    data = buffered
    while True:
        try:
            piece = sock.recv(65536)
        except ConnectionResetError:
            return data
        except TimeoutError:
            raise AssertionError(f"connection still open after {timeout}s; got {data!r}") from None
        if not piece:
            return data
        data += piece


def run_case(server: Server, case: Verdict, split: bool = False) -> None:
    """Send the case (in two pieces if ``split``) and check every promise the table makes."""
    before = len(_records(server.records_dir))
    raw = case.raw + (SMUGGLED % case.id.encode() if case.smuggle else b"")
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        if split:
            # Half now, half after a pause: the worker sees a partial message first, so its
            # incremental path (NEED_DATA, deadlines) must reach the same verdict.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            middle = len(case.raw) // 2
            sock.sendall(raw[:middle])
            time.sleep(0.005)
            raw_rest = raw[middle:]
        else:
            raw_rest = raw
        sock.sendall(raw_rest)
        if case.half_close:
            sock.shutdown(socket.SHUT_WR)
        reader = ResponseReader(sock)
        if case.status is None:
            rest = _read_to_eof(sock, b"", 5)
            assert rest == b"", f"expected no response, got {rest!r}"
        else:
            interim = []
            status, headers, body = reader.read(head_request=case.head)
            while status < 200:
                interim.append(status)
                status, headers, body = reader.read(head_request=case.head)
            assert tuple(interim) == case.interim
            assert status == case.status, body
            if case.status >= 400:
                assert headers.get("connection") == "close"
            if case.closes:
                rest = _read_to_eof(sock, reader.buf, 3)
                assert rest == b"", f"more than one response: {rest!r}"
            else:
                for _ in range(case.pipelined):
                    assert reader.read()[0] == 200
                sock.sendall(FOLLOW_UP)
                status, _, body = reader.read()
                assert status == 200 and json.loads(body)["path"] == "/after"
                assert _read_to_eof(sock, reader.buf, 3) == b""

    records = _records(server.records_dir)[before:]
    smuggled = [r for r in records if r["path"] == "/smuggled"]
    assert not smuggled, f"a hidden request reached the app: {smuggled}"
    mine = [r for r in records if r["path"] not in ("/after", "/second")]
    if case.app_called:
        assert len(mine) == 1, mine
        check_seen(mine[0], case.sees or {})
    else:
        assert mine == [], f"the app was called for a rejected request: {mine}"


CASE_IDS = [f"{c.section}:{c.id}" for c in VERDICTS]


@pytest.mark.parametrize("case", VERDICTS, ids=CASE_IDS)
def test_case(conformance_server, case: Verdict) -> None:
    run_case(conformance_server, case)


@pytest.mark.parametrize("case", VERDICTS, ids=CASE_IDS)
def test_case_split(conformance_server, case: Verdict) -> None:
    run_case(conformance_server, case, split=True)


SELF_CHECK = "harness-self-check"


def test_harness_notices_a_parsed_hidden_request(conformance_server) -> None:
    """The smuggling check must be able to fail: pipeline /smuggled behind a valid request."""
    case = Verdict(SELF_CHECK, msg(b"GET / HTTP/1.1", HOST), 200, False, {}, app_called=True,
                smuggle=True, pipelined=1)
    with pytest.raises(AssertionError, match="hidden request reached the app"):
        run_case(conformance_server, case)


def test_harness_notices_a_wrong_verdict(conformance_server) -> None:
    case = Verdict("harness-wrong-verdict", msg(b"GET / HTTP/1.1", HOST), 400, True, smuggle=True)
    with pytest.raises(AssertionError):
        run_case(conformance_server, case)


def test_table_is_large_enough_and_covers_every_section() -> None:
    counts = {name: sum(c.section == name for c in VERDICTS)
              for name in ("request-line", "fields", "framing", "chunked", "limits",
                           "smuggling")}
    assert sum(counts.values()) == len(VERDICTS) >= 380, counts
    assert all(counts.values()), counts
    # Every rejected case hides a second request; every accepted one proves reuse or close.
    assert all(c.smuggle for c in VERDICTS if c.status is not None and c.status >= 400)


def test_no_smuggled_request_ever_reached_the_app(conformance_server) -> None:
    """Runs after the table (pytest keeps file order): the app's own tally must be empty."""
    hits = conformance_server.records_dir / "smuggled.log"
    lines = hits.read_text().splitlines() if hits.exists() else []
    # Only the harness self-checks above may have reached /smuggled (on purpose).
    assert [line for line in lines if "harness-" not in line] == []
    # And the server is still healthy: the workers it booted with, nothing crashed.
    assert sorted(conformance_server.worker_pids()) == conformance_server.first_workers
    assert "crash" not in conformance_server.log()
    assert "Traceback" not in conformance_server.log()
