"""A worker: one epoll loop that accepts, parses, parks keep-alive connections and runs the app.

The loop never blocks on a client except while the app runs: heads and small bodies are read
without blocking under a deadline, idle keep-alive connections wait in epoll, and only a request
that has fully arrived (or whose body is large or expected via ``100-continue``) reaches the app.
While the app runs, its reads and writes on that one connection block with a timeout.

Each connection has one live deadline (head, body, idle or linger), all on the monotonic clock;
the loop sleeps until the nearest one (rule 7 of style.md).
"""

from __future__ import annotations

import _socket
import errno
import faulthandler
import fcntl
import os
import resource
import select
import signal
import socket
import ssl
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from forkserver import handoff, logs, mold, tls, upkeep, wsgi
from forkserver.handing import Handing
from forkserver.http.errors import HTTPError, RequestTimeout
from forkserver.http.parser import NEED_DATA, Limits, Request, RequestParser
from forkserver.http.response import http_date
from forkserver.phases import NEXT, Phase, check_move
from forkserver.preamble import Preamble
from forkserver.scoreboard import Reason, Scoreboard, State
from forkserver.threaded import Lending
from forkserver.wsgi import ClientDisconnected, Verdict

if TYPE_CHECKING:
    from forkserver.config import Settings

# Exit codes the master understands.
EXIT_OK = 0
EXIT_BOOT_ERROR = 3      # the app (or a boot hook) failed to load
# The master may sleep on WorkerSpec.notify_fd: a worker writes a byte there when it becomes
# ready and when it asks to be replaced.
NOTIFIES_MASTER = True

RECV_SIZE = 64 * 1024
ACCEPT_BATCH = 4           # connections taken per wakeup, so workers share a burst
HOUSEKEEPING_INTERVAL = 1.0
STOP_IDLE_GRACE = 2.0      # a stopping worker's idle keep-alive connections get this long
SERVER_HEADER = b"forkserver"
_NEVER = float("inf")
WOULD_BLOCK = tls.WOULD_BLOCK  # BlockingIOError, or an SSLSocket's want-read/want-write

# accept() errors that concern only the connection being accepted (see accept(2), Linux).
_ACCEPT_RETRY = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN,
                           errno.ENOPROTOOPT, errno.EHOSTDOWN, errno.ENONET,
                           errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH})
# sendfile() errors that are the client's socket's, not the file's.
_CLIENT_ERRNOS = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ETIMEDOUT, errno.ENOTCONN})


# Plain module names for the hot path (an Enum member lookup through its class costs ~60 ns).
HEAD, BODY, BUSY, IDLE, LINGER = Phase.HEAD, Phase.BODY, Phase.BUSY, Phase.IDLE, Phase.LINGER
PROXY, HANDSHAKE = Phase.PROXY, Phase.HANDSHAKE
KEEP, CLOSE, ABORT = Verdict.KEEP, Verdict.CLOSE, Verdict.ABORT
EMPTY_INPUT = wsgi.EMPTY_INPUT
KEEPALIVE_STATE, IDLE_STATE = int(State.KEEPALIVE), int(State.IDLE)  # as the slot stores them


@dataclass(frozen=True)
class WorkerSpec:
    """What the master decided for one worker before the fork. Every tunable is read from
    ``settings`` (the worker never reads config files); only what differs per worker, or was
    opened or imported by the master, has a field of its own."""

    settings: Settings
    index: int  # scoreboard slot
    generation: int
    listeners: list[socket.socket]
    load_app: Callable[[], Callable]
    scoreboard: Scoreboard
    master_pid: int
    title: str
    max_requests: int  # settings.max_requests plus this worker's jitter; 0: no limit
    hooks: dict[str, Callable]  # the worker-side hooks, already imported
    access_log: logs.AccessLog | None  # opened by the master; None: off
    tls_context: ssl.SSLContext | None  # built once per generation by the master; None: plain
    reload_dir: str | None  # with `reload`: where the worker reports the module files it imported
    notify_fd: int  # write end of the master's wakeup pipe (readiness, recycle requests); -1: none
    handoff: handoff.Channel | None  # the channel busy workers pass connections over; None: off
    mold_link: socket.socket | None  # refork: where a promoted template announces its mold


class Connection:
    """One client connection; also the ``wsgi.Channel`` the app's I/O goes through.

    Every failure of this socket while the app runs surfaces as ``ClientDisconnected``, so
    the exchange can tell the client's faults from the app's.
    """

    __slots__ = (
        "base",
        "body",
        "body_deadline",
        "deadline",
        "drained",
        "fd",
        "handshake",
        "hops",
        "lent",
        "parser",
        "phase",
        "proxy",
        "registered",
        "remote",
        "request",
        "requests",
        "running",
        "sock",
        "tls",
        "view",
        "worker",
    )

    def __init__(self, worker: Worker, sock: socket.socket, remote: tuple[str, str],
                 base: dict[str, Any]) -> None:
        self.worker = worker
        self.sock = sock
        self.fd = sock.fileno()
        self.parser = RequestParser(worker.limits)
        self.remote = remote
        self.base = base
        self.phase = HEAD
        self.deadline = 0.0
        self.requests = 0
        self.hops = 0                    # handoffs since its last request was served
        self.request: Request | None = None         # its head is in; the app has not run yet
        self.body: wsgi.Body | wsgi.EmptyInput | None = None  # that request's body
        self.body_deadline = 0.0
        self.drained = 0                 # bytes discarded while lingering
        self.registered = False          # known to epoll (only once it outlives its first read)
        self.view = worker.view          # receive()'s buffer; a pool thread brings its own
        self.lent: tuple[Request, Any, bool] | None = None  # what a pool thread is to run
        self.running = ""                # "METHOD target" of the request lent to a thread
        self.proxy: Any = None           # the PROXY header reader, while in PROXY
        self.handshake: Any = None       # the TLS handshake, while in HANDSHAKE
        self.tls = False                 # sock is an SSLSocket: no sendfile

    def drain(self) -> bool:
        """Lingering: read and discard what the client sends; True once that is over (the
        client closed, or sent more than linger_bytes)."""
        limit = self.worker.settings.linger_bytes
        buffer = self.worker.buffer
        while True:
            try:
                n = self.sock.recv_into(buffer)
            except WOULD_BLOCK:
                return False
            except OSError:
                n = 0
            self.drained += n
            if n == 0 or self.drained > limit:
                return True

    def end_tls(self) -> None:
        """Say close_notify before the TCP close, so a client reading a close-delimited body
        can tell the end from a truncation. Best effort: the peer's own close_notify is not
        awaited (the first SSL_shutdown sends ours; the second would block and is skipped)."""
        self.tls = False
        try:
            self.sock.unwrap()
        except (ssl.SSLError, OSError, ValueError):
            pass

    # -- wsgi.Channel: blocking with timeouts, used only while the app runs -------------------
    def receive(self) -> bool:
        """More request body for the app. The worker is held while it waits, so a body that
        trickles in is cut off (408) long before the master's timeout would abort the worker:
        after ``header_timeout`` of grace it must keep arriving at ``min_body_rate``."""
        worker = self.worker
        rate = worker.settings.min_body_rate
        if not self.body_deadline:
            self.body_deadline = (time.monotonic() + worker.settings.header_timeout if rate
                                  else float("inf"))
        while True:
            try:
                n = self.sock.recv_into(self.view)
            except WOULD_BLOCK as blocked:
                left = self.body_deadline - time.monotonic()
                if left <= 0:
                    raise RequestTimeout("request body arrives too slowly") from None
                self._wait(select.POLLOUT if isinstance(blocked, ssl.SSLWantWriteError)
                           else select.POLLIN, "send the request body", left)
                continue
            except OSError as error:
                raise ClientDisconnected(f"receiving: {error}") from None
            if n == 0:
                return False
            if rate:
                self.body_deadline += n / rate
            self.parser.feed(self.view[:n])
            return True

    def send_all(self, data: bytes) -> None:
        sock = self.sock
        events = select.POLLOUT
        try:
            sent = sock.send(data)
        except WOULD_BLOCK as blocked:
            sent, events = 0, _wait_for(blocked)
        except OSError as error:
            raise ClientDisconnected(f"sending: {error}") from None
        if sent == len(data):
            return
        view = memoryview(data)[sent:]
        while view:
            self._wait(events, "read the response")
            try:
                sent = sock.send(view)
            except WOULD_BLOCK as blocked:
                events = _wait_for(blocked)
                continue
            except OSError as error:
                raise ClientDisconnected(f"sending: {error}") from None
            view = view[sent:]

    def send_file(self, fd: int, offset: int, count: int) -> int:
        if self.tls:  # the kernel cannot encrypt: read and send through the SSLSocket
            data = tls.read_file_chunk(fd, offset, count)
            if data:
                self.send_all(data)
            return len(data)
        while True:
            try:
                return os.sendfile(self.fd, fd, offset, count)
            except BlockingIOError:
                self._wait(select.POLLOUT, "read the response")
            except OSError as error:
                if error.errno in _CLIENT_ERRNOS:
                    raise ClientDisconnected(f"sending a file: {error}") from None
                raise  # the file's fault: the app's, not the client's

    def _wait(self, events: int, what: str, limit: float | None = None) -> None:
        seconds = self.worker.settings.send_timeout
        if limit is not None and limit < seconds:
            seconds = limit
        poller = select.poll()
        poller.register(self.fd, events | select.POLLERR | select.POLLHUP)
        if not poller.poll(seconds * 1000):
            if events & select.POLLIN:
                raise RequestTimeout(f"client did not {what} for {seconds:g}s")
            raise ClientDisconnected(f"client did not {what} for {seconds:g}s")


class Requests(handoff.Inline):
    """Runs each complete request through the app, with its bookkeeping: hooks, scoreboard,
    access log, and recycling after max_requests. As a ``handoff.Inline`` it is also what the
    handoff watcher reads of the request running inline."""

    def __init__(self, spec: WorkerSpec, slot: Any) -> None:
        super().__init__()
        self.spec = spec
        self.settings = spec.settings
        self.slot = slot
        self.log = logs.get_logger()
        self.app: Callable | None = None
        self.proxies = wsgi.trusted_proxies(spec.settings.forwarded_allow_ips,
                                            spec.settings.forwarded_headers)
        self.pre_request = spec.hooks.get("pre_request")
        self.post_request = spec.hooks.get("post_request")
        self.retiring = False  # answer every next request with Connection: close
        self.recycling = False  # asked the master for a replacement
        self.watcher: handoff.Watcher | None = None  # reads app_since, for handoff
        self.log_app_error = self._log_app_error  # bound once, not per request
        self.finished_at = 0.0  # the clock when the last inline request ended

    def _begin(self, conn: Connection, request: Request) -> bool:
        """Count the request on its connection; whether its response may offer keep-alive (the
        exchange may still say no). Retiring: the next request on each connection is answered
        with close, so no client has a connection closed under a request it just sent
        (requests already pipelined behind it are answered first)."""
        conn.body_deadline = 0.0
        conn.requests += 1
        settings = self.settings
        return (request.keep_alive and settings.keepalive > 0
                and conn.requests < settings.keepalive_requests
                and (not self.retiring or conn.parser.buffered > 0))

    def dispatch(self, conn: Connection, request: Request, body: Any) -> Verdict:
        """Run one request; return what becomes of the connection."""
        keep_alive = self._begin(conn, request)
        slot = self.slot
        started = time.monotonic()  # one clock reading per end of the request
        slot.request_started(f"{request.method} {request.target}".encode("latin-1"), started)
        self.app_since = started  # from here the app runs (the caller resets it)
        if self.dozing:
            self.watcher.wake()
        environ = wsgi.build_environ(request, conn.base, conn.remote, body, self.proxies)
        if self.pre_request is not None:
            call_hook(self.pre_request, environ)
        exchange = wsgi.handle(self.app, conn, request, body, environ, keep_alive,
                               SERVER_HEADER, self.log_app_error)
        if self.post_request is not None:
            call_hook(self.post_request, environ, exchange.status_code)
        self.count += 1
        now = self.finished_at = time.monotonic()
        duration = now - started
        verdict = exchange.verdict
        state = KEEPALIVE_STATE if verdict is KEEP else IDLE_STATE
        slot.request_finished(exchange.status_code, exchange.bytes_sent, state, duration, now)
        if self.spec.access_log is not None:
            self._log_access(environ, request, exchange, duration)
        if exchange.close_reason:
            self.log.debug("closing %s after %s %s: %s", conn.remote[0], request.method,
                           request.target, exchange.close_reason)
        if self.spec.max_requests and self.count == self.spec.max_requests:
            self._retire(state)
        return verdict

    def lend(self, conn: Connection, request: Request, body: Any) -> None:
        """The reactor's part of a request a pool thread will run (see ``run_lent``)."""
        keep_alive = self._begin(conn, request)
        conn.lent = (request, body, keep_alive)
        conn.running = f"{request.method} {request.target}"

    def run_lent(self, conn: Connection, seat: Any) -> Verdict:
        """In a pool thread: run the request lent with ``conn`` (as ``dispatch`` does inline),
        recording it in the thread's own scoreboard record; return the connection's verdict."""
        request, body, keep_alive = conn.lent
        conn.lent = None
        local = seat.state
        conn.view = local.view
        record = local.record
        record.request_started(request.method, request.target)
        started = time.monotonic()
        status = bytes_sent = 0
        try:
            environ = wsgi.build_environ(request, conn.base, conn.remote, body, self.proxies)
            if self.pre_request is not None:
                call_hook(self.pre_request, environ)
            exchange = wsgi.handle(self.app, conn, request, body, environ, keep_alive,
                                   SERVER_HEADER, self.log_app_error)
            status, bytes_sent = exchange.status_code, exchange.bytes_sent
            if self.post_request is not None:
                call_hook(self.post_request, environ, status)
        finally:
            duration = time.monotonic() - started
            record.request_finished(status, bytes_sent, duration)
        if self.spec.access_log is not None:
            self._log_access(environ, request, exchange, duration)
        if exchange.close_reason:
            self.log.debug("closing %s after %s %s: %s", conn.remote[0], request.method,
                           request.target, exchange.close_reason)
        return exchange.verdict

    def finished(self) -> None:
        """The reactor's count of a request a thread has finished."""
        self.count += 1
        if self.spec.max_requests and self.count == self.spec.max_requests:
            self._retire(State.IDLE)

    def _retire(self, state: State | int) -> None:
        """Ask the master for a replacement; it sends TERM once that one is ready, so capacity
        never dips. Until then this worker keeps serving, closing each connection after its
        next response."""
        if self.recycling:
            return
        self.recycling = True
        self.log.info("worker %d served %d requests; asking to be recycled",
                      os.getpid(), self.count)
        self.retiring = True
        self.slot.set_state(state, Reason.REQUESTS)
        notify_master(self.spec.notify_fd)

    def _log_access(self, environ: dict[str, Any], request: Request, exchange: Any,
                    duration: float) -> None:
        self.spec.access_log.write(
            environ["REMOTE_ADDR"], request.method, request.target, request.version,
            exchange.status_code, exchange.bytes_sent, duration,
            environ.get("HTTP_USER_AGENT", ""), environ.get("HTTP_REFERER", ""),
            environ.get("HTTP_X_REQUEST_ID", ""))

    def _log_app_error(self, message: str, with_traceback: bool) -> None:
        self.log.error(message, exc_info=with_traceback)


class Listeners:
    """The listening sockets of one worker: their epoll registration and accepting."""

    def __init__(self, worker: Worker, socks: list[socket.socket]) -> None:
        self.worker = worker
        multithread = worker.settings.threads > 1
        # fd -> (listener, its connections' base environ, what socket() needs to wrap one:
        # family, type and protocol as plain ints, read once instead of per accept)
        self.listeners = {sock.fileno(): (sock, listener_environ(sock, multithread),
                                          _accepted_kind(sock))
                          for sock in socks}
        self.accepting = False

    def close_all(self) -> None:
        """Stop accepting for good. What already waits in the backlog is taken first: those
        clients were accepted by the kernel and must get an answer, not a reset."""
        was_accepting = self.accepting
        self.off()
        for fd, (sock, _, _) in self.listeners.items():
            if was_accepting:
                self._batch(fd, self.worker.settings.worker_connections, drain=True)
            sock.close()

    def on(self) -> None:
        lending = self.worker.lending
        if lending is not None and not lending.has_free_thread:
            return  # accept only with a free thread; the next give-back resumes
        if not self.accepting and not self.worker.stopping:
            for fd in self.listeners:
                # EPOLLEXCLUSIVE wakes one waiting worker per connection (no thundering herd);
                # such a registration cannot be modified, only removed and added again.
                self.worker.epoll.register(fd, select.EPOLLIN | select.EPOLLEXCLUSIVE)
            self.accepting = True

    def off(self) -> None:
        if self.accepting:
            for fd in self.listeners:
                self.worker.epoll.unregister(fd)
            self.accepting = False

    def accept(self, fd: int, batch: int = ACCEPT_BATCH) -> None:
        kept = self._batch(fd, batch)
        if kept and self.accepting:
            # EPOLLEXCLUSIVE wakes the first idle epoll on the listener's wait queue, in
            # registration order, so an idle first worker would collect every keep-alive
            # connection. Registering again moves this worker to the back of the queue and
            # spreads long-lived connections round-robin (connections that close at once skip
            # this, so the Connection: close path pays nothing).
            self.off()
            self.on()

    def _batch(self, fd: int, batch: int, drain: bool = False) -> int:
        """Accept up to ``batch`` connections; return how many stay open (keep-alive). Unless
        ``drain``, stop after one that closed at once (``Connection: close``): level-triggered
        epoll reports a backlog again. Accepting on was measured no cheaper: under wrk -c50 a
        second accept finds a connection two times in three, and the failed third's exception
        costs what the saved epoll rounds save; with few clients every one of them fails."""
        worker = self.worker
        listener, base, kind = self.listeners[fd]
        unix = kind[0] == socket.AF_UNIX
        kept = 0
        limit = worker.settings.worker_connections
        for _ in range(batch):
            if len(worker.conns) >= limit and not worker.idle:
                self.off()  # every connection is busy; _go(IDLE) or _close resumes
                return kept
            try:
                # socket.accept() less what a worker never uses (a tenth of a Connection:
                # close request's Python time): accept4 with SOCK_CLOEXEC, then the C socket
                # object for the new descriptor, without socket.socket's Python layer (enum
                # conversions, makefile bookkeeping) on creation and on close.
                new_fd, address = listener._accept()
                sock = _socket.socket(*kind, new_fd)
            except (BlockingIOError, InterruptedError):
                return kept
            except OSError as error:
                if error.errno in _ACCEPT_RETRY:
                    continue  # that one connection failed; the next may be fine
                # Out of descriptors or memory: stop accepting for a moment (housekeeping
                # or the next close resumes), keep serving what is open.
                worker.log.warning("accept failed: %s; pausing accepts", error)
                self.off()
                return kept
            # (TCP_NODELAY comes from the listener: sockets.py sets it there, Linux copies it.)
            remote = ("", "") if unix else (address[0], str(address[1]))
            if len(worker.conns) >= limit:
                # At the limit, the longest-idle keep-alive connection makes room, so a new
                # client is served at once instead of waiting for some connection to expire.
                worker.close(next(iter(worker.idle.values())))
            if worker.adopt(sock, remote, base):
                kept += 1
            elif not drain:
                return kept
        return kept


class Worker:
    """One worker process's loop: accept, read, run the app, park, linger, expire."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.settings = settings = spec.settings
        self.limits = request_limits(settings)
        self.log = logs.get_logger()
        self.buffer = bytearray(RECV_SIZE)
        self.view = memoryview(self.buffer)
        self.conns: dict[int, Connection] = {}
        self.idle: dict[int, Connection] = {}  # IDLE connections, longest-idle first
        self.epoll = select.epoll()
        self.stopping = False          # graceful: finish what was received, then exit
        self.stop_deadline = 0.0
        self.quick_exit = False
        self.pending_signals: deque[int] = deque()
        self.next_deadline = float("inf")
        self.slot = spec.scoreboard.writer(spec.index)
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.requests = Requests(spec, self.slot)
        self.lending: Lending | None = None  # the thread pool, with threads > 1
        self.handing: Handing | None = None  # the handoff channel's use, with handoff_delay
        self.listeners = Listeners(self, spec.listeners)
        self.preamble = Preamble.for_worker(self)  # PROXY header, TLS; None: HTTP at once

    # -- setup ------------------------------------------------------------------------------
    def boot(self) -> int | None:
        """Become a worker process and load the app; returns an exit code if it cannot serve."""
        self.slot.set_pid(os.getpid())
        _become_worker_process(self.spec.title)
        _install_signals(self.pending_signals, self.wake_w, self.spec.mold_link is not None)
        app = load_app(self.spec)
        if app is None:
            return EXIT_BOOT_ERROR
        self.open(app)
        return None

    def open(self, app: Callable) -> None:
        """Start serving ``app``: watch the wakeup pipe, accept, tell the master we are ready.
        (Process-wide setup is ``boot``'s; tests drive a worker from here on.)"""
        self.requests.app = app
        self.epoll.register(self.wake_r, select.EPOLLIN)
        if self.settings.threads > 1:
            self.lending = Lending(self, self.settings.threads, RECV_SIZE)
        self.listeners.on()
        if self.spec.handoff is not None and self.settings.handoff_delay > 0:
            self.handing = Handing(self, self.spec.handoff, self.settings.handoff_delay / 1000)
            self.handing.open()
        self.slot.set_state(State.IDLE)
        notify_master(self.spec.notify_fd)

    def adopt(self, sock: socket.socket, remote: tuple[str, str] = ("", ""),
              base: dict[str, Any] | None = None, handed: handoff.Handed | None = None) -> bool:
        """Serve an accepted (or handed-over) client socket; True if it stays open."""
        if sock.fileno() <= 2:
            sock = _move_above_std_fds(sock)
        sock.setblocking(False)
        conn = Connection(self, sock, remote,
                          base or listener_environ(sock, self.settings.threads > 1))
        self.conns[conn.fd] = conn
        if handed is not None:  # its preamble is behind it; what was read comes first
            conn.hops, conn.requests = handed.hops, handed.requests
            if handed.pending:  # (a deadline, if it stays open, as for any connection)
                conn.parser.feed(handed.pending)
                self._process(conn)
                if self.conns.get(conn.fd) is not conn:
                    return False
        elif self.preamble is not None:
            self._arm(conn)
            self.preamble.begin(conn)
            return self.conns.get(conn.fd) is conn
        # The request usually arrived with the connection (TCP_DEFER_ACCEPT): serve it now,
        # and involve epoll, and a deadline, only if the connection stays open.
        self._readable(conn)
        if self.conns.get(conn.fd) is not conn:
            return False
        if conn.phase is HEAD:  # no head, or part of one: header_timeout counts from now
            self._arm(conn)
        self.epoll.register(conn.fd, select.EPOLLIN)
        conn.registered = True
        return True

    # -- phases and deadlines ---------------------------------------------------------------
    def _go(self, conn: Connection, phase: Phase) -> None:
        """Move ``conn`` to ``phase`` (an unlisted move raises) and start its deadline."""
        old = conn.phase
        if phase not in NEXT[old]:
            check_move(old, phase)
        if phase is IDLE:
            self._park(conn, time.monotonic())
            return
        if old is IDLE:
            del self.idle[conn.fd]
        conn.phase = phase
        if phase is BUSY:
            conn.deadline = _NEVER
            return
        self._arm(conn)

    def _park(self, conn: Connection, now: float) -> None:
        """Move ``conn`` to IDLE (legal from every other phase that reaches it, see
        ``phases.NEXT``): it waits for its next request, its keep-alive deadline counted from
        ``now``. After each keep-alive response; ``_go`` checks the moves from elsewhere."""
        conn.phase = IDLE
        self.idle[conn.fd] = conn
        seconds = self.settings.keepalive
        if self.stopping:
            seconds = min(seconds, STOP_IDLE_GRACE)
        deadline = conn.deadline = now + seconds
        if deadline < self.next_deadline:  # noqa: PLR1730 - per request: no call to min()
            self.next_deadline = deadline
        if not self.listeners.accepting and not self.stopping and \
                len(self.conns) >= self.settings.worker_connections:
            self.listeners.on()  # at the limit, an idle connection can make room

    def _arm(self, conn: Connection) -> None:
        """Start the deadline of the phase ``conn`` just entered (IDLE's is ``_park``'s)."""
        seconds = (self.settings.linger_timeout if conn.phase is LINGER
                   else self.settings.header_timeout)
        conn.deadline = deadline = time.monotonic() + seconds
        self.next_deadline = min(self.next_deadline, deadline)

    def _expire(self, now: float) -> None:
        """Act on connections whose deadline passed; find the next deadline."""
        nearest = float("inf")
        for conn in list(self.conns.values()):
            if conn.deadline <= now:
                self._timed_out(conn, now)
                if self.conns.get(conn.fd) is not conn:
                    continue
            nearest = min(nearest, conn.deadline)
        self.next_deadline = nearest

    def _timed_out(self, conn: Connection, now: float) -> None:
        if conn.phase is not LINGER:
            # The worker may have been held (a slow reader, a long request): bytes that came
            # meanwhile are served, not dropped with the connection.
            self._readable(conn)
            if self.conns.get(conn.fd) is not conn or conn.deadline > now:
                return
        if conn.phase is LINGER:
            self.close(conn)
        elif conn.request is not None or conn.parser.in_message:
            self._fail(conn, RequestTimeout("request not received in time"))
        else:
            self.close(conn)

    # -- connection handling ----------------------------------------------------------------
    def close(self, conn: Connection) -> None:
        if self.conns.pop(conn.fd, None) is not None:
            self.idle.pop(conn.fd, None)
            if conn.registered:
                try:
                    self.epoll.unregister(conn.fd)
                except (OSError, ValueError):
                    pass
        if conn.tls:
            conn.end_tls()
        try:
            conn.sock.close()
        except OSError:
            pass
        if not self.listeners.accepting and not self.stopping and \
                len(self.conns) < self.settings.worker_connections:
            self.listeners.on()

    def _fail(self, conn: Connection, error: HTTPError) -> None:
        """Answer a protocol error or a timeout outside the app, then linger."""
        self.log.debug("closing %s: %s %s", conn.remote[0], error.status, error)
        try:
            conn.sock.send(error.response(http_date()))
        except OSError:
            self.close(conn)
            return
        self.linger(conn)

    def _end(self, conn: Connection, verdict: Verdict) -> None:
        """Carry out an exchange's verdict other than KEEP."""
        if verdict is ABORT or (verdict is CLOSE and not conn.parser.buffered):
            self.close(conn)
        else:
            self.linger(conn)

    def linger(self, conn: Connection) -> None:
        """Shut down our side, then read and discard what the client still sends, for up to
        linger_timeout and linger_bytes: closing with unread input would make the kernel send
        a reset, which can destroy the response still in flight (nginx's lingering close)."""
        if not self.settings.linger_bytes or not self.settings.linger_timeout:
            self.close(conn)
            return
        if conn.tls:
            conn.end_tls()
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close(conn)
            return
        conn.drained = 0
        self._go(conn, LINGER)

    def _readable(self, conn: Connection) -> None:
        phase = conn.phase
        if phase is not IDLE and phase is not HEAD and phase is not BODY:
            if phase is LINGER:
                if conn.drain():
                    self.close(conn)
            elif phase is BUSY:  # lent to a pool thread, which alone reads it now
                self.lending.mute(conn)
            else:
                self.preamble.advance(conn)
            return
        try:
            n = conn.sock.recv_into(self.buffer)
        except WOULD_BLOCK:
            return
        except OSError:
            self.close(conn)
            return
        if n == 0:
            # The peer closed. A partial request can never be answered; drop it.
            self.close(conn)
            return
        conn.parser.feed(self.view[:n])
        if phase is IDLE and self.handing is not None and self.lending is not None and \
                self.handing.give_waiting(conn, time.monotonic()):
            return
        self._process(conn)

    def _process(self, conn: Connection) -> None:
        """Run each request that is complete enough for the app, in order, until the parser
        needs more bytes. The body's events are the body's (``wsgi.Body``); this only feeds."""
        parser = conn.parser
        try:
            while True:
                body = conn.body
                if body is None:
                    event = parser.next_event()
                    if event is NEED_DATA:
                        phase = HEAD if parser.in_message else IDLE
                        if conn.phase is not phase:
                            self._go(conn, phase)
                        return
                    # A Request: PAUSED cannot come, every exchange ends with start_next().
                    conn.request = event
                    conn.body = body = wsgi.open_body(conn, event)
                if body is not EMPTY_INPUT and not body.preread():
                    if conn.phase is not BODY:
                        self._go(conn, BODY)
                    return
                request = conn.request
                conn.request = conn.body = None
                if conn.phase is not BUSY:  # (the one hot move, inlined from _go)
                    if conn.phase is IDLE:
                        del self.idle[conn.fd]
                    conn.phase = BUSY  # legal from every phase _process runs in (phases.NEXT)
                    conn.deadline = _NEVER
                conn.hops = 0  # served here: its handoffs start over
                if self.lending is not None:
                    self.lending.lend(conn, request, body)
                    return
                requests = self.requests
                try:
                    verdict = requests.dispatch(conn, request, body)
                finally:
                    requests.app_since = 0.0  # (handoff.Inline) the app has returned
                    if requests.giving:  # forget what the watcher gave away meanwhile
                        for given in requests.watcher.collect():
                            self.close(given)
                if verdict is not KEEP:
                    self._end(conn, verdict)
                    return
                if not parser.start_next():  # nothing pipelined: wait for the next request
                    self._park(conn, requests.finished_at)
                    return
        except HTTPError as error:
            self._fail(conn, error)

    # -- lifecycle --------------------------------------------------------------------------
    def begin_stop(self, reason: Reason = Reason.SHUTDOWN) -> None:
        upkeep.begin_stop(self, reason, STOP_IDLE_GRACE)

    def _handle_signals(self) -> None:
        upkeep.handle_signals(self, run)

    def _housekeeping(self) -> None:
        upkeep.housekeeping(self, guard_std_fds)

    def serve(self) -> int:
        code = self.boot()
        if code is not None:
            return code
        code = self._loop()
        if self.handing is not None:
            self.handing.close()
        if self.lending is not None:
            self.lending.finish(self.quick_exit)
        hook = self.spec.hooks.get("worker_exit")
        if hook is not None:
            call_hook(hook, os.getpid())
        return code

    def run_once(self, timeout: float, now: float | None = None) -> float:
        """One turn of the loop: wait up to ``timeout`` (less if a deadline is nearer) for
        events, serve them, act on signals and passed deadlines; return the time after."""
        conns = self.conns
        if now is None:
            now = time.monotonic()
        wait = min(timeout, self.next_deadline - now)
        events = self.epoll.poll(max(0.0, wait))
        if self.pending_signals:
            self._handle_signals()  # what came first acts first (a USR1 reopen, a TERM)
        for fd, _ in events:
            conn = conns.get(fd)
            if conn is not None:
                self._readable(conn)
            elif fd in self.listeners.listeners:
                if not self.stopping:
                    self.listeners.accept(fd)
            elif self.lending is not None and fd == self.lending.fd:
                self.lending.collect()
            elif self.handing is not None and fd == self.handing.fd:
                self.handing.take()
            elif fd == self.wake_r:
                try:
                    os.read(fd, 512)
                except BlockingIOError:
                    pass
        if self.pending_signals:
            self._handle_signals()
        now = time.monotonic()
        if now >= self.next_deadline:
            self._expire(now)
        return now

    def _loop(self) -> int:
        now = time.monotonic()
        next_housekeeping = now + HOUSEKEEPING_INTERVAL
        while True:
            now = self.run_once(next_housekeeping - now, now)
            if now >= next_housekeeping:
                self._housekeeping()
                next_housekeeping = now + HOUSEKEEPING_INTERVAL
            if self.quick_exit:
                return EXIT_OK
            if self.stopping and (not self.conns or now >= self.stop_deadline or (
                    self.lending is not None and self.lending.only_stuck_left())) and (
                    self.handing is None or not self.handing.rescue(now, self.stop_deadline)):
                return EXIT_OK


def _become_worker_process(title: str) -> None:
    guard_std_fds()
    try:
        import setproctitle
        setproctitle.setproctitle(title)
    except ImportError:  # pragma: no cover - it is a declared dependency
        pass
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # an abort leaves a traceback, no core
    # SIGABRT from the master (timeout) dumps every thread's stack into the error log.
    faulthandler.enable(file=logs.error_stream(), all_threads=True)


def request_limits(settings: Settings) -> Limits:
    return Limits(max_line=settings.limit_request_line, max_fields=settings.limit_request_fields,
                  max_field_size=settings.limit_request_field_size,
                  max_body=settings.limit_request_body, max_head=settings.limit_request_head)


def load_app(spec: WorkerSpec) -> Callable | None:
    """Run the boot hooks and import the app; None (logged) if that fails."""
    hooks = spec.hooks
    inherited = set(sys.modules)  # what the app brought in is the reloader's to watch
    try:
        _drop_privileges(spec.settings.user, spec.settings.group)
        if "post_fork" in hooks:
            hooks["post_fork"](os.getpid())
        app = spec.load_app()
        if "post_worker_init" in hooks:
            hooks["post_worker_init"](os.getpid())
    except Exception as error:  # noqa: BLE001 - any boot failure is reported the same way
        # In development (reload) the traceback of the error in the app's own code is what its
        # author needs (once: the loader's wrapping error adds nothing to it).
        root = error
        while root.__cause__ is not None:
            root = root.__cause__
        logs.get_logger().error("worker %d failed to boot: %s", os.getpid(), error,
                                exc_info=root if spec.reload_dir is not None else None)
        report_modules(spec, inherited, error)
        return None
    report_modules(spec, inherited)
    return app


def report_modules(spec: WorkerSpec, inherited: set[str],
                   error: BaseException | None = None) -> None:
    """With ``reload``: tell the master's reloader which files this app is made of (on a
    failed load too, so fixing the broken file brings the worker back)."""
    if spec.reload_dir is None:
        return
    from forkserver import reloader
    try:
        reloader.report_modules(spec.reload_dir, inherited, error=error)
    except OSError as problem:
        logs.get_logger().warning("cannot report modules for reload: %s", problem)


def _install_signals(pending: deque[int], wake_fd: int, promotable: bool = False) -> None:
    """Handlers only record the signal (the loop acts on it) and wake the loop's epoll.
    ``promotable`` (refork is on): the master's ``mold.PROMOTE_SIGNAL`` is recorded too."""
    recorded = [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1,
                signal.SIGHUP, signal.SIGWINCH]
    if promotable:
        recorded.append(mold.PROMOTE_SIGNAL)
    for signum in recorded:
        signal.signal(signum, lambda signum, frame: pending.append(signum))
    # TTIN/TTOU/USR2 are the master's.
    for signum in (signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)
    signal.set_wakeup_fd(wake_fd, warn_on_full_buffer=False)


def _accepted_kind(listener: socket.socket) -> tuple[int, int, int]:
    """Family, type and protocol of the connections ``listener`` accepts, as plain ints."""
    return int(listener.family), listener.type & ~socket.SOCK_NONBLOCK, listener.proto


def listener_environ(sock: socket.socket, multithread: bool = False) -> dict[str, Any]:
    """The constant part of the environ for connections on ``sock``."""
    address = sock.getsockname()
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        name, port = str(address[0]), str(address[1])
    else:
        name, port = (address if isinstance(address, str) else address.decode()), ""
    base = wsgi.base_environ(name, port, errors=logs.ErrorsStream())
    base["wsgi.multithread"] = multithread
    return base


def _wait_for(blocked: BaseException) -> int:
    """The poll event a WOULD_BLOCK send waits for (a TLS send may need to read first)."""
    return select.POLLIN if isinstance(blocked, ssl.SSLWantReadError) else select.POLLOUT


def notify_master(fd: int) -> None:
    """Wake the master (one byte on its note pipe); a full pipe already wakes it."""
    if fd >= 0:
        try:
            os.write(fd, b"!")
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as error:
            logs.get_logger().debug("cannot notify the master: %s", error)


def call_hook(hook: Callable, *args: Any) -> None:
    try:
        hook(*args)
    except Exception:  # noqa: BLE001 - a hook must not stop serving
        logs.get_logger().exception("hook %s failed", getattr(hook, "__name__", hook))


def guard_std_fds() -> None:
    """Put /dev/null on whichever of 0-2 is closed (an app may close them), so a client socket
    can never get one of those numbers and writes meant for stdout or stderr reach no client."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            else:
                os.set_inheritable(fd, True)


def _move_above_std_fds(sock: socket.socket) -> socket.socket:
    """The same connection under a descriptor above 2, with /dev/null put back on 0-2."""
    high = fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, 3)
    moved = socket.socket(sock.family, sock.type, sock.proto, fileno=high)
    sock.close()
    guard_std_fds()
    return moved

def _drop_privileges(user: str, group: str) -> None:
    """Switch to the configured group and user (only possible when started as root)."""
    if group:
        import grp
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        os.setgroups([gid])
        os.setgid(gid)
    if user:
        import pwd
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        if not group:
            os.initgroups(entry.pw_name, entry.pw_gid)
            os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)


def run(spec: WorkerSpec) -> None:
    """The child's whole life after fork; never returns to the master's code."""
    code = 1
    try:
        code = Worker(spec).serve()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:  # noqa: BLE001 - log whatever killed the worker, then exit
        logs.get_logger().exception("worker %d crashed", os.getpid())
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
