"""In-process cost of one request on forkserver's hot path, in CPU microseconds (issue 14).

    .venv/bin/python load/hotpath.py                  # the table, about 30 s
    .venv/bin/python load/hotpath.py --quick          # fewer, shorter repeats
    .venv/bin/python load/hotpath.py --profile        # plus cProfile of the whole path
    .venv/bin/python load/hotpath.py --profile --top 40 --shape browser
    .venv/bin/python load/hotpath.py --ablate         # plus each part's cost inside the path
    .venv/bin/python load/hotpath.py --evict 2048     # plus the parts with cold caches

Three request shapes: ``wrk`` (the request wrk sends: a request line and ``Host``),
``browser`` (wrk's ``Host`` plus the 8 fields of ``load/bench.py``'s browser-like request,
cookie included), each sent again and again as wrk does, and ``varied``: the browser request
with an ``X-Request-Id`` field that differs from one request to the next, as a proxy adds it,
so no head repeats (the parser's memory of a connection's last head never matches, and the
environ is derived anew for every request). For each shape, the real code is driven in this process:

- ``socket floor``: a socketpair round trip doing no HTTP work (client send, server
  ``recv_into``, server send of a constant response, client recv): what the kernel and the
  interpreter's socket calls cost, the in-process analogue of the ceiling row of ``make bench``;
- ``parser``: one keep-alive parser taken through what the worker asks of it per request:
  ``feed``, ``next_event`` until END_OF_MESSAGE, ``start_next``, ``next_event`` (NEED_DATA);
  ``parser, new each`` builds a parser per request (the ``close`` path);
- ``environ``, ``app + response`` and ``scoreboard``: ``wsgi.build_environ``, ``wsgi.handle``
  with a channel that discards what it is sent, and one request's two scoreboard writes;
- ``whole path``: a real ``Worker`` serving a socketpair: the client writes the request, the
  worker's per-connection read handler (the one the epoll loop calls) reads, parses, calls
  ``load.apps:hello`` and writes the response; the client reads it;
- ``close path (TCP)``: connect over loopback, the worker's accept handler takes, serves and
  closes the connection, the client reads to EOF; ``close floor (TCP)`` does the same with no
  HTTP work (accept, ``TCP_NODELAY``, non-blocking, ``recv_into``, a constant response, close):
  the in-process analogue of the ceiling's ``Connection: close`` row.

``glue`` is what the whole path costs beyond the floor and the parts measured alone: the worker's
own bookkeeping, plus what the parts cost inside the path beyond their cost alone (code run in a
tight loop of its own has hot caches and branch predictors). ``--ablate`` measures that directly:
the whole path again with one part replaced by a stand-in that does (nearly) nothing (a parser
that returns the same parsed request, a prebuilt environ, no trusted proxies, a scoreboard that
writes nothing, ``wsgi.handle`` as one constant send); the difference is what the part costs in
place. The differences overlap, so they do not add up to the whole.

``--evict KIB`` measures the parts a ``Connection: close`` request runs (a new parser, the
environ, the app and response, the scoreboard) once more, with KIB KiB written over, one byte
per cache line, before each call and outside its timing: what the code left in the caches is
then gone, as it is after the kernel sets up and tears down a connection in between. Each call
is timed alone (wall clock, best repeat), so the figures carry the clock's own cost.

Each figure is the best of the repeats of ``process_time`` over many requests (CPU time: another
process preempting this one does not count), so it moves less than wall time on a shared machine,
but absolute figures still move with the machine; compare rows and runs made in one go. A part
whose interface this harness no longer matches is reported as ``n/a`` with the reason, rather
than stopping the run; every measured response is checked to be a 200.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import inspect
import itertools
import os
import pstats
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``load`` and ``forkserver`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from load.apps import hello
from load.bench import BROWSER_HEADERS

HOST = "127.0.0.1:8000"
BROWSER_LINES = ["GET / HTTP/1.1", f"Host: {HOST}", *BROWSER_HEADERS]
VARIANTS = 4096  # more than the parser keeps of anything, so none is still cached when it recurs
# A shape is one request sent again and again, or distinct requests sent in turn.
SHAPES: dict[str, bytes | list[bytes]] = {
    "wrk": f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode("latin-1"),
    "browser": "\r\n".join([*BROWSER_LINES, "", ""]).encode("latin-1"),
    "varied": ["\r\n".join([*BROWSER_LINES, f"X-Request-Id: {n:016x}", "", ""])
               .encode("latin-1") for n in range(VARIANTS)],
}
CLOSE_FIELD = b"Connection: close\r\n"
FLOOR_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\nHello, World!"
OK = b"HTTP/1.1 200 "
# Candidate names of the worker's seams, newest first: the worker module is being rewritten.
READ_HANDLERS = ("readable", "_readable", "on_readable", "_on_readable")
ACCEPT_HANDLERS = ("_accept", "accept", "_on_accept")

Step = Callable[[], None]
Shape = bytes | list[bytes]


def turns(shape: Shape) -> Callable[[], bytes]:
    """The next request of ``shape`` at each call."""
    return itertools.cycle(shape if isinstance(shape, list) else [shape]).__next__


def first(shape: Shape) -> bytes:
    return shape[0] if isinstance(shape, list) else shape


class Unsupported(Exception):
    """The code under test no longer offers what this part drives."""


@dataclasses.dataclass
class Part:
    """One measured row: a step run once per request, and what to close afterwards."""

    name: str
    step: Step | None = None
    why: str = ""                 # the reason it is n/a
    count_scale: float = 1.0      # fraction of the iterations to run (slow parts run fewer)
    cleanup: list[Callable[[], None]] = dataclasses.field(default_factory=list)


def best_us(step: Step, count: int, repeats: int) -> float:
    """The lowest CPU time per call over ``repeats`` runs of ``count`` calls, in microseconds."""
    best = float("inf")
    clock = time.process_time
    for _ in range(repeats):
        started = clock()
        for _ in range(count):
            step()
        best = min(best, clock() - started)
    return best / count * 1e6


# --------------------------------------------------------------------------------------------
# The parts, each built by one function; any exception makes the row n/a.

def make_floor(shape: Shape) -> Part:
    client, server = socket.socketpair()
    server.setblocking(False)
    buffer = bytearray(64 * 1024)
    next_raw = turns(shape)

    def step() -> None:
        client.send(next_raw())
        server.recv_into(buffer)
        server.send(FLOOR_RESPONSE)
        client.recv(65536)

    return Part("socket floor", step, cleanup=[client.close, server.close])


def parser_limits() -> Any:
    """The limits a worker builds from the default settings."""
    from forkserver.http.parser import Limits
    settings = default_settings()
    return Limits(max_line=settings.limit_request_line,
                  max_fields=settings.limit_request_fields,
                  max_field_size=settings.limit_request_field_size,
                  max_body=settings.limit_request_body,
                  max_head=settings.limit_request_head)


def make_parser(shape: Shape, fresh: bool = False) -> Part:
    from forkserver.http.parser import END_OF_MESSAGE, NEED_DATA, Request, RequestParser
    limits = parser_limits()
    kept = RequestParser(limits)
    next_raw = turns(shape)

    def step() -> None:
        parser = RequestParser(limits) if fresh else kept
        parser.feed(next_raw())
        if type(parser.next_event()) is not Request or parser.next_event() is not END_OF_MESSAGE:
            raise AssertionError("the parser did not return one request")
        parser.start_next()
        if parser.next_event() is not NEED_DATA:
            raise AssertionError("the parser did not ask for more")

    step()
    return Part("parser, new each" if fresh else "parser", step)


def parsed(raw: bytes) -> Any:
    from forkserver.http.parser import RequestParser
    parser = RequestParser(parser_limits())
    parser.feed(raw)
    return parser.next_event()


def make_environ(shape: Shape) -> Part:
    """A repeated head is the parser's same Request each time; a new head is a new Request,
    with nothing derived from it yet (``memo``, where the Request has one)."""
    from forkserver import wsgi
    request = parsed(first(shape))
    base = wsgi.base_environ("127.0.0.1", "8000")
    remote = ("127.0.0.1", "50000")
    empty = wsgi.EMPTY_INPUT
    new_heads = isinstance(shape, list) and hasattr(request, "memo")

    def step() -> None:
        if new_heads:
            request.memo = None
        wsgi.build_environ(request, base, remote, empty, None)

    step()
    return Part("environ", step)


class DiscardingChannel:
    """A ``wsgi.Channel`` whose sends go nowhere: the app and response code alone."""

    def __init__(self, raw: bytes) -> None:
        from forkserver.http.parser import RequestParser
        self.parser = RequestParser()
        self.last = b""

    def receive(self) -> bool:
        return False

    def send_all(self, data: bytes) -> None:
        self.last = data

    def send_file(self, fd: int, offset: int, count: int) -> int:
        raise Unsupported("sendfile is not part of the hello-world path")


def make_app(shape: Shape) -> Part:
    from forkserver import wsgi
    raw = first(shape)
    request = parsed(raw)
    environ = wsgi.build_environ(request, wsgi.base_environ("127.0.0.1", "8000"),
                                 ("127.0.0.1", "50000"), wsgi.EMPTY_INPUT, None)
    channel = DiscardingChannel(raw)

    def log_error(message: str, with_traceback: bool) -> None:
        raise AssertionError(message)

    handle = wsgi.handle
    arguments = by_name(handle, {
        "app": hello, "channel": channel, "request": request, "environ": environ,
        "body": wsgi.EMPTY_INPUT, "wsgi_input": wsgi.EMPTY_INPUT, "keep_alive": True,
        "server": b"forkserver", "log_error": log_error})

    def step() -> None:
        handle(**arguments)

    step()
    if not channel.last.startswith(OK):
        raise Unsupported(f"wsgi.handle sent {channel.last[:40]!r}")
    return Part("app + response", step)


def make_scoreboard(shape: Shape) -> Part:
    from forkserver.scoreboard import Scoreboard, State
    board = Scoreboard(1)
    board.claim(0, os.getpid(), 1)
    slot = board.writer(0)
    raw = first(shape)
    line = raw[:raw.index(b" HTTP/")]

    def step() -> None:
        slot.request_started(line)
        slot.request_finished(200, 160, State.KEEPALIVE, 0.0001)

    step()
    return Part("scoreboard", step, cleanup=[board.close])


# --------------------------------------------------------------------------------------------
# A real Worker, driven through the seams its epoll loop uses.

_SETTINGS: list[Any] = []
_NOTED: list[list[str]] = []  # WorkerSpec fields this harness does not know, said once


def default_settings() -> Any:
    """The settings a bare ``forkserver load.apps:hello`` would run with (no config file)."""
    if not _SETTINGS:
        from forkserver import config
        with tempfile.TemporaryDirectory() as cwd:
            _SETTINGS.append(config.resolve({"app": "load.apps:hello"}, None, {}, cwd)
                             if "app" in {s.name for s in config.SETTINGS}
                             else config.resolve({}, None, {}, cwd))
    return _SETTINGS[0]


def make_worker(listener: socket.socket, handoff: bool = False
                ) -> tuple[Any, list[Callable[[], None]]]:
    """A Worker serving ``hello`` on ``listener``, built as the master would (no boot: no
    signal handlers or process title in this process); with ``handoff``, with a handoff channel
    and the default ``handoff_delay`` (its watcher thread runs)."""
    from forkserver import worker as worker_module
    from forkserver.scoreboard import Scoreboard
    board = Scoreboard(1)
    board.claim(0, os.getpid(), 1)
    offered = {"settings": default_settings(), "index": 0, "generation": 1,
               "listeners": [listener], "load_app": lambda: hello, "scoreboard": board,
               "master_pid": os.getppid(), "title": "hotpath", "max_requests": 0, "hooks": {},
               "access_log": None, "tls_context": None, "reload_dir": None, "notify_fd": -1}
    cleanup: list[Callable[[], None]] = [board.close]
    if handoff:
        from forkserver.handoff import Channel
        channel = Channel.create()
        offered["handoff"] = channel
        cleanup += [channel.receiving.close, channel.sending.close]
    spec_type = worker_module.WorkerSpec
    fields = dataclasses.fields(spec_type)
    missing = [f.name for f in fields if f.name not in offered
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    for name in missing:  # a field added since: None is "not wired" (a failure makes it n/a)
        offered[name] = None
    spec = spec_type(**{f.name: offered[f.name] for f in fields if f.name in offered})
    if missing and not _NOTED:
        _NOTED.append(missing)
        print(f"(WorkerSpec fields given None: {', '.join(missing)})", file=sys.stderr)
    worker = worker_module.Worker(spec)
    for part in parts_of(worker):  # wherever the worker keeps the app it calls
        if hasattr(part, "app") and (part.app is None or callable(part.app)):
            try:
                part.app = hello
            except AttributeError:  # a frozen record, not the app's holder
                pass
    for name in ("epoll",):
        handle = getattr(worker, name, None)
        if handle is not None:
            cleanup.insert(0, handle.close)
    for name in ("wake_r", "wake_w"):
        fd = getattr(worker, name, None)
        if isinstance(fd, int):
            cleanup.insert(0, lambda fd=fd: os.close(fd))
    return worker, cleanup


def parts_of(worker: Any) -> list[Any]:
    """The worker and the objects it holds directly: a seam may live on either."""
    held = getattr(worker, "__dict__", {}).values()
    return [worker, *(part for part in held
                      if not isinstance(part, (dict, list, tuple, set, socket.socket)))]


def holders(worker: Any, name: str) -> list[Any]:
    """Every one of ``parts_of(worker)`` with an attribute ``name``."""
    found = [part for part in parts_of(worker) if hasattr(part, name)]
    if not found:
        raise Unsupported(f"no part of the Worker has {name!r}")
    return found


def seam(worker: Any, names: tuple[str, ...]) -> Callable:
    for part in parts_of(worker):
        for name in names:
            method = getattr(part, name, None)
            if callable(method):
                return method
    raise Unsupported(f"Worker has none of {', '.join(names)}")


def by_name(function: Callable, offered: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments for ``function`` among the offered values (signatures move)."""
    parameters = inspect.signature(function).parameters
    missing = [name for name, parameter in parameters.items()
               if name not in offered and parameter.default is inspect.Parameter.empty
               and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)]
    if missing:
        raise Unsupported(f"{function.__name__}() needs {', '.join(missing)}")
    return {name: offered[name] for name in parameters if name in offered}


def adopt(worker: Any, sock: socket.socket, remote: tuple[str, str]) -> Any:
    """Hand ``sock`` to the worker as its accept path would; returns the worker's connection."""
    sock.setblocking(False)
    method = getattr(worker, "adopt", None)
    if callable(method):
        method(sock, remote)
    else:
        from forkserver import worker as worker_module
        base = next(iter(worker.listeners.values()))[1]
        conn = worker_module.Connection(worker, sock, remote, base)
        worker.conns[conn.fd] = conn
    conn = worker.conns.get(sock.fileno())
    if conn is None:
        raise Unsupported("the worker did not keep the adopted connection")
    return conn


class KeepAliveClient:
    """A client on a socketpair whose other end a Worker serves; it reconnects when the worker
    closes the connection (``keepalive_requests``), as wrk does."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.read_handler = seam(worker, READ_HANDLERS)
        self.client: socket.socket | None = None
        self.conn: Any = None
        self.server: socket.socket | None = None
        self.on_connect: Callable[[Any], None] | None = None  # for ablations: sees each conn
        self.connect()

    def connect(self) -> None:
        self.close()
        self.client, self.server = socket.socketpair()
        self.conn = adopt(self.worker, self.server, ("127.0.0.1", "50000"))
        if self.on_connect is not None:
            self.on_connect(self.conn)

    def request(self, raw: bytes) -> None:
        client = self.client
        client.send(raw)
        self.read_handler(self.conn)
        if not client.recv(65536).startswith(OK):
            raise AssertionError("the worker did not answer 200")
        if self.server.fileno() < 0:  # the worker closed it after its last request
            self.connect()

    def close(self) -> None:
        for sock in (self.client, self.server):
            if sock is not None:
                sock.close()


def make_whole(shape: Shape, handoff: bool = False) -> Part:
    listener = socket.create_server(("127.0.0.1", 0))
    worker, cleanup = make_worker(listener, handoff)
    cleanup.insert(0, listener.close)
    part = Part("whole path, handoff" if handoff else "whole path", cleanup=cleanup)
    try:
        if handoff:  # what Worker.open does when the spec carries a channel
            from forkserver.handing import Handing
            worker.handing = Handing(worker, worker.spec.handoff,
                                     worker.settings.handoff_delay / 1000)
            worker.handing.open()
            cleanup.insert(0, worker.handing.close)
        client = KeepAliveClient(worker)
        cleanup.insert(0, client.close)
        next_raw = turns(shape)
        client.request(next_raw())
    except BaseException:
        run_cleanup(part)
        raise
    part.step = lambda: client.request(next_raw())
    return part


def expect_close(client: socket.socket, problem: str) -> None:
    """Read a hello-world response to its end, then the server's close; else raise."""
    reply = client.recv(65536)
    while not reply.endswith(b"Hello, World!"):
        reply += client.recv(65536)
    if not reply.startswith(OK) or client.recv(1):
        raise AssertionError(problem)


def make_close(shape: Shape) -> Part:
    next_raw = turns([raw[:-2] + CLOSE_FIELD + b"\r\n"
                      for raw in (shape if isinstance(shape, list) else [shape])])
    from forkserver.sockets import bind, parse_bind
    listener = bind(parse_bind("127.0.0.1:0"), 64)  # with the options the master sets
    worker, cleanup = make_worker(listener)
    cleanup.insert(0, listener.close)
    address = listener.getsockname()
    accept = seam(worker, ACCEPT_HANDLERS)
    fd = listener.fileno()

    def step() -> None:
        client = socket.create_connection(address)
        try:
            client.send(next_raw())
            accept(fd)
            expect_close(client, "the worker did not answer 200 and close")
        finally:
            client.close()

    part = Part("close path (TCP)", step, count_scale=0.1, cleanup=cleanup)
    try:
        step()
    except BaseException:
        run_cleanup(part)
        raise
    return part


def make_close_floor(shape: Shape) -> Part:
    next_raw = turns([raw[:-2] + CLOSE_FIELD + b"\r\n"
                      for raw in (shape if isinstance(shape, list) else [shape])])
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    address = listener.getsockname()
    buffer = bytearray(64 * 1024)

    def step() -> None:
        client = socket.create_connection(address)
        try:
            client.send(next_raw())
            server, _ = listener.accept()
            server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            server.setblocking(False)
            server.recv_into(buffer)
            server.send(FLOOR_RESPONSE)
            server.close()
            expect_close(client, "no constant response and close")
        finally:
            client.close()

    step()
    return Part("close floor (TCP)", step, count_scale=0.1, cleanup=[listener.close])


def run_cleanup(part: Part) -> None:
    for close in part.cleanup:
        try:
            close()
        except OSError:
            pass
    part.cleanup = []


# --------------------------------------------------------------------------------------------
# Ablations: the whole path again with one part replaced by (nearly) nothing. Code measured
# alone runs with hot caches and predictors; inside the path it costs more, and the difference
# an ablation makes is what removing or shrinking that part could gain.

class CannedParser:
    """Stands in for a connection's parser: each ``feed`` replays the events a real parser gave
    for the request (the same Request object every time), with no parsing."""

    buffered = 0
    in_message = False

    def __init__(self, raw: bytes) -> None:
        from forkserver.http.parser import RequestParser
        real = RequestParser(parser_limits())
        real.feed(raw)
        self.canned = (real.next_event(), real.next_event())  # the Request, END_OF_MESSAGE
        real.start_next()
        self.need_data = real.next_event()
        self.events: list[Any] = []
        self.trailers: list[Any] = []

    def feed(self, data: Any) -> None:
        self.events = list(self.canned)

    def next_event(self) -> Any:
        return self.events.pop(0) if self.events else self.need_data

    def start_next(self) -> None:
        self.events = []  # like the real one: what is left of the last request is done

    def eof(self) -> None:
        pass


class NoSlot:
    """A scoreboard slot writer that writes nothing."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


@dataclasses.dataclass(slots=True)
class Sent:
    """What the worker reads from an exchange."""

    status_code: int
    bytes_sent: int
    keep_alive: bool
    close_reason: str = ""
    verdict: Any = None  # wsgi.Verdict where the worker reads one


def canned_handle(real: Callable) -> Callable[..., Sent]:
    """``real`` (``wsgi.handle``) reduced to one constant send: no app call, no response."""
    names = list(inspect.signature(real).parameters)
    at_channel, at_keep_alive = names.index("channel"), names.index("keep_alive")

    def handle(*args: Any, **kwargs: Any) -> Sent:
        channel = args[at_channel] if len(args) > at_channel else kwargs["channel"]
        keep_alive = args[at_keep_alive] if len(args) > at_keep_alive else kwargs["keep_alive"]
        channel.send_all(FLOOR_RESPONSE)
        from forkserver import wsgi
        verdicts = getattr(wsgi, "Verdict", None)
        verdict = None if verdicts is None else verdicts.KEEP if keep_alive else verdicts.CLOSE
        return Sent(200, len(FLOOR_RESPONSE), keep_alive, verdict=verdict)
    return handle


def ablations(shape: Shape) -> dict[str, Callable[[Any, KeepAliveClient], Callable[[], None]]]:
    """name -> apply(worker, client), which returns the function that undoes it."""
    from forkserver import wsgi
    raw = first(shape)

    def parser_off(worker: Any, client: KeepAliveClient) -> Callable[[], None]:
        canned = CannedParser(raw)

        def swap(conn: Any) -> None:
            conn.parser = canned
        swap(client.conn)
        client.on_connect = swap
        return lambda: setattr(client, "on_connect", None) or client.connect()

    def attribute(owners: list[Any], name: str, value: Any) -> Callable[[], None]:
        olds = [(owner, getattr(owner, name)) for owner in owners]
        for owner in owners:
            setattr(owner, name, value)
        return lambda: [setattr(owner, name, old) for owner, old in olds] and None

    def environ_off(worker: Any, client: KeepAliveClient) -> Callable[[], None]:
        environ = wsgi.build_environ(parsed(raw), wsgi.base_environ("127.0.0.1", "8000"),
                                     ("127.0.0.1", "50000"), wsgi.EMPTY_INPUT, None)
        return attribute([wsgi], "build_environ", lambda *args: environ)

    return {
        "parser canned": parser_off,
        "environ prebuilt": environ_off,
        "no trusted proxies": lambda worker, client: attribute(holders(worker, "proxies"),
                                                               "proxies", None),
        "scoreboard off": lambda worker, client: attribute(holders(worker, "slot"), "slot",
                                                           NoSlot()),
        "wsgi.handle: 1 send": lambda worker, client: attribute([wsgi], "handle",
                                                                canned_handle(wsgi.handle)),
    }


def measure_ablations(shape: Shape, count: int, rounds: int) -> dict[str, float | str]:
    """Whole-path µs per request for the real path and each ablation, taken in turns (so
    drift on a shared machine hits all alike); the best of the rounds counts."""
    part = build(make_whole, "whole path", shape)
    if part.step is None:
        return {"real path": part.why}
    run_cleanup(part)
    listener = socket.create_server(("127.0.0.1", 0))
    worker, cleanup = make_worker(listener)
    client = KeepAliveClient(worker)
    next_raw = turns(shape)

    def step() -> None:
        client.request(next_raw())

    figures: dict[str, float | str] = {"real path": float("inf")}
    try:
        for _ in range(rounds):
            try:
                figures["real path"] = min(figures["real path"], best_us(step, count, 1))
            except Exception as error:  # noqa: BLE001 - the worker moved under an ablation
                figures["real path"] = f"{type(error).__name__}: {error}"
                break
            for name, apply in ablations(shape).items():
                if isinstance(figures.get(name), str):
                    continue
                try:
                    undo = apply(worker, client)
                    try:
                        figures[name] = min(figures.get(name, float("inf")),
                                            best_us(step, count, 1))
                    finally:
                        undo()
                except Exception as error:  # noqa: BLE001 - a seam that moved: n/a
                    figures[name] = f"{type(error).__name__}: {error}"
                    client.connect()  # a fresh connection for the next row
    finally:
        client.close()
        for close in [listener.close, *cleanup]:
            close()
    return figures


def print_ablations(results: dict[str, dict[str, float | str]]) -> None:
    print("\nablations: whole path with one part replaced; saved = real path - this row")
    shapes = list(results)
    print(f"{'':<22}" + "".join(f"{shape:>10}{'saved':>8}" for shape in shapes))
    for name in results[shapes[0]]:
        cells = []
        for shape in shapes:
            value, real = results[shape][name], results[shape]["real path"]
            if isinstance(value, float) and isinstance(real, float):
                cells.append(f"{value:10.2f}{real - value:8.2f}")
            else:
                cells.append(f"{'n/a':>18}")
                print(f"  n/a {name} ({shape}): {value}")
        print(f"{name:<22}" + "".join(cells))


# --------------------------------------------------------------------------------------------
# Running and reporting.

BUILDERS: tuple[Callable[[Shape], Part], ...] = (
    make_floor, make_parser, lambda raw: make_parser(raw, fresh=True), make_environ, make_app,
    make_scoreboard, make_whole, lambda raw: make_whole(raw, handoff=True), make_close,
    make_close_floor)
NAMES = ("socket floor", "parser", "parser, new each", "environ", "app + response",
         "scoreboard", "whole path", "whole path, handoff", "close path (TCP)",
         "close floor (TCP)")
GLUE_PARTS = ("socket floor", "parser", "environ", "app + response", "scoreboard")


def build(builder: Callable[[Shape], Part], name: str, shape: Shape) -> Part:
    try:
        return builder(shape)
    except Exception as error:  # noqa: BLE001 - any mismatch with the code makes the row n/a
        return Part(name, why=f"{type(error).__name__}: {error}")


def measure_parts(shape: Shape, names: Iterable[str], measure: Callable[[Part], Any]
                  ) -> dict[str, Any]:
    """``measure(part)`` for each named part, built and cleaned up in turn; the reason instead
    where a part is n/a or its measurement fails."""
    figures: dict[str, Any] = {}
    for builder, name in zip(BUILDERS, NAMES, strict=True):
        if name not in names:
            continue
        part = build(builder, name, shape)
        try:
            figures[name] = part.why if part.step is None else measure(part)
        except Exception as error:  # noqa: BLE001
            figures[name] = f"{type(error).__name__}: {error}"
        finally:
            run_cleanup(part)
    return figures


def measure_shape(shape: Shape, count: int, repeats: int) -> dict[str, float | str]:
    """µs per request for each part (or the reason it is n/a), plus the derived glue."""
    figures = measure_parts(shape, NAMES, lambda part: best_us(
        part.step, max(1, int(count * part.count_scale)), repeats))
    parts = [figures[name] for name in ("whole path", *GLUE_PARTS)]
    if all(isinstance(value, float) for value in parts):
        figures["glue"] = parts[0] - sum(parts[1:])
    else:
        figures["glue"] = "needs every part above"
    return figures


def print_table(results: dict[str, dict[str, float | str]]) -> None:
    shapes = list(results)
    ratios = "wrk" in shapes and "browser" in shapes
    print(f"{'µs CPU per request':<20}" + "".join(f"{shape:>12}" for shape in shapes)
          + ("   browser/wrk" if ratios else ""))
    notes: list[str] = []
    for name in (*NAMES, "glue"):
        cells = []
        for shape in shapes:
            value = results[shape][name]
            if isinstance(value, float):
                cells.append(f"{value:12.2f}")
            else:
                cells.append(f"{'n/a':>12}")
                notes.append(f"{name} ({shape}): {value}")
        ratio = ""
        if ratios:
            wrk, browser = results["wrk"][name], results["browser"][name]
            if isinstance(wrk, float) and isinstance(browser, float) and wrk > 0:
                ratio = f"{browser / wrk:12.2f}x"
        print(f"{name:<20}" + "".join(cells) + ratio)
    for note in dict.fromkeys(notes):
        print(f"  n/a {note}")


def profile(requests: Shape, shape: str, count: int, top: int) -> None:
    """cProfile the whole path (or, if it cannot run, the parser); top functions by own time."""
    part = build(make_whole, "whole path", requests)
    if part.step is None:
        print(f"\nwhole path n/a ({part.why}); profiling the parser instead")
        part = build(make_parser, "parser", requests)
    if part.step is None:
        print(f"parser n/a ({part.why})")
        return
    profiler = cProfile.Profile()
    try:
        profiler.runcall(lambda: [part.step() for _ in range(count)])
    finally:
        run_cleanup(part)
    stats = pstats.Stats(profiler)
    table = stats.stats  # type: ignore[attr-defined]
    rows = sorted(table.items(), key=lambda item: item[1][2], reverse=True)
    print(f"\n{part.name}, {shape} request: top {top} functions by own time, per request "
          f"(cProfile inflates every call; read the shares, not the absolute figures)")
    print(f"{'own µs':>8} {'cum µs':>8} {'calls':>6}  function")
    for (filename, line, function), (_, calls, own, cumulative, _) in rows[:top]:
        where = f"{Path(filename).name}:{line}" if line else filename
        print(f"{own / count * 1e6:8.2f} {cumulative / count * 1e6:8.2f} {calls / count:6.2f}"
              f"  {function} ({where})")


COLD_PARTS = ("parser, new each", "environ", "app + response", "scoreboard")


def evicting(kib: int) -> Callable[[], None]:
    """A call that writes one byte in each 64-byte line of a ``kib`` KiB buffer."""
    buffer = bytearray(kib * 1024)
    ones = b"\x01" * len(buffer[::64])

    def evict() -> None:
        buffer[::64] = ones

    return evict


def each_call_us(step: Step, count: int, repeats: int, before: Callable[[], None]) -> float:
    """The lowest mean wall time of ``step`` over ``repeats`` runs of ``count`` calls, in
    microseconds, with ``before`` run untimed ahead of each call."""
    clock = time.perf_counter_ns
    best = float("inf")
    for _ in range(repeats):
        total = 0
        for _ in range(count):
            before()
            started = clock()
            step()
            total += clock() - started
        best = min(best, total / count)
    return best / 1000


def measure_cold(shape: Shape, count: int, repeats: int, kib: int
                 ) -> dict[str, tuple[float, float] | str]:
    """(hot, with ``kib`` KiB evicted before each call) µs for each of COLD_PARTS."""
    evict = evicting(kib)
    return measure_parts(shape, COLD_PARTS, lambda part: (
        each_call_us(part.step, count, repeats, lambda: None),
        each_call_us(part.step, count, repeats, evict)))


def print_cold(results: dict[str, dict[str, tuple[float, float] | str]], kib: int) -> None:
    print(f"\nµs wall per call, hot / with {kib} KiB evicted before each call")
    for shape, figures in results.items():
        total_hot = total_cold = 0.0
        for name, value in figures.items():
            if isinstance(value, str):
                print(f"{shape:<8} {name:<18} n/a ({value})")
                continue
            hot, cold = value
            total_hot, total_cold = total_hot + hot, total_cold + cold
            print(f"{shape:<8} {name:<18} {hot:8.2f} {cold:8.2f} {cold / hot:6.2f}x")
        if total_hot:
            print(f"{shape:<8} {'together':<18} {total_hot:8.2f} {total_cold:8.2f} "
                  f"{total_cold / total_hot:6.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20_000, help="requests per repeat")
    parser.add_argument("--repeats", type=int, default=5, help="repeats; the best one counts")
    parser.add_argument("--quick", action="store_true", help="--count 3000 --repeats 3")
    parser.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
    parser.add_argument("--profile", action="store_true", help="cProfile the whole path")
    parser.add_argument("--ablate", action="store_true",
                        help="the whole path with each part replaced in turn")
    parser.add_argument("--top", type=int, default=25, help="functions listed by --profile")
    parser.add_argument("--evict", type=int, metavar="KIB", default=0,
                        help="also the Connection: close parts with KIB KiB evicted before each")
    args = parser.parse_args(argv)
    if args.quick:
        args.count, args.repeats = 3000, 3
    shapes = list(SHAPES) if args.shape == "all" else [args.shape]
    print(f"python {sys.version.split()[0]} on {os.cpu_count()} CPUs, "
          f"{args.count} requests x {args.repeats} repeats, best repeat counts")
    results = {shape: measure_shape(SHAPES[shape], args.count, args.repeats) for shape in shapes}
    print_table(results)
    if args.ablate:
        print_ablations({shape: measure_ablations(SHAPES[shape], max(1000, args.count // 4),
                                                  args.repeats + 2) for shape in shapes})
    if args.evict:
        print_cold({shape: measure_cold(SHAPES[shape], max(200, args.count // 40), args.repeats,
                                        args.evict) for shape in shapes}, args.evict)
    if args.profile:
        for shape in shapes:
            profile(SHAPES[shape], shape, min(args.count, 10_000), args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
