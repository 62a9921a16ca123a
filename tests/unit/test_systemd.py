"""sd_notify over a real AF_UNIX datagram socket (path and abstract) and the watchdog interval."""

from __future__ import annotations

import os
import socket

import pytest

from forkserver import systemd


@pytest.fixture
def receiver(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.settimeout(2)
    yield path, sock
    sock.close()


def test_notify_to_a_path_socket(receiver):
    path, sock = receiver
    assert systemd.notify("READY=1\nSTATUS=serving", {"NOTIFY_SOCKET": path}) is True
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving"


def test_notify_to_an_abstract_socket():
    name = f"forkserver-notify-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        assert systemd.notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name}) is True
        assert sock.recv(4096) == b"STOPPING=1"


def test_each_call_is_one_datagram(receiver):
    path, sock = receiver
    env = {"NOTIFY_SOCKET": path}
    assert systemd.notify("WATCHDOG=1", env)
    assert systemd.notify("STATUS=workers: 4 busy, 0 idle \u2713", env)
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert sock.recv(4096) == "STATUS=workers: 4 busy, 0 idle \u2713".encode()


def test_notify_reads_os_environ_by_default(receiver, monkeypatch):
    path, sock = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert systemd.notify("READY=1") is True
    assert sock.recv(4096) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert systemd.notify("READY=1") is False


@pytest.mark.parametrize("value", ["", "relative/path", "@", "vsock:2:1234"])
def test_notify_without_a_usable_socket_is_false(value):
    assert systemd.notify("READY=1", {"NOTIFY_SOCKET": value}) is False


def test_notify_failures_are_silent_false(tmp_path, capsys):
    missing = str(tmp_path / "gone.sock")
    assert systemd.notify("READY=1", {"NOTIFY_SOCKET": missing}) is False
    assert systemd.notify("READY=1", {}) is False
    # A socket file nobody reads from any more (systemd went away).
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as dead:
        dead.bind(str(tmp_path / "dead.sock"))
    assert systemd.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "dead.sock")}) is False
    assert capsys.readouterr() == ("", "")


def test_watchdog_interval():
    pid = 1234
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000"}, pid) == 15.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "1234"},
                                     pid) == 0.25
    assert systemd.watchdog_interval({}, pid) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "99"},
                                     pid) is None
    for bad in ("0", "", "-5", "1e6", "abc", "\u00b2"):
        assert systemd.watchdog_interval({"WATCHDOG_USEC": bad}, pid) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "x"}, pid) is None
