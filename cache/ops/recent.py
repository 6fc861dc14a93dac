"""The last minutes of API3 traffic, for the status page: hits and passes per entity type and
per reason, in buckets of :data:`BUCKET_SECONDS` (thread-safe; memory bounded by the window).

The hit rate is over reads: passes with reason ``method`` (writes, ``info``, schema calls: never
answered from the replica) are listed but do not lower it."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

BUCKET_SECONDS = 10
#: How far back the page looks.
WINDOW_SECONDS = 300
#: The pass reason of calls that are not reads.
METHOD = "method"


@dataclass
class Window:
    """Totals over the window: hits and passes per entity type, passes per reason."""

    seconds: int
    hits: collections.Counter[str] = field(default_factory=collections.Counter)
    passes: collections.Counter[str] = field(default_factory=collections.Counter)
    reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Passes of reads (every reason but ``method``), per entity type: the hit rate's misses.
    read_passes: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def total_hits(self) -> int:
        return sum(self.hits.values())

    @property
    def total_passes(self) -> int:
        return sum(self.passes.values())

    def hit_rate(self, entity_type: str | None = None) -> float | None:
        """Hits over reads (of ``entity_type``), None when there were none."""
        if entity_type is None:
            hits, passes = self.total_hits, sum(self.read_passes.values())
        else:
            hits, passes = self.hits[entity_type], self.read_passes[entity_type]
        return hits / (hits + passes) if hits + passes else None


class Recent:
    """Counts per :data:`BUCKET_SECONDS` bucket, kept for :data:`WINDOW_SECONDS`."""

    def __init__(self, window: int = WINDOW_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: collections.OrderedDict[int, collections.Counter[tuple[str, str | None]]] = \
            collections.OrderedDict()

    def add(self, entity_type: str, reason: str | None) -> None:
        """One request: a hit (``reason`` None) or a pass with its reason."""
        key = int(self._clock() // BUCKET_SECONDS)
        with self._lock:
            self._buckets.setdefault(key, collections.Counter())[(entity_type, reason)] += 1
            self._drop_old(key)

    def _drop_old(self, now_key: int) -> None:
        oldest = now_key - self.window // BUCKET_SECONDS
        while self._buckets and next(iter(self._buckets)) < oldest:
            self._buckets.popitem(last=False)

    def window_totals(self) -> Window:
        """The totals of the last :attr:`window` seconds."""
        now_key = int(self._clock() // BUCKET_SECONDS)
        out = Window(self.window)
        with self._lock:
            self._drop_old(now_key)
            for counts in self._buckets.values():
                for (entity_type, reason), n in counts.items():
                    if reason is None:
                        out.hits[entity_type] += n
                    else:
                        out.passes[entity_type] += n
                        out.reasons[reason] += n
                        if reason != METHOD:
                            out.read_passes[entity_type] += n
        return out
