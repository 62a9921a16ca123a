"""Forwarded headers are believed only from trusted proxies (forwarded_allow_ips)."""

from __future__ import annotations

import requests

HEADERS = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}


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


def test_forwarded_header_rfc7239(server_factory):
    server = server_factory("tests.apps.basic:app")
    headers = {"Forwarded": 'for="[2001:db8::1]:4711";proto=https;host=example.org'}
    data = requests.get(f"{server.url}/environ", headers=headers, timeout=10).json()
    assert data["REMOTE_ADDR"] == "2001:db8::1"
    assert data["wsgi.url_scheme"] == "https"
    assert data["HTTP_HOST"] == "example.org"
