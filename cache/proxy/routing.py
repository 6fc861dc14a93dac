"""Which flows the proxy looks at: the hosts mitmproxy decrypts, and the site's API3 calls.

Only the site's host (and the operator's ``sgcache_hosts``) is decrypted; every other TLS
connection is tunnelled untouched. Of the decrypted requests, only ``POST .../api3/json`` to
the site itself (scheme, host, port and Host header) is answered or learnt from; another
host's API3 passes (``other-site``), anything else is not the proxy's business.
Where the proxy may connect at all is :mod:`cache.proxy.relay`'s decision.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

from cache.replica.site import Site

#: An allow_hosts entry that matches nothing (an empty allow_hosts would decrypt everything).
NO_HOST = r"\A(?!)"


def decrypt_patterns(site: Site | None, host_globs: Iterable[str]) -> list[str]:
    """mitmproxy's ``allow_hosts`` (regexes matched against ``host:port``): the site's host and
    port, then the hosts named by globs (any port); never empty."""
    patterns = [host_regex(glob) for glob in host_globs]
    if site is not None:
        patterns.insert(0, f"^{re.escape(site.host)}:{site.port}$")
    return patterns or [NO_HOST]


def host_regex(glob: str) -> str:
    """An allow_hosts regex (matched against ``host:port``) for a host glob."""
    return "^" + fnmatch.translate(glob.lower()).removeprefix("(?s:").removesuffix(")\\Z") + "(:\\d+)?$"


def is_api3(method: str, path: str) -> bool:
    """Whether a request is an API3 call (``POST`` to a path ending in ``/api3/json``)."""
    return method == "POST" and path.split("?", 1)[0].endswith("/api3/json")


def hostport(host: str, port: int) -> str:
    """``host:port`` for a message, IPv6 hosts in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
