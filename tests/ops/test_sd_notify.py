"""sd_notify as systemd would see it: a datagram socket named by NOTIFY_SOCKET."""

from __future__ import annotations

import signal
import socket
import time

import pytest


class NotifySocket:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def wait_for(self, needle: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        for message in self.messages:
            if needle in message:
                return message
        while time.monotonic() < deadline:
            try:
                message = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            self.messages.append(message)
            if needle in message:
                return message
        raise AssertionError(f"no {needle!r} in {self.messages}")

    def drain(self) -> None:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                return

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path):
    sock = NotifySocket(str(tmp_path / "notify.sock"))
    yield sock
    sock.close()


def test_ready_reloading_stopping_sequence(server_factory, notify, tmp_path):
    server = server_factory("tests.apps.basic:app",
                            env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    notify.wait_for("READY=1")
    server.send_signal(signal.SIGHUP)
    server.wait_for_log(r"generation 2 ready")
    server.known_pids.update(server.worker_pids())
    assert server.stop() == 0, server.log()
    notify.drain()
    lines = [line for message in notify.messages for line in message.split("\n")]
    states = [line for line in lines if line in ("READY=1", "RELOADING=1", "STOPPING=1")]
    assert states == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"], notify.messages
    assert any(line.startswith("MONOTONIC_USEC=") for line in lines)
    assert any(line.startswith("STATUS=") for line in lines)


def test_watchdog_pings(server_factory, notify, tmp_path):
    server_factory("tests.apps.basic:app", env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
                                                "WATCHDOG_USEC": "400000"})
    notify.wait_for("WATCHDOG=1")
    count = sum(m == "WATCHDOG=1" for m in notify.messages)
    time.sleep(1.0)
    notify.drain()
    assert sum(m == "WATCHDOG=1" for m in notify.messages) >= count + 3  # every 0.2 s


def test_abstract_notify_socket(server_factory, tmp_path):
    name = f"forkserver-test-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(20)
    try:
        server_factory("tests.apps.basic:app", env={"NOTIFY_SOCKET": "@" + name})
        messages = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any("READY=1" in m for m in messages):
            messages.append(sock.recv(4096).decode())
        assert any("READY=1" in m for m in messages)
    finally:
        sock.close()
