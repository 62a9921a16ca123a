"""TLS: the context from settings, the non-blocking handshake over real loopback sockets, mutual
TLS, plain HTTP on the TLS port, the environ, and one line per bad setting.

Certificates come from ``trustme`` (a throwaway CA per test module). The server side is driven
exactly as a worker would: a non-blocking socket and ``Handshake.step()`` in a select loop; the
client is an ordinary blocking ``ssl`` client in a thread.
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import threading
import time
from types import SimpleNamespace

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from forkserver import tls

WAIT = 10.0  # generous: other helpers' tests share the two cores


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    alice = ca.issue_cert("alice@example.org", common_name="alice",
                          organization_name="Example, Inc.", organization_unit_name="ops")
    stranger = trustme.CA().issue_cert("mallory@example.org", common_name="mallory")
    paths = SimpleNamespace(root=root, authority=ca, server=server, alice=alice, stranger=stranger)
    for name, blob in [("ca.pem", ca.cert_pem), ("cert.pem", server.cert_chain_pems[0]),
                       ("key.pem", server.private_key_pem),
                       ("both.pem", server.private_key_and_cert_chain_pem),
                       ("alice_key.pem", alice.private_key_pem)]:
        blob.write_to_path(str(root / name))
        setattr(paths, name.replace(".pem", ""), str(root / name))
    return paths


def settings(pki, **overrides):
    values = {"certfile": pki.cert, "keyfile": pki.key, "ca_certs": "", "cert_reqs": "none",
              "ciphers": "", "tls_min_version": "1.2"}
    values.update(overrides)
    return SimpleNamespace(**values)


@pytest.fixture
def listener():
    sock = socket.create_server(("127.0.0.1", 0))
    yield sock
    sock.close()


def accept(listener):
    sock, _ = listener.accept()
    sock.setblocking(False)
    return sock


def drive(handshake, fd, deadline=WAIT):
    """Run step() as an epoll loop would; return the events it asked for along the way."""
    asked = []
    end = time.monotonic() + deadline
    while True:
        events = handshake.step()
        if events == tls.DONE:
            return asked
        asked.append(events)
        readers = [fd] if events & select.EPOLLIN else []
        writers = [fd] if events & select.EPOLLOUT else []
        left = end - time.monotonic()
        assert left > 0, "handshake did not finish in time"
        select.select(readers, writers, [], left)


class Client(threading.Thread):
    """A blocking TLS client: handshake, then echo one message; records what happened."""

    def __init__(self, address, context, go=None):
        super().__init__(daemon=True)
        self.address, self.context, self.go = address, context, go
        self.sock = socket.create_connection(address, timeout=WAIT)
        self.error = None
        self.info = {}

    def run(self):
        try:
            if self.go is not None:
                self.go.wait(WAIT)
            with self.context.wrap_socket(self.sock, server_hostname="localhost") as conn:
                self.info = {"alpn": conn.selected_alpn_protocol(), "version": conn.version(),
                             "cipher": conn.cipher()[0]}
                conn.sendall(b"ping")
                self.info["echo"] = conn.recv(4)
        except (OSError, ssl.SSLError) as error:
            self.error = error
        finally:
            self.sock.close()


def client_context(pki, cert=None, maximum=None):
    context = ssl.create_default_context()
    pki.authority.configure_trust(context)
    context.set_alpn_protocols(["h2", "http/1.1"])
    if cert is not None:
        cert.configure_cert(context)
    if maximum is not None:
        context.maximum_version = maximum
    return context


def echo(ssl_socket):
    """Read the client's 4 bytes without blocking, as the worker would, and send them back."""
    end = time.monotonic() + WAIT
    while True:
        try:
            data = ssl_socket.recv(4)
            break
        except tls.WOULD_BLOCK as error:
            waits = tls.wait_events(error)
            fd = ssl_socket.fileno()
            readers = [fd] if waits & select.EPOLLIN else []
            select.select(readers, [] if readers else [fd], [], end - time.monotonic())
    ssl_socket.send(data)


def serve_one(pki, listener, config, client):
    server = accept(listener)
    handshake = tls.Handshake(tls.server_context(config), server)
    try:
        asked = drive(handshake, server.fileno())
    except tls.HandshakeError:
        handshake.socket.close()
        assert handshake.socket.fileno() == -1  # the descriptor really is released
        client.join(WAIT)
        raise
    conn = handshake.ssl_socket
    environ = tls.environ_for(conn)
    echo(conn)
    client.join(WAIT)
    conn.close()
    return asked, environ


# -- the handshake ----------------------------------------------------------------------------

def test_handshake_completes_without_blocking(pki, listener):
    go = threading.Event()
    client = Client(listener.getsockname(), client_context(pki), go)
    client.start()
    server = accept(listener)
    fd = server.fileno()
    handshake = tls.Handshake(tls.server_context(settings(pki)), server)
    started = time.monotonic()
    assert handshake.step() == select.EPOLLIN  # nothing sent yet: it asks, it does not wait
    assert time.monotonic() - started < 1.0
    go.set()
    drive(handshake, fd)
    # the same descriptor, so an epoll registration survives; the plain object is detached
    assert handshake.ssl_socket.fileno() == fd and server.fileno() == -1
    echo(handshake.ssl_socket)
    client.join(WAIT)
    handshake.ssl_socket.close()
    assert client.error is None
    assert client.info["alpn"] == "http/1.1" and client.info["echo"] == b"ping"


def test_handshake_waits_for_the_clients_finished_without_blocking(pki, listener):
    """A client driven flight by flight (memory BIOs), so each wait is certain, not a race."""
    raw = socket.create_connection(listener.getsockname(), timeout=WAIT)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context(pki).wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    raw.sendall(outgoing.read())  # the ClientHello, and nothing more
    server = accept(listener)
    select.select([server], [], [], WAIT)
    handshake = tls.Handshake(tls.server_context(settings(pki)), server)
    started = time.monotonic()
    assert handshake.step() == select.EPOLLIN  # its flight is sent; the client's Finished is due
    assert handshake.step() == select.EPOLLIN
    assert time.monotonic() - started < 1.0
    while True:  # the client reads the server's flight and answers with its Finished
        incoming.write(raw.recv(65536))
        try:
            client.do_handshake()
            break
        except ssl.SSLWantReadError:
            continue
    raw.sendall(outgoing.read())
    drive(handshake, handshake.ssl_socket.fileno())
    assert tls.environ_for(handshake.ssl_socket)["SSL_PROTOCOL"] == client.version()
    handshake.ssl_socket.close()
    raw.close()


def test_a_stalled_handshake_never_blocks_and_others_proceed(pki, listener):
    context = tls.server_context(settings(pki))
    staller = socket.create_connection(listener.getsockname())
    staller.sendall(b"\x16\x03\x01\x00\xc8\x01\x00")  # a ClientHello record cut short
    stalled_sock = accept(listener)
    stalled = tls.Handshake(context, stalled_sock)
    client = Client(listener.getsockname(), client_context(pki))
    client.start()
    good_sock = accept(listener)
    good = tls.Handshake(context, good_sock)
    for _ in range(3):
        started = time.monotonic()
        assert stalled.step() == select.EPOLLIN
        assert time.monotonic() - started < 1.0
    drive(good, good_sock.fileno())  # served while the other waits
    echo(good.ssl_socket)
    client.join(WAIT)
    assert client.error is None and client.info["echo"] == b"ping"
    assert stalled.step() == select.EPOLLIN  # still waiting, still not blocking
    staller.close()
    with pytest.raises(tls.HandshakeError):
        drive(stalled, stalled.socket.fileno())
    assert stalled_sock.fileno() == -1 and stalled.socket is stalled.ssl_socket
    for sock in (good.ssl_socket, stalled.socket):
        sock.close()


def test_minimum_version_is_enforced(pki, listener):
    client = Client(listener.getsockname(), client_context(pki, maximum=ssl.TLSVersion.TLSv1_2))
    client.start()
    with pytest.raises(tls.HandshakeError, match="TLS handshake failed"):
        serve_one(pki, listener, settings(pki, tls_min_version="1.3"), client)
    assert client.error is not None


def test_peer_closing_before_the_handshake(pki, listener):
    sock = socket.create_connection(listener.getsockname())
    sock.close()
    server = accept(listener)
    select.select([server], [], [], WAIT)
    with pytest.raises(tls.HandshakeError, match="closed"):
        tls.Handshake(tls.server_context(settings(pki)), server).step()
    server.close()


# -- plain HTTP on the TLS port ---------------------------------------------------------------

def test_plain_http_is_detected_and_answered(pki, listener):
    client = socket.create_connection(listener.getsockname(), timeout=WAIT)
    client.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    server = accept(listener)
    select.select([server], [], [], WAIT)
    with pytest.raises(tls.NotTLS) as info:
        tls.Handshake(tls.server_context(settings(pki)), server).step()
    assert info.value.plain_http
    tls.answer_plain_http(server)
    server.close()
    answer = b""
    while chunk := client.recv(4096):
        answer += chunk
    client.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in head
    assert b"HTTPS" in body and len(body) == int(head.split(b"Content-Length: ")[1].split()[0])


def test_garbage_is_not_tls_and_not_http(pki, listener):
    client = socket.create_connection(listener.getsockname())
    client.sendall(b"\x00\x01\x02")
    server = accept(listener)
    select.select([server], [], [], WAIT)
    with pytest.raises(tls.NotTLS) as info:
        tls.Handshake(tls.server_context(settings(pki)), server).step()
    assert not info.value.plain_http
    server.close()
    client.close()


# -- mutual TLS and the environ ---------------------------------------------------------------

def test_mutual_tls_accepted_with_the_client_in_the_environ(pki, listener):
    client = Client(listener.getsockname(), client_context(pki, cert=pki.alice))
    client.start()
    config = settings(pki, ca_certs=pki.ca, cert_reqs="required")
    _, environ = serve_one(pki, listener, config, client)
    assert client.error is None and client.info["echo"] == b"ping"
    assert environ["SSL_PROTOCOL"] == client.info["version"] == "TLSv1.3"
    assert environ["SSL_CIPHER"] == client.info["cipher"]
    assert environ["SSL_CLIENT_VERIFY"] == "SUCCESS"
    assert environ["SSL_CLIENT_S_DN"] == r"CN=alice,OU=ops,O=Example\, Inc."
    expected = ssl.PEM_cert_to_DER_cert(pki.alice.cert_chain_pems[0].bytes().decode())
    assert environ["SSL_CLIENT_CERT"].startswith("-----BEGIN CERTIFICATE-----")
    assert ssl.PEM_cert_to_DER_cert(environ["SSL_CLIENT_CERT"]) == expected


@pytest.mark.parametrize("who", ["nobody", "stranger"])
def test_mutual_tls_refused(pki, listener, who):
    cert = pki.stranger if who == "stranger" else None
    client = Client(listener.getsockname(), client_context(pki, cert=cert))
    client.start()
    config = settings(pki, ca_certs=pki.ca, cert_reqs="required")
    with pytest.raises(tls.HandshakeError, match="(?i)certificate"):
        serve_one(pki, listener, config, client)
    assert client.error is not None  # the client learns it on its first read


def test_optional_client_certificate_may_be_absent(pki, listener):
    client = Client(listener.getsockname(), client_context(pki))
    client.start()
    config = settings(pki, ca_certs=pki.ca, cert_reqs="optional")
    _, environ = serve_one(pki, listener, config, client)
    assert client.error is None
    assert environ["SSL_CLIENT_VERIFY"] == "NONE"
    assert "SSL_CLIENT_S_DN" not in environ and "SSL_CLIENT_CERT" not in environ


def test_optional_client_certificate_that_does_not_verify_is_refused(pki, listener):
    client = Client(listener.getsockname(), client_context(pki, cert=pki.stranger))
    client.start()
    config = settings(pki, ca_certs=pki.ca, cert_reqs="optional")
    with pytest.raises(tls.HandshakeError):
        serve_one(pki, listener, config, client)


def test_key_and_certificate_in_one_file(pki, listener):
    client = Client(listener.getsockname(), client_context(pki))
    client.start()
    _, environ = serve_one(pki, listener, settings(pki, certfile=pki.both, keyfile=""), client)
    assert client.error is None and environ["SSL_CLIENT_VERIFY"] == "NONE"


def test_file_over_tls_by_pread_and_send(pki, listener, tmp_path):
    content = os.urandom(3 * tls.FILE_CHUNK + 123)
    path = tmp_path / "blob"
    path.write_bytes(content)
    raw = socket.create_connection(listener.getsockname(), timeout=WAIT)
    received = bytearray()

    def read_all():
        with client_context(pki).wrap_socket(raw, server_hostname="localhost") as conn:
            while len(received) < len(content) and (chunk := conn.recv(65536)):
                received.extend(chunk)

    reader = threading.Thread(target=read_all, daemon=True)
    reader.start()
    server = accept(listener)
    handshake = tls.Handshake(tls.server_context(settings(pki)), server)
    drive(handshake, server.fileno())
    conn = handshake.ssl_socket
    with open(path, "rb") as file:
        with pytest.raises(ValueError):  # why the worker cannot use socket.sendfile here
            conn.sendfile(file)
        offset = 0
        while chunk := tls.read_file_chunk(file.fileno(), offset, len(content) - offset):
            view = memoryview(chunk)
            while view:
                try:
                    view = view[conn.send(view):]
                except tls.WOULD_BLOCK as error:
                    reading = tls.wait_events(error) & select.EPOLLIN
                    select.select([conn] if reading else [], [] if reading else [conn], [], WAIT)
            offset += len(chunk)
    reader.join(WAIT)
    conn.close()
    assert bytes(received) == content


def test_distinguished_name_escaping():
    subject = ((("countryName", "DE"),), (("organizationName", "#1 \"Best\" <Co>; a+b "),),
               (("commonName", "x"), ("userId", "u\\1")), (("emailAddress", " e@x"),))
    assert tls.distinguished_name(subject) == (
        r"emailAddress=\ e@x,CN=x+UID=u\\1,O=\#1 \"Best\" \<Co\>\; a\+b\ ,C=DE")


# -- bad settings: one line naming the setting ------------------------------------------------

def encrypted_key(pki):
    path = pki.root / "encrypted.pem"
    key = load_pem_private_key(pki.server.private_key_pem.bytes(), None)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.BestAvailableEncryption(b"secret")))
    return str(path)


def junk(pki):
    path = pki.root / "junk.pem"
    path.write_text("not a pem file\n")
    return str(path)


BAD = [
    ("certfile", lambda p: {"certfile": "/nonexistent/cert.pem"}, "cannot read"),
    ("certfile", lambda p: {"certfile": ""}, "is required"),
    ("certfile", lambda p: {"certfile": junk(p)}, "no PEM certificate"),
    ("keyfile", lambda p: {"keyfile": "/nonexistent/key.pem"}, "cannot read"),
    ("keyfile", lambda p: {"keyfile": p.alice_key}, "does not match the certificate"),
    ("keyfile", lambda p: {"keyfile": junk(p)}, "no PEM private key"),
    ("keyfile", lambda p: {"keyfile": encrypted_key(p)}, "is encrypted"),
    ("certfile", lambda p: {"keyfile": ""}, "no PEM private key"),
    ("tls_min_version", lambda p: {"tls_min_version": "1.1"}, "unknown TLS version"),
    ("cert_reqs", lambda p: {"cert_reqs": "maybe"}, "expected none, optional or required"),
    ("ca_certs", lambda p: {"cert_reqs": "required"}, "is needed"),
    ("ca_certs", lambda p: {"cert_reqs": "optional", "ca_certs": junk(p)}, "no PEM certificate"),
    ("ca_certs", lambda p: {"ca_certs": "/nonexistent/ca.pem"}, "cannot read"),
    ("ciphers", lambda p: {"ciphers": "NO-SUCH-CIPHER"}, "no cipher matches"),
]


@pytest.mark.parametrize("setting, change, words", BAD)
def test_bad_setting_gives_one_line_naming_it(pki, setting, change, words):
    with pytest.raises(tls.TLSConfigError) as info:
        tls.server_context(settings(pki, **change(pki)))
    message = str(info.value)
    assert info.value.setting == setting
    assert message.startswith(f"{setting}: ") and words in message and "\n" not in message


def test_enabled_only_when_a_tls_file_is_set(pki):
    assert tls.enabled(settings(pki))
    assert not tls.enabled(settings(pki, certfile="", keyfile=""))
    assert tls.enabled(settings(pki, certfile="", keyfile="", ca_certs=pki.ca))


def test_context_settings(pki):
    context = tls.server_context(settings(pki, tls_min_version="1.3", ciphers="ECDHE+AESGCM"))
    assert context.minimum_version is ssl.TLSVersion.TLSv1_3
    assert context.verify_mode == ssl.CERT_NONE
    assert context.options & ssl.OP_NO_RENEGOTIATION
    context = tls.server_context(settings(pki, ca_certs=pki.ca, cert_reqs="optional"))
    assert context.verify_mode == ssl.CERT_OPTIONAL


# -- PROXY header first, then the handshake on the same socket ---------------------------------

def test_proxy_header_then_handshake(pki, listener):
    from forkserver import proxy_protocol

    client = Client(listener.getsockname(), client_context(pki))
    client.sock.sendall(b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 443\r\n")
    client.start()  # the ClientHello follows at once, likely in the same read
    server = accept(listener)
    reader = proxy_protocol.ProxyReader("auto")
    end = time.monotonic() + WAIT
    while (header := proxy_protocol.read_header(server, reader)) is proxy_protocol.NEED_DATA:
        select.select([server], [], [], end - time.monotonic())
    assert header.source == ("192.0.2.10", 56324)
    handshake = tls.Handshake(tls.server_context(settings(pki)), server)
    drive(handshake, server.fileno())  # the ClientHello was left in the socket, whole
    echo(handshake.ssl_socket)
    client.join(WAIT)
    handshake.ssl_socket.close()
    assert client.error is None and client.info["echo"] == b"ping"
