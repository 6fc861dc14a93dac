"""The answers the proxy makes itself, and the ``X-SGCache`` header that tells them apart.

Every answer a client gets is marked: ``hit`` (from the replica), ``hit; stale`` (from the
replica while SG is down), or ``pass; reason=<why>`` (SG's answer, or an error that stands
in for one). The reasons are listed in docs/semantics.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cache.proxy import api3

HEADER = "X-SGCache"
JSON = "application/json; charset=utf-8"


@dataclass(frozen=True)
class Answer:
    """An HTTP answer made by the proxy (the addon turns it into mitmproxy's response)."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    #: The pass reason it stands in for SG's answer with (counted); None for a hit.
    reason: str | None = None
    #: A hit's entities, and its service time in seconds (worker, SQL, encoding): for the metrics.
    rows: int | None = None
    seconds: float | None = None


def pass_header(reason: str) -> str:
    """The ``X-SGCache`` value of an answer that is SG's, or stands in for SG's."""
    return f"pass; reason={reason}"


def hit(body: bytes, stale: bool = False) -> Answer:
    """An answer from the replica (``stale``: SG is down, the replica may be behind)."""
    return Answer(200, body, {"Content-Type": JSON, HEADER: "hit; stale" if stale else "hit"})


def refusal(message: str, reason: str) -> Answer:
    """SG's error envelope with HTTP 200: the client raises it and never re-sends the request."""
    return Answer(200, api3.encode_error(message), {"Content-Type": JSON, HEADER: pass_header(reason)}, reason)


def unreachable(host: str, method: str) -> Answer:
    """SG could not be reached: the call was not sent (and is not retried by the client)."""
    return refusal(f"sgcache: the SG site {host} cannot be reached; {method} was not sent", "sg-unreachable")


def relay_refusal(what: str, reason: str) -> Answer:
    """A destination the relay policy forbids: 403 with a one-line reason."""
    return Answer(403, f"sgcache: {what} refused: {reason}\n".encode(),
                  {"Content-Type": "text/plain; charset=utf-8", HEADER: pass_header("relay-refused")}, "relay-refused")
