"""Waiting for a condition instead of sleeping a fixed time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float, what: str, *, pause: float = 0.05,
               detail: Callable[[], str] | None = None) -> T:
    """Call ``condition`` until it returns something true, and return that.

    Fails after ``timeout`` seconds with ``what`` (and ``detail()``, e.g. a process log, when given).
    The condition is always tried once more at the deadline, so a slow machine only costs time."""
    deadline = time.monotonic() + timeout
    while True:
        last_try = time.monotonic() >= deadline
        value = condition()
        if value:
            return value
        if last_try:
            extra = f"\n{detail()}" if detail is not None else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{extra}")
        time.sleep(pause)
