"""The PROXY protocol against the real server (issue 16, item 2): raw headers, then HAProxy.

Raw headers test each refusal: a connection whose header is truncated, oversized, of the wrong
signature, missing, or sent by a peer outside ``proxy_allow_ips`` is closed without an HTTP byte
in answer, and the worker serves on. HAProxy in front (``send-proxy-v2``, ``send-proxy``) proves
the address the app sees is the client's: the client connects from 127.0.0.2, HAProxy from
127.0.0.1.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
import time

import pytest

from tests.conftest import ResponseReader, read_until_closed
from tests.ops._proxies import HAProxy, free_port, running

CLIENT = "127.0.0.2"
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
ENVIRON = b"GET /environ HTTP/1.1\r\nHost: t\r\n\r\n"


def v1(source: str = "203.0.113.7", port: int = 40000) -> bytes:
    return f"PROXY TCP4 {source} 127.0.0.1 {port} 80\r\n".encode()


def v2(source: str = "2001:db8::7", port: int = 40001, command: int = 0x21,
       extra: bytes = b"") -> bytes:
    """A v2 header: PROXY (0x21) or LOCAL (0x20), TCP over IPv6, plus ``extra`` TLV bytes."""
    addresses = (ipaddress.IPv6Address(source).packed + ipaddress.IPv6Address("::1").packed
                 + struct.pack("!HH", port, 443) + extra)
    return V2_SIGNATURE + bytes([command, 0x21]) + struct.pack("!H", len(addresses)) + addresses


def environ_after(port: int, header: bytes, source: str = "127.0.0.1") -> dict | None:
    """The app's environ for a request sent after ``header``; None if closed unanswered."""
    with socket.create_connection(("127.0.0.1", port), timeout=10,
                                  source_address=(source, 0)) as sock:
        sock.sendall(header + ENVIRON)
        try:
            status, _, body = ResponseReader(sock).read()
        except (ConnectionError, AssertionError, ValueError):
            return None
        assert status == 200
        return json.loads(body)


def closed_unanswered(port: int, data: bytes, source: str = "127.0.0.1") -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=10,
                                  source_address=(source, 0)) as sock:
        sock.sendall(data)
        return read_until_closed(sock) == b""


@pytest.fixture
def proxied(server_factory):
    return server_factory("tests.apps.basic:app", "--proxy-protocol", "auto", workers=1)


def test_valid_v1_and_v2_headers_name_the_client(proxied):
    environ = environ_after(proxied.port, v1("203.0.113.7", 40000))
    assert (environ["REMOTE_ADDR"], environ["REMOTE_PORT"]) == ("203.0.113.7", "40000")
    environ = environ_after(proxied.port, v2("2001:db8::7", 40001))
    assert (environ["REMOTE_ADDR"], environ["REMOTE_PORT"]) == ("2001:db8::7", "40001")
    environ = environ_after(proxied.port, v2(command=0x20))  # LOCAL: the proxy's own check
    assert environ["REMOTE_ADDR"] == "127.0.0.1"


def test_a_header_split_across_packets_is_read_whole(proxied):
    header = v2("2001:db8::9", 40002)
    with socket.create_connection(("127.0.0.1", proxied.port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for piece in (header[:5], header[5:20], header[20:]):
            sock.sendall(piece)
            time.sleep(0.05)
        sock.sendall(ENVIRON)
        body = ResponseReader(sock).read()[2]
    assert json.loads(body)["REMOTE_ADDR"] == "2001:db8::9"


@pytest.mark.parametrize("data", [
    pytest.param(v1()[:20] + b"\r\n", id="v1-truncated"),
    pytest.param(b"PROXY TCP4 " + b"1" * 120 + b"\r\n", id="v1-oversized"),
    pytest.param(v2(extra=b"\x00" * 5000), id="v2-oversized"),
    pytest.param(b"\r\n\r\n\x00\r\nQUIX\n" + v2()[12:], id="v2-wrong-signature"),
    pytest.param(b"PROXI TCP4 1.2.3.4 5.6.7.8 1 2\r\n", id="v1-wrong-signature"),
    pytest.param(b"", id="no-header"),
])
def test_a_bad_header_closes_without_an_answer_and_the_worker_serves_on(proxied, data):
    assert closed_unanswered(proxied.port, data + ENVIRON)
    assert environ_after(proxied.port, v1())["REMOTE_ADDR"] == "203.0.113.7"


def test_a_truncated_header_is_cut_at_header_timeout(server_factory):
    server = server_factory("tests.apps.basic:app", "--proxy-protocol", "v2",
                            "--header-timeout", "1", workers=1)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(v2()[:20])  # and then nothing
        assert environ_after(server.port, v2("2001:db8::1"))["REMOTE_ADDR"] == "2001:db8::1"
        assert read_until_closed(sock) == b""
    assert time.monotonic() - started < 6


def test_a_peer_not_allowed_is_closed_unread(server_factory):
    server = server_factory("tests.apps.basic:app", "--proxy-protocol", "v1",
                            "--proxy-allow-ips", "127.0.0.1", workers=1)
    assert closed_unanswered(server.port, v1() + ENVIRON, source=CLIENT)
    assert environ_after(server.port, v1())["REMOTE_ADDR"] == "203.0.113.7"


def haproxy_config(port: int, backend: int, send_proxy: str) -> str:
    return f"""
global
    log stdout format raw local0
    maxconn 256
defaults
    mode tcp
    log global
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend web
    bind 127.0.0.1:{port}
    default_backend forkserver
backend forkserver
    server app 127.0.0.1:{backend} {send_proxy}
"""


@pytest.mark.parametrize("send_proxy", ["send-proxy-v2", "send-proxy"])
def test_haproxy_in_front_passes_the_clients_address(server_factory, tmp_path, send_proxy):
    version = "v2" if send_proxy.endswith("v2") else "v1"
    server = server_factory("tests.apps.basic:app", "--proxy-protocol", version, workers=1)
    port = free_port()
    proxy = HAProxy(tmp_path / "haproxy", haproxy_config(port, server.port, send_proxy))
    with running(proxy, port):
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=10,
                                          source_address=(CLIENT, 0)) as sock:
                sock.sendall(ENVIRON)
                environ = json.loads(ResponseReader(sock).read()[2])
                assert environ["REMOTE_ADDR"] == CLIENT
                assert environ["REMOTE_PORT"] == str(sock.getsockname()[1])
