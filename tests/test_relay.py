"""cache/proxy/relay.py: which CONNECT tunnels and plain-http destinations the proxy allows (no network)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from cache.proxy.relay import RelayPolicy, is_local, own_address, parse_allow
from cache.replica.site import Site

OWN = {ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("fd00::3")}
DNS = {
    "sg.example.test": ["203.0.113.10"],
    "rebind.example.test": ["203.0.113.11", "127.0.0.1"],  # a name that also points at loopback
    "me.example.test": ["10.1.2.3"],
    "meta.example.test": ["169.254.169.254"],
    "mapped.example.test": ["::ffff:127.0.0.1"],
}


def resolver(name: str) -> list[Any]:
    return [ipaddress.ip_address(a) for a in DNS.get(name, [])]


def policy(site: str | None = "https://studio.example.test", allow: tuple[str, ...] = ()) -> RelayPolicy:
    return RelayPolicy(Site.parse(site) if site else None, allow, resolver=resolver, own=lambda a: a in OWN)


@pytest.mark.parametrize(
    ("host", "port", "allowed"),
    [
        ("studio.example.test", 443, True),  # the site
        ("sg.example.test", 443, True),  # another public host on 443 (S3 uploads, ...)
        ("sg.example.test", 8443, False),
        ("sg.example.test", 22, False),
        ("127.0.0.1", 5432, False),
        ("127.0.0.1", 443, False),
        ("127.8.9.10", 443, False),
        ("::1", 443, False),
        ("[::1]", 443, False),
        ("0.0.0.0", 443, False),
        ("169.254.169.254", 443, False),
        ("meta.example.test", 443, False),
        ("fe80::1", 443, False),
        ("10.1.2.3", 443, False),  # one of the proxy host's own addresses
        ("me.example.test", 443, False),
        ("rebind.example.test", 443, False),
        ("mapped.example.test", 443, False),
        ("224.0.0.1", 443, False),
        ("unresolvable.example.test", 443, True),  # the connection itself will fail
    ],
)
def test_connect(host: str, port: int, allowed: bool) -> None:
    decision = policy().connect(host, port)
    assert decision.allowed is allowed, decision.reason
    assert decision.reason


def test_the_site_is_allowed_on_its_own_port_even_on_loopback() -> None:
    p = policy("http://127.0.0.1:8000")
    assert p.connect("127.0.0.1", 8000).allowed
    assert p.request("http", "127.0.0.1", 8000).allowed
    assert not p.request("https", "127.0.0.1", 8000).allowed  # another scheme: not the site
    assert not p.connect("127.0.0.1", 8001).allowed
    assert not p.connect("localhost", 8000).allowed  # the site is named 127.0.0.1


def test_plain_requests() -> None:
    p = policy()
    assert p.request("http", "sg.example.test", 80).allowed
    assert p.request("https", "sg.example.test", 443).allowed
    assert not p.request("http", "sg.example.test", 443).allowed
    assert not p.request("http", "sg.example.test", 8080).allowed
    assert not p.request("http", "127.0.0.1", 80).allowed
    assert not p.request("http", "meta.example.test", 80).allowed
    assert not p.request("ftp", "sg.example.test", 21).allowed


def test_allow_globs_name_exceptions() -> None:
    p = policy(allow=("127.0.0.1:5432", "*.studio.internal:8*", "[::1]:9000"))
    assert p.connect("127.0.0.1", 5432).allowed
    assert not p.connect("127.0.0.1", 5433).allowed
    assert p.connect("files.studio.internal", 8443).allowed
    assert p.request("http", "files.studio.internal", 8080).allowed
    assert not p.connect("files.studio.internal", 9443).allowed
    assert p.connect("::1", 9000).allowed and p.connect("[::1]", 9000).allowed
    assert not p.connect("::1", 9001).allowed


def test_an_address_glob_matches_addresses_not_names_that_resolve_anywhere() -> None:
    """``*`` matches dots: ``10.20.0.*`` written for a subnet also matched the name
    ``10.20.0.9.attacker.example``, which its owner may point at the proxy's own loopback."""
    dns = {"10.20.0.9.attacker.example": [ipaddress.ip_address("127.0.0.1")],
           "fd00--1.attacker.example": [ipaddress.ip_address("::1")]}
    p = RelayPolicy(Site.parse("https://sg.example.test"), ["10.20.0.*:8443", "[fd00::*]:8443", "files.*:8443"],
                    resolver=lambda name: dns.get(name, []), own=lambda a: False)
    assert p.connect("10.20.0.9", 8443).allowed and p.connect("fd00::5", 8443).allowed  # what they are for
    for name in ("10.20.0.9.attacker.example", "10.20.0.1.2"):
        assert not p.connect(name, 8443).allowed, name
        assert not p.request("http", name, 8443).allowed, name
    assert p.peer_refused("10.20.0.9.attacker.example", 8443, "127.0.0.1") is not None
    assert p.peer_refused("10.20.0.9", 8443, "10.20.0.9") is None
    assert p.connect("files.studio.internal", 8443).allowed  # a name glob still names names


@pytest.mark.parametrize("glob", ["127.0.0.1", "host:", ":443", "host:abc", "host:[0-9]"])
def test_bad_allow_globs_are_refused(glob: str) -> None:
    with pytest.raises(ValueError):
        parse_allow([glob])


def test_no_site_still_polices() -> None:
    p = policy(None)
    assert p.connect("sg.example.test", 443).allowed
    assert not p.connect("127.0.0.1", 443).allowed


def test_local_addresses() -> None:
    for text in ("127.0.0.1", "::1", "0.0.0.0", "::", "169.254.1.1", "fe80::1", "::ffff:127.0.0.1"):
        assert is_local(ipaddress.ip_address(text)), text
    assert not is_local(ipaddress.ip_address("203.0.113.5"))
    assert own_address(ipaddress.ip_address("127.0.0.1"))  # bindable: this host's
    assert not own_address(ipaddress.ip_address("203.0.113.5"))


def test_a_connection_that_reached_a_local_address_is_dropped() -> None:
    p = policy("http://127.0.0.1:8000", allow=("db.example.test:5432",))
    assert p.peer_refused("sg.example.test", 443, "203.0.113.10") is None
    assert "local address" in (p.peer_refused("sg.example.test", 443, "127.0.0.1") or "")  # rebound
    assert p.peer_refused("sg.example.test", 443, "10.1.2.3") is not None  # this host
    assert p.peer_refused("sg.example.test", 443, "::ffff:127.0.0.1") is not None
    assert p.peer_refused("127.0.0.1", 8000, "127.0.0.1") is None  # the site
    assert p.peer_refused("db.example.test", 5432, "127.0.0.1") is None  # named by the operator
