"""Bounded live fuzzing: mutated and random requests against a real server (``make fuzz``).

    python tests/fuzz_live.py --seconds 120 [--threads 8] [--seed N]

It starts a server with two workers, then several threads throw requests at it until the time or
the request budget runs out: valid requests, the conformance table's hostile ones, and mutations
of both (flipped, inserted, deleted and duplicated bytes, spliced messages, injected framing
headers, odd chunk sizes), sent whole, in pieces, half-closed or reset. Afterwards it checks that
the server still answers a normal request, that no worker was replaced (same PIDs), that
nothing in the log says a worker crashed or was aborted, and that every answer the server gave
was a well-formed status line with a status the server is allowed to produce.

Not a pytest module (no ``test_`` names, and pytest does not collect ``fuzz_live.py``): it is
too slow for ``make test``. Exit status 0 means no problem was found; the seed is printed so a
failing run can be repeated.
"""

from __future__ import annotations

import argparse
import collections
import random
import re
import socket
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Statuses the server may answer a fuzzed request with; anything else (a 500 above all) means a
# request got past the parser into a state nobody planned for.
ALLOWED = {100, 200, 400, 408, 413, 414, 417, 431, 501, 505}
STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) [^\r\n]*\r\n")
CONTENT_LENGTH = re.compile(rb"\r\nContent-Length: (\d+)\r\n", re.IGNORECASE)
BODY_LIMIT = 65536

SEEDS: list[bytes] = [
    b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
    (b"GET /a/b?x=1&y=%20z HTTP/1.1\r\nHost: example.com\r\nUser-Agent: fuzz\r\n"
     b"Accept: */*\r\nCookie: a=1\r\n\r\n"),
    b"HEAD /h HTTP/1.1\r\nHost: example.com\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: example.com\r\n\r\n",
    b"GET http://example.com/abs?q HTTP/1.1\r\nHost: example.com\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: example.com\r\nContent-Length: 5\r\n\r\nhello",
    (b"POST /p HTTP/1.1\r\nHost: example.com\r\nContent-Type: text/plain\r\n"
     b"Content-Length: 11\r\nExpect: 100-continue\r\n\r\nhello world"),
    (b"POST /c HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"),
    b"POST /c HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET /1 HTTP/1.1\r\nHost: example.com\r\n\r\nGET /2 HTTP/1.1\r\nHost: example.com\r\n\r\n",
    (b"POST /1 HTTP/1.1\r\nHost: example.com\r\nContent-Length: 3\r\n\r\nabc"
     b"GET /2 HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n"),
]

# Bytes and fragments that parsers have historically got wrong.
INTERESTING_BYTES = b"\r\n\x00\t :;,\"\\_-+0123456789abcdefxX\x7f\x80\xff\x0b\x0c"
FRAGMENTS = [
    b"\r\n", b"\n", b"\r", b"\r\n\r\n", b" ", b"\t", b"\x00", b":", b";", b",",
    b"Transfer-Encoding: chunked\r\n", b"Transfer-Encoding: chunked, chunked\r\n",
    b"Transfer-Encoding:  chunked\r\n", b"Transfer-Encoding: xchunked\r\n",
    b"Transfer-Encoding : chunked\r\n", b" Transfer-Encoding: chunked\r\n",
    b"Content-Length: 0\r\n", b"Content-Length: 5\r\n", b"Content-Length: +5\r\n",
    b"Content-Length: 5, 5\r\n", b"Content-Length: 99999999999999999999\r\n",
    b"Content_Length: 5\r\n", b"Host: example.com\r\n", b"Host: a\r\nHost: b\r\n",
    b"Connection: close\r\n", b"Connection: keep-alive\r\n", b"Expect: 100-continue\r\n",
    b"0x5\r\n", b"ffffffffffffffffff\r\n", b"5 \r\n", b" 5\r\n", b"-1\r\n",
    b"0\r\n\r\n", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9",
    b"GET /smuggled HTTP/1.1\r\nHost: example.com\r\n\r\n", b"\xc3\xa9", b"%00", b"%2F",
]


def load_corpus() -> list[bytes]:
    """The seeds plus every raw request of the HTTP verdict corpus (plain data, no pytest)."""
    from tests.corpus.http_verdicts import VERDICTS

    return list(SEEDS) + [case.raw for case in VERDICTS if len(case.raw) < 4096]


class Mutator:
    def __init__(self, rng: random.Random, corpus: list[bytes]) -> None:
        self.rng = rng
        self.corpus = corpus
        self.operations = [
            self.flip_bit, self.set_byte, self.insert_byte, self.insert_fragment,
            self.delete_range, self.duplicate_range, self.splice, self.truncate,
            self.swap_lines, self.change_case, self.bump_number, self.random_bytes,
        ]

    def request(self) -> bytes:
        rng = self.rng
        data = rng.choice(self.corpus)
        for _ in range(rng.choice((0, 1, 1, 1, 2, 2, 3, 5))):
            data = rng.choice(self.operations)(data)
        return data

    def _position(self, data: bytes) -> int:
        return self.rng.randrange(len(data) + 1)

    def flip_bit(self, data: bytes) -> bytes:
        if not data:
            return data
        i = self.rng.randrange(len(data))
        return data[:i] + bytes([data[i] ^ (1 << self.rng.randrange(8))]) + data[i + 1:]

    def set_byte(self, data: bytes) -> bytes:
        if not data:
            return data
        i = self.rng.randrange(len(data))
        return data[:i] + bytes([self.rng.choice(INTERESTING_BYTES)]) + data[i + 1:]

    def insert_byte(self, data: bytes) -> bytes:
        i = self._position(data)
        return data[:i] + bytes([self.rng.choice(INTERESTING_BYTES)]) + data[i:]

    def insert_fragment(self, data: bytes) -> bytes:
        # Most often at a line start, where a whole injected header line is meaningful.
        starts = [m.end() for m in re.finditer(rb"\r?\n", data)] or [0]
        i = self.rng.choice(starts) if self.rng.random() < 0.7 else self._position(data)
        return data[:i] + self.rng.choice(FRAGMENTS) + data[i:]

    def delete_range(self, data: bytes) -> bytes:
        i = self._position(data)
        return data[:i] + data[i + self.rng.randint(1, 8):]

    def duplicate_range(self, data: bytes) -> bytes:
        i = self._position(data)
        j = min(len(data), i + self.rng.randint(1, 64))
        return data[:j] + data[i:j] * self.rng.randint(1, 4) + data[j:]

    def splice(self, data: bytes) -> bytes:
        other = self.rng.choice(self.corpus)
        return data[:self._position(data)] + other[self.rng.randrange(len(other) + 1):]

    def truncate(self, data: bytes) -> bytes:
        return data[:self._position(data)]

    def swap_lines(self, data: bytes) -> bytes:
        lines = data.split(b"\r\n")
        if len(lines) > 2:
            i, j = self.rng.sample(range(len(lines)), 2)
            lines[i], lines[j] = lines[j], lines[i]
        return b"\r\n".join(lines)

    def change_case(self, data: bytes) -> bytes:
        i = self._position(data)
        j = i + self.rng.randint(1, 20)
        return data[:i] + data[i:j].swapcase() + data[j:]

    def bump_number(self, data: bytes) -> bytes:
        numbers = list(re.finditer(rb"[0-9A-Fa-f]+", data))
        if not numbers:
            return data
        match = self.rng.choice(numbers)
        value = self.rng.choice((b"0", b"1", b"65536", b"4294967296", b"-1",
                                 b"18446744073709551616", b"7fffffffffffffff",
                                 b"00000000000000000001", b"1e3", b"1_0"))
        return data[:match.start()] + value + data[match.end():]

    def random_bytes(self, data: bytes) -> bytes:
        return self.rng.randbytes(self.rng.randint(1, 200))


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent = 0
        self.statuses: collections.Counter[int] = collections.Counter()
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.problems: list[str] = []

    def add(self, statuses: list[int], outcome: str) -> None:
        with self.lock:
            self.sent += 1
            self.statuses.update(statuses)
            self.outcomes[outcome] += 1

    def problem(self, text: str) -> None:
        with self.lock:
            if len(self.problems) < 50:
                self.problems.append(text)


def exchange(port: int, data: bytes, rng: random.Random, stats: Stats) -> None:
    """Send one mutated request in a random way and check whatever comes back."""
    style = rng.choice(("whole", "whole", "pieces", "half-close", "reset", "slow-reader"))
    received = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if style == "pieces" and len(data) > 1:
                cuts = sorted(rng.sample(range(1, len(data)), min(3, len(data) - 1)))
                for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
                    sock.sendall(data[start:end])
                    time.sleep(0.002)
            else:
                sock.sendall(data)
            if style == "reset":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                stats.add([], style)
                return
            if style == "half-close":
                sock.shutdown(socket.SHUT_WR)
            if style == "slow-reader":
                time.sleep(0.01)
            # Read what comes back for a short while: keep-alive answers do not end in EOF, so
            # a pause after some bytes is taken as the end of the answer.
            sock.settimeout(0.2)
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                try:
                    piece = sock.recv(65536)
                except TimeoutError:
                    break
                if not piece:
                    break
                received += piece
                sock.settimeout(0.05)
    except OSError as error:  # timeouts and resets included
        if isinstance(error, ConnectionRefusedError):
            stats.problem("connection refused: is the server down?")
        # Resets are an answer too (the server may close on a request it rejected).
    statuses = check_response(received, data, stats)
    stats.add(statuses, style)


def check_response(received: bytes, request: bytes, stats: Stats) -> list[int]:
    """Split what came back into responses; each must have a well-formed, allowed status line.

    Every response this app and server produce is length-delimited (or a bodiless 1xx), so the
    stream can be walked response by response; whatever is left that is not the start of a
    response is a problem (a HEAD answer has a Content-Length but no body, hence the retry).
    """
    statuses: list[int] = []
    pos = 0
    while pos < len(received):
        match = STATUS_LINE.match(received, pos)
        if match is None:
            if not received.startswith(b"HTTP/1.1 "[:len(received) - pos], pos):
                stats.problem(f"not a response at byte {pos}: {received[pos:pos + 80]!r} "
                              f"after request {request[:300]!r}")
            break
        status = int(match.group(1))
        statuses.append(status)
        if status not in ALLOWED:
            stats.problem(f"status {status} for {request[:300]!r}: {received[:300]!r}")
        end = received.find(b"\r\n\r\n", pos)
        if end < 0:
            break  # we stopped reading mid-head
        body_start = end + 4
        length = CONTENT_LENGTH.search(received, pos, end)
        if status < 200 or length is None:
            pos = body_start if status < 200 else len(received)
            continue
        after_body = body_start + int(length.group(1))
        if after_body < len(received) and not received.startswith(b"HTTP/1.1 ", after_body) \
                and received.startswith(b"HTTP/1.1 ", body_start):
            after_body = body_start  # the answer to a HEAD request
        pos = after_body
    return statuses


def worker_loop(port: int, seed: int, stop_at: float, budget: int, corpus: list[bytes],
                stats: Stats) -> None:
    rng = random.Random(seed)
    mutator = Mutator(rng, corpus)
    while time.monotonic() < stop_at and stats.sent < budget:
        exchange(port, mutator.request(), rng, stats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="how long to fuzz")
    parser.add_argument("--threads", type=int, default=8, help="concurrent clients")
    parser.add_argument("--max-requests", type=int, default=500_000, help="request budget")
    parser.add_argument("--seed", type=int, default=None, help="repeat a run")
    args = parser.parse_args(argv)
    # Run as a script, the repository root is not on sys.path; the server helpers live there.
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.conftest import Server, http_request

    seed = args.seed if args.seed is not None else random.randrange(2**32)
    print(f"fuzzing for {args.seconds:g}s with {args.threads} threads, seed {seed}")

    with tempfile.TemporaryDirectory(prefix="forkserver-fuzz-") as tmp:
        server = Server(Path(tmp), "tests.apps.conformance_app:app",
                        "--limit-request-body", str(BODY_LIMIT), "--header-timeout", "2",
                        "--keepalive", "2", "--send-timeout", "2", "--timeout", "20",
                        workers=2)
        server.start()
        problems: list[str] = []
        try:
            workers_before = sorted(server.worker_pids())
            corpus = load_corpus()
            stats = Stats()
            stop_at = time.monotonic() + args.seconds
            threads = [threading.Thread(target=worker_loop, daemon=True,
                                        args=(server.port, seed + i, stop_at,
                                              args.max_requests, corpus, stats))
                       for i in range(args.threads)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(args.seconds + 30)
            problems += stats.problems

            # After the storm: a normal request is answered, and by the same workers.
            time.sleep(0.5)
            response = http_request(server.port, b"GET /after-fuzz HTTP/1.1\r\nHost: t\r\n"
                                                 b"Connection: close\r\n\r\n", timeout=10)
            if not response.startswith(b"HTTP/1.1 200 "):
                problems.append(f"normal request failed after fuzzing: {response[:200]!r}")
            workers_after = sorted(server.worker_pids())
            if workers_after != workers_before:
                problems.append(f"workers changed: {workers_before} -> {workers_after}")
            log = server.log()
            for marker in ("crash", "aborting", "Traceback", "killed by"):
                if marker in log:
                    problems.append(f"server log mentions {marker!r}")
            print(f"{stats.sent} requests; statuses {dict(sorted(stats.statuses.items()))}; "
                  f"styles {dict(stats.outcomes)}")
        finally:
            try:
                server.stop()
            except AssertionError as error:
                problems.append(str(error))
            if problems:
                print(server.log()[-5000:], file=sys.stderr)
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    print("fuzz: FAILED" if problems else "fuzz: OK", f"(seed {seed})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
