"""A real nginx and a real HAProxy in front of forkserver, upstream keep-alive on (issue 10, 1-3).

Each check runs through both proxies, configured the way their documentation shows for an app
server (nginx: ``$proxy_add_x_forwarded_for`` and the usual WebSocket ``map``; HAProxy:
``option forwardfor``), with a pool of upstream keep-alive connections:

1. an app that answers without reading a large body: every client gets the answer, no reset
   and no 502;
2. a client that forges ``Forwarded`` and a left-most ``X-Forwarded-For``: the app sees the
   address the proxy appended, the scheme the proxy set and the Host the client sent;
3. an app that returns a 1xx as its final status: the client gets a 500 and no tunnel, so the
   next request on the same connection still meets the proxy's access rules.

The client connects from 127.0.0.2, so the proxy-appended address differs from the proxy's own
(127.0.0.1, the only trusted peer) and from the forged left-most entry.
"""

from __future__ import annotations

import http.client
import json
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import ResponseReader, Server
from tests.ops._proxies import HAProxy, Nginx, free_port, running

CLIENT_ADDRESS = "127.0.0.2"
BIG_BODY = b"\x00" * (8 * 1024 * 1024)
CLIENTS = 20
PARALLEL = 4  # clients in flight at once (2 cores, other suites running)


def nginx_site(port: int, backend: int) -> str:
    return f"""
map $http_upgrade $connection_upgrade {{
    default upgrade;
    ''      '';
}}
upstream forkserver {{
    server 127.0.0.1:{backend};
    keepalive 8;
}}
server {{
    listen 127.0.0.1:{port};
    client_max_body_size 16m;
    location /secret {{
        deny all;
    }}
    location / {{
        proxy_pass http://forkserver;
        proxy_http_version 1.1;
        proxy_set_header Host $http_host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection $connection_upgrade;
    }}
}}
"""


def haproxy_config(port: int, backend: int) -> str:
    return f"""
global
    log stdout format raw local0
    maxconn 256
defaults
    mode http
    log global
    option httplog
    option http-keep-alive
    option forwardfor
    http-reuse always
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout tunnel 30s
frontend web
    bind 127.0.0.1:{port}
    http-request deny if {{ path_beg /secret }}
    http-request set-header X-Forwarded-Proto http
    default_backend forkserver
backend forkserver
    server app 127.0.0.1:{backend}
"""


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("fronts"), "tests.apps.fronts_app:app",
                    "--forwarded-allow-ips", "127.0.0.1")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module", params=["nginx", "haproxy"])
def front(request, tmp_path_factory, backend):
    prefix: Path = tmp_path_factory.mktemp(request.param)
    port = free_port()
    if request.param == "nginx":
        proxy = Nginx.with_site(prefix, nginx_site(port, backend.port))
    else:
        proxy = HAProxy(prefix, haproxy_config(port, backend.port))
    with running(proxy, port) as started:
        yield started


def connect(front, timeout: float = 30.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", front.port), timeout=timeout,
                                    source_address=(CLIENT_ADDRESS, 0))


def post_unread_body(port: int) -> tuple[int, bytes] | str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60,
                                      source_address=(CLIENT_ADDRESS, 0))
    try:
        conn.request("POST", "/ignore-body", body=BIG_BODY,
                     headers={"Content-Type": "application/octet-stream"})
        response = conn.getresponse()
        return response.status, response.read()
    except OSError as error:  # a reset or a broken pipe is the failure this test looks for
        return f"{type(error).__name__}: {error}"
    finally:
        conn.close()


def test_an_answer_to_an_unread_body_reaches_every_client(front, backend):
    with ThreadPoolExecutor(PARALLEL) as pool:
        outcomes = list(pool.map(post_unread_body, [front.port] * CLIENTS))
    failed = [outcome for outcome in outcomes if outcome != (200, b"ignored")]
    assert failed == [], (f"{len(failed)} of {CLIENTS} clients lost the answer: {failed[:3]}\n"
                          f"{front.name}: {front.errors()[-2000:]}")
    assert "Traceback" not in backend.log()


def test_forged_forwarding_headers_do_not_fool_the_app(front):
    raw = (b"GET /whoami HTTP/1.1\r\nHost: shop.example\r\n"
           b"Forwarded: for=6.6.6.6;proto=https;host=evil.example\r\n"
           b"X-Forwarded-For: 127.0.0.1\r\nConnection: close\r\n\r\n")
    with connect(front) as sock:
        sock.sendall(raw)
        status, _headers, body = ResponseReader(sock).read()
    assert status == 200, body
    seen = json.loads(body)
    # What the proxy appended is the real client; the forged entries stay to its left.
    assert seen["HTTP_X_FORWARDED_FOR"].split(",")[-1].strip() == CLIENT_ADDRESS, seen
    assert (seen["REMOTE_ADDR"], seen["wsgi.url_scheme"], seen["HTTP_HOST"]) == (
        CLIENT_ADDRESS, "http", "shop.example"), seen


def test_a_1xx_final_status_is_a_500_and_opens_no_tunnel(front):
    upgrade = (b"GET /upgrade HTTP/1.1\r\nHost: shop.example\r\nUpgrade: websocket\r\n"
               b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               b"Sec-WebSocket-Version: 13\r\n\r\n")  # HAProxy insists on a full handshake
    with connect(front, timeout=10) as sock:
        reader = ResponseReader(sock)
        sock.sendall(upgrade)
        status, _headers, _body = reader.read()
        # Today nginx relays the 101 and opens a tunnel; HAProxy refuses the bare 101 (502).
        assert status == 500, f"{front.name} answered {status}: the app's 1xx went out as final"
        # Still HTTP between client and proxy: the proxy's access rules apply to what follows.
        sock.sendall(b"GET /secret HTTP/1.1\r\nHost: shop.example\r\n\r\n")
        status, _headers, body = reader.read()
        assert status == 403, f"/secret reached the app through {front.name}: {body[:100]!r}"
        sock.sendall(b"GET /open HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n")
        status, _headers, body = reader.read()
        assert (status, body) == (200, b"/open")
