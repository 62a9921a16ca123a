"""Forwarding headers are believed only from trusted proxies (forwarded_allow_ips), and only
the ones the operator named (forwarded_headers); see docs/proxies.md."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import psutil
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


def environ_of(port: int, headers: dict[str, str], source: str = "127.0.0.1") -> dict:
    """GET /environ on a loopback port, from the given loopback source address."""
    with socket.create_connection(("127.0.0.1", port), timeout=10,
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
    data = environ_of(server.port, SPOOF)
    assert data["REMOTE_ADDR"] == "127.0.0.1"
    assert data["wsgi.url_scheme"] == "http"
    assert data["HTTP_HOST"] == "app.example"
    assert data["HTTP_FORWARDED"] == SPOOF["Forwarded"]  # passed on, never believed


def test_the_client_is_the_rightmost_untrusted_hop(server_factory):
    # The proxy (127.0.0.1) appended the address it saw (127.0.0.2); what the client wrote
    # further left is never read, and the left-most entry is never taken on trust.
    server = server_factory("tests.apps.basic:app", "--forwarded-allow-ips", "127.0.0.1")
    data = environ_of(server.port, {"X-Forwarded-For": "6.6.6.6, 127.0.0.2",
                               "X-Forwarded-Proto": "https"})
    assert data["REMOTE_ADDR"] == "127.0.0.2"
    assert data["wsgi.url_scheme"] == "https"
    # A malformed entry at the right is never believed: the peer is all we know.
    data = environ_of(server.port, {"X-Forwarded-For": "6.6.6.6, not-an-address"})
    assert data["REMOTE_ADDR"] == "127.0.0.1"


def test_an_untrusted_source_address_is_not_believed(server_factory):
    server = server_factory("tests.apps.basic:app", "--forwarded-allow-ips", "127.0.0.1")
    data = environ_of(server.port, HEADERS, source="127.0.0.2")
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
    data = environ_of(server.port, {"Forwarded": 'for="[2001:db8::1]:4711";proto=https'})
    assert data["REMOTE_ADDR"] == "2001:db8::1"
    assert data["wsgi.url_scheme"] == "https"
    data = environ_of(server.port, {"X-Forwarded-Host": "shop.example"})
    assert data["HTTP_HOST"] == "shop.example"


# -- behind a real nginx and HAProxy, configured as docs/proxies.md says ----------------------
#
# The client connects to the proxy from 127.0.0.2, the proxy to forkserver from 127.0.0.1,
# and only 127.0.0.1 is trusted: the app must see 127.0.0.2, whatever the client wrote.

NGINX_SITE = """
server {{
    listen 127.0.0.1:{port};
    location / {{
        proxy_pass http://127.0.0.1:{backend};
        proxy_set_header Host              $host;
        proxy_set_header X-Forwarded-For   $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
    }}
}}
"""

HAPROXY_CONFIG = """
global
    maxconn 64
defaults
    mode http
    timeout connect 5s
    timeout client 10s
    timeout server 10s
frontend web
    bind 127.0.0.1:{port}
    default_backend app
backend app
    option forwardfor
    http-request set-header X-Forwarded-Proto https if {{ ssl_fc }}
    http-request set-header X-Forwarded-Proto http  if !{{ ssl_fc }}
    server app1 127.0.0.1:{backend}
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def binary(name: str) -> str:
    found = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/local/sbin/{name}") if os.access(p, os.X_OK)),
        None)
    if found is None:
        pytest.skip(f"{name} not found (scripts/system-deps installs it)")
    return found


@contextlib.contextmanager
def running(argv: list[str], port: int, log: Path):
    """A proxy in the foreground, stopped (and its children waited for) afterwards."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"{argv[0]} exited:\n{log.read_text(errors='replace')}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{argv[0]} did not listen on {port}") from None
                time.sleep(0.05)
        yield port
    finally:
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        _gone, alive = psutil.wait_procs(children, timeout=5)
        for child in alive:
            child.kill()
        assert not alive, f"{argv[0]} children left behind"


@contextlib.contextmanager
def nginx(tmp_path: Path, backend: int):
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    port = free_port()
    (prefix / "site.conf").write_text(NGINX_SITE.format(port=port, backend=backend))
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp = "".join(f"    {kind}_temp_path {prefix}/{kind};\n"
                   for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (prefix / "nginx.conf").write_text(
        f"{user}worker_processes 1;\npid {prefix}/nginx.pid;\nerror_log {prefix}/error.log;\n"
        "events { worker_connections 64; }\n"
        f"http {{\n    access_log off;\n{temp}    include {prefix}/site.conf;\n}}\n")
    argv = [binary("nginx"), "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
            "-e", str(prefix / "error.log"), "-g", "daemon off;"]
    with running(argv, port, prefix / "stdout.log") as listening:
        yield listening


@contextlib.contextmanager
def haproxy(tmp_path: Path, backend: int):
    port = free_port()
    conf = tmp_path / "haproxy.cfg"
    conf.write_text(HAPROXY_CONFIG.format(port=port, backend=backend))
    with running([binary("haproxy"), "-db", "-f", str(conf)], port,
                 tmp_path / "haproxy.log") as listening:
        yield listening


@pytest.mark.parametrize("proxy", [nginx, haproxy], ids=["nginx", "haproxy"])
def test_spoofed_headers_through_a_real_proxy_are_not_believed(server_factory, tmp_path, proxy):
    server = server_factory("tests.apps.basic:app", "--forwarded-allow-ips", "127.0.0.1")
    spoof = {**SPOOF, "X-Forwarded-For": "6.6.6.6, 127.0.0.1", "X-Forwarded-Proto": "https"}
    with proxy(tmp_path, server.port) as port:
        data = environ_of(port, spoof, source="127.0.0.2")
        assert data["REMOTE_ADDR"] == "127.0.0.2"  # the client, as the proxy saw it
        assert data["wsgi.url_scheme"] == "http"  # the proxy replaced the client's https
        assert data["HTTP_HOST"] == "app.example"
        # The app can still read what was sent, as plain headers.
        assert data["HTTP_FORWARDED"] == SPOOF["Forwarded"]
        assert data["HTTP_X_FORWARDED_FOR"].startswith("6.6.6.6, 127.0.0.1")
        # Without spoofing, the client's own address comes through the same way.
        assert environ_of(port, {}, source="127.0.0.2")["REMOTE_ADDR"] == "127.0.0.2"
