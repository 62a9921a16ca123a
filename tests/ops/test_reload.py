"""Reloads the master starts by itself or keeps from harming the server: a development reload
(``--reload``) when the app's source changes, and a HUP whose TLS settings cannot be loaded.

The apps here are written into the test's own directory and put on PYTHONPATH, so the test can
edit, break and fix them while the server runs.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import time
from pathlib import Path

import pytest
import trustme

from tests.conftest import ROOT, Server, read_response

SERVED = """\
import answer


def app(environ, start_response):
    body = answer.TEXT.encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
"""


def write_answer(appdir: Path, text: str) -> None:
    """Write answer.py by rename, as many editors save (a new inode each time)."""
    temporary = appdir / ".answer.py.tmp"
    temporary.write_text(text)
    os.replace(temporary, appdir / "answer.py")


def get_text(server: Server, timeout: float = 5.0) -> str:
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        status, _, body = read_response(sock)
    assert status == 200
    return body.decode()


def wait_for_answer(server: Server, wanted: str, within: float) -> float:
    """Seconds until the server answers ``wanted``; fails after ``within``."""
    start = time.monotonic()
    seen = ""
    while time.monotonic() - start < within:
        seen = get_text(server)
        if seen == wanted:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"still {seen!r}, not {wanted!r}, after {within}s:\n{server.log()}")


@pytest.fixture
def appdir(tmp_path) -> Path:
    path = tmp_path / "app"
    path.mkdir()
    (path / "served.py").write_text(SERVED)
    write_answer(path, 'TEXT = "one"\n')
    return path


def start_reloading(server_factory, appdir: Path, *args: str) -> Server:
    server = server_factory("served:app", "--reload", *args, workers=2,
                            env={"PYTHONPATH": f"{ROOT}{os.pathsep}{appdir}"})
    assert get_text(server) == "one"
    return server


def edit_break_fix(server: Server, appdir: Path) -> None:
    """The cycle of issue 16: edit, see it; break it, keep the old answer; fix it, see it."""
    time.sleep(0.6)  # past the first scan, which only takes the baseline
    write_answer(appdir, 'TEXT = "two"\n')
    assert wait_for_answer(server, "two", within=2.0) < 2.0
    server.wait_for_log(r"2 workers ready \(generation 2\)")
    write_answer(appdir, 'TEXT = "three"\nthis is not python\n')
    server.wait_for_log(r"reload abandoned .*generation 2 keeps serving", timeout=10)
    for _ in range(10):
        assert get_text(server) == "two"
        time.sleep(0.05)
    write_answer(appdir, 'TEXT = "three"\n')
    assert wait_for_answer(server, "three", within=2.0) < 2.0
    server.known_pids.update(server.worker_pids())


def test_a_watched_file_reloads_and_a_broken_change_keeps_the_last_good_generation(
        server_factory, appdir):
    """The master's side on its own: the file is watched through reload_extra_files, so no
    report from a worker is needed."""
    server = start_reloading(server_factory, appdir, "--reload-extra-files",
                             str(appdir / "*.py"))
    edit_break_fix(server, appdir)
    log = server.log()
    # The broken change booted one worker, not one per worker, and was not retried.
    assert len(re.findall(r"worker \d+ failed to boot", log)) == 1, log
    assert re.search(r"reload: .*answer\.py changed", log)
    assert "(crash)" not in log


def test_an_imported_module_reloads_without_being_named(server_factory, appdir):
    """The modules the workers imported are watched without reload_extra_files."""
    server = start_reloading(server_factory, appdir)
    edit_break_fix(server, appdir)
    assert server.log().count("Traceback (most recent call last)") == 1, server.log()


def test_an_edited_config_file_reloads_with_its_new_settings(server_factory, appdir, tmp_path):
    conf = tmp_path / "forkserver.toml"
    conf.write_text('access_log_format = "common"\n')
    server = start_reloading(server_factory, appdir, "--config", str(conf))
    time.sleep(0.6)
    conf.write_text('access_log_format = "json"\n')
    server.wait_for_log(r"reload: .*forkserver\.toml changed", timeout=5)
    server.wait_for_log(r"2 workers ready \(generation 2\)", timeout=10)
    server.known_pids.update(server.worker_pids())


# -- TLS settings on HUP ------------------------------------------------------------------------
def answers(server: Server, ca: trustme.CA) -> bool:
    """The worker answers a request: over TLS when it speaks it, else in plain HTTP (a TLS
    context is the master's to build; the worker's use of it is a separate piece)."""
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    try:
        sock: socket.socket = context.wrap_socket(raw, server_hostname="localhost")
    except (ssl.SSLError, ConnectionError):
        raw.close()
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    with sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        return read_response(sock)[0] == 200


def test_a_hup_with_a_missing_certificate_keeps_the_old_workers(server_factory, tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    conf = tmp_path / "tls.toml"
    conf.write_text(f'certfile = "{certfile}"\nkeyfile = "{keyfile}"\n')
    server = server_factory("tests.apps.basic:app", "--config", str(conf), workers=2)
    workers = sorted(server.worker_pids())
    assert answers(server, ca)
    conf.write_text(f'certfile = "{tmp_path / "gone.pem"}"\nkeyfile = "{keyfile}"\n')
    server.send_signal(signal.SIGHUP)
    line = server.wait_for_log(r".*reload failed, keeping the running configuration: .*")
    assert "certfile" in line.group(0) and "gone.pem" in line.group(0)
    time.sleep(0.5)
    log = server.log()
    assert log.count("reload failed") == 1 and "Traceback" not in log, log
    assert "generation 2" not in log
    assert sorted(server.worker_pids()) == workers
    assert answers(server, ca)
    # Fixed again, the next HUP reloads (with the certificate files read afresh).
    conf.write_text(f'certfile = "{certfile}"\nkeyfile = "{keyfile}"\n')
    server.send_signal(signal.SIGHUP)
    server.wait_for_log(r"2 workers ready \(generation 2\)")
    server.known_pids.update(server.worker_pids())
    assert answers(server, ca)


def test_certificate_rotation_by_hup_under_keep_alive_load(server_factory, tmp_path):
    """Issue 16: new certificate files are read by a HUP while keep-alive TLS clients keep
    sending; no request fails, and new connections see the new certificate."""
    import http.client
    import threading

    ca = trustme.CA()
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"

    def install(cert: trustme.LeafCert) -> bytes:
        cert.cert_chain_pems[0].write_to_path(str(certfile))
        cert.private_key_pem.write_to_path(str(keyfile))
        return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())

    old_der = install(ca.issue_cert("localhost"))
    server = server_factory("tests.apps.basic:app", "--certfile", str(certfile),
                            "--keyfile", str(keyfile), workers=2)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    counts = {"ok": 0, "failed": 0}
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = [time.monotonic() + 30.0]  # bounded: the test ends it earlier

    def client() -> None:
        conn = http.client.HTTPSConnection("localhost", server.port, context=context, timeout=10)
        sent = 0
        while time.monotonic() < stop_at[0] and sent < 20_000:
            sent += 1
            try:
                conn.request("GET", "/")
                response = conn.getresponse()
                response.read()
                good = response.status == 200
            except (OSError, http.client.HTTPException) as error:
                good = False
                errors.append(repr(error))
                conn.close()
            with lock:
                counts["ok" if good else "failed"] += 1
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        new_der = install(ca.issue_cert("localhost"))
        assert new_der != old_der
        server.send_signal(signal.SIGHUP)
        server.wait_for_log(r"2 workers ready \(generation 2\)", timeout=20)
        server.known_pids.update(server.worker_pids())
        time.sleep(1.5)
    finally:
        stop_at[0] = 0.0
        for thread in threads:
            thread.join(15)
    print(f"certificate rotation under load: {counts['ok']} ok, {counts['failed']} failed")
    assert counts["failed"] == 0, errors[:5]
    assert counts["ok"] > 100
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls_sock:
        assert tls_sock.getpeercert(binary_form=True) == new_der
