"""Exceptions shared by the core."""

from __future__ import annotations


class Passthrough(Exception):
    """The cache cannot answer this request exactly; send it upstream.

    ``reason`` is a short token (``uncached-field``, ``operator``, ...) used in the
    ``X-SGCache`` header and in the pass counters; ``detail`` is for the log.
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
