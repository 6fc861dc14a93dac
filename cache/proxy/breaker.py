"""The database circuit breaker: after repeated database failures, stop using the replica for a while.

:data:`BREAKER_FAILURES` consecutive failures that count (cache/replica/dialect's
``classify_error``) open it: requests pass ``db-backoff`` for :data:`BREAKER_SECONDS`, then one
is let through as a probe; its success closes the breaker. A slow or too large read is one
request's cost and never counts. The proxy's workers share one breaker per replica (thread-safe).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ..errors import Passthrough
from ..private import redact
from ..replica.dialect import classify_error

log = logging.getLogger("sgcache.service")

#: Consecutive database failures that open the breaker, and how long it stays open.
BREAKER_FAILURES = 3
BREAKER_SECONDS = 5.0


class Breaker:
    """The failure count of one replica's database, and when its back-off ends."""

    def __init__(self, dispose: Callable[[], None], forget: Callable[[], None], secrets: list[str]) -> None:
        self._dispose = dispose  # drops the read engine's connections when the breaker opens
        self._forget = forget  # drops the cached replica state on every counted failure
        self._secrets = secrets  # masked in every log line about the database
        self._lock = threading.Lock()
        #: consecutive failures that count; the breaker is open from BREAKER_FAILURES on
        self.failures = 0
        #: monotonic time until which requests pass db-backoff (once open)
        self.open_until = 0.0

    def check(self) -> None:
        """Raise db-backoff while the breaker is open; once it has been open long enough, let one
        request through as a probe (the others keep passing until it succeeds)."""
        with self._lock:
            if self.failures < BREAKER_FAILURES:
                return
            now = time.monotonic()
            if now < self.open_until:
                raise Passthrough("db-backoff")
            self.open_until = now + BREAKER_SECONDS

    def failed(self, exc: BaseException) -> Passthrough:
        """Record a database failure; the Passthrough to raise for it."""
        reason, trips = classify_error(exc)
        if not trips:
            if reason in ("slow-read", "too-large"):  # one request's cost: no warning per request
                log.info("read %s, passing through: %s", reason, short_error(exc))
                return Passthrough(reason, type(exc).__name__)
            # an internal error is a bug: its traceback goes to the log (never to the client)
            log.warning("replica cannot answer (%s), passing through: %s", reason,
                        redact(short_error(exc), self._secrets), exc_info=reason == "internal-error")
            return Passthrough(reason, type(exc).__name__)
        with self._lock:
            self.failures += 1
            failures = self.failures
            if failures >= BREAKER_FAILURES:
                self.open_until = time.monotonic() + BREAKER_SECONDS
        self._forget()
        log.warning("database error, passing through: %s", redact(short_error(exc), self._secrets))
        if failures >= BREAKER_FAILURES:
            if failures == BREAKER_FAILURES:
                log.warning("database failing; not using it for %.0fs at a time", BREAKER_SECONDS)
            try:
                self._dispose()  # reconnect from scratch when it is back
            except Exception:  # noqa: BLE001
                log.debug("dispose failed", exc_info=True)
        return Passthrough(reason, type(exc).__name__)

    def ok(self) -> None:
        """The database answered: close the breaker (logged when it was open)."""
        if self.failures or self.open_until:
            with self._lock:
                if self.failures >= BREAKER_FAILURES:
                    log.warning("database answering again; reads served from the replica")
                self.failures = 0
                self.open_until = 0.0

    def is_open(self) -> bool:
        """Whether the breaker is open: reads pass (``db-backoff``) until a probe succeeds."""
        with self._lock:
            return self.failures >= BREAKER_FAILURES

    def backing_off(self) -> bool:
        """Whether the back-off is running (no probe is due yet)."""
        return time.monotonic() < self.open_until


def short_error(exc: BaseException) -> str:
    """One line naming ``exc`` for the log (its database error's first line), at most 200 characters."""
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]
