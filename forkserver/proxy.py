"""Trusted proxies: which forwarding headers are believed, from whom, and what they say.

Any client can send ``X-Forwarded-For: 10.0.0.1``. Such a header only means something when the
hop that added it is one we trust, so a header is read from the right (the entry our peer
added) leftwards, and only while each hop that added an entry is itself a trusted proxy. The
first address that is not trusted is the client; nothing to its left is looked at, because it
came from that client and may be made up. A malformed entry ends the walk at the last good hop.

Two settings decide: ``forwarded_allow_ips`` names the peers, ``forwarded_headers`` the headers
those peers are known to set (``HEADERS`` lists the ones understood). Only named headers are
read at all: the default is ``X-Forwarded-For`` and ``X-Forwarded-Proto``, what nginx and
HAProxy set in their usual configurations. ``Forwarded`` (RFC 7239) and ``X-Forwarded-Host``
count only when named, because a proxy that does not set them passes the client's own copy
through untouched; the host is never changed unless a host header is named. When both
``Forwarded`` and ``X-Forwarded-For`` are named, ``Forwarded`` is read.

Called for every request, so the common case (no forwarding header, or an untrusted peer)
costs a dict lookup and one pass over the header names. This module imports nothing else of
forkserver.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

__all__ = ["DEFAULT_HEADERS", "HEADERS", "TrustedProxies", "check_allow_entry",
           "check_header_name"]

_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_FORWARDED = "FORWARDED"
_XFF = "X-FORWARDED-FOR"
_XFP = "X-FORWARDED-PROTO"
_XFH = "X-FORWARDED-HOST"
# The headers forwarded_headers may name, in their usual spelling.
HEADERS = ("X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "Forwarded")
DEFAULT_HEADERS = ("X-Forwarded-For", "X-Forwarded-Proto")
_CANONICAL = {name.upper(): name for name in HEADERS}
_SCHEMES = frozenset(("http", "https"))

# Bounds the per-process memo of trusts(): a scan of many client addresses must not grow it
# without end, and starting over when full is cheaper than LRU bookkeeping per request.
_CACHE_MAX = 1024

# RFC 7239 section 4: forwarded-pair = token "=" value; value = token / quoted-string.
# OWS is allowed around ";" as well as "," because real proxies emit "for=a; proto=https".
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = r'"(?:[\t !\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
_PAIR = re.compile(rf"[ \t]*({_TOKEN})=({_TOKEN}|{_QUOTED})[ \t]*")
_SEPARATOR = re.compile(r"[ \t]*([;,])[ \t]*")
_UNESCAPE = re.compile(r"\\(.)")

# RFC 7239 section 6: obfuscated identifiers and ports start with "_".
_OBFUSCATED = re.compile(r"_[0-9A-Za-z._-]+")
_PORT = re.compile(r"[0-9]{1,5}|_[0-9A-Za-z._-]+")
# A Host value: a name or IPv4 address, or a bracketed IPv6 literal, with an optional port.
# Anything else (spaces, "/", "@", ...) could smuggle a different URL into the app's view.
_HOST = re.compile(r"(?:[0-9A-Za-z._~-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


class _Unknown:
    """A node that is well-formed but names no address ("unknown" or an obfuscated id)."""


_NO_ADDRESS = _Unknown()


def _address(text: str) -> _IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def check_allow_entry(entry: str) -> str:
    """One forwarded_allow_ips entry (IP, CIDR network, "unix" or "*"), stripped; ValueError
    naming it otherwise."""
    entry = entry.strip()
    if entry not in ("*", "unix"):
        _network(entry)
    return entry


def check_header_name(name: str) -> str:
    """One forwarded_headers entry in its usual spelling; ValueError naming it otherwise."""
    canonical = _CANONICAL.get(name.strip().upper())
    if canonical is None:
        raise ValueError(f"unknown forwarding header {name.strip()!r}; known: "
                         f"{', '.join(HEADERS)}")
    return canonical


class TrustedProxies:
    """The peers whose forwarding headers are believed, and which headers.

    ``allow`` holds IPv4/IPv6 addresses and CIDR networks, ``"unix"`` for peers on a unix
    socket (a local proxy such as nginx on the same machine), and ``"*"`` to trust every peer
    (only right when nothing but the proxy can reach the server). Blank entries are skipped,
    so a comma-separated setting split naively still works. A bad entry raises ValueError
    naming it: a typo here silently changes who may claim to be whom. ``headers`` names the
    headers those peers set (see ``HEADERS``); any other is never read.
    """

    def __init__(self, allow: Iterable[str], headers: Iterable[str] = DEFAULT_HEADERS) -> None:
        self._everyone = False
        self._unix = False
        networks: list[_IPNetwork] = []
        for raw in allow:
            entry = raw.strip()
            if not entry:
                continue
            if entry == "*":
                self._everyone = True
            elif entry.lower() == "unix":
                self._unix = True
            else:
                networks.append(_network(entry))
        self._networks = tuple(networks)
        self._names = frozenset(check_header_name(name).upper() for name in headers)
        self._cache: dict[str, bool] = {}

    def __repr__(self) -> str:
        parts = (["*"] if self._everyone else []) + (["unix"] if self._unix else [])
        names = sorted(_CANONICAL[name] for name in self._names)
        return (f"TrustedProxies({parts + [str(net) for net in self._networks]!r}, "
                f"headers={names!r})")

    def trusts(self, peer: str) -> bool:
        """Whether `peer` (an IP address string; "" for a unix socket peer) is a trusted proxy."""
        known = self._cache.get(peer)
        if known is not None:
            return known
        result = self._everyone or self._check(peer)
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[peer] = result
        return result

    def _check(self, peer: str) -> bool:
        if peer == "":
            return self._unix
        address = _address(peer)
        return address is not None and self._contains(address)

    def _contains(self, address: _IPAddress) -> bool:
        # A dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d; "127.0.0.1" must match.
        mapped = getattr(address, "ipv4_mapped", None)
        for network in self._networks:
            if address in network or (mapped is not None and mapped in network):
                return True
        return False

    def _trusts_address(self, address: _IPAddress) -> bool:
        return self.trusts(str(address))

    def resolve(self, peer: str, headers: list[tuple[str, str]]
                ) -> tuple[str, str | None, str | None]:
        """(remote_addr, url_scheme or None, host or None) for a request from `peer`.

        `headers` are (UPPER-CASED NAME, value) pairs as the parser yields them. None means
        "no trustworthy value": keep the socket's own. An untrusted peer always gets
        (peer, None, None), whatever its headers say, and so does a header nobody named.
        """
        if not self.trusts(peer):
            return peer, None, None
        named: dict[str, list[str]] = {}
        for name, value in headers:
            if name in self._names:
                named.setdefault(name, []).append(value)
        if not named:
            return peer, None, None
        if _FORWARDED in named:
            return self._from_forwarded(peer, named[_FORWARDED])
        remote = self._from_x_forwarded(peer, named[_XFF]) if _XFF in named else peer
        scheme = _last_scheme(named.get(_XFP, []))
        return remote, scheme, _last_host(named.get(_XFH, []))

    # -- Forwarded ---------------------------------------------------------------------------
    def _from_forwarded(self, peer: str, lines: list[str]
                        ) -> tuple[str, str | None, str | None]:
        remote, scheme, host = peer, None, None
        # Elements are read right to left, each one added by the hop we currently believe in.
        for element in _forwarded_elements(lines):
            if element is None:
                break  # cannot tell who added what beyond this point
            # This element was added by a hop we trust, so its proto= and host= are believed;
            # the outermost believed value wins, being closest to what the client used.
            proto = element.get("proto")
            if isinstance(proto, str) and proto.lower() in _SCHEMES:
                scheme = proto.lower()
            value = element.get("host")
            if isinstance(value, str) and _HOST.fullmatch(value):
                host = value
            node = element.get("for")
            if node is None or node is _NO_ADDRESS:
                break  # that hop did not say who sent it the request: the chain ends here
            remote = str(node)
            if not self._trusts_address(node):
                break
        return remote, scheme, host

    # -- X-Forwarded-For ---------------------------------------------------------------------
    def _from_x_forwarded(self, peer: str, lines: list[str]) -> str:
        remote = peer
        for line in reversed(lines):
            for item in reversed(line.split(",")):
                item = item.strip()
                if not item:
                    continue  # an empty list element says nothing (RFC 9110 section 5.6.1)
                address = _xff_address(item)
                if address is None:
                    return remote  # garbage from here leftwards; the last good hop stands
                remote = str(address)
                if not self._trusts_address(address):
                    return remote
        return remote


def _network(entry: str) -> _IPNetwork:
    try:
        if "/" in entry:
            return ipaddress.ip_network(entry, strict=True)
        return ipaddress.ip_network(entry)  # a single address: a /32 or /128
    except ValueError as exc:
        if "/" in entry and "has host bits set" in str(exc):
            fixed = ipaddress.ip_network(entry, strict=False)
            raise ValueError(f"trusted proxy {entry!r} has host bits set; did you mean "
                             f"{str(fixed)!r}?") from None
        raise ValueError(f"trusted proxy {entry!r} is not an IP address, a CIDR network, "
                         f"'unix' or '*'") from None


def _last_scheme(lines: list[str]) -> str | None:
    # Only the value our trusted peer wrote counts: the rightmost one. Anything to its left
    # may have been passed through from the client by an appending proxy.
    if not lines:
        return None
    scheme = lines[-1].rsplit(",", 1)[-1].strip().lower()
    return scheme if scheme in _SCHEMES else None


def _last_host(lines: list[str]) -> str | None:
    # As for the scheme, only the rightmost value is our peer's; it must look like a Host value.
    if not lines:
        return None
    host = lines[-1].rsplit(",", 1)[-1].strip()
    return host if _HOST.fullmatch(host) else None


def _xff_address(item: str) -> _IPAddress | None:
    """One X-Forwarded-For entry; some proxies add a port ("a.b.c.d:p", "[v6]:p")."""
    if item.startswith("["):
        inside, sep, rest = item[1:].partition("]")
        if not sep or (rest and not (rest[0] == ":" and rest[1:].isdigit())):
            return None
        address = _address(inside)
        return address if address is not None and address.version == 6 else None
    if item.count(":") == 1:
        host, port = item.split(":")
        if not port.isdigit():
            return None
        address = _address(host)
        return address if address is not None and address.version == 4 else None
    return _address(item)


def _node(value: str) -> _IPAddress | _Unknown | None:
    """An RFC 7239 node: the address without its port, _NO_ADDRESS, or None if malformed."""
    if value.startswith("["):
        inside, sep, rest = value[1:].partition("]")
        address = _address(inside) if sep else None
        if address is None or address.version != 6:
            return None
    else:
        host, sep, rest = value.partition(":")
        rest = sep + rest
        if host.lower() == "unknown" or _OBFUSCATED.fullmatch(host):
            return _NO_ADDRESS if not rest or _PORT.fullmatch(rest[1:]) else None
        address = _address(host)
        if address is None or address.version != 4:
            return None
    if rest and not (rest[0] == ":" and _PORT.fullmatch(rest[1:])):
        return None
    return address


def _parse_line(line: str) -> list[dict[str, object] | None]:
    """One Forwarded field line -> its elements; [None] when any of it is malformed.

    A syntax error can shift where elements begin and end (an unbalanced quote swallows the
    rest of the line), so after one nothing in the line can be attributed to a hop.
    """
    elements: list[dict[str, object] | None] = []
    current: dict[str, object] = {}
    line = line.strip(" \t")
    pos, end = 0, len(line)
    while True:
        match = _PAIR.match(line, pos)
        if match is not None:
            key = match.group(1).lower()
            raw = match.group(2)
            value = _UNESCAPE.sub(r"\1", raw[1:-1]) if raw.startswith('"') else raw
            if key in current:
                return [None]  # RFC 7239 section 4: a parameter at most once per element
            if key == "for":
                node = _node(value)
                if node is None:
                    return [None]
                current[key] = node
            else:
                current[key] = value
            pos = match.end()
        if pos == end:
            if current:
                elements.append(current)
            return elements
        sep = _SEPARATOR.match(line, pos)
        if sep is None:
            return [None]
        pos = sep.end()
        if sep.group(1) == ",":
            if current:  # empty list elements are allowed and say nothing
                elements.append(current)
            current = {}


def _forwarded_elements(lines: Iterable[str]) -> list[dict[str, object] | None]:
    """All elements of all Forwarded lines, rightmost (nearest hop) first."""
    elements: list[dict[str, object] | None] = []
    for line in lines:
        elements.extend(_parse_line(line))
    elements.reverse()
    return elements
