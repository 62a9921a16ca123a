"""load/servers.py's start-up checks: a server given a certificate must speak TLS.

A build may accept ``--certfile`` before its workers speak TLS; the benchmark must then report
"not supported by this build" rather than measure plain HTTP or fail the whole run. A tiny
stand-in server (the standard library's http.server, plain or wrapped in TLS) plays both builds.
"""

from __future__ import annotations

import sys
import time

import pytest
import trustme

from load.servers import ManagedServer, NoTls, ServerError

# Prints the two lines ManagedServer waits for, then serves GET with a 200 ("ok").
STAND_IN = """
import http.server, os, ssl, sys

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass

server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
if len(sys.argv) > 1:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(sys.argv[1], sys.argv[2])
    server.socket = context.wrap_socket(server.socket, server_side=True)
print(f"Listening at: http://127.0.0.1:{server.server_address[1]} ({os.getpid()})", flush=True)
print("1 workers ready", flush=True)
server.serve_forever()
"""


def _stand_in(tmp_path, *argv: str) -> ManagedServer:
    return ManagedServer("stand-in", [sys.executable, "-c", STAND_IN, *argv],
                         tmp_path / "stand-in.log", workers=1, ready_pattern=r"workers ready",
                         scheme="https")


def test_a_server_that_answers_a_handshake_in_plain_http_has_no_tls(tmp_path):
    server = _stand_in(tmp_path)
    began = time.monotonic()
    with pytest.raises(NoTls) as caught:
        server.start(timeout=30)
    # Told apart at once, not after the start-up deadline; and stopped.
    assert time.monotonic() - began < 15
    assert "without TLS" in caught.value.reason
    assert server.proc is not None and server.proc.poll() is not None


def test_a_server_that_speaks_tls_passes_the_handshake_and_the_probe(tmp_path):
    cert = trustme.CA().issue_cert("127.0.0.1")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    server = _stand_in(tmp_path, str(certfile), str(keyfile))
    server.start(timeout=30)
    try:
        assert server.url.startswith("https://127.0.0.1:")
    finally:
        server.stop(timeout=10)
    assert server.proc.poll() is not None


def test_the_user_s_server_settings_do_not_reach_a_measured_server(tmp_path, monkeypatch):
    monkeypatch.setenv("FORKSERVER_SHUTDOWN_DELAY", "60")
    monkeypatch.setenv("WEB_CONCURRENCY", "9")
    monkeypatch.setenv("GUNICORN_CMD_ARGS", "--workers 9")
    names = ("FORKSERVER_SHUTDOWN_DELAY", "WEB_CONCURRENCY", "GUNICORN_CMD_ARGS",
             "FORKSERVER_ROW")
    script = f"import os; print(sorted(k for k in os.environ if k in {names!r}), flush=True)"
    server = ManagedServer("env", [sys.executable, "-c", script], tmp_path / "env.log",
                           workers=1, ready_pattern="never printed",
                           env={"FORKSERVER_ROW": "1"})
    with pytest.raises(ServerError):
        server.start(timeout=10)  # it prints what it got and exits
    assert server.log().splitlines()[0] == "['FORKSERVER_ROW']"
