"""TLS termination with the standard ``ssl`` module: the context, a non-blocking handshake, the
environ variables, and what the worker's I/O must know about an ``SSLSocket``.

The master builds the ``SSLContext`` (``server_context``) at startup, in ``--check-config`` and on
every HUP, before forking: a bad setting fails there with one line naming it, a HUP with broken
certificate files keeps the old generation serving, and every worker of a generation shares one
context, hence one session-ticket key, so a client resumes its session on any worker.

A worker drives ``Handshake.step()`` from its epoll loop under ``header_timeout``: each call
does what it can without blocking and says which event to wait for next, so a client stalling
mid-handshake costs a parked file descriptor, never a blocked worker or thread. Before wrapping,
the first byte is peeked: a TLS connection starts with a handshake record (0x16); anything else
is a client speaking plain HTTP (or nothing sensible) to the TLS port, answered with a short
plain-text 400 (``PLAIN_HTTP_RESPONSE``), as nginx does.
"""

from __future__ import annotations

import os
import select
import socket
import ssl
from typing import Any

__all__ = [
    "DONE",
    "FILE_CHUNK",
    "PLAIN_HTTP_RESPONSE",
    "WOULD_BLOCK",
    "Handshake",
    "HandshakeError",
    "NotTLS",
    "TLSConfigError",
    "answer_plain_http",
    "enabled",
    "environ_for",
    "read_file_chunk",
    "server_context",
    "wait_events",
]

CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
ALPN = ("http/1.1",)
TLS_HANDSHAKE_RECORD = 0x16  # the content type byte that opens every TLS connection
DONE = 0  # Handshake.step(): finished; otherwise the epoll events to wait for

# What an SSLSocket raises where a plain non-blocking socket raises BlockingIOError. Either
# direction can be wanted by either call: a send may need to read (and a recv to write) while
# TLS exchanges its own records, so wait for ``wait_events(error)``, not for the call's own.
WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)

# sendfile(2) would put file bytes on the wire unencrypted, and socket.sendfile() refuses
# non-blocking SSL sockets, so files go through pread + send in chunks of this size (four full
# TLS records).
FILE_CHUNK = 64 * 1024

_PLAIN_BODY = b"400 Bad Request: this port speaks HTTPS, and the request was plain HTTP.\n"
PLAIN_HTTP_RESPONSE = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_PLAIN_BODY), _PLAIN_BODY)
)

# RFC 4514 section 3: the attribute types with a short name; others keep OpenSSL's name.
_SHORT_NAMES = {
    "commonName": "CN", "localityName": "L", "stateOrProvinceName": "ST",
    "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
    "streetAddress": "STREET", "domainComponent": "DC", "userId": "UID",
}


class TLSConfigError(Exception):
    """A TLS setting that cannot work; ``str()`` is one line starting with the setting's name."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting


class HandshakeError(Exception):
    """The handshake failed or the peer went away; one line for a debug log, then close."""


class NotTLS(HandshakeError):
    """The first byte is not a TLS handshake record; ``plain_http`` when it looks like HTTP."""

    def __init__(self, first_byte: int) -> None:
        super().__init__(f"not a TLS connection (first byte 0x{first_byte:02x})")
        self.plain_http = 0x41 <= first_byte <= 0x5A  # an upper-case letter starts every method


class _EncryptedKey(Exception):
    pass


def _refuse_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal, which a server must never do.
    raise _EncryptedKey


# -- the context (master side) ---------------------------------------------------------------

def enabled(settings: Any) -> bool:
    """Whether the settings ask for TLS; a key or CA without a certificate is then an error."""
    return bool(settings.certfile or settings.keyfile or settings.ca_certs)


def server_context(settings: Any) -> ssl.SSLContext:
    """The server ``SSLContext`` for ``settings`` (certfile, keyfile, ca_certs, cert_reqs,
    ciphers, tls_min_version); raises TLSConfigError naming the first bad setting."""
    version = MIN_VERSIONS.get(str(settings.tls_min_version))
    if version is None:
        raise TLSConfigError("tls_min_version", f"unknown TLS version "
                             f"{settings.tls_min_version!r}; expected 1.2 or 1.3")
    reqs = CERT_REQS.get(str(settings.cert_reqs))
    if reqs is None:
        raise TLSConfigError("cert_reqs", f"unknown value {settings.cert_reqs!r}; expected "
                             "none, optional or required")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = version
    # Renegotiation lets a client make the server redo expensive work at will; HTTP/1.1 over
    # TLS 1.2 has no use for it, and TLS 1.3 removed it.
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    _load_chain(context, settings.certfile, settings.keyfile)
    _load_client_ca(context, settings.ca_certs, str(settings.cert_reqs), reqs)
    if settings.ciphers:
        try:
            context.set_ciphers(settings.ciphers)
        except ssl.SSLError:
            raise TLSConfigError("ciphers", f"no cipher matches {settings.ciphers!r} "
                                 "(an OpenSSL cipher list)") from None
    context.set_alpn_protocols(list(ALPN))
    return context


def _readable(setting: str, path: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise TLSConfigError(setting, f"cannot read {path!r}: {error.strerror}") from None


def _load_chain(context: ssl.SSLContext, certfile: str, keyfile: str) -> None:
    if not certfile:
        raise TLSConfigError("certfile", "is required for TLS" if keyfile else "is not set")
    _readable("certfile", certfile)
    if keyfile:
        _readable("keyfile", keyfile)
    # load_cert_chain says only "PEM lib" for a bad certificate and a bad key alike, so read
    # the certificate on its own first to blame the right file.
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(certfile)
    except ssl.SSLError:
        raise TLSConfigError("certfile", f"no PEM certificate in {certfile!r}") from None
    key_setting, key_path = ("keyfile", keyfile) if keyfile else ("certfile", certfile)
    try:
        context.load_cert_chain(certfile, keyfile or None, password=_refuse_password)
    except _EncryptedKey:
        raise TLSConfigError(key_setting, f"the private key in {key_path!r} is encrypted; "
                             "give an unencrypted one (readable by this user only)") from None
    except ssl.SSLError as error:
        if error.reason == "KEY_VALUES_MISMATCH":
            raise TLSConfigError(key_setting, f"the private key in {key_path!r} does not "
                                 f"match the certificate in {certfile!r}") from None
        raise TLSConfigError(key_setting, f"no PEM private key in {key_path!r}") from None


def _load_client_ca(context: ssl.SSLContext, ca_certs: str, name: str, reqs: int) -> None:
    if not ca_certs:
        if reqs != ssl.CERT_NONE:
            raise TLSConfigError("ca_certs", f"is needed to verify client certificates "
                                 f"(cert_reqs = {name})")
        return
    _readable("ca_certs", ca_certs)
    try:
        context.load_verify_locations(cafile=ca_certs)
    except ssl.SSLError:
        raise TLSConfigError("ca_certs", f"no PEM certificate in {ca_certs!r}") from None
    context.verify_mode = reqs


# -- the handshake (worker side) -------------------------------------------------------------

class Handshake:
    """Drives the server handshake of one accepted, non-blocking plain socket.

    Call ``step()`` once the connection is accepted and again whenever epoll reports the events
    it returned, until it returns DONE; then use ``ssl_socket`` in place of the plain socket
    (same file descriptor, so the epoll registration stays valid). ``step()`` raises NotTLS or
    HandshakeError; the caller closes ``socket`` (after ``answer_plain_http`` for a NotTLS whose
    ``plain_http`` is true). Close ``socket``, never the plain socket it was given: once the
    handshake has begun, that object is detached and closing it would leak the descriptor.
    """

    __slots__ = ("_context", "_plain", "ssl_socket")

    def __init__(self, context: ssl.SSLContext, sock: socket.socket) -> None:
        self._context = context
        self._plain = sock
        self.ssl_socket: ssl.SSLSocket | None = None

    @property
    def socket(self) -> socket.socket:
        """The object that owns the descriptor now: the SSLSocket once wrapped."""
        return self.ssl_socket if self.ssl_socket is not None else self._plain

    def step(self) -> int:
        if self.ssl_socket is None:
            try:
                first = self._plain.recv(1, socket.MSG_PEEK)
            except WOULD_BLOCK:
                return select.EPOLLIN
            except OSError as error:
                raise HandshakeError(f"connection failed before the handshake: {error}") from None
            if not first:
                raise HandshakeError("connection closed before the handshake")
            if first[0] != TLS_HANDSHAKE_RECORD:
                raise NotTLS(first[0])
            self.ssl_socket = self._context.wrap_socket(
                self._plain, server_side=True, do_handshake_on_connect=False)
        try:
            self.ssl_socket.do_handshake()
        except ssl.SSLWantReadError:
            return select.EPOLLIN
        except ssl.SSLWantWriteError:
            return select.EPOLLOUT
        except (ssl.SSLError, OSError) as error:
            reason = getattr(error, "reason", None) or error.strerror or error
            raise HandshakeError(f"TLS handshake failed: {reason}") from None
        return DONE


def wait_events(error: BaseException) -> int:
    """The epoll events to wait for after a WOULD_BLOCK error, whichever call raised it."""
    return select.EPOLLIN if isinstance(error, ssl.SSLWantReadError) else select.EPOLLOUT


def answer_plain_http(sock: socket.socket) -> None:
    """Best effort: the short 400 for plain HTTP on the TLS port, then shut down writing.

    The unread request is drained as far as it has arrived: closing a socket with unread input
    sends a reset, which can erase the answer before the client reads it. The caller then
    lingers as after any error (drain until EOF or a short deadline) and closes.
    """
    try:
        sock.send(PLAIN_HTTP_RESPONSE)
        sock.shutdown(socket.SHUT_WR)
        for _ in range(16):
            if not sock.recv(FILE_CHUNK):
                break
    except OSError:
        pass  # nothing more to read now, or the client left: it gets the close either way


def read_file_chunk(fd: int, offset: int, count: int) -> bytes:
    """Up to FILE_CHUNK bytes of ``fd`` at ``offset`` for an SSL send (b"" at end of file)."""
    return os.pread(fd, min(count, FILE_CHUNK), offset)


# -- the environ ------------------------------------------------------------------------------

def environ_for(ssl_socket: ssl.SSLSocket) -> dict[str, str]:
    """The TLS variables of a connection (mod_ssl's names); compute once per connection."""
    cipher = ssl_socket.cipher()
    environ = {
        "SSL_PROTOCOL": ssl_socket.version() or "",
        "SSL_CIPHER": cipher[0] if cipher else "",
        "SSL_CLIENT_VERIFY": "NONE",
    }
    # getpeercert() is non-empty only for a certificate that verified against ca_certs; with
    # cert_reqs = none it is {} even if the client sent one, and that one proves nothing.
    peer = ssl_socket.getpeercert()
    if peer:
        der = ssl_socket.getpeercert(binary_form=True)
        environ["SSL_CLIENT_VERIFY"] = "SUCCESS"
        environ["SSL_CLIENT_S_DN"] = distinguished_name(peer.get("subject", ()))
        environ["SSL_CLIENT_I_DN"] = distinguished_name(peer.get("issuer", ()))
        environ["SSL_CLIENT_CERT"] = ssl.DER_cert_to_PEM_cert(der) if der else ""
    return environ


def distinguished_name(rdns: Any) -> str:
    """``getpeercert()``'s subject or issuer as an RFC 4514 string (most specific RDN first)."""
    parts = []
    for rdn in reversed(rdns):
        parts.append("+".join(f"{_SHORT_NAMES.get(name, name)}={_escape(str(value))}"
                              for name, value in rdn))
    return ",".join(parts)


def _escape(value: str) -> str:
    """RFC 4514 section 2.4: escape the specials, a leading '#' or space, a trailing space."""
    out = []
    for i, char in enumerate(value):
        if char in '"+,;<>\\' or (i == 0 and char in "# ") or \
                (i == len(value) - 1 and char == " "):
            out.append("\\" + char)
        elif char == "\x00":
            out.append("\\00")
        else:
            out.append(char)
    return "".join(out)
