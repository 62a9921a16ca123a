"""Real nginx and HAProxy in front of forkserver, for the ops tests (start, check, stop).

Everything a proxy writes (pid file, logs, nginx's temp directories) stays under the ``prefix``
directory the test gives (a ``tmp_path`` subdirectory). Proxies listen on 127.0.0.1 only, and
are stopped by their own PID: nothing here looks processes up by name.

API:

``free_port() -> int``
    A loopback TCP port that was free a moment ago.
``nginx_binary() -> str`` / ``haproxy_binary() -> str``
    The binary's path. The test is skipped if it is missing (``scripts/system-deps`` installs
    ``nginx-light`` and ``haproxy``).
``nginx_main_config(prefix, site) -> str``
    A throwaway ``nginx.conf`` that keeps every file under ``prefix`` and includes ``site`` (a
    file holding ``upstream``/``server`` blocks) inside ``http {}``.
``Nginx(prefix, conf)``; ``Nginx.with_site(prefix, site_text)`` writes both files first.
``HAProxy(prefix, config_text)``
    Writes ``prefix/haproxy.cfg``. Its output, and its log if the config says
    ``log stdout format raw local0``, goes to ``prefix/haproxy.out``.
Both proxies have these methods:
    ``test_config()`` runs the binary's config check and returns the ``CompletedProcess``.
    ``start(port)`` runs the proxy in the foreground and waits until ``port`` accepts; it raises
    ``AssertionError`` with the proxy's log if the proxy exits or never listens.
    ``errors()`` returns the proxy's log text.
    ``stop()`` sends SIGTERM to the proxy's PID, waits, then kills any child left over. It is
    safe to call twice.
``running(proxy, port)``
    A context manager: ``start`` on entry, ``stop`` on exit, whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

NGINX_TEMPS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _binary(name: str, package: str) -> str:
    found = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/local/sbin/{name}") if os.access(p, os.X_OK)),
        None)
    if found is None:
        pytest.skip(f"{name} not found (install the Debian package '{package}', "
                    "or run scripts/system-deps as root)")
    return found


def nginx_binary() -> str:
    return _binary("nginx", "nginx-light")


def haproxy_binary() -> str:
    return _binary("haproxy", "haproxy")


def nginx_main_config(prefix: Path, site: Path) -> str:
    """A throwaway nginx.conf: everything nginx writes stays under ``prefix``."""
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must reach tmp_path
    temp = "".join(f"    {kind}_temp_path {prefix}/{kind};\n" for kind in NGINX_TEMPS)
    return (f"{user}worker_processes 1;\npid {prefix}/nginx.pid;\n"
            f"error_log {prefix}/error.log info;\n"
            "events { worker_connections 256; }\n"
            f"http {{\n    access_log {prefix}/access.log;\n{temp}    include {site};\n}}\n")


class _Proxy:
    """A proxy process run in the foreground, owned by the test that started it."""

    name = "proxy"
    log_name = "proxy.log"

    def __init__(self, prefix: Path, argv: list[str]) -> None:
        self.prefix = prefix
        self.argv = argv
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def _run_argv(self) -> list[str]:
        raise NotImplementedError

    def _check_argv(self) -> list[str]:
        raise NotImplementedError

    def test_config(self) -> subprocess.CompletedProcess:
        return subprocess.run(self._check_argv(), capture_output=True, text=True, timeout=30)

    def start(self, port: int, timeout: float = 10.0) -> _Proxy:
        self.port = port
        with open(self.prefix / f"{self.name}.out", "ab") as out:
            self.proc = subprocess.Popen(self._run_argv(), stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}):\n"
                                     f"{self.errors()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise AssertionError(f"{self.name} did not listen on {port}:\n{self.errors()}")

    def errors(self) -> str:
        texts = []
        for name in dict.fromkeys((self.log_name, f"{self.name}.out")):
            path = self.prefix / name
            if path.exists():
                texts.append(path.read_text(errors="replace"))
        return "\n".join(texts)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        self.proc.send_signal(signal.SIGTERM)  # both stop at once on TERM
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        _gone, alive = psutil.wait_procs(children, timeout=5)
        for child in alive:
            child.kill()
        assert not alive, f"{self.name} children left behind: {[c.pid for c in alive]}"


class Nginx(_Proxy):
    name = "nginx"
    log_name = "error.log"

    def __init__(self, prefix: Path, conf: Path) -> None:
        super().__init__(prefix, [nginx_binary(), "-p", str(prefix), "-c", str(conf),
                                  "-e", str(prefix / "error.log")])

    @classmethod
    def with_site(cls, prefix: Path, site_text: str) -> Nginx:
        prefix.mkdir(parents=True, exist_ok=True)
        site = prefix / "site.conf"
        site.write_text(site_text)
        conf = prefix / "nginx.conf"
        conf.write_text(nginx_main_config(prefix, site))
        return cls(prefix, conf)

    def _run_argv(self) -> list[str]:
        return [*self.argv, "-g", "daemon off;"]

    def _check_argv(self) -> list[str]:
        return [*self.argv, "-t"]


class HAProxy(_Proxy):
    name = "haproxy"
    log_name = "haproxy.out"  # its stdout and stderr: `log stdout` in the config lands here

    def __init__(self, prefix: Path, config_text: str) -> None:
        prefix.mkdir(parents=True, exist_ok=True)
        conf = prefix / "haproxy.cfg"
        conf.write_text(config_text)
        super().__init__(prefix, [haproxy_binary(), "-f", str(conf)])

    def _run_argv(self) -> list[str]:
        # -db: stay in the foreground, one process (no master-worker), so its PID is the proxy.
        return [*self.argv, "-db", "-p", str(self.prefix / "haproxy.pid")]

    def _check_argv(self) -> list[str]:
        return [*self.argv, "-c"]



@contextlib.contextmanager
def running(proxy: _Proxy, port: int) -> Iterator[_Proxy]:
    checked = proxy.test_config()
    assert checked.returncode == 0, (
        f"{proxy.name} config check failed:\n{checked.stdout}{checked.stderr}")
    try:
        yield proxy.start(port)
    finally:
        proxy.stop()
