"""The hit and pass counters that ``info()["sgcache"]`` reports (per replica opened)."""

from __future__ import annotations

import collections
import threading


class Counters:
    """Hits, and passes per ``X-SGCache`` reason; thread-safe (worker threads count too)."""

    def __init__(self) -> None:
        self.hits = 0
        self.passes: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def count(self, reason: str | None) -> None:
        """Count a hit (reason None) or a pass with its reason."""
        with self._lock:
            if reason is None:
                self.hits += 1
            else:
                self.passes[reason] += 1

    def snapshot(self) -> dict[str, object]:
        """``{"hits": n, "passes": {reason: n}}``, as ``info`` shows them."""
        with self._lock:
            return {"hits": self.hits, "passes": dict(self.passes)}
