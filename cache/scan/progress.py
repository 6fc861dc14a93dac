"""Scan progress a person or a service log can read.

On a terminal each type gets a tqdm bar (rows, rows/s, ETA). Under a service manager (stderr
not a terminal) the same figures go to the log every ``log_every`` seconds, so a long prime
shows signs of life long before a type finishes. Totals are SG's own count (``summarize``)
taken before the type is read; without one (a site or client that cannot count) the figures
are rows and rows/s only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("sgcache.scanner")

#: Seconds between progress lines in a log.
DEFAULT_LOG_EVERY = 30.0
#: How progress is shown: a bar on a terminal, lines in a log, or not at all.
MODES = ("bar", "log", "off")


def format_duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class TypeProgress:
    """The progress of reading one entity type (a context manager; :meth:`update` per page)."""

    def __init__(self, entity_type: str, total: int | None, mode: str = "off", *,
                 log_every: float = DEFAULT_LOG_EVERY, clock: Callable[[], float] = time.monotonic,
                 bar_factory: Callable[..., Any] | None = None):
        if mode not in MODES:
            raise ValueError(f"progress mode {mode!r} is not one of {MODES}")
        self.entity_type = entity_type
        self.total = total
        self.mode = mode
        self.log_every = log_every
        self.clock = clock
        self.rows = 0
        self.started = clock()
        self._logged_at = self.started
        self._bar: Any = None
        if mode == "bar":
            if bar_factory is None:
                from tqdm import tqdm as bar_factory
            self._bar = bar_factory(desc=entity_type, total=total, unit=" rows", leave=False)

    def __enter__(self) -> TypeProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()

    def update(self, rows: int) -> None:
        """``rows`` more rows were stored."""
        self.rows += rows
        if self._bar is not None:
            if self.total is not None and self.rows > self.total:  # retired rows, or rows created meanwhile
                self.total = self._bar.total = self.rows
            self._bar.update(rows)
        elif self.mode == "log":
            now = self.clock()
            if now - self._logged_at >= self.log_every:
                self._logged_at = now
                log.info("%s", self.line(now))

    def rate(self, now: float | None = None) -> float:
        """Rows per second so far."""
        elapsed = (self.clock() if now is None else now) - self.started
        return self.rows / elapsed if elapsed > 0 else 0.0

    def line(self, now: float | None = None) -> str:
        """``Shot: 3000/5000 rows (60%), 250 rows/s, ETA 8 s``."""
        rate = self.rate(now)
        if self.total and self.rows <= self.total:
            text = f"{self.entity_type}: {self.rows}/{self.total} rows ({100 * self.rows // self.total}%), {rate:.0f} rows/s"
            if rate > 0:
                text += f", ETA {format_duration((self.total - self.rows) / rate)}"
            return text
        return f"{self.entity_type}: {self.rows} rows, {rate:.0f} rows/s"

    def elapsed(self) -> str:
        """``12 s, 406 rows/s`` for the type's summary line."""
        return f"{format_duration(self.clock() - self.started)}, {self.rate():.0f} rows/s"
