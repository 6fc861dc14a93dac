"""Which flows the proxy looks at: the hosts mitmproxy decrypts, and the site's API3 calls.

Only the site's host (and the operator's ``sgcache_hosts``) is decrypted; every other TLS
connection is tunnelled untouched. Of the decrypted requests, only ``POST /api3/json`` (exactly
the path shotgun_api3 builds from the site's URL, :func:`api3_path`) to the site itself (scheme,
host, port and Host header) is answered or learnt from; another host's API3 passes
(``other-site``), anything else is not the proxy's business, but for a ``POST`` to the site that a
lenient router could still take for an API3 call (:func:`may_be_api3`): SG's success envelope to it
marks every cached type pending (it may have been a write).
Where the proxy may connect at all is :mod:`cache.proxy.relay`'s decision.

In reverse-proxy mode (``mitmdump --mode reverse:https://site``) clients name the proxy, not SG;
mitmproxy gives each request the reverse target's scheme, host and port (and, unless
``keep_host_header`` is set, its ``Host`` header), so the same test decides. The reverse target
is the site: :func:`served_site` takes it when ``sgcache_site`` is not given, and refuses a target
that is another site.
"""

from __future__ import annotations

import fnmatch
import re
import urllib.parse
from collections.abc import Iterable

from cache.replica.site import Site, SiteError

#: The path of API3 calls to a site named without a path (what shotgun_api3 posts to).
API3_PATH = "/api3/json"
#: An allow_hosts entry that matches nothing (an empty allow_hosts would decrypt everything).
NO_HOST = r"\A(?!)"


def decrypt_patterns(site: Site | None, host_globs: Iterable[str]) -> list[str]:
    """mitmproxy's ``allow_hosts`` (regexes matched against ``host:port``): the site's host and
    port, then the hosts named by globs (any port); never empty."""
    patterns = [host_regex(glob) for glob in host_globs]
    if site is not None:
        patterns.insert(0, f"^{re.escape(site.host)}:{site.port}$")
    return patterns or [NO_HOST]


def served_site(configured: str, reverse_targets: Iterable[tuple[str, str, int]]) -> str:
    """The site URL the proxy serves: ``configured`` (``sgcache_site``), else the one http(s)
    reverse-proxy target (``(scheme, host, port)`` of each ``--mode reverse:...``); "" for neither.

    Raises :class:`SiteError` when a reverse target is not the configured site, or when several
    different targets leave the site unnamed: a replica copies one site."""
    targets: list[Site] = []
    for scheme, host, port in reverse_targets:
        if scheme in ("http", "https"):  # tcp, tls, dns, ... targets carry no API3 the addon sees
            site = Site(scheme, host.rstrip(".").lower().strip("[]"), port)
            if site not in targets:
                targets.append(site)
    if configured.strip():
        site = Site.parse(configured)
        for target in targets:
            if target != site:
                raise SiteError(f"the reverse-proxy target {target.url} is not the site {site.url}: "
                                "a replica copies one site (point --mode reverse: at it)")
        return configured
    if len(targets) > 1:
        raise SiteError("several reverse-proxy targets (" + ", ".join(t.url for t in targets)
                        + "): name the one site with sgcache_site")
    return targets[0].url if targets else ""


def host_regex(glob: str) -> str:
    """An allow_hosts regex (matched against ``host:port``) for a host glob."""
    return "^" + fnmatch.translate(glob.lower()).removeprefix("(?s:").removesuffix(")\\Z") + "(:\\d+)?$"


def api3_path(site_url: str) -> str:
    """The path shotgun_api3 posts API3 calls to for a site URL (``Shotgun.set_server_params``):
    ``api3/json`` under the URL path's directory (``/api3/json`` for ``https://site`` and
    ``https://site/sg``, ``/sg/api3/json`` for ``https://site/sg/``)."""
    base = urllib.parse.urlsplit(site_url.strip()).path
    return urllib.parse.urljoin(urllib.parse.urljoin(base or "/", "api3/"), "json")


def is_api3(method: str, path: str, api_path: str = API3_PATH) -> bool:
    """Whether a request is an API3 call: ``POST`` to exactly the path shotgun_api3 posts to
    (``api_path``), without a query string (it sends none). Any other path, even one ending in
    ``/api3/json``, is not the proxy's business: SG (or whatever serves that path) answers it."""
    return method == "POST" and path == api_path


def may_be_api3(method: str, path: str, api_path: str = API3_PATH) -> bool:
    """Whether a request the proxy does not take for an API3 call (:func:`is_api3`) could still be
    one to a lenient router (Rails-style): a ``POST`` to ``api_path`` but for a query string, a
    trailing or doubled slash, percent-escapes, a format suffix (``.json``) or letter case."""
    return method == "POST" and _loose(path) == _loose(api_path)


def router_path(path: str) -> str:
    """A request's path as a lenient router (Rails) reads it before routing: no query or fragment,
    percent-escapes decoded, doubled slashes squeezed, no trailing slash (letter case kept)."""
    path = urllib.parse.unquote(path.split("?", 1)[0].split("#", 1)[0])
    return re.sub(r"/+", "/", path).rstrip("/")


def _loose(path: str) -> str:
    return re.sub(r"\.[^./]*$", "", router_path(path)).lower()


def hostport(host: str, port: int) -> str:
    """``host:port`` for a message, IPv6 hosts in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
