"""TLS termination against the real server (issue 16, item 1), certificates made by trustme.

Clients verify the server's certificate against the test CA: ``requests``, ``http.client``,
``curl`` and raw ``ssl`` sockets (for 100-continue, pipelining and a stalled handshake).
"""

from __future__ import annotations

import dataclasses
import http.client
import shutil
import socket
import ssl
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from forkserver import pool
from tests.conformance import test_conformance as conformance
from tests.conftest import ResponseReader, Server, read_until_closed
from tests.corpus.http_verdicts import SERVER_ARGS, VERDICTS

trustme = pytest.importorskip("trustme")

# The worker terminates TLS with the context the master builds per generation; until the master
# hands it over (WorkerSpec.tls_context), a TLS port would speak plain HTTP.
_BLUEPRINT = getattr(pool, "Blueprint", None)
pytestmark = pytest.mark.skipif(
    not dataclasses.is_dataclass(_BLUEPRINT)
    or "tls_context" not in {field.name for field in dataclasses.fields(_BLUEPRINT)},
    reason="the master does not hand its TLS context to the workers yet")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA; the server's certificate (127.0.0.1, localhost); a client certificate."""
    ca = trustme.CA()
    directory = tmp_path_factory.mktemp("pki")
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(
        str(directory / "server.pem"))
    ca.issue_cert("client@example.com", common_name="client").private_key_and_cert_chain_pem \
        .write_to_path(str(directory / "client.pem"))
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    return directory


def tls_args(pki, *more: str) -> tuple[str, ...]:
    return ("--certfile", str(pki / "server.pem"), *more)


def https(server: Server) -> str:
    return server.url.replace("http://", "https://")


def client_context(pki, cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if cert:
        context.load_cert_chain(str(pki / "client.pem"))
    return context


def tls_connect(server: Server, pki, cert: bool = False) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return client_context(pki, cert).wrap_socket(sock, server_hostname="127.0.0.1")


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, pki):
    server = Server(tmp_path_factory.mktemp("tls"), "tests.apps.basic:app",
                    *tls_args(pki)).start()
    yield server
    server.stop()


def test_requests_keep_alive_chunked_bodies_and_files(tls_server, pki, tmp_path):
    blob = tmp_path / "blob.bin"
    blob.write_bytes(bytes(range(256)) * 2000)
    with requests.Session() as session:
        session.trust_env = False  # REQUESTS_CA_BUNDLE would replace session.verify
        session.verify = str(pki / "ca.pem")
        base = https(tls_server)
        assert session.get(f"{base}/").text == "Hello, world!"
        environ = session.get(f"{base}/environ").json()
        assert environ["wsgi.url_scheme"] == "https" and environ["HTTPS"] == "on"
        assert environ["SSL_PROTOCOL"].startswith("TLSv1.") and environ["SSL_CIPHER"]
        assert environ["SSL_CLIENT_VERIFY"] == "NONE"
        assert session.post(f"{base}/echo", data=iter([b"chunk", b"ed"])).content == b"chunked"
        assert session.get(f"{base}/file?name={blob}").content == blob.read_bytes()
        assert session.get(f"{base}/stream").text.count("part") == 5
        assert len({session.get(f"{base}/environ").json()["REMOTE_PORT"]
                    for _ in range(5)}) == 1  # one connection throughout


def test_http_client_with_verification(tls_server, pki):
    connection = http.client.HTTPSConnection("127.0.0.1", tls_server.port, timeout=10,
                                             context=client_context(pki))
    try:
        for _ in range(3):
            connection.request("GET", "/")
            response = connection.getresponse()
            assert (response.status, response.read()) == (200, b"Hello, world!")
    finally:
        connection.close()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_with_verification(tls_server, pki):
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--cacert", str(pki / "ca.pem"),
         f"https://localhost:{tls_server.port}/", f"https://localhost:{tls_server.port}/"],
        capture_output=True, timeout=20, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"Hello, world!" * 2


def test_pipelining_and_100_continue(tls_server, pki):
    with tls_connect(tls_server, pki) as sock:
        sock.sendall(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n")
        reader = ResponseReader(sock)
        assert reader.read()[0] == 404
        assert reader.read()[2] == b"Hello, world!"
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        assert reader.read()[0] == 100
        sock.sendall(b"hello")
        assert reader.read()[2] == b"hello"


def test_plain_http_to_the_tls_port_gets_a_400_and_a_close(tls_server):
    with socket.create_connection(("127.0.0.1", tls_server.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in answer


def test_a_stalled_handshake_is_cut_off_while_others_are_served(server_factory, pki):
    server = server_factory("tests.apps.basic:app", *tls_args(pki, "--header-timeout", "1"),
                            workers=1)
    stalled = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    stalled.sendall(b"\x16\x03\x01\x02\x00")  # a ClientHello's record header, then silence
    started = time.monotonic()
    for _ in range(5):  # one worker, and it is not held by the stalled client
        response = requests.get(f"{https(server)}/", verify=str(pki / "ca.pem"), timeout=5)
        assert response.status_code == 200
    assert read_until_closed(stalled) == b""
    assert time.monotonic() - started < 5
    stalled.close()


def test_mutual_tls_accepted_and_refused(server_factory, pki):
    server = server_factory("tests.apps.basic:app", *tls_args(
        pki, "--ca-certs", str(pki / "ca.pem"), "--cert-reqs", "required"), workers=1)
    with tls_connect(server, pki, cert=True) as sock:
        sock.sendall(b"GET /environ HTTP/1.1\r\nHost: t\r\n\r\n")
        body = ResponseReader(sock).read()[2]
    assert b'"SSL_CLIENT_VERIFY": "SUCCESS"' in body and b"CN=client" in body
    assert b"-----BEGIN CERTIFICATE-----" in body
    with pytest.raises((ssl.SSLError, ConnectionError)), \
            tls_connect(server, pki) as sock:  # no client certificate
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        if not sock.recv(100):  # TLS 1.3 reports the refusal on the first read
            raise ConnectionError("closed")


def test_threads_over_tls(server_factory, pki):
    server = server_factory("tests.apps.basic:app", *tls_args(pki, "--threads", "4"),
                            workers=1)

    def client(_: int) -> list[int]:
        with requests.Session() as session:
            session.trust_env = False  # REQUESTS_CA_BUNDLE would replace session.verify
            session.verify = str(pki / "ca.pem")
            codes = [session.get(f"{https(server)}/slow?s=0.2", timeout=20).status_code]
            codes += [session.get(f"{https(server)}/", timeout=20).status_code
                      for _ in range(10)]
            return codes

    started = time.monotonic()
    with ThreadPoolExecutor(4) as executor:
        codes = [code for result in executor.map(client, range(4)) for code in result]
    assert codes == [200] * 44
    assert time.monotonic() - started < 0.2 * 4  # the slow requests ran side by side


# ---------------------------------------------------------------------------------------------
# A sample of the HTTP verdict corpus over TLS: every third case that does not half-close
# (a TLS client cannot half-close without ending TLS), sent whole through a verified client.

SAMPLE = [case for case in VERDICTS if not case.half_close][::3]


class _TLSSockets:
    """Stands in for the ``socket`` module inside the conformance harness: its connections
    are TLS connections to the server under test."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context

    def __getattr__(self, name: str):
        return getattr(socket, name)

    def create_connection(self, address, timeout=None):
        sock = socket.create_connection(address, timeout=timeout)
        return self._context.wrap_socket(sock, server_hostname="127.0.0.1")


@pytest.fixture(scope="module")
def conformance_tls_server(tmp_path_factory, pki):
    records_dir = tmp_path_factory.mktemp("records")
    server = Server(tmp_path_factory.mktemp("conformance-tls"), "tests.apps.conformance_app:app",
                    *SERVER_ARGS, *tls_args(pki), env={"CONFORMANCE_DIR": str(records_dir)})
    server.start()
    server.records_dir = records_dir
    yield server
    server.stop()


@pytest.mark.parametrize("case", SAMPLE, ids=[f"{c.section}:{c.id}" for c in SAMPLE])
def test_verdict_corpus_over_tls(conformance_tls_server, pki, case, monkeypatch):
    monkeypatch.setattr(conformance, "socket", _TLSSockets(client_context(pki)))
    conformance.run_case(conformance_tls_server, case)


def test_proxy_header_then_tls(server_factory, pki):
    server = server_factory("tests.apps.basic:app", *tls_args(pki, "--proxy-protocol", "v1"),
                            workers=1)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(b"PROXY TCP4 198.51.100.4 127.0.0.1 5555 443\r\n")  # before the ClientHello
    with client_context(pki).wrap_socket(sock, server_hostname="127.0.0.1") as tls_sock:
        tls_sock.sendall(b"GET /environ HTTP/1.1\r\nHost: t\r\n\r\n")
        body = ResponseReader(tls_sock).read()[2]
    assert b'"REMOTE_ADDR": "198.51.100.4"' in body and b'"HTTPS": "on"' in body
