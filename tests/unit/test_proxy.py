"""Trusted-proxy rules: who may rewrite REMOTE_ADDR and the URL scheme, and how far back."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forkserver.proxy import TrustedProxies, check_allow_entry, check_header_name

LOCAL = ["127.0.0.1", "::1", "unix"]
DEFAULT = TrustedProxies(LOCAL)  # the default headers: X-Forwarded-For and X-Forwarded-Proto
FORWARDED = TrustedProxies(LOCAL, headers=["Forwarded"])


def xff(value: str) -> list[tuple[str, str]]:
    return [("X-FORWARDED-FOR", value)]


def fwd(*values: str) -> list[tuple[str, str]]:
    return [("FORWARDED", value) for value in values]


# -- the allow list ---------------------------------------------------------------------------

@pytest.mark.parametrize("peer, expected", [
    ("127.0.0.1", True),
    ("127.0.0.2", False),
    ("::1", True),
    ("", True),  # unix socket peer
    ("203.0.113.9", False),
    ("::ffff:127.0.0.1", True),  # IPv4 client on a dual-stack socket
    ("not an address", False),
])
def test_default_allow_list(peer, expected):
    assert DEFAULT.trusts(peer) is expected


def test_cidrs_in_both_families():
    proxies = TrustedProxies(["10.0.0.0/8", "2001:db8::/32"])
    assert proxies.trusts("10.255.0.1")
    assert not proxies.trusts("11.0.0.1")
    assert proxies.trusts("2001:db8:ffff::1")
    assert not proxies.trusts("2001:db9::1")
    assert not proxies.trusts("")  # unix peers only when "unix" is listed


def test_star_trusts_everyone_including_unix_peers():
    proxies = TrustedProxies(["*"])
    assert proxies.trusts("198.51.100.7")
    assert proxies.trusts("")


def test_blank_entries_are_skipped_and_an_empty_list_trusts_nobody():
    assert TrustedProxies([" 127.0.0.1 ", "", "  "]).trusts("127.0.0.1")
    nobody = TrustedProxies([])
    assert not nobody.trusts("127.0.0.1")
    assert not nobody.trusts("")
    assert nobody.resolve("127.0.0.1", xff("1.2.3.4")) == ("127.0.0.1", None, None)


@pytest.mark.parametrize("entry, message", [
    ("10.0.0.1/8", "did you mean '10.0.0.0/8'"),
    ("localhost", "'localhost' is not an IP address"),
    ("300.1.1.1", "'300.1.1.1'"),
    ("10.0.0.0/33", "'10.0.0.0/33'"),
])
def test_bad_entries_are_rejected_by_name(entry, message):
    with pytest.raises(ValueError, match=message):
        TrustedProxies([entry])


def test_the_memo_stays_bounded_and_correct():
    proxies = TrustedProxies(["10.0.0.0/8"])
    for i in range(3000):
        assert proxies.trusts(f"10.0.{i // 256}.{i % 256}")
        assert not proxies.trusts(f"11.0.{i // 256}.{i % 256}")
    assert len(proxies._cache) <= 1024


# -- which headers are read (forwarded_headers) ---------------------------------------------

# What a client sends through nginx with `proxy_set_header X-Forwarded-For
# $proxy_add_x_forwarded_for` (or HAProxy's `option forwardfor`): its own Forwarded header
# passes through untouched, and the proxy appends the real address to X-Forwarded-For.
SPOOFED_THROUGH_A_PROXY = [
    ("FORWARDED", "for=127.0.0.1;proto=https;host=evil.example"),
    ("X-FORWARDED-HOST", "evil.example"),
    ("X-FORWARDED-FOR", "6.6.6.6, 198.51.100.1"),
    ("X-FORWARDED-PROTO", "http"),
]


def test_by_default_only_x_forwarded_for_and_proto_are_read():
    assert DEFAULT.resolve("127.0.0.1", SPOOFED_THROUGH_A_PROXY) == ("198.51.100.1", "http", None)


def test_forwarded_alone_is_never_read_unless_named():
    headers = fwd("for=6.6.6.6;proto=https;host=evil.example")
    assert DEFAULT.resolve("127.0.0.1", headers) == ("127.0.0.1", None, None)


def test_a_header_not_named_is_ignored_even_from_a_trusted_peer():
    only_for = TrustedProxies(LOCAL, headers=["X-Forwarded-For"])
    assert only_for.resolve("127.0.0.1", SPOOFED_THROUGH_A_PROXY) == ("198.51.100.1", None, None)
    nothing = TrustedProxies(LOCAL, headers=[])
    assert nothing.resolve("127.0.0.1", SPOOFED_THROUGH_A_PROXY) == ("127.0.0.1", None, None)


def test_x_forwarded_host_only_when_named_and_only_the_rightmost():
    with_host = TrustedProxies(LOCAL, headers=["X-Forwarded-For", "X-Forwarded-Host"])
    headers = [("X-FORWARDED-HOST", "evil.example, shop.example:8443")]
    assert with_host.resolve("127.0.0.1", headers) == ("127.0.0.1", None, "shop.example:8443")
    assert DEFAULT.resolve("127.0.0.1", headers) == ("127.0.0.1", None, None)


@pytest.mark.parametrize("host", ["evil.example/path", "a b", "user@host", "", "x:99999999"])
def test_a_malformed_x_forwarded_host_is_not_believed(host):
    with_host = TrustedProxies(LOCAL, headers=["X-Forwarded-Host"])
    assert with_host.resolve("127.0.0.1", [("X-FORWARDED-HOST", host)])[2] is None


@pytest.mark.parametrize("name, canonical", [
    ("x-forwarded-for", "X-Forwarded-For"), (" FORWARDED ", "Forwarded"),
    ("X-Forwarded-Host", "X-Forwarded-Host"), ("x-forwarded-proto", "X-Forwarded-Proto"),
])
def test_header_names_are_canonical(name, canonical):
    assert check_header_name(name) == canonical


@pytest.mark.parametrize("name", ["X-Real-IP", "X-Forwarded-Port", "Host", ""])
def test_unknown_header_names_are_refused_by_name(name):
    with pytest.raises(ValueError, match="unknown forwarding header"):
        check_header_name(name)
    with pytest.raises(ValueError, match="unknown forwarding header"):
        TrustedProxies(LOCAL, headers=[name])


def test_allow_entries_are_checked_by_the_same_rule_as_the_constructor():
    assert check_allow_entry(" 10.0.0.0/8 ") == "10.0.0.0/8"
    assert check_allow_entry("unix") == "unix" and check_allow_entry("*") == "*"
    with pytest.raises(ValueError, match="did you mean '10.0.0.0/8'"):
        check_allow_entry("10.0.0.1/8")


# -- untrusted peers --------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [
    xff("1.2.3.4"),
    [("X-FORWARDED-PROTO", "https")],
    fwd("for=1.2.3.4;proto=https;host=evil.example"),
])
def test_untrusted_peer_headers_are_never_believed(headers):
    assert DEFAULT.resolve("203.0.113.5", headers) == ("203.0.113.5", None, None)


def test_trusted_peer_without_forwarding_headers_keeps_its_own_address():
    headers = [("HOST", "example.com"), ("X-FORWARDED-HOST", "evil.example")]
    assert DEFAULT.resolve("127.0.0.1", headers) == ("127.0.0.1", None, None)
    assert DEFAULT.resolve("", []) == ("", None, None)


# -- X-Forwarded-For / X-Forwarded-Proto ------------------------------------------------------

def test_trusted_peer_sets_address_and_scheme():
    headers = [("X-FORWARDED-FOR", "198.51.100.1"), ("X-FORWARDED-PROTO", "https")]
    assert DEFAULT.resolve("127.0.0.1", headers) == ("198.51.100.1", "https", None)
    assert DEFAULT.resolve("", headers) == ("198.51.100.1", "https", None)


def test_chain_stops_at_the_rightmost_untrusted_address():
    proxies = TrustedProxies(["127.0.0.1", "10.0.0.0/8"])
    # The client made up "6.6.6.6"; 198.51.100.1 reached our first trusted proxy (10.0.0.5).
    headers = xff("6.6.6.6, 198.51.100.1, 10.0.0.5")
    assert proxies.resolve("127.0.0.1", headers)[0] == "198.51.100.1"


def test_chain_of_only_trusted_hops_gives_the_leftmost():
    proxies = TrustedProxies(["127.0.0.1", "10.0.0.0/8"])
    assert proxies.resolve("127.0.0.1", xff("10.0.0.9, 10.0.0.5"))[0] == "10.0.0.9"


def test_several_header_lines_form_one_list_in_order():
    proxies = TrustedProxies(["127.0.0.1", "10.0.0.0/8"])
    headers = [("X-FORWARDED-FOR", "6.6.6.6, 198.51.100.1"), ("X-FORWARDED-FOR", "10.0.0.5")]
    assert proxies.resolve("127.0.0.1", headers)[0] == "198.51.100.1"


@pytest.mark.parametrize("value, expected", [
    ("198.51.100.1:5555", "198.51.100.1"),
    ("[2001:db8::7]:443", "2001:db8::7"),
    ("2001:DB8::7", "2001:db8::7"),  # normalised
    ("198.51.100.1, ", "198.51.100.1"),  # empty list elements are skipped
])
def test_xff_entry_forms(value, expected):
    assert DEFAULT.resolve("127.0.0.1", xff(value))[0] == expected


@pytest.mark.parametrize("value", [
    "garbage", "unknown", "1.2.3", "01.2.3.4", "1.2.3.4:http", "[1.2.3.4]", "[::1", "::1]:80",
])
def test_malformed_xff_entry_stops_at_the_last_good_hop(value):
    # Nothing made up may become REMOTE_ADDR: the peer itself is what we know for sure.
    assert DEFAULT.resolve("127.0.0.1", xff(value))[0] == "127.0.0.1"


def test_garbage_left_of_an_untrusted_address_is_never_read():
    assert DEFAULT.resolve("127.0.0.1", xff("<script>, 198.51.100.1"))[0] == "198.51.100.1"


@pytest.mark.parametrize("value, expected", [
    ("https", "https"), ("HTTPS", "https"), ("http", "http"),
    ("ftp", None), ("javascript", None), ("", None), ("https, http", "http"),
])
def test_proto_is_http_or_https_and_the_rightmost_counts(value, expected):
    assert DEFAULT.resolve("127.0.0.1", [("X-FORWARDED-PROTO", value)]) == (
        "127.0.0.1", expected, None)


# -- Forwarded (RFC 7239) ---------------------------------------------------------------------

def test_forwarded_gives_address_scheme_and_host():
    headers = fwd('for=192.0.2.60;proto=https;host=www.example.com;by=203.0.113.43')
    assert FORWARDED.resolve("127.0.0.1", headers) == ("192.0.2.60", "https", "www.example.com")


def test_forwarded_parameter_names_are_case_insensitive_and_ows_is_tolerated():
    headers = fwd('For=192.0.2.60; Proto=HTTPS ;HOST="example.com:8443"')
    assert FORWARDED.resolve("127.0.0.1", headers) == ("192.0.2.60", "https", "example.com:8443")


@pytest.mark.parametrize("node, expected", [
    ('"[2001:db8:cafe::17]:4711"', "2001:db8:cafe::17"),
    ('"[2001:db8:cafe::17]"', "2001:db8:cafe::17"),
    ('"192.0.2.43:47011"', "192.0.2.43"),
    ('"192.0.2.43:_port"', "192.0.2.43"),
    ('"\\[2001:db8::1\\]"', "2001:db8::1"),  # quoted-pair escapes are undone
])
def test_forwarded_node_forms(node, expected):
    assert FORWARDED.resolve("127.0.0.1", fwd(f"for={node}"))[0] == expected


def test_forwarded_walks_from_the_right_through_trusted_hops():
    proxies = TrustedProxies(["unix", "10.0.0.0/8"], headers=["Forwarded"])
    header = ('for=6.6.6.6;proto=http;host=evil.example, '
              'for=198.51.100.1;proto=https;host=shop.example, for=10.0.0.5;proto=http')
    assert proxies.resolve("", fwd(header)) == ("198.51.100.1", "https", "shop.example")


def test_forwarded_over_several_lines():
    proxies = TrustedProxies(["127.0.0.1", "10.0.0.0/8"], headers=["Forwarded"])
    headers = fwd("for=6.6.6.6", 'for=198.51.100.1;proto=https', "for=10.0.0.5")
    assert proxies.resolve("127.0.0.1", headers) == ("198.51.100.1", "https", None)


def test_forwarded_is_read_instead_of_x_forwarded_headers_when_both_are_named():
    both = TrustedProxies(LOCAL, headers=["Forwarded", "X-Forwarded-For", "X-Forwarded-Proto"])
    headers = [("X-FORWARDED-FOR", "203.0.113.1"), ("X-FORWARDED-PROTO", "https"),
               ("FORWARDED", "for=198.51.100.1")]
    assert both.resolve("127.0.0.1", headers) == ("198.51.100.1", None, None)
    # A request without Forwarded still gets the X- headers the proxy set.
    assert both.resolve("127.0.0.1", headers[:2]) == ("203.0.113.1", "https", None)


@pytest.mark.parametrize("element", ["for=unknown;proto=https", "for=_hidden;proto=https",
                                     "proto=https"])
def test_forwarded_hop_without_an_address_keeps_the_peer_but_its_scheme_counts(element):
    assert FORWARDED.resolve("127.0.0.1", fwd(element)) == ("127.0.0.1", "https", None)


@pytest.mark.parametrize("header", [
    "for=192.0.2.1;for=192.0.2.2",  # a parameter twice in one element
    "for=2001:db8::1",  # IPv6 must be bracketed and quoted
    'for="2001:db8::1"',
    'for="[192.0.2.1]"',
    'for="192.0.2.1',  # unterminated quote
    "for=192.0.2.1 proto=https",
    "for=192.0.2.1;proto",
    "for=300.0.0.1",
    'for="[::1]:port"',
    "for=\x00",
])
def test_malformed_forwarded_is_ignored_safely(header):
    assert FORWARDED.resolve("127.0.0.1", fwd(header)) == ("127.0.0.1", None, None)


def test_malformed_line_stops_the_walk_but_hops_to_its_right_still_count():
    proxies = TrustedProxies(["127.0.0.1", "10.0.0.0/8"], headers=["Forwarded"])
    headers = fwd('for="broken', "for=10.0.0.5;proto=https")
    assert proxies.resolve("127.0.0.1", headers) == ("10.0.0.5", "https", None)


@pytest.mark.parametrize("host", ["evil.example/path", "a b", "user@host", "", "x:99999999"])
def test_forwarded_host_must_look_like_a_host(host):
    headers = fwd(f'for=192.0.2.1;host="{host}"')
    assert FORWARDED.resolve("127.0.0.1", headers) == ("192.0.2.1", None, None)


def test_forwarded_ignores_other_schemes():
    assert FORWARDED.resolve("127.0.0.1", fwd("for=192.0.2.1;proto=gopher"))[1] is None


# -- properties: nothing an untrusted party writes can leak through ------------------------

_header_names = st.sampled_from(["FORWARDED", "X-FORWARDED-FOR", "X-FORWARDED-PROTO",
                                 "X-FORWARDED-HOST", "HOST"])
_header_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF)
                       | st.sampled_from(list('"[]:;,=\\ _')), max_size=60)
_headers = st.lists(st.tuples(_header_names, _header_text), max_size=6)
EVERY_HEADER = TrustedProxies(LOCAL, headers=["Forwarded", "X-Forwarded-For",
                                              "X-Forwarded-Proto", "X-Forwarded-Host"])


@settings(max_examples=300, deadline=None)
@given(headers=_headers)
def test_any_headers_never_raise_and_give_an_address_or_the_peer(headers):
    remote, scheme, host = EVERY_HEADER.resolve("127.0.0.1", headers)
    assert scheme in (None, "http", "https")
    if remote != "127.0.0.1":
        ipaddress.ip_address(remote)  # always a real address, never header text
    if host is not None:
        assert not any(c in host for c in " /@\\\"?#")


@settings(max_examples=200, deadline=None)
@given(headers=_headers)
def test_the_default_never_changes_the_host(headers):
    assert DEFAULT.resolve("127.0.0.1", headers)[2] is None


@settings(max_examples=200, deadline=None)
@given(headers=_headers, peer=st.ip_addresses(v=4).map(str))
def test_untrusted_peers_always_keep_their_own_view(headers, peer):
    proxies = TrustedProxies(["10.0.0.0/8"], headers=["Forwarded", "X-Forwarded-For",
                                                     "X-Forwarded-Proto", "X-Forwarded-Host"])
    if not proxies.trusts(peer):
        assert proxies.resolve(peer, headers) == (peer, None, None)
