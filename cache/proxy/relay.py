"""Where the proxy may open connections for its clients (CONNECT tunnels, plain-http requests).

The proxy is no door into the network it runs in. Allowed, in this order:

1. a destination matching one of the operator's ``host:port`` globs (``sgcache_allow_connect``);
2. the SG site's own host and port (for a plain-http request also its scheme);
3. any other host on port 443 (a CONNECT, or an ``https://`` request) or 80 (an ``http://``
   request), unless the name is or resolves to a loopback, link-local, unspecified or
   multicast address or one of the proxy host's own addresses.

Everything else is refused with a one-line reason.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from ..replica.site import Site, _norm_host

log = logging.getLogger("sgcache.relay")

CONNECT_PORTS = frozenset({443})
PLAIN_PORTS = {"http": frozenset({80}), "https": frozenset({443})}
#: How long a name's addresses are reused.
RESOLVE_TTL = 30.0

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str  # why (one line), for the log and a refusal's body


@dataclass(frozen=True)
class AllowGlob:
    """One ``host:port`` glob of ``sgcache_allow_connect``, ready for :func:`fnmatch.fnmatchcase`."""

    pattern: str
    #: Its host is an address pattern (``10.20.0.*``, ``[fd00::*]``): it matches addresses only,
    #: never a name (``*`` matches dots: ``10.20.0.9.attacker.example`` may resolve anywhere).
    addresses_only: bool

    def matches(self, target: str, is_address: bool) -> bool:
        return (is_address or not self.addresses_only) and fnmatch.fnmatchcase(target, self.pattern)


def parse_allow(globs: Iterable[str]) -> list[AllowGlob]:
    """Validate ``host:port`` globs (``*`` and ``?`` are the wildcards; an IPv6 host in brackets,
    ``[::1]:5432``); lower-cased, brackets made literal for :func:`fnmatch.fnmatchcase`."""
    out = []
    for raw in globs:
        glob = raw.strip().lower()
        host, sep, port = glob.rpartition(":")
        if not sep or not host or not port:
            raise ValueError(f"sgcache_allow_connect wants host:port globs, got {raw!r}")
        if not all(c.isdigit() or c in "*?" for c in port):
            raise ValueError(f"bad port in sgcache_allow_connect glob {raw!r}")
        ipv4 = host.strip("*?") != "" and all(c.isdigit() or c in ".*?" for c in host)
        ipv6 = host.startswith("[") and host.endswith("]")
        out.append(AllowGlob("".join({"[": "[[]", "]": "[]]"}.get(c, c) for c in glob), ipv4 or ipv6))
    return out


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def is_local(addr: Address, own: Callable[[Address], bool] | None = None) -> bool:
    """Loopback, link-local, unspecified, multicast, or (per ``own``) one of this host's addresses."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_loopback or addr.is_link_local or addr.is_unspecified or addr.is_multicast:
        return True
    return own(addr) if own is not None else False


def own_address(addr: Address) -> bool:
    """Whether ``addr`` belongs to one of this host's interfaces: a socket can bind to it."""
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((str(addr), 0))
    except OSError:
        return addr in _hostname_addresses()
    return True


_own_cache: tuple[float, set[Address]] = (0.0, set())


def _hostname_addresses() -> set[Address]:
    """The addresses this host's name resolves to (looked up at most once a minute)."""
    global _own_cache
    expires, found = _own_cache
    if time.monotonic() < expires:
        return found
    found = set()
    _own_cache = (time.monotonic() + 60.0, found)
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None)
    except OSError:
        return found
    for info in infos:
        try:
            found.add(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]))
        except ValueError:
            continue
    return found


def system_resolve(host: str) -> list[Address]:
    """Every address ``host`` resolves to (empty when it does not resolve)."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return []
    out = []
    for info in infos:
        try:
            out.append(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]))
        except ValueError:
            continue
    return out


class RelayPolicy:
    """Decides CONNECT tunnels and plain-http destinations. Blocking (DNS): call it off the event loop."""

    def __init__(
        self,
        site: Site | None,
        allow: Sequence[str] = (),
        *,
        resolver: Callable[[str], list[Address]] = system_resolve,
        own: Callable[[Address], bool] = own_address,
    ):
        self.site = site
        self.allow = parse_allow(allow)
        self._resolver = resolver
        self._own = own
        self._cache: dict[str, tuple[float, list[Address]]] = {}
        self._lock = threading.Lock()

    def connect(self, host: str, port: int) -> Decision:
        """May the proxy tunnel a CONNECT to ``host:port``?"""
        if self.site is not None and self.site.is_host(host, port):
            return Decision(True, "the SG site")
        return self._decide(host, port, CONNECT_PORTS)

    def request(self, scheme: str, host: str, port: int) -> Decision:
        """May the proxy send a plain (absolute-URI) request to ``scheme://host:port``?"""
        if self.site is not None and self.site.is_host(host, port) and scheme.lower() == self.site.scheme:
            return Decision(True, "the SG site")
        return self._decide(host, port, PLAIN_PORTS.get(scheme.lower(), frozenset()))

    def upstream(self, host: str, port: int, tls: bool) -> Decision:
        """May the proxy open a connection to ``host:port`` for a client (the last word, whatever
        the client asked: a tunnel, else a plain request of that scheme)?"""
        tunnel = self.connect(host, port)
        if tunnel.allowed:
            return tunnel
        return self.request("https" if tls else "http", host, port)

    def peer_refused(self, host: str, port: int, peer: str) -> str | None:
        """Why a connection opened to ``host:port`` must be dropped now that it reached ``peer``
        (an IP): a name that resolved to a local address after it was checked (DNS rebinding).
        None when the site or an allow glob names the destination, or the peer is not local."""
        if self.site is not None and self.site.is_host(host, port):
            return None
        name = _norm_host(host)
        if self._allowed(name, port):
            return None
        try:
            addr = ipaddress.ip_address(peer.split("%", 1)[0])
        except ValueError:
            return None
        if is_local(addr, self._own):
            return f"{name} reached a local address ({addr}); see sgcache_allow_connect"
        return None

    def _allowed(self, name: str, port: int) -> bool:
        """Whether an ``sgcache_allow_connect`` glob names ``name:port`` (``name`` normalised)."""
        if not self.allow:
            return False
        target = f"[{name}]:{port}" if ":" in name else f"{name}:{port}"
        is_address = _is_address(name)
        return any(glob.matches(target, is_address) for glob in self.allow)

    def _decide(self, host: str, port: int, ports: frozenset[int]) -> Decision:
        name = _norm_host(host)
        if self._allowed(name, port):
            return Decision(True, "named in sgcache_allow_connect")
        if port not in ports:
            allowed = ", ".join(str(p) for p in sorted(ports)) or "none"
            return Decision(False, f"port {port} is not allowed (ports: {allowed}; "
                                   "see sgcache_allow_connect)")
        for addr in self._addresses(name):
            if is_local(addr, self._own):
                return Decision(False, f"{name} is a local address ({addr}); see sgcache_allow_connect")
        return Decision(True, "public port")

    def _addresses(self, name: str) -> list[Address]:
        try:
            return [ipaddress.ip_address(name)]
        except ValueError:
            pass
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(name)
        if cached is not None and cached[0] > now:
            return cached[1]
        addrs = self._resolver(name)
        with self._lock:
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[name] = (now + RESOLVE_TTL, addrs)
        return addrs
