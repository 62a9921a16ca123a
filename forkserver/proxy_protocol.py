"""The PROXY protocol (HAProxy's spec, versions 1 and 2): who the client behind a TCP proxy is.

A layer-4 proxy (HAProxy ``send-proxy``/``send-proxy-v2``, cloud network load balancers) opens
its own connection to us, so the socket's peer is the proxy. It therefore writes one header
before anything else, naming the client's address. That header comes before the first HTTP byte,
and before the TLS handshake when we terminate TLS.

``ProxyReader`` is sans-IO: ``feed(bytes)`` returns ``NEED_DATA`` or a ``ProxyHeader`` and raises
``ProxyProtocolError`` on anything malformed. It never takes a byte past the end of the header:
``used`` says how much of the last ``feed`` was header, and ``rest`` holds what followed,
untouched (the start of HTTP or of a TLS ClientHello). ``read_header`` drives a reader from a
socket by peeking and then consuming exactly the header, so whatever follows stays in the kernel
for the HTTP parser or for ``ssl`` to read.

The spec forbids guessing whether a header is present, so every mode but ``off`` requires one;
``auto`` only lets the first byte choose the version. The header is believed only from peers in
``proxy_allow_ips`` (``allow_list``); the caller closes any other connection unread.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from forkserver.proxy import TrustedProxies

__all__ = [
    "NEED_DATA",
    "V1_MAX",
    "V2_MAX",
    "Command",
    "Mode",
    "ProxyHeader",
    "ProxyProtocolError",
    "ProxyReader",
    "allow_list",
    "read_header",
]

V1_MAX = 107  # the spec's bound for a v1 line, CRLF included
# A v2 header may announce up to 65,535 more bytes; real ones (addresses and a few TLVs, even
# HAProxy's TLS ones) stay far below this, and a bound keeps a hostile peer from holding memory.
V2_MAX = 4096

V1_SIGNATURE = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED = 16  # signature, version/command, family/transport, length
_V2_LENGTH = struct.Struct("!H")
_TLV_HEAD = struct.Struct("!BH")
# v2 address blocks by family nibble (1 INET, 2 INET6); 3 (UNIX) holds two 108-byte paths.
_V2_INET = {
    1: (socket.AF_INET, struct.Struct("!4s4sHH")),
    2: (socket.AF_INET6, struct.Struct("!16s16sHH")),
}
_V2_UNIX_SIZE = 216
_PORT = re.compile(r"0|[1-9][0-9]{0,4}", re.ASCII)


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


class Mode(enum.Enum):
    """The ``proxy_protocol`` setting."""

    OFF = "off"
    V1 = "v1"
    V2 = "v2"
    AUTO = "auto"  # either version, chosen by the first byte; a header is still required


class Command(enum.Enum):
    PROXY = "proxy"      # source and destination name the client's connection
    LOCAL = "local"      # v2: the proxy's own connection (health check); keep the socket's address
    UNKNOWN = "unknown"  # v1 UNKNOWN, or a v2 family we do not map (unspecified, unix)


class ProxyProtocolError(Exception):
    """A missing, malformed or oversized header; ``str()`` is one line for the error log."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What the header said. ``source`` is None when the socket's own address must be kept."""

    version: int
    command: Command
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    tlvs: tuple[tuple[int, bytes], ...]
    length: int  # bytes the header took on the wire


def allow_list(entries: Iterable[str]) -> TrustedProxies:
    """The peers whose PROXY header is believed (``proxy_allow_ips``): ``.trusts(peer_ip)``.

    The same address/CIDR/"unix"/"*" rules as ``forwarded_allow_ips``, so one piece of code
    decides what a network entry matches (IPv4-mapped IPv6 peers included).
    """
    return TrustedProxies(list(entries))


class ProxyReader:
    """Reads one PROXY header in ``mode`` from bytes fed in any pieces."""

    def __init__(self, mode: Mode | str, v2_max: int = V2_MAX) -> None:
        self.mode = Mode(mode)
        if self.mode is Mode.OFF:
            raise ValueError("a ProxyReader is only needed when proxy_protocol is not 'off'")
        self._v2_max = v2_max
        self._version = {Mode.V1: 1, Mode.V2: 2}.get(self.mode, 0)  # 0: not known yet
        self._buffer = bytearray()
        self._total = 0  # v2: header length once the fixed part is in
        self.used = 0    # bytes of the last feed() that belonged to the header
        self.rest = b""  # bytes of the last feed() after a complete header
        self.header: ProxyHeader | None = None

    @property
    def want(self) -> int:
        """The most bytes that could still belong to the header: how much to peek at."""
        if self._version == 1:
            return V1_MAX - len(self._buffer)
        if self._version == 2:
            return (self._total or self._v2_max) - len(self._buffer)
        return max(V1_MAX, self._v2_max)

    def feed(self, data: bytes) -> ProxyHeader | _NeedData:
        """Take the header's share of ``data``; the header once complete, else NEED_DATA."""
        if self.header is not None:
            raise RuntimeError("the PROXY header is already complete")
        self.used, self.rest = 0, b""
        if not data:
            return NEED_DATA
        if not self._version:
            self._version = _version_from_first_byte(data[0])
        if self._version == 1:
            return self._feed_v1(data)
        return self._feed_v2(data)

    # -- version 1: one text line ------------------------------------------------------------
    def _feed_v1(self, data: bytes) -> ProxyHeader | _NeedData:
        room = V1_MAX - len(self._buffer)
        end = data.find(b"\n", 0, room)
        if end < 0:
            if len(data) >= room:
                raise ProxyProtocolError(f"PROXY v1 header longer than {V1_MAX} bytes")
            self._buffer += data
            self.used = len(data)
            _check_prefix(self._buffer, V1_SIGNATURE, 1)
            return NEED_DATA
        self._buffer += data[:end + 1]
        self.used, self.rest = end + 1, bytes(data[end + 1:])
        line = bytes(self._buffer)
        _check_prefix(line, V1_SIGNATURE, 1)
        self.header = _parse_v1(line)
        return self.header

    # -- version 2: fixed 16 bytes, then the announced length --------------------------------
    def _feed_v2(self, data: bytes) -> ProxyHeader | _NeedData:
        view = memoryview(data)
        if len(self._buffer) < _V2_FIXED:
            take = view[:_V2_FIXED - len(self._buffer)]
            self._buffer += take
            self.used = len(take)
            view = view[len(take):]
            _check_prefix(self._buffer, V2_SIGNATURE, 2)
            if len(self._buffer) < _V2_FIXED:
                return NEED_DATA
            self._total = _V2_FIXED + _v2_length(self._buffer, self._v2_max)
        take = view[:self._total - len(self._buffer)]
        self._buffer += take
        self.used += len(take)
        if len(self._buffer) < self._total:
            return NEED_DATA
        self.rest = bytes(view[len(take):])
        self.header = _parse_v2(bytes(self._buffer))
        return self.header


def read_header(sock: socket.socket, reader: ProxyReader) -> ProxyHeader | _NeedData:
    """Advance ``reader`` from a non-blocking plain socket, consuming only the header's bytes.

    Peeks, feeds, then reads exactly ``reader.used`` bytes, so the bytes after the header stay
    queued in the kernel (``ssl`` must read a ClientHello from the socket itself). Returns
    NEED_DATA when the socket has nothing more yet (wait for EPOLLIN: every queued byte was
    taken, so a level-triggered epoll does not spin). Raises ProxyProtocolError, including
    when the peer closes first; OSError from the socket passes through.
    """
    try:
        data = sock.recv(reader.want, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return NEED_DATA
    if not data:
        raise ProxyProtocolError("connection closed before the PROXY header was complete")
    result = reader.feed(data)
    if reader.used:
        sock.recv(reader.used)  # exactly what was peeked and taken: cannot come up short
    return result


def _version_from_first_byte(byte: int) -> int:
    if byte == V1_SIGNATURE[0]:
        return 1
    if byte == V2_SIGNATURE[0]:
        return 2
    raise ProxyProtocolError("no PROXY protocol header (first byte is neither 'P' nor CR)")


def _check_prefix(buffer: bytes | bytearray, signature: bytes, version: int) -> None:
    """Fail on the first byte that cannot begin a header, without waiting for more."""
    n = min(len(buffer), len(signature))
    if buffer[:n] != signature[:n]:
        raise ProxyProtocolError(f"wrong PROXY v{version} signature")


def _parse_v1(line: bytes) -> ProxyHeader:
    if not line.endswith(b"\r\n"):
        raise ProxyProtocolError("PROXY v1 header does not end in CRLF")
    try:
        text = line[:-2].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError("PROXY v1 header is not ASCII") from None
    parts = text.split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        # The spec: whatever follows UNKNOWN is to be ignored; keep the socket's address.
        return ProxyHeader(1, Command.UNKNOWN, None, None, (), len(line))
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError("malformed PROXY v1 header: expected "
                                 "'PROXY TCP4|TCP6 SRC DST SPORT DPORT' or 'PROXY UNKNOWN'")
    family = 4 if parts[1] == "TCP4" else 6
    source = (_v1_address(parts[2], family), _v1_port(parts[4]))
    destination = (_v1_address(parts[3], family), _v1_port(parts[5]))
    return ProxyHeader(1, Command.PROXY, source, destination, (), len(line))


def _v1_address(text: str, family: int) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        address = None
    if address is None or address.version != family or "%" in text:
        raise ProxyProtocolError(f"PROXY v1 header: {text[:45]!r} is not an IPv{family} address")
    return str(address)


def _v1_port(text: str) -> int:
    if not _PORT.fullmatch(text) or int(text) > 65535:
        raise ProxyProtocolError(f"PROXY v1 header: {text[:10]!r} is not a port")
    return int(text)


def _v2_length(fixed: bytes | bytearray, v2_max: int) -> int:
    """Check the version/command and family bytes; return the announced length."""
    if fixed[12] >> 4 != 2:
        raise ProxyProtocolError(f"PROXY v2 header with version {fixed[12] >> 4}")
    if fixed[12] & 0x0F > 1:
        raise ProxyProtocolError(f"PROXY v2 header with unknown command {fixed[12] & 0x0F}")
    family, transport = fixed[13] >> 4, fixed[13] & 0x0F
    if family > 3 or transport > 2:
        raise ProxyProtocolError(f"PROXY v2 header with unknown address family 0x{fixed[13]:02x}")
    if transport == 2:
        raise ProxyProtocolError("PROXY v2 header announces a datagram (UDP) connection")
    (length,) = _V2_LENGTH.unpack_from(fixed, 14)
    if _V2_FIXED + length > v2_max:
        raise ProxyProtocolError(f"PROXY v2 header of {_V2_FIXED + length} bytes is larger "
                                 f"than {v2_max}")
    return length


def _parse_v2(header: bytes) -> ProxyHeader:
    total = len(header)
    if header[12] & 0x0F == 0:
        # LOCAL: the proxy speaking for itself; the spec says to discard the whole block.
        return ProxyHeader(2, Command.LOCAL, None, None, (), total)
    family = header[13] >> 4
    block = memoryview(header)[_V2_FIXED:]
    if family == 0:
        return ProxyHeader(2, Command.UNKNOWN, None, None, (), total)
    if family == 3:
        if len(block) < _V2_UNIX_SIZE:
            raise ProxyProtocolError("PROXY v2 header too short for its unix addresses")
        tlvs = _parse_tlvs(block[_V2_UNIX_SIZE:])
        return ProxyHeader(2, Command.UNKNOWN, None, None, tlvs, total)
    af, layout = _V2_INET[family]
    if len(block) < layout.size:
        raise ProxyProtocolError("PROXY v2 header too short for its addresses")
    src, dst, sport, dport = layout.unpack_from(block)
    source = (socket.inet_ntop(af, src), sport)
    destination = (socket.inet_ntop(af, dst), dport)
    tlvs = _parse_tlvs(block[layout.size:])
    return ProxyHeader(2, Command.PROXY, source, destination, tlvs, total)


def _parse_tlvs(data: memoryview) -> tuple[tuple[int, bytes], ...]:
    """Type-length-value records after the addresses; each must fit exactly."""
    tlvs = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < _TLV_HEAD.size:
            raise ProxyProtocolError("PROXY v2 header ends inside a TLV")
        kind, length = _TLV_HEAD.unpack_from(data, pos)
        pos += _TLV_HEAD.size
        if pos + length > len(data):
            raise ProxyProtocolError(f"PROXY v2 TLV 0x{kind:02x} runs past the header")
        tlvs.append((kind, bytes(data[pos:pos + length])))
        pos += length
    return tuple(tlvs)
