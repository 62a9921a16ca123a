"""The PROXY protocol reader: valid v1/v2 headers, every truncation, limits, signatures, peers."""

from __future__ import annotations

import socket
import struct

import pytest

from forkserver.proxy_protocol import (
    NEED_DATA,
    V1_MAX,
    V2_MAX,
    V2_SIGNATURE,
    Command,
    ProxyHeader,
    ProxyProtocolError,
    ProxyReader,
    allow_list,
    read_header,
)

HTTP = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
TLS_HELLO_START = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"

V1_TCP4 = b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 443\r\n"
V1_TCP6 = b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 8080\r\n"
V1_UNKNOWN = b"PROXY UNKNOWN ffff:f...f:ffff 1.2.3.4 65535 0\r\n"


def v2(command: int = 1, family: int = 1, transport: int = 1, body: bytes = b"") -> bytes:
    return V2_SIGNATURE + bytes([0x20 | command, family << 4 | transport]) + \
        struct.pack("!H", len(body)) + body


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


V2_TCP4 = v2(body=socket.inet_aton("203.0.113.7") + socket.inet_aton("10.0.0.1")
             + struct.pack("!HH", 61000, 8000))
V2_TCP6 = v2(family=2, body=socket.inet_pton(socket.AF_INET6, "2001:db8::7")
             + socket.inet_pton(socket.AF_INET6, "::1") + struct.pack("!HH", 1234, 443))
V2_LOCAL = v2(command=0, family=0, transport=0)
V2_TLVS = v2(body=socket.inet_aton("203.0.113.8") + socket.inet_aton("10.0.0.1")
             + struct.pack("!HH", 5, 6) + tlv(0x01, b"http/1.1") + tlv(0x05, b"\x00" * 4)
             + tlv(0xEA, b"vpce-0123456789abcdef"))


def parse(mode: str, data: bytes) -> tuple[ProxyHeader, bytes]:
    reader = ProxyReader(mode)
    header = reader.feed(data)
    assert isinstance(header, ProxyHeader)
    return header, reader.rest


@pytest.mark.parametrize("mode", ["v1", "auto"])
def test_v1_tcp4(mode):
    header, rest = parse(mode, V1_TCP4 + HTTP)
    assert header == ProxyHeader(1, Command.PROXY, ("192.0.2.10", 56324),
                                 ("198.51.100.1", 443), (), len(V1_TCP4))
    assert rest == HTTP


def test_v1_tcp6():
    header, rest = parse("v1", V1_TCP6)
    assert header.source == ("2001:db8::1", 4000)
    assert header.destination == ("2001:db8::2", 8080)
    assert rest == b""


def test_v1_unknown_keeps_the_socket_address():
    header, rest = parse("v1", V1_UNKNOWN + TLS_HELLO_START)
    assert header.command is Command.UNKNOWN and header.source is None
    assert rest == TLS_HELLO_START


@pytest.mark.parametrize("mode", ["v2", "auto"])
def test_v2_tcp4(mode):
    header, rest = parse(mode, V2_TCP4 + HTTP)
    assert (header.version, header.command) == (2, Command.PROXY)
    assert header.source == ("203.0.113.7", 61000)
    assert header.destination == ("10.0.0.1", 8000)
    assert header.length == len(V2_TCP4) and rest == HTTP


def test_v2_tcp6():
    header, _ = parse("v2", V2_TCP6)
    assert header.source == ("2001:db8::7", 1234)
    assert header.destination == ("::1", 443)


def test_v2_local_keeps_the_socket_address():
    header, rest = parse("v2", V2_LOCAL + HTTP)
    assert header.command is Command.LOCAL and header.source is None
    assert rest == HTTP


def test_v2_local_ignores_whatever_address_block_it_carries():
    header, _ = parse("v2", v2(command=0, family=1, body=b"\xff" * 12))
    assert header.command is Command.LOCAL and header.source is None


def test_v2_tlvs():
    header, rest = parse("v2", V2_TLVS + TLS_HELLO_START)
    assert header.source == ("203.0.113.8", 5)
    assert header.tlvs == ((0x01, b"http/1.1"), (0x05, b"\x00" * 4),
                           (0xEA, b"vpce-0123456789abcdef"))
    assert rest == TLS_HELLO_START


def test_v2_unspecified_and_unix_families_keep_the_socket_address():
    assert parse("v2", v2(family=0, transport=0))[0].source is None
    unix = parse("v2", v2(family=3, body=b"/run/a".ljust(108, b"\0") + b"/b".ljust(108, b"\0")))
    assert unix[0].command is Command.UNKNOWN and unix[0].source is None


VALID = [("v1", V1_TCP4), ("v1", V1_TCP6), ("v1", V1_UNKNOWN), ("v2", V2_TCP4),
         ("v2", V2_TCP6), ("v2", V2_LOCAL), ("v2", V2_TLVS), ("auto", V1_TCP4), ("auto", V2_TLVS)]


@pytest.mark.parametrize("mode, wire", VALID)
def test_truncated_at_every_byte_needs_data_and_then_completes(mode, wire):
    whole, _ = parse(mode, wire + HTTP)
    for cut in range(len(wire)):
        reader = ProxyReader(mode)
        assert reader.feed(wire[:cut]) is NEED_DATA, cut
        assert reader.used == cut  # every byte before the end is header: nothing left behind
        assert reader.feed(wire[cut:] + HTTP) == whole, cut
        assert reader.used == len(wire) - cut and reader.rest == HTTP


@pytest.mark.parametrize("mode, wire", VALID)
def test_one_byte_at_a_time(mode, wire):
    reader = ProxyReader(mode)
    results = [reader.feed(wire[i:i + 1]) for i in range(len(wire))]
    assert all(result is NEED_DATA for result in results[:-1])
    assert results[-1] == parse(mode, wire)[0]


def test_feeding_after_the_header_is_a_programming_error():
    reader = ProxyReader("v1")
    reader.feed(V1_TCP4)
    with pytest.raises(RuntimeError):
        reader.feed(HTTP)


def errors(mode: str, data: bytes) -> str:
    reader = ProxyReader(mode)
    with pytest.raises(ProxyProtocolError) as info:
        reader.feed(data)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_v1_oversized():
    line = b"PROXY TCP4 " + b"1" * (V1_MAX - 11)
    assert "longer than 107" in errors("v1", line)
    # in pieces too, and without waiting for a newline that never comes
    reader = ProxyReader("v1")
    assert reader.feed(line[:60]) is NEED_DATA
    with pytest.raises(ProxyProtocolError, match="longer than 107"):
        reader.feed(line[60:])


def test_v1_of_exactly_the_maximum_length_is_accepted():
    line = b"PROXY UNKNOWN " + b"x" * (V1_MAX - 16) + b"\r\n"
    assert len(line) == V1_MAX
    assert parse("v1", line)[0].command is Command.UNKNOWN


def test_v2_oversized():
    assert "larger than" in errors("v2", V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", V2_MAX))


@pytest.mark.parametrize("mode, data", [
    ("v1", HTTP), ("v1", b"PROXZ TCP4"), ("v1", V2_TCP4), ("v2", V1_TCP4), ("v2", HTTP),
    ("v2", b"\r\n\r\n\x00\r\nQUIZ"), ("auto", HTTP), ("auto", TLS_HELLO_START),
])
def test_wrong_signature_fails_at_the_first_wrong_byte(mode, data):
    assert "signature" in errors(mode, data) or "no PROXY protocol header" in errors(mode, data)
    # it fails as soon as the deciding bytes are in, not after a timeout
    short = next(n for n in range(1, len(data) + 1) if _fails(mode, data[:n]))
    assert short <= 12


def _fails(mode: str, data: bytes) -> bool:
    try:
        ProxyReader(mode).feed(data)
    except ProxyProtocolError:
        return True
    return False


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 192.0.2.10 198.51.100.1 56324\r\n",           # a field short
    b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 443 9\r\n",     # a field more
    b"PROXY TCP4  192.0.2.10 198.51.100.1 56324 443\r\n",      # double space
    b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 443\n",         # bare LF
    b"PROXY TCP5 192.0.2.10 198.51.100.1 56324 443\r\n",       # unknown protocol
    b"PROXY TCP4 2001:db8::1 198.51.100.1 56324 443\r\n",      # family mismatch
    b"PROXY TCP6 192.0.2.10 2001:db8::2 1 2\r\n",
    b"PROXY TCP4 192.0.2.010 198.51.100.1 56324 443\r\n",      # leading zero in an octet
    b"PROXY TCP6 fe80::1%eth0 2001:db8::2 1 2\r\n",            # scope id
    b"PROXY TCP4 192.0.2.10 198.51.100.1 65536 443\r\n",       # port out of range
    b"PROXY TCP4 192.0.2.10 198.51.100.1 0443 443\r\n",        # leading zero in a port
    b"PROXY TCP4 192.0.2.10 198.51.100.1 -1 443\r\n",
    b"PROXY TCP4 192.0.2.\xff 198.51.100.1 1 443\r\n",          # not ASCII
])
def test_malformed_v1(line):
    errors("v1", line)


@pytest.mark.parametrize("wire, reason", [
    (V2_SIGNATURE + b"\x11\x11\x00\x00", "version 1"),
    (V2_SIGNATURE + b"\x22\x11\x00\x00", "unknown command"),
    (V2_SIGNATURE + b"\x21\x41\x00\x00", "address family"),
    (v2(transport=2, body=b"\0" * 12), "datagram"),
    (v2(body=b"\0" * 11), "too short"),
    (v2(family=2, body=b"\0" * 35), "too short"),
    (v2(family=3, body=b"\0" * 200), "too short"),
    (v2(body=b"\0" * 12 + b"\x01\x00"), "inside a TLV"),
    (v2(body=b"\0" * 12 + tlv(0x01, b"h2")[:-1]), "runs past"),
])
def test_malformed_v2(wire, reason):
    assert reason in errors("v2", wire)


def test_off_needs_no_reader():
    with pytest.raises(ValueError):
        ProxyReader("off")
    with pytest.raises(ValueError):
        ProxyReader("v3")


def test_allow_list_defaults_and_cidrs():
    rules = allow_list(["127.0.0.1", "::1"])
    assert rules.trusts("127.0.0.1") and rules.trusts("::1")
    assert rules.trusts("::ffff:127.0.0.1")  # a dual-stack listener's view of an IPv4 peer
    assert not rules.trusts("192.0.2.1") and not rules.trusts("127.0.0.2")
    assert not rules.trusts("")  # a unix-socket peer only with "unix"
    rules = allow_list(["10.0.0.0/8", "unix"])
    assert rules.trusts("10.20.30.40") and rules.trusts("") and not rules.trusts("11.0.0.1")
    with pytest.raises(ValueError, match="not-an-ip"):
        allow_list(["not-an-ip"])


# -- read_header over a real loopback connection --------------------------------------------

@pytest.fixture
def pair():
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    server.setblocking(False)
    yield client, server
    client.close()
    server.close()


def wait_readable(sock: socket.socket) -> None:
    import select
    assert select.select([sock], [], [], 5)[0]


@pytest.mark.parametrize("mode, wire", [("v1", V1_TCP4), ("v2", V2_TLVS), ("auto", V2_TCP6)])
def test_read_header_leaves_what_follows_in_the_socket(pair, mode, wire):
    client, server = pair
    reader = ProxyReader(mode)
    assert read_header(server, reader) is NEED_DATA  # nothing sent yet: no block, no error
    client.sendall(wire[:5])
    wait_readable(server)
    assert read_header(server, reader) is NEED_DATA
    # nothing taken is left queued, so a level-triggered epoll would not spin
    with pytest.raises(BlockingIOError):
        server.recv(1, socket.MSG_PEEK)
    client.sendall(wire[5:] + TLS_HELLO_START)
    wait_readable(server)
    header = read_header(server, reader)
    assert header == parse(mode, wire)[0]
    assert server.recv(100) == TLS_HELLO_START  # untouched, for ssl or the HTTP parser


def test_read_header_when_the_peer_closes_early(pair):
    client, server = pair
    client.sendall(V1_TCP4[:10])
    client.close()
    reader = ProxyReader("v1")
    wait_readable(server)
    assert read_header(server, reader) is NEED_DATA
    wait_readable(server)
    with pytest.raises(ProxyProtocolError, match="closed"):
        read_header(server, reader)


def test_read_header_rejects_plain_http(pair):
    client, server = pair
    client.sendall(HTTP)
    wait_readable(server)
    with pytest.raises(ProxyProtocolError):
        read_header(server, ProxyReader("auto"))
