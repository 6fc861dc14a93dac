"""The ``info`` answer: SG's, with the proxy's own ``sgcache`` key; and its copy for when SG is down.

shotgun_api3 calls ``info`` when it connects (server capabilities). Every ``info`` answer SG
gives passes through :meth:`InfoCopies.add_sgcache`, which keeps a copy per host (without the
``sgcache`` key); while SG is down (:mod:`.outage`) that copy is the answer, marked
``hit; stale`` and ``"offline": true`` in its ``sgcache`` key, so clients can still connect.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .answers import Answer, hit


class InfoCopies:
    """The last ``info`` answer SG gave, per host."""

    def __init__(self) -> None:
        self.last: dict[str, dict[str, Any]] = {}

    def add_sgcache(self, host: str, reply: dict[str, Any], sgcache: Mapping[str, Any]) -> bytes:
        """Keep a copy of SG's ``info`` ``reply`` and return it with the ``sgcache`` key added
        (to ``results`` when SG nests the answer there)."""
        target = reply["results"] if isinstance(reply.get("results"), dict) else reply
        self.last[host] = {k: v for k, v in target.items() if k != "sgcache"}
        target["sgcache"] = dict(sgcache)
        return json.dumps(reply).encode("utf-8")

    def has(self, host: str) -> bool:
        """Whether SG's ``info`` answer for ``host`` was seen."""
        return host in self.last

    def offline_answer(self, host: str, sgcache: Mapping[str, Any]) -> Answer:
        """The copy of ``host``'s ``info`` answer (see :meth:`has`), with ``sgcache`` marked offline."""
        info = dict(self.last[host])
        info["sgcache"] = {**sgcache, "offline": True}
        return hit(json.dumps(info).encode(), stale=True)
