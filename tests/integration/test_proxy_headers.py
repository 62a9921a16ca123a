"""Forwarding headers are believed only from trusted proxies (forwarded_allow_ips), and only
the ones the operator named (forwarded_headers); see docs/proxies.md."""

from __future__ import annotations

import inspect
import json
import socket

import pytest
import requests

from forkserver import wsgi

HEADERS = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}
# What a client sends to fool an app behind a proxy that only appends to X-Forwarded-For.
SPOOF = {"Forwarded": "for=6.6.6.6;proto=https;host=evil.example",
         "X-Forwarded-Host": "evil.example"}

# The worker builds its TrustedProxies through wsgi.trusted_proxies; forwarded_headers reaches
# it once that function takes the header list (a change in wsgi.py and worker.py).
headers_reach_the_worker = pytest.mark.skipif(
    len(inspect.signature(wsgi.trusted_proxies).parameters) < 2,
    reason="wsgi.trusted_proxies(allow, headers) not there yet: forwarded_headers is not passed",
)


def environ_of(server, headers: dict[str, str], source: str = "127.0.0.1") -> dict:
    """GET /environ from the given loopback source address."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10,
                                  source_address=(source, 0)) as sock:
        lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        sock.sendall(f"GET /environ HTTP/1.1\r\nHost: app.example\r\n{lines}"
                     "Connection: close\r\n\r\n".encode("latin-1"))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    return json.loads(body)


def test_trusted_peer_sets_remote_addr_and_scheme(server_factory):
    server = server_factory("tests.apps.basic:app")  # default trusts 127.0.0.1
    data = requests.get(f"{server.url}/environ", headers=HEADERS, timeout=10).json()
    assert data["REMOTE_ADDR"] == "203.0.113.7"
    assert data["wsgi.url_scheme"] == "https"
    assert data["HTTP_X_FORWARDED_FOR"] == "203.0.113.7"  # the header itself is left as sent


def test_untrusted_peer_is_not_believed(server_factory):
    server = server_factory("tests.apps.basic:app", "--forwarded-allow-ips", "10.9.9.9")
    data = requests.get(f"{server.url}/environ", headers=HEADERS, timeout=10).json()
    assert data["REMOTE_ADDR"] == "127.0.0.1"
    assert data["wsgi.url_scheme"] == "http"


def test_forwarded_and_host_headers_are_not_believed_by_default(server_factory):
    server = server_factory("tests.apps.basic:app")
    data = environ_of(server, SPOOF)
    assert data["REMOTE_ADDR"] == "127.0.0.1"
    assert data["wsgi.url_scheme"] == "http"
    assert data["HTTP_HOST"] == "app.example"
    assert data["HTTP_FORWARDED"] == SPOOF["Forwarded"]  # passed on, never believed


def test_the_client_is_the_rightmost_untrusted_hop(server_factory):
    # The proxy (127.0.0.1) appended the address it saw (127.0.0.2); what the client wrote
    # further left is never read, and the left-most entry is never taken on trust.
    server = server_factory("tests.apps.basic:app", "--forwarded-allow-ips", "127.0.0.1")
    data = environ_of(server, {"X-Forwarded-For": "6.6.6.6, 127.0.0.2",
                               "X-Forwarded-Proto": "https"})
    assert data["REMOTE_ADDR"] == "127.0.0.2"
    assert data["wsgi.url_scheme"] == "https"
    # A malformed entry at the right is never believed: the peer is all we know.
    data = environ_of(server, {"X-Forwarded-For": "6.6.6.6, not-an-address"})
    assert data["REMOTE_ADDR"] == "127.0.0.1"


def test_an_untrusted_source_address_is_not_believed(server_factory):
    server = server_factory("tests.apps.basic:app", "--forwarded-allow-ips", "127.0.0.1")
    data = environ_of(server, HEADERS, source="127.0.0.2")
    assert data["REMOTE_ADDR"] == "127.0.0.2"
    assert data["wsgi.url_scheme"] == "http"


def test_unknown_header_name_is_a_config_error(server_factory):
    server = server_factory("tests.apps.basic:app", "--forwarded-headers", "X-Real-IP",
                            wait_ready=False)
    assert server.wait_exit(20) != 0
    output = server.proc.stdout.read().decode(errors="replace")
    assert "forwarded_headers" in output and "X-Real-IP" in output


@headers_reach_the_worker
def test_named_forwarded_and_host_headers_are_believed(server_factory):
    server = server_factory("tests.apps.basic:app", "--forwarded-headers", "Forwarded",
                            "--forwarded-headers", "X-Forwarded-Host")
    data = environ_of(server, {"Forwarded": 'for="[2001:db8::1]:4711";proto=https'})
    assert data["REMOTE_ADDR"] == "2001:db8::1"
    assert data["wsgi.url_scheme"] == "https"
    data = environ_of(server, {"X-Forwarded-Host": "shop.example"})
    assert data["HTTP_HOST"] == "shop.example"
