"""Bind specs, binding, inheriting (fd://, LISTEN_FDS), describe() and cleanup()."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from forkserver import addresses, sockets
from forkserver.sockets import BindError, BindSpec, bind, cleanup, describe, parse_bind


def _has_ipv6() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 loopback")


def _assert_listener(sock: socket.socket) -> None:
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    assert sock.getblocking() is False
    assert sock.get_inheritable() is False
    assert sock.type == socket.SOCK_STREAM


# -- parse_bind ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:8000", BindSpec(kind="tcp", host="127.0.0.1", port=8000)),
    ("localhost:0", BindSpec(kind="tcp", host="localhost", port=0)),
    ("0.0.0.0:65535", BindSpec(kind="tcp", host="0.0.0.0", port=65535)),
    ("[::1]:8080", BindSpec(kind="tcp", host="::1", port=8080)),
    ("[::]:80", BindSpec(kind="tcp", host="::", port=80)),
    ("[fe80::1%lo]:80", BindSpec(kind="tcp", host="fe80::1%lo", port=80)),
    ("unix:/run/app.sock", BindSpec(kind="unix", path="/run/app.sock")),
    ("unix:relative.sock", BindSpec(kind="unix", path="relative.sock")),
    ("fd://3", BindSpec(kind="fd", fd=3)),
])
def test_parse_bind_accepts(text, expected):
    assert parse_bind(text) == expected
    assert str(parse_bind(text)) == text  # messages name the spec as the user wrote it


@pytest.mark.parametrize("text", [
    "", "8000", "localhost", ":8000", "host:", "host:port", "host:-1", "host:65536", "host:+80",
    "host:8_0", "host: 80", "host:８０", "::1:8000", "[::1]", "[::1]8000", "[]:80",
    "[127.0.0.1]:80", "unix:", "fd://", "fd://x", "fd://-1", "fd://3.0", "tcp://h:1",
    "my host:80",
])
def test_parse_bind_rejects_with_one_line_naming_the_spec(text):
    with pytest.raises(ValueError) as info:
        parse_bind(text)
    message = str(info.value)
    assert repr(text) in message
    assert "\n" not in message


# -- bind ---------------------------------------------------------------------------------------

def test_bind_tcp_v4_serves_connections():
    sock = bind(parse_bind("127.0.0.1:0"), backlog=16)
    try:
        _assert_listener(sock)
        assert sock.family == socket.AF_INET
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        port = sock.getsockname()[1]
        assert describe(sock) == f"http://127.0.0.1:{port}"
        with socket.create_connection(("127.0.0.1", port), timeout=2) as client:
            sock.setblocking(True)
            conn, _ = sock.accept()
            client.sendall(b"ping")
            assert conn.recv(4) == b"ping"
            # Set on the listener, inherited by each accepted socket: the worker sets nothing.
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            conn.close()
    finally:
        sock.close()


@needs_ipv6
def test_bind_tcp_v6_is_v6_only():
    sock = bind(parse_bind("[::1]:0"), backlog=16)
    try:
        _assert_listener(sock)
        assert sock.family == socket.AF_INET6
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        port = sock.getsockname()[1]
        assert describe(sock) == f"http://[::1]:{port}"
    finally:
        sock.close()


def test_bind_reuse_port():
    first = bind(parse_bind("127.0.0.1:0"), backlog=4, reuse_port=True)
    port = first.getsockname()[1]
    try:
        assert first.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        second = bind(parse_bind(f"127.0.0.1:{port}"), backlog=4, reuse_port=True)
        second.close()
    finally:
        first.close()


def test_bind_address_in_use_is_a_one_line_bind_error():
    first = bind(parse_bind("127.0.0.1:0"), backlog=4)
    port = first.getsockname()[1]
    try:
        with pytest.raises(BindError) as info:
            bind(parse_bind(f"127.0.0.1:{port}"), backlog=4)
        message = str(info.value)
        assert message.startswith(f"cannot bind 127.0.0.1:{port}: ")
        assert "in use" in message.lower() and "\n" not in message
    finally:
        first.close()


def test_bind_unresolvable_host_is_a_bind_error():
    with pytest.raises(BindError, match=r"^cannot bind no-such-host\.invalid:80: "):
        bind(parse_bind("no-such-host.invalid:80"), backlog=4)


def test_bind_unix_and_cleanup(tmp_path):
    path = str(tmp_path / "app.sock")
    spec = parse_bind(f"unix:{path}")
    sock = bind(spec, backlog=8)
    _assert_listener(sock)
    assert sock.family == socket.AF_UNIX
    assert describe(sock) == f"unix:{path}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(path)
    cleanup([sock], [spec])
    assert sock.fileno() == -1
    assert not os.path.exists(path)


def test_bind_unix_removes_a_stale_socket_file(tmp_path):
    path = str(tmp_path / "stale.sock")
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(path)  # bound, never listening, then closed: what a crashed server leaves
    leftover.close()
    assert os.path.exists(path)
    sock = bind(parse_bind(f"unix:{path}"), backlog=8)
    try:
        _assert_listener(sock)
    finally:
        sock.close()


def test_bind_unix_refuses_a_live_socket(tmp_path):
    path = str(tmp_path / "live.sock")
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(path)
    live.listen(1)
    try:
        with pytest.raises(BindError, match="another process is listening"):
            bind(parse_bind(f"unix:{path}"), backlog=8)
        assert os.path.exists(path)
    finally:
        live.close()


def test_bind_unix_never_removes_a_regular_file(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("precious")
    with pytest.raises(BindError, match="not a socket"):
        bind(parse_bind(f"unix:{path}"), backlog=8)
    assert path.read_text() == "precious"


def test_bind_unix_missing_directory_is_a_bind_error(tmp_path):
    with pytest.raises(BindError, match=r"^cannot bind unix:.*: No such file"):
        bind(parse_bind(f"unix:{tmp_path}/nope/app.sock"), backlog=8)


def test_cleanup_spares_a_socket_file_replaced_by_someone_else(tmp_path):
    path = str(tmp_path / "app.sock")
    spec = parse_bind(f"unix:{path}")
    sock = bind(spec, backlog=8)
    # Another server removed our file and bound its own at the same path.
    os.unlink(path)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(path)
    try:
        cleanup([sock], [spec])
        assert os.path.exists(path)
    finally:
        other.close()


def test_cleanup_leaves_unix_paths_it_did_not_serve(tmp_path):
    path = str(tmp_path / "foreign.sock")
    foreign = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    foreign.bind(path)
    tcp = bind(parse_bind("127.0.0.1:0"), backlog=4)
    try:
        cleanup([tcp], [parse_bind(f"unix:{path}"), parse_bind("127.0.0.1:0")])
        assert tcp.fileno() == -1
        assert os.path.exists(path)
    finally:
        foreign.close()


def test_bind_fd_adopts_a_listening_socket():
    original = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    original.bind(("127.0.0.1", 0))
    original.listen(4)
    original.set_inheritable(True)
    fd = original.detach()
    sock = bind(parse_bind(f"fd://{fd}"), backlog=4)
    try:
        assert sock.fileno() == fd
        _assert_listener(sock)
        assert describe(sock).startswith("http://127.0.0.1:")
        with socket.create_connection(sock.getsockname(), timeout=2):
            sock.setblocking(True)
            conn, _ = sock.accept()
            with conn:  # an adopted listener gets TCP_NODELAY for its connections too
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        sock.close()


def test_bind_fd_rejects_non_listening_and_non_sockets(tmp_path):
    unlistened = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    dgram = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with open(tmp_path / "f", "w") as regular:
        try:
            for fd in (unlistened.fileno(), dgram.fileno(), regular.fileno()):
                with pytest.raises(ValueError, match=f"fd {fd} is not"):
                    bind(parse_bind(f"fd://{fd}"), backlog=4)
            # The rejected descriptors were left open for their owner.
            assert unlistened.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) == socket.SOCK_STREAM
            os.fstat(regular.fileno())
        finally:
            unlistened.close()
            dgram.close()


def test_describe_abstract_unix_socket():
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(b"\0forkserver-test-%d" % os.getpid())
        assert describe(s) == f"unix:@forkserver-test-{os.getpid()}"


# -- systemd socket activation ----------------------------------------------------------------

def test_inherited_sockets_absent_or_not_ours():
    assert sockets.inherited_sockets({}, os.getpid()) == []
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2"}
    assert sockets.inherited_sockets(env, os.getpid()) == []
    assert sockets.inherited_sockets({"LISTEN_FDS": "1"}, os.getpid()) == []
    assert sockets.inherited_names(env, os.getpid()) == []


def test_inherited_sockets_malformed_count_is_an_error():
    with pytest.raises(ValueError, match="LISTEN_FDS"):
        sockets.inherited_sockets({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "x"},
                                  os.getpid())


def test_inherited_sockets_from_fd_3(tmp_path):
    """Run in a child whose fds 3 and 4 are listeners, as systemd would start it."""
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(4)
    port = tcp.getsockname()[1]
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(tmp_path / "act.sock"))
    unix.listen(4)
    script = textwrap.dedent("""
        import os, socket
        from forkserver import sockets
        env = dict(os.environ, LISTEN_PID=str(os.getpid()))
        socks = sockets.inherited_sockets(env, os.getpid())
        for s in socks:
            assert s.getblocking() is False and s.get_inheritable() is False
            print(s.fileno(), s.family.name, sockets.describe(s))
        print(sockets.inherited_names(env, os.getpid()))
    """)
    try:
        # pass_fds keeps each fd's own number, so place them on 3 and 4 in the child.
        src = (tcp.fileno(), unix.fileno())

        def place() -> None:
            moved = [os.dup(fd) for fd in src]
            for target, fd in zip((3, 4), moved, strict=True):
                os.dup2(fd, target)

        env = dict(os.environ, LISTEN_FDS="2", LISTEN_FDNAMES="web")
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, preexec_fn=place, close_fds=False,
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.splitlines()
    finally:
        tcp.close()
        unix.close()
    assert out[0] == f"3 AF_INET http://127.0.0.1:{port}"
    assert out[1] == f"4 AF_UNIX unix:{tmp_path / 'act.sock'}"
    assert out[2] == "['web', '']"


# -- forkserver.addresses: the one parser and formatter ----------------------------------------

@pytest.mark.parametrize("text, why", [
    ("::1:8000", "an IPv6 address needs brackets: [ADDRESS]:PORT"),
    ("[zz::1]:80", "[zz::1] is not an IPv6 address"),
    ("host:99999", "port '99999' is not a number from 0 to 65535"),
    ("unix:/" + "a" * 120, "unix socket path is longer than 107 bytes"),
    ("unix:/a\0b", "unix: needs a socket path"),
    ("my host:80", "'my host' is not a host name or IPv4 address"),
])
def test_address_errors_say_why_without_repeating_the_spec(text, why):
    with pytest.raises(addresses.AddressError) as info:
        addresses.parse(text)
    assert info.value.why == why
    assert str(info.value) == f"invalid bind {text!r}: {why}"


def test_sockname_writes_the_bind_notation(tmp_path):
    with socket.socket() as tcp:
        tcp.bind(("127.0.0.1", 0))
        assert addresses.sockname(tcp) == f"127.0.0.1:{tcp.getsockname()[1]}"
        assert str(parse_bind(addresses.sockname(tcp))) == addresses.sockname(tcp)
    with socket.socket(socket.AF_UNIX) as unix:
        unix.bind(str(tmp_path / "s"))
        assert addresses.sockname(unix) == f"unix:{tmp_path / 's'}"
    with socket.socket(socket.AF_UNIX) as abstract:
        abstract.bind(b"\0forkserver-test-abstract")
        assert addresses.sockname(abstract) == "unix:@forkserver-test-abstract"


@needs_ipv6
def test_sockname_brackets_ipv6():
    with socket.socket(socket.AF_INET6) as tcp:
        tcp.bind(("::1", 0))
        assert addresses.sockname(tcp) == f"[::1]:{tcp.getsockname()[1]}"
        assert addresses.endpoint(tcp) == ("::1", str(tcp.getsockname()[1]))


def test_endpoint_for_the_environ(tmp_path):
    with socket.socket() as tcp:
        tcp.bind(("127.0.0.1", 0))
        assert addresses.endpoint(tcp) == ("127.0.0.1", str(tcp.getsockname()[1]))
    with socket.socket(socket.AF_UNIX) as unix:
        unix.bind(str(tmp_path / "s"))
        assert addresses.endpoint(unix) == (str(tmp_path / "s"), "")
