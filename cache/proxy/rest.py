"""Writes through SG's REST API change rows without an API3 write the proxy could learn from.

Besides API3, SG serves a REST API under ``/api/v1`` (and later versions): a tool may update an
entity there (``PUT /api/v1/entity/shots/12``), delete, revive, batch, edit relationships or the
schema, and read it back through API3. Such a request passes untouched; once SG answered it
(with anything but a 4xx: SG refused it, nothing changed) or the connection broke after it was
sent while the client waited (not once it hung up: it reads nothing back), every cached type is
marked pending before the client has the answer, and reads pass (``pending-write``) until the
ingester has the write's events, as for an upload
(:mod:`cache.proxy.uploads`). Every type, not the one the path names: the REST API names types
its own way (plural, snake case) and one write changes other types too (paired fields, event rows).

A schema edit (``PUT`` or ``DELETE /api/v1/schema/{entity}/fields/{field}``) logs no event: the
field named is also un-primed, in the cached type named or, where the path's name is not one, in
every cached type that has a field of that name (the ingester's schema re-read primes it again).

Reads never mark: ``GET``, ``HEAD``, ``OPTIONS``, the search and summary endpoints (``_search``,
``_text_search``, ``_summarize``, ``hierarchy/_expand``) and the credentials exchange (``auth/...``).
"""

from __future__ import annotations

import re

from .routing import router_path

#: Methods that change nothing.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: A REST path: an ``api/v<version>`` pair of segments anywhere (a site served under a path prefix).
_REST = re.compile(r"(?:^|/)api/v\d[^/]*(/.*)?$")
#: Endpoints that POST a query and change nothing (the last segment of the path).
READ_ENDPOINTS = frozenset({"_search", "_text_search", "_summarize", "_expand"})


def _segments(path: str) -> list[str] | None:
    """The segments after the REST API's version (``["entity", "shots", "12"]``); None: not a REST path."""
    match = _REST.search(router_path(path).lower())
    if match is None:
        return None
    return [s for s in (match.group(1) or "").split("/") if s]


def is_rest_write(method: str, path: str) -> bool:
    """Whether a request to the site is a REST API call that may change entities or the schema."""
    if method.upper() in SAFE_METHODS:
        return False
    segments = _segments(path)
    if segments is None:
        return False
    if segments[:1] == ["auth"]:
        return False  # an access token for credentials: no entity changes
    return not (method.upper() == "POST" and segments and segments[-1] in READ_ENDPOINTS)


def changed(status: int) -> bool:
    """Whether SG's answer leaves the write possibly applied: anything but a 4xx (a refusal)."""
    return not 400 <= status < 500


def schema_field(method: str, path: str) -> tuple[str, str] | None:
    """``(entity, field)`` named by a schema edit of a field (``PUT``/``PATCH``/``DELETE
    .../schema/{entity}/fields/{field}``) as written in the path (letter case kept); else None."""
    if method.upper() not in ("PUT", "PATCH", "DELETE", "POST") or _segments(path) is None:
        return None
    raw = [s for s in router_path(path).split("/") if s]
    lowered = [s.lower() for s in raw]
    for i in range(len(lowered) - 3):
        if lowered[i] == "schema" and lowered[i + 2] == "fields":
            return raw[i + 1], raw[i + 3]
    return None
