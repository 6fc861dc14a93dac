"""What the reader knows of the replica's state; a plan is valid for as long as it is unchanged."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ReplicaState:
    """What the reader needs to know of the replica's state, refreshed by the caller."""

    primed: dict[str, set[str]]  # entity type -> its primed fields
    pending_fetch: set[str] = field(default_factory=set)  # types with rows waiting in the fetch queue
    event_cursor: int | None = None  # the ingester's cursor: EventLogEntry reads above it pass

    @functools.cached_property
    def fingerprint(self) -> tuple[frozenset[Any], frozenset[str]]:
        """What a plan depends on: equal fingerprints, same planning decisions."""
        return frozenset((t, frozenset(f)) for t, f in self.primed.items()), frozenset(self.pending_fetch)
