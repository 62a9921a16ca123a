"""A worker: one epoll loop that accepts, parses, parks keep-alive connections and runs the app.

The loop never blocks on a client except while the app runs: heads and small bodies are read
without blocking under a deadline, idle keep-alive connections wait in epoll, and only a request
that has fully arrived (or whose body is large or expected via ``100-continue``) reaches the app.
While the app runs, its reads and writes on that one connection block with a timeout.

Each connection has one live deadline (head, body, idle or linger), all on the monotonic clock;
the loop sleeps until the nearest one (rule 7 of style.md).
"""

from __future__ import annotations

import errno
import faulthandler
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

from forkserver import logs, wsgi
from forkserver.http.errors import HTTPError, RequestTimeout
from forkserver.http.parser import (
    END_OF_MESSAGE,
    NEED_DATA,
    PAUSED,
    Limits,
    Request,
    RequestParser,
)
from forkserver.http.response import http_date
from forkserver.scoreboard import Reason, Scoreboard, State

if TYPE_CHECKING:
    from forkserver.config import Settings

# Exit codes the master understands.
EXIT_OK = 0
EXIT_BOOT_ERROR = 3      # the app (or a boot hook) failed to load

RECV_SIZE = 64 * 1024
PREREAD_LIMIT = 64 * 1024  # bodies up to this size are read before the app is called
LINGER_SECONDS = 2.0       # how long an error close drains the client before closing
ACCEPT_BATCH = 4           # connections taken per wakeup, so workers share a burst
HOUSEKEEPING_INTERVAL = 1.0
SERVER_HEADER = b"forkserver"

# accept() errors that concern only the connection being accepted (see accept(2), Linux).
_ACCEPT_RETRY = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN,
                           errno.ENOPROTOOPT, errno.EHOSTDOWN, errno.ENONET,
                           errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH})

# Connection phases; each but BUSY has its own kind of deadline.
HEAD, BODY, IDLE, LINGER, BUSY = range(5)


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


class Connection:
    """One client connection; also the ``wsgi.Channel`` the app's I/O goes through."""

    __slots__ = (
        "base",
        "body_deadline",
        "body_size",
        "deadline",
        "fd",
        "parser",
        "parts",
        "phase",
        "registered",
        "remote",
        "request",
        "requests",
        "sock",
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
        self.request: Request | None = None
        self.parts: deque | None = None
        self.body_size = 0
        self.body_deadline = 0.0
        self.registered = False          # known to epoll (only once it outlives its first read)

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
                n = self.sock.recv_into(worker.buffer)
            except BlockingIOError:
                left = self.body_deadline - time.monotonic()
                if left <= 0:
                    raise RequestTimeout("request body arrives too slowly") from None
                self._wait(select.POLLIN, "send the request body", left)
                continue
            if n == 0:
                return False
            if rate:
                self.body_deadline += n / rate
            self.parser.feed(worker.view[:n])
            return True

    def send_all(self, data: bytes) -> None:
        sock = self.sock
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return
        view = memoryview(data)[sent:]
        while view:
            self._wait(select.POLLOUT, "write")
            try:
                sent = sock.send(view)
            except BlockingIOError:
                continue
            view = view[sent:]

    def send_file(self, fd: int, offset: int, count: int) -> int:
        while True:
            try:
                return os.sendfile(self.fd, fd, offset, count)
            except BlockingIOError:
                self._wait(select.POLLOUT, "write")

    def _wait(self, events: int, what: str, limit: float | None = None) -> None:
        seconds = self.worker.settings.send_timeout
        if limit is not None and limit < seconds:
            seconds = limit
        poller = select.poll()
        poller.register(self.fd, events | select.POLLERR | select.POLLHUP)
        if not poller.poll(seconds * 1000):
            raise TimeoutError(f"client did not {what} for {seconds:g}s")


class Worker:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.settings = settings = spec.settings
        self.limits = Limits(
            max_line=settings.limit_request_line,
            max_fields=settings.limit_request_fields,
            max_field_size=settings.limit_request_field_size,
            max_body=settings.limit_request_body,
            max_head=settings.limit_request_head,
        )
        self.log = logs.get_logger()
        self.buffer = bytearray(RECV_SIZE)
        self.view = memoryview(self.buffer)
        self.conns: dict[int, Connection] = {}
        self.epoll = select.epoll()
        self.listeners = {sock.fileno(): (sock, self._base_environ(sock))
                          for sock in spec.listeners}
        self.accepting = False
        self.stopping = False          # graceful: finish what was received, then exit
        self.stop_deadline = 0.0
        self.quick_exit = False
        self.pending_signals: deque[int] = deque()
        self.next_deadline = float("inf")
        self.requests = 0
        self.slot = spec.scoreboard.writer(spec.index)
        self.app: Callable | None = None
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.proxies = wsgi.trusted_proxies(settings.forwarded_allow_ips)
        self.pre_request = spec.hooks.get("pre_request")
        self.post_request = spec.hooks.get("post_request")

    # -- setup ------------------------------------------------------------------------------
    def _base_environ(self, sock: socket.socket) -> dict[str, Any]:
        address = sock.getsockname()
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            name, port = str(address[0]), str(address[1])
        else:
            name, port = (address if isinstance(address, str) else address.decode()), ""
        return wsgi.base_environ(name, port, errors=logs.ErrorsStream())

    def _install_signals(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1,
                       signal.SIGHUP):
            signal.signal(signum, self._record_signal)
        # The master sends CHLD-irrelevant signals only; TTIN/TTOU/USR2 are the master's.
        for signum in (signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR2, signal.SIGWINCH):
            signal.signal(signum, signal.SIG_IGN)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)

    def _record_signal(self, signum: int, frame: Any) -> None:
        self.pending_signals.append(signum)

    def boot(self) -> int | None:
        """Load the app; returns an exit code if the worker cannot serve."""
        spec = self.spec
        self.slot.set_pid(os.getpid())
        try:
            import setproctitle
            setproctitle.setproctitle(spec.title)
        except ImportError:  # pragma: no cover - it is a declared dependency
            pass
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # an abort leaves a traceback, no core
        # SIGABRT from the master (timeout) dumps every thread's stack into the error log.
        faulthandler.enable(file=logs.error_stream(), all_threads=True)
        self._install_signals()
        hooks = spec.hooks
        try:
            _drop_privileges(spec.settings.user, spec.settings.group)
            if "post_fork" in hooks:
                hooks["post_fork"](os.getpid())
            self.app = spec.load_app()
            if "post_worker_init" in hooks:
                hooks["post_worker_init"](os.getpid())
        except Exception as error:  # noqa: BLE001 - any boot failure is reported the same way
            self.log.error("worker %d failed to boot: %s", os.getpid(), error)
            return EXIT_BOOT_ERROR
        self.epoll.register(self.wake_r, select.EPOLLIN)
        self._accept_on()
        self.slot.set_state(State.IDLE)
        return None

    # -- accepting --------------------------------------------------------------------------
    def _accept_on(self) -> None:
        if not self.accepting and not self.stopping:
            for fd in self.listeners:
                # EPOLLEXCLUSIVE wakes one waiting worker per connection (no thundering herd);
                # such a registration cannot be modified, only removed and added again.
                self.epoll.register(fd, select.EPOLLIN | select.EPOLLEXCLUSIVE)
            self.accepting = True

    def _accept_off(self) -> None:
        if self.accepting:
            for fd in self.listeners:
                self.epoll.unregister(fd)
            self.accepting = False

    def _accept(self, fd: int, batch: int = ACCEPT_BATCH) -> None:
        kept = self._accept_batch(fd, batch)
        if kept and self.accepting:
            # EPOLLEXCLUSIVE wakes the first idle epoll on the listener's wait queue, in
            # registration order, so an idle first worker would collect every keep-alive
            # connection. Registering again moves this worker to the back of the queue and
            # spreads long-lived connections round-robin (connections that close at once skip
            # this, so the Connection: close path pays nothing).
            self._accept_off()
            self._accept_on()

    def _accept_batch(self, fd: int, batch: int) -> int:
        """Accept up to ``batch`` connections; return how many stay open (keep-alive)."""
        listener, base = self.listeners[fd]
        limit = self.settings.worker_connections
        kept = 0
        for _ in range(batch):
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return kept
            except OSError as error:
                if error.errno in _ACCEPT_RETRY:
                    continue  # that one connection failed; the next may be fine
                # Out of descriptors or memory: stop accepting for a moment (housekeeping
                # or the next close resumes), keep serving what is open.
                self.log.warning("accept failed: %s; pausing accepts", error)
                self._accept_off()
                return kept
            sock.setblocking(False)
            if sock.family == socket.AF_UNIX:
                remote = ("", "")
            else:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                remote = (address[0], str(address[1]))
            conn = Connection(self, sock, remote, base)
            self._set_deadline(conn, HEAD, self.settings.header_timeout)
            self.conns[conn.fd] = conn
            # The request usually arrived with the connection (TCP_DEFER_ACCEPT): serve it now,
            # and involve epoll only if the connection stays open.
            self._readable(conn)
            if conn.fd in self.conns:
                self.epoll.register(conn.fd, select.EPOLLIN)
                conn.registered = True
                kept += 1
            if len(self.conns) >= limit:
                self._accept_off()
                return kept
        return kept

    # -- deadlines --------------------------------------------------------------------------
    def _set_deadline(self, conn: Connection, phase: int, seconds: float) -> None:
        conn.phase = phase
        deadline = time.monotonic() + seconds
        conn.deadline = deadline
        self.next_deadline = min(self.next_deadline, deadline)

    def _expire(self, now: float) -> None:
        """Close connections whose deadline passed; find the next deadline."""
        nearest = float("inf")
        for conn in list(self.conns.values()):
            if conn.deadline <= now:
                if conn.phase in (HEAD, BODY) and conn.parser.in_message:
                    self._fail(conn, RequestTimeout("request not received in time"))
                else:
                    self._close(conn)
            elif conn.deadline < nearest:
                nearest = conn.deadline
        self.next_deadline = nearest

    # -- connection handling ----------------------------------------------------------------
    def _close(self, conn: Connection) -> None:
        if self.conns.pop(conn.fd, None) is not None and conn.registered:
            try:
                self.epoll.unregister(conn.fd)
            except (OSError, ValueError):
                pass
        try:
            conn.sock.close()
        except OSError:
            pass
        if not self.accepting and not self.stopping and \
                len(self.conns) < self.settings.worker_connections:
            self._accept_on()

    def _fail(self, conn: Connection, error: HTTPError) -> None:
        """Answer a protocol error, then close without losing the answer to a reset."""
        self.log.debug("closing %s: %s %s", conn.remote[0], error.status, error)
        try:
            conn.sock.send(error.response(http_date()))
        except OSError:
            self._close(conn)
            return
        self._linger(conn)

    def _linger(self, conn: Connection) -> None:
        """Shut down our side, then drain what the client still sends for a moment: closing with
        unread input would send a reset that can destroy the response in flight."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        self._set_deadline(conn, LINGER, LINGER_SECONDS)

    def _readable(self, conn: Connection) -> None:
        try:
            n = conn.sock.recv_into(self.buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if conn.phase == LINGER:
            if n == 0:
                self._close(conn)
            return
        if n == 0:
            # The peer closed. A partial request can never be answered; drop it.
            self._close(conn)
            return
        conn.parser.feed(self.view[:n])
        self._process(conn)

    def _process(self, conn: Connection) -> None:
        """Pull events until the parser needs data; run each complete request in order."""
        parser = conn.parser
        while True:
            try:
                event = parser.next_event()
            except HTTPError as error:
                self._fail(conn, error)
                return
            if event is NEED_DATA:
                if conn.request is not None:
                    if conn.phase != BODY:
                        self._set_deadline(conn, BODY, self.settings.header_timeout)
                elif parser.in_message:
                    if conn.phase != HEAD:
                        self._set_deadline(conn, HEAD, self.settings.header_timeout)
                elif conn.phase != IDLE:
                    self._set_deadline(conn, IDLE, self.settings.keepalive)
                return
            if event is PAUSED:  # not reached: every dispatch ends with start_next()
                return
            if event is END_OF_MESSAGE:
                request = conn.request
                if request is None:  # the body was streamed; nothing left to do
                    continue
                parts = conn.parts
                body = wsgi.Input(conn, parts, True, False) if parts else wsgi.EMPTY_INPUT
                if not self._dispatch(conn, request, body):
                    return
                continue
            if type(event) is Request:
                conn.request = event
                conn.parts = None
                conn.body_size = 0
                # A client expecting 100-continue waits for our go-ahead: the app decides.
                if event.expect_continue and \
                        not self._dispatch(conn, event, wsgi.Input(conn, None, False, True)):
                    return
                continue
            # A piece of body: buffer small bodies, stream large ones.
            if conn.parts is None:
                conn.parts = deque()
            conn.parts.append(event)
            conn.body_size += len(event)
            if conn.body_size > PREREAD_LIMIT:
                request = conn.request
                if not self._dispatch(conn, request, wsgi.Input(conn, conn.parts, False, False)):
                    return

    def _dispatch(self, conn: Connection, request: Request, body: Any) -> bool:
        """Run one request; True if the connection goes on to the next one."""
        spec = self.spec
        conn.request = None
        conn.parts = None
        conn.phase = BUSY  # so the next NEED_DATA sets a fresh idle or head deadline
        conn.body_deadline = 0.0
        conn.requests += 1
        # While stopping, answer what is already buffered (pipelined), then close.
        keep_alive = (request.keep_alive and spec.settings.keepalive > 0
                      and conn.requests < spec.settings.keepalive_requests
                      and (not self.stopping or conn.parser.buffered > 0))
        slot = self.slot
        slot.request_started(f"{request.method} {request.target}".encode("latin-1"))
        environ = wsgi.build_environ(request, conn.base, conn.remote, body, self.proxies)
        started = time.monotonic()
        if self.pre_request is not None:
            self._call_hook(self.pre_request, environ)
        exchange = wsgi.handle(self.app, conn, request, environ, keep_alive,
                               SERVER_HEADER, self._log_app_error)
        if self.post_request is not None:
            self._call_hook(self.post_request, environ, exchange.status_code)
        self.requests += 1
        duration = time.monotonic() - started
        slot.request_finished(exchange.status_code, exchange.bytes_sent,
                              State.KEEPALIVE if exchange.keep_alive else State.IDLE, duration)
        if spec.access_log is not None:
            self._log_access(environ, request, exchange, duration)
        if spec.max_requests and self.requests == spec.max_requests and not self.stopping:
            # Ask the master for a replacement; it sends TERM once that one is ready, so
            # capacity never dips. Until then this worker keeps serving.
            self.log.info("worker %d served %d requests; asking to be recycled",
                          os.getpid(), self.requests)
            self.slot.set_state(State.KEEPALIVE if exchange.keep_alive else State.IDLE,
                                Reason.REQUESTS)
        if not exchange.keep_alive:
            if exchange.close_reason:
                # The client is gone or stuck; nothing to drain politely.
                self.log.debug("closing %s after %s %s: %s", conn.remote[0], request.method,
                               request.target, exchange.close_reason)
                self._close(conn)
            elif exchange.status_code >= 400 or conn.parser.buffered:
                self._linger(conn)
            else:
                self._close(conn)
            return False
        conn.parser.start_next()
        return True

    def _log_access(self, environ: dict[str, Any], request: Request, exchange: Any,
                    duration: float) -> None:
        self.spec.access_log.write(
            environ["REMOTE_ADDR"], request.method, request.target, request.version,
            exchange.status_code, exchange.bytes_sent, duration,
            environ.get("HTTP_USER_AGENT", ""), environ.get("HTTP_REFERER", ""),
            environ.get("HTTP_X_REQUEST_ID", ""))

    def _call_hook(self, hook: Callable, *args: Any) -> None:
        try:
            hook(*args)
        except Exception:  # a request hook must not stop serving
            self.log.exception("hook %s failed", getattr(hook, "__name__", hook))

    def _log_app_error(self, message: str, with_traceback: bool) -> None:
        self.log.error(message, exc_info=with_traceback)

    # -- lifecycle --------------------------------------------------------------------------
    def _begin_stop(self, reason: Reason = Reason.SHUTDOWN) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.stop_deadline = time.monotonic() + self.settings.graceful_timeout
        self.slot.set_state(State.EXITING, reason)
        was_accepting = self.accepting
        self._accept_off()
        for fd, (sock, _) in self.listeners.items():
            if was_accepting:
                # Take what already waits in the backlog: those clients were accepted by the
                # kernel and must get an answer, not a reset when the socket closes.
                self._accept(fd, self.settings.worker_connections)
            sock.close()
        for conn in list(self.conns.values()):
            if conn.phase == IDLE and not conn.parser.buffered:
                self._close(conn)

    def _handle_signals(self) -> None:
        while self.pending_signals:
            signum = self.pending_signals.popleft()
            if signum == signal.SIGTERM:
                self._begin_stop()
            elif signum in (signal.SIGINT, signal.SIGQUIT):
                self.quick_exit = True
            elif signum == signal.SIGUSR1:
                logs.reopen()

    def _housekeeping(self, now: float) -> None:
        self.slot.heartbeat()
        if os.getppid() != self.spec.master_pid and not self.stopping:
            # Nobody supervises us any more: finish what clients already sent, then go.
            self.log.warning("worker %d: master is gone; exiting", os.getpid())
            self._begin_stop()
        if self.stopping:
            for conn in list(self.conns.values()):
                if conn.phase == IDLE and not conn.parser.buffered:
                    self._close(conn)
        self.slot.set_connections(len(self.conns))
        if not self.accepting and not self.stopping and \
                len(self.conns) < self.settings.worker_connections:
            self._accept_on()  # resume after an accept failure paused us

    def serve(self) -> int:
        code = self.boot()
        if code is not None:
            return code
        code = self._loop()
        hook = self.spec.hooks.get("worker_exit")
        if hook is not None:
            self._call_hook(hook, os.getpid())
        return code

    def _loop(self) -> int:
        epoll = self.epoll
        conns = self.conns
        listeners = self.listeners
        wake_r = self.wake_r
        next_housekeeping = time.monotonic() + HOUSEKEEPING_INTERVAL
        while True:
            now = time.monotonic()
            wait = min(self.next_deadline, next_housekeeping) - now
            events = epoll.poll(max(0, wait))
            for fd, mask in events:
                conn = conns.get(fd)
                if conn is not None:
                    self._readable(conn)
                elif fd in listeners:
                    if not self.stopping:
                        self._accept(fd)
                elif fd == wake_r:
                    try:
                        os.read(wake_r, 512)
                    except BlockingIOError:
                        pass
            if self.pending_signals:
                self._handle_signals()
            now = time.monotonic()
            if now >= self.next_deadline:
                self._expire(now)
            if now >= next_housekeeping:
                self._housekeeping(now)
                next_housekeeping = now + HOUSEKEEPING_INTERVAL
            if self.quick_exit:
                return EXIT_OK
            if self.stopping and (not conns or now >= self.stop_deadline):
                return EXIT_OK


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
