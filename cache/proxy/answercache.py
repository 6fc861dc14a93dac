"""Answers kept by request, reused while the database has not changed since they were read.

The database tells whether it changed: SQLite's ``PRAGMA data_version``, asked on a connection
kept for it alone (cache/proxy/inline.py; the event loop and the workers take turns, each asking
takes microseconds), changes whenever any other connection or process commits (the ingester, a
scan, this proxy's own writes, another proxy); that connection itself never writes. An answer
is kept with the version seen just before it was read and, when a worker
read it, just after (both the same: nothing was committed meanwhile); it is reused only while
that connection still sees the same version. Everything a read's answer depends on but the
request is in the database (rows, primed fields, the fetch queue, pending-write markers), except
what is checked before each reuse (the replica is fresh, the breaker closed, no write left
unrecorded, the credentials) and the clock, so relative-date and EventLogEntry reads are not
kept (``Reader.reusable``). Bounded in entries and bytes (least recently used first out).
"""

from __future__ import annotations

import collections
import threading
from typing import Any

#: Answers kept at most; their total bytes by default (``sgcache_answer_cache``, in MB); a bigger
#: answer than MAX_ANSWER_BYTES is not kept.
MAX_ANSWERS = 256
ANSWER_CACHE_MB = 32
MAX_BYTES = ANSWER_CACHE_MB * 1024 * 1024
MAX_ANSWER_BYTES = 4 * 1024 * 1024

#: (connection token, data version): comparable only for the same connection.
Version = tuple[object, Any]


class AnswerCache:
    """Encoded answers (body, rows) by request key, each with the database version it holds for."""

    def __init__(self, max_answers: int = MAX_ANSWERS, max_bytes: int = MAX_BYTES) -> None:
        self.max_answers, self.max_bytes = max_answers, max_bytes
        self._answers: collections.OrderedDict[str, tuple[Version, bytes, int | None]] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str, version: Version) -> tuple[bytes, int | None] | None:
        """The answer kept for ``key`` if the database is still at ``version``."""
        with self._lock:
            kept = self._answers.get(key)
            if kept is None:
                return None
            if kept[0][0] is not version[0] or kept[0][1] != version[1]:
                self._drop(key)
                return None
            self._answers.move_to_end(key)
            return kept[1], kept[2]

    def put(self, key: str, version: Version, body: bytes, rows: int | None) -> None:
        if len(body) > min(MAX_ANSWER_BYTES, self.max_bytes):
            return
        with self._lock:
            if key in self._answers:
                self._drop(key)
            self._answers[key] = (version, body, rows)
            self._bytes += len(body)
            self._evict()

    def resize(self, max_bytes: int) -> None:
        """Keep at most ``max_bytes`` of answers from now on (0: none)."""
        with self._lock:
            self.max_bytes = max_bytes
            self._evict()

    def _evict(self) -> None:
        while self._answers and (len(self._answers) > self.max_answers or self._bytes > self.max_bytes):
            self._drop(next(iter(self._answers)))

    def _drop(self, key: str) -> None:
        self._bytes -= len(self._answers.pop(key)[1])

    def clear(self) -> None:
        with self._lock:
            self._answers.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._answers)
