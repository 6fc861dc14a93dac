"""The one SG site a replica copies: its identity, and the binding stored in the replica.

A site is identified by scheme, host and port (``https://studio.shotgunstudio.com:443``):
the host lower-cased, the default port made explicit, any path dropped. The first program
that writes into a replica (``scripts/scan``, ``scripts/ingest-events``, or the proxy) stores
the site under the ``site`` state key; every later start compares its own site with the stored
one and refuses to run on a mismatch (:class:`SiteMismatch`, whose message names both).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import urllib.parse
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .statekeys import SITE as SITE_KEY  # the site this replica copies (normalised URL)
from .store import Store, now_utc

log = logging.getLogger("sgcache.site")

DEFAULT_PORTS = {"http": 80, "https": 443}


#: Distinct (scheme, host, port, Host header) answers a Site remembers.
MATCH_MEMORY = 256


class SiteError(ValueError):
    """A site URL that cannot name an SG site."""


class SiteMismatch(RuntimeError):
    """The replica copies another site than the one configured."""

    def __init__(self, configured: Site, stored: str):
        super().__init__(
            f"this replica copies {stored}, not the configured site {configured.url}: "
            "use the replica made for this site, or a new database"
        )
        self.configured = configured
        self.stored = stored


@dataclass(frozen=True)
class Site:
    """An SG site: scheme (``http``/``https``), lower-case host, explicit port."""

    scheme: str
    host: str
    port: int
    #: answers of :meth:`matches` by its arguments (every request asks it several times)
    _matched: dict[tuple[str, str, int, str | None], bool] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False)

    @classmethod
    def parse(cls, url: str) -> Site:
        """Parse a site URL as shotgun_api3 takes it (``https://host[:port][/path]``)."""
        text = (url or "").strip()
        if not text:
            raise SiteError("empty site URL")
        parts = urllib.parse.urlsplit(text)
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS or "://" not in text:
            raise SiteError(f"site URL must start with http:// or https://: {url!r}")
        if parts.username is not None or parts.password is not None:
            raise SiteError("site URL must not carry credentials")
        if parts.query or parts.fragment:
            raise SiteError(f"site URL must not have a query or fragment: {url!r}")
        host = (parts.hostname or "").rstrip(".").lower()
        if not host:
            raise SiteError(f"site URL has no host: {url!r}")
        try:
            port = parts.port
        except ValueError as exc:
            raise SiteError(f"bad port in site URL {url!r}") from exc
        if port == 0:
            raise SiteError(f"bad port in site URL {url!r}")
        return cls(scheme, host, port or DEFAULT_PORTS[scheme])

    @property
    def url(self) -> str:
        """The normalised URL, e.g. ``https://studio.shotgunstudio.com:443``."""
        return f"{self.scheme}://{_bracket(self.host)}:{self.port}"

    def __str__(self) -> str:
        return self.url

    def is_host(self, host: str, port: int) -> bool:
        """Whether ``host:port`` is this site's host and port (any scheme)."""
        return _norm_host(host) == self.host and port == self.port

    def matches(self, scheme: str, host: str, port: int, host_header: str | None = None) -> bool:
        """Whether a request to ``scheme://host:port`` (with that Host header, if any) goes to this site.

        The Host header counts too: SG's front ends route by it, so a request sent to the site's
        address for another tenant's name is another site's request.
        """
        key = (scheme, host, port, host_header)
        known = self._matched.get(key)
        if known is None:
            if len(self._matched) >= MATCH_MEMORY:
                self._matched.clear()
            known = self._matched[key] = self._matches(scheme, host, port, host_header)
        return known

    def _matches(self, scheme: str, host: str, port: int, host_header: str | None) -> bool:
        if scheme.lower() != self.scheme or not self.is_host(host, port):
            return False
        if host_header is None:
            return True
        name, hport = _split_authority(host_header)
        return name == self.host and (hport is None or hport == self.port)


def normalise(url: str) -> str:
    """The normalised form of a site URL (see :class:`Site`)."""
    return Site.parse(url).url


def _norm_host(host: str) -> str:
    host = host.strip().rstrip(".").lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host


def _bracket(host: str) -> str:
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host


def _split_authority(authority: str) -> tuple[str, int | None]:
    """``host[:port]`` (IPv6 in brackets) -> (normalised host, port or None)."""
    text = authority.strip()
    port: int | None = None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
        return _norm_host(host), port
    host, sep, tail = text.rpartition(":")
    if sep and tail.isdigit() and ":" not in host:
        return _norm_host(host), int(tail)
    return _norm_host(text), None


# -- the binding stored in the replica ---------------------------------------------------
def stored_site(store: Store, conn: Connection | None = None) -> str | None:
    """The normalised site URL stored in the replica, or None when it is not bound yet."""
    if conn is None:
        with store.engine.connect() as own:
            return stored_site(store, own)
    if not sa.inspect(conn).has_table(store.state.name):
        return None  # a new database: nothing bound yet
    value = store.get_state(conn, SITE_KEY)
    return value if isinstance(value, str) and value else None


def check(store: Store, site: Site) -> str | None:
    """Compare ``site`` with the replica's; raise :class:`SiteMismatch` when they differ.

    Returns the stored URL (None when the replica is not bound to a site yet)."""
    stored = stored_site(store)
    if stored is not None and stored != site.url:
        raise SiteMismatch(site, stored)
    return stored


def bind(store: Store, site: Site) -> None:
    """Bind the replica to ``site`` (stored once), or raise :class:`SiteMismatch`.

    The site is inserted, never overwritten: of two programs binding an unbound replica at the
    same moment to different sites, the second finds the first's site and refuses."""
    stored = stored_site(store)
    if stored is None:
        try:
            with store.write_engine.begin() as conn:
                conn.execute(sa.insert(store.state).values(
                    key=SITE_KEY, value=json.dumps(site.url), updated_at=now_utc()))
            log.info("replica bound to the site %s", site.url)
            return
        except sa.exc.IntegrityError:
            stored = stored_site(store)  # bound meanwhile by another program
    if stored is not None and stored != site.url:
        raise SiteMismatch(site, stored)


def resolve(store: Store, configured: Site | None, *, bind_unbound: bool = True) -> Site | None:
    """The site to serve: the configured one (checked against the replica, and stored there when
    the replica has none and ``bind_unbound``), else the one stored in the replica, else None."""
    if configured is not None:
        if bind_unbound:
            bind(store, configured)
        else:
            check(store, configured)
        return configured
    stored = stored_site(store)
    if stored is None:
        return None
    try:
        return Site.parse(stored)
    except SiteError:
        log.warning("the replica names an unreadable site %r; ignoring it", stored)
        return None
