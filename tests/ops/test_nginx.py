"""deploy/nginx.conf in front of two forkserver instances: losing one whole instance (master
and workers at once) must not fail requests, including one that instance was serving."""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import psutil
import pytest
import requests

from tests.conftest import ROOT, Server
from tests.ops._proxies import Nginx, free_port, nginx_main_config, running

DEPLOY_NGINX = ROOT / "deploy" / "nginx.conf"


def site_config(backends: list[str], port: int) -> str:
    """deploy/nginx.conf with the test's backends and a loopback listener, nothing else changed."""
    text = DEPLOY_NGINX.read_text()
    servers = "".join(f"    server {b} max_fails=3 fail_timeout=10s;\n" for b in backends)
    text, upstreams = re.subn(r"(?m)^\s*server (?:127\.0\.0\.1|unix:)\S* [^\n]*\n", "", text)
    text, blocks = re.subn(r"(upstream forkserver \{\n)", lambda m: m.group(1) + servers, text)
    text, listens = re.subn(r"(?m)^\s*listen 80;\n", f"    listen 127.0.0.1:{port};\n", text)
    text, v6 = re.subn(r"(?m)^\s*listen \[::\]:80;\n", "", text)
    assert (blocks, listens, v6) == (1, 1, 1) and upstreams >= 2, \
        "deploy/nginx.conf changed shape: update site_config()"
    return text


class GroupServer(Server):
    """A forkserver in its own session, so one os.killpg() takes master and workers at once."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, new_session=True, **kwargs)


# The test app plus a route that tells the instances apart and lets instance "a" answer 503.
BACKEND_APP = """
import os
from tests.apps.basic import app as basic

INSTANCE = os.environ["TEST_INSTANCE"].encode()


def app(environ, start_response):
    if environ["PATH_INFO"] != "/instance":
        return basic(environ, start_response)
    if INSTANCE == b"a" and environ["QUERY_STRING"] == "unavailable":
        start_response("503 Service Unavailable", [("Content-Length", "0")])
        return [b""]
    start_response("200 OK", [("Content-Length", str(len(INSTANCE)))])
    return [INSTANCE]
"""


@pytest.fixture
def backends(tmp_path):
    (tmp_path / "nginx_backend.py").write_text(BACKEND_APP)
    servers = [GroupServer(tmp_path, "nginx_backend:app", workers=2,
                           env={"PYTHONPATH": f"{ROOT}:{tmp_path}", "TEST_INSTANCE": name})
               for name in ("a", "b")]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            if server.proc is not None and server.proc.poll() is None:
                server.stop(signal.SIGTERM)


@pytest.fixture
def nginx(tmp_path, backends):
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    port = free_port()
    site = prefix / "forkserver.conf"
    site.write_text(site_config([f"127.0.0.1:{s.port}" for s in backends], port))
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_main_config(prefix, site))
    with running(Nginx(prefix, conf), port) as server:
        yield server


def test_shipped_config_passes_nginx_t(tmp_path):
    """The file exactly as shipped (port 80, a unix backend) is valid nginx syntax."""
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_main_config(prefix, DEPLOY_NGINX))
    result = Nginx(prefix, conf).test_config()
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr
    assert "[warn]" not in result.stderr and "[emerg]" not in result.stderr, result.stderr


def test_requests_keep_succeeding_when_one_instance_dies(nginx, backends):
    url = f"http://127.0.0.1:{nginx.port}"
    pids = [set(server.worker_pids()) for server in backends]
    seen = {int(requests.get(f"{url}/pid", timeout=10).text) for _ in range(10)}
    assert seen & pids[0] and seen & pids[1], "nginx should spread requests over both"

    # Two slow requests at once: least_conn puts one on each instance, so the instance that
    # dies is in the middle of one. nginx must retry that GET on the survivor.
    results: list[requests.Response | Exception] = []

    def slow() -> None:
        try:
            results.append(requests.get(f"{url}/slow?s=1", timeout=30))
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            results.append(error)

    threads = [threading.Thread(target=slow) for _ in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(0.4)  # both are now inside the app's sleep
    victim, _survivor = backends
    os.killpg(victim.pid, signal.SIGKILL)  # master and workers, no chance to drain
    victim.proc.wait(10)
    for thread in threads:
        thread.join(30)
    assert [getattr(r, "status_code", r) for r in results] == [200, 200]
    assert all(r.text == "slept" for r in results)

    for _ in range(20):
        response = requests.get(f"{url}/pid", timeout=10)
        assert response.status_code == 200
        assert int(response.text) in pids[1]
    for pid in victim.known_pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    errors = nginx.errors()
    # Proof that the retries above happened: one for the request cut off mid-flight, and
    # refused connects until nginx took the dead instance out of rotation.
    assert re.search(r"upstream prematurely closed|recv\(\) failed", errors), errors
    assert "connect() failed (111" in errors, errors


def test_client_cannot_smuggle_forwarding_headers_through_nginx(nginx):
    headers = {"Forwarded": "for=6.6.6.6;proto=https", "X-Forwarded-For": "6.6.6.6",
               "X-Forwarded-Proto": "https"}
    response = requests.get(f"http://127.0.0.1:{nginx.port}/environ", headers=headers,
                            timeout=10)
    environ = response.json()
    assert "HTTP_FORWARDED" not in environ
    assert environ["HTTP_X_FORWARDED_FOR"] == "127.0.0.1"  # what nginx saw, nothing appended
    assert environ["HTTP_X_FORWARDED_PROTO"] == "http"
    assert environ["HTTP_CONNECTION"] == "close"  # no upstream keep-alive pool
    assert environ["SERVER_PROTOCOL"] == "HTTP/1.0"


def test_a_503_is_retried_on_the_other_instance(nginx):
    url = f"http://127.0.0.1:{nginx.port}/instance"
    assert {requests.get(url, timeout=10).text for _ in range(6)} == {"a", "b"}
    for _ in range(10):
        response = requests.get(f"{url}?unavailable", timeout=10)
        assert (response.status_code, response.text) == (200, "b")
