"""What comes before HTTP on a connection: a PROXY protocol header, then the TLS handshake.

Both run in the worker's reactor, without blocking, under the ``header_timeout`` deadline set at
the accept (a client that stalls costs a parked descriptor, never a worker or a thread):

- with ``proxy_protocol`` other than ``off``, a peer outside ``proxy_allow_ips`` is closed unread;
  a missing, malformed or oversized header closes the connection without an answer; the header's
  source becomes the connection's remote address (and so the peer that ``forwarded_allow_ips``
  judges); v2 ``LOCAL`` keeps the socket's own;
- with a TLS context, the handshake (``tls.Handshake``); a client speaking plain HTTP to the TLS
  port gets the short plain-text 400 and a lingering close; once done, the connection's socket
  is the ``SSLSocket`` and its environ carries ``wsgi.url_scheme = https``, ``HTTPS`` and the
  ``SSL_*`` variables, computed once.
"""

from __future__ import annotations

import select
import ssl
from typing import Any

from forkserver import proxy_protocol, tls
from forkserver.phases import Phase, check_move

# The worker's Connection and Worker (typed Any: this module is imported by worker.py).
Connection = Worker = Any


class Preamble:
    """One worker's rules for the bytes before HTTP (see the module docstring)."""

    def __init__(self, worker: Worker, mode: str, allow: tuple[str, ...],
                 context: ssl.SSLContext | None) -> None:
        self.worker = worker
        self.mode = proxy_protocol.Mode(mode)
        self.allowed = None if self.mode is proxy_protocol.Mode.OFF else \
            proxy_protocol.allow_list(allow)
        self.context = context

    @classmethod
    def for_worker(cls, worker: Worker) -> Preamble | None:
        """The worker's Preamble, or None when HTTP starts at the first byte."""
        settings = worker.settings
        context = worker.spec.tls_context
        if settings.proxy_protocol == "off" and context is None:
            return None
        return cls(worker, settings.proxy_protocol, settings.proxy_allow_ips, context)

    def begin(self, conn: Connection) -> None:
        """A connection just accepted (its deadline armed): start with what comes first."""
        if self.allowed is not None:
            if not self.allowed.trusts(conn.remote[0]):
                self.worker.log.debug("closing %s: not in proxy_allow_ips", conn.remote[0])
                self.worker.close(conn)
                return
            conn.proxy = proxy_protocol.ProxyReader(self.mode)
            conn.phase = Phase.PROXY
        else:
            conn.handshake = tls.Handshake(self.context, conn.sock)
            conn.phase = Phase.HANDSHAKE
        self.advance(conn)

    def advance(self, conn: Connection) -> None:
        """Any epoll event while in PROXY or HANDSHAKE: go as far as the bytes allow."""
        try:
            if conn.phase is Phase.PROXY and not self._proxy_header(conn):
                return
            if conn.phase is Phase.HANDSHAKE and not self._handshake(conn):
                return
        except tls.NotTLS as error:
            self._refuse(conn, str(error), answer=error.plain_http)
            return
        except (tls.HandshakeError, proxy_protocol.ProxyProtocolError, OSError) as error:
            self._refuse(conn, str(error))
            return
        check_move(conn.phase, Phase.HEAD)
        conn.phase = Phase.HEAD  # the deadline set at the accept still runs
        self._wait(conn, select.EPOLLIN)
        self.worker._readable(conn)  # serve what came with the preamble

    def _proxy_header(self, conn: Connection) -> bool:
        """True once the header is in (and the connection moved on)."""
        header = proxy_protocol.read_header(conn.sock, conn.proxy)
        if header is proxy_protocol.NEED_DATA:
            self._wait(conn, select.EPOLLIN)
            return False
        conn.proxy = None
        if header.source is not None:
            conn.remote = (header.source[0], str(header.source[1]))
        if self.context is not None:
            check_move(conn.phase, Phase.HANDSHAKE)
            conn.handshake = tls.Handshake(self.context, conn.sock)
            conn.phase = Phase.HANDSHAKE
        return True

    def _handshake(self, conn: Connection) -> bool:
        """True once the handshake is done and the connection speaks TLS."""
        handshake = conn.handshake
        try:
            events = handshake.step()
        finally:
            conn.sock = handshake.socket  # whichever object owns the descriptor now
        if events != tls.DONE:
            self._wait(conn, events)
            return False
        conn.handshake = None
        conn.tls = True
        conn.base = {**conn.base, "wsgi.url_scheme": "https", "HTTPS": "on",
                     **tls.environ_for(conn.sock)}
        return True

    def _refuse(self, conn: Connection, why: str, answer: bool = False) -> None:
        worker = self.worker
        worker.log.debug("closing %s before HTTP: %s", conn.remote[0], why)
        if conn.handshake is not None:
            conn.sock = conn.handshake.socket
            conn.handshake = None
        if not answer:
            worker.close(conn)
            return
        tls.answer_plain_http(conn.sock)  # the short 400; writing is shut down
        self._wait(conn, select.EPOLLIN)
        worker.linger(conn)  # drain what the client still sends, then close

    def _wait(self, conn: Connection, events: int) -> None:
        epoll = self.worker.epoll
        if conn.registered:
            epoll.modify(conn.fd, events)
        else:
            epoll.register(conn.fd, events)
            conn.registered = True
