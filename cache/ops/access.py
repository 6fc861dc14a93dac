"""The access log: one line per API3 request, as logfmt or JSON, on the ``sgcache.access`` logger.

A line names the call, never its credentials: method, entity type, outcome (``hit``, ``pass``,
``error``), the pass reason, rows answered, milliseconds, HTTP status, the client's address and
the script or login name (never a key, password or token).

With the access log on, mitmproxy's own per-connection lines (``client connect``, ``server
connect ...``) are demoted to debug (:class:`ConnectionNoise`): at the default verbosity the
access log is the one line per request.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("sgcache.access")

FORMATS = ("off", "logfmt", "json")
#: mitmproxy's logger of connection events, and its messages demoted to debug.
MITM_SERVER_LOGGER = "mitmproxy.proxy.server"
_NOISE = ("client connect", "client disconnect", "server connect ", "server disconnect ")


@dataclass(frozen=True)
class RequestRecord:
    """One finished API3 request, as the access log and the metrics see it."""

    method: str  # the API3 method, "-" when the body was not decoded
    entity_type: str  # "-" when the call names none
    outcome: str  # hit, pass or error
    reason: str | None  # the X-SGCache pass reason (None for a hit)
    rows: int | None  # entities answered (reads), when known
    ms: float  # from the request's first byte to its answer
    status: int | None  # HTTP status answered (None: no answer, see outcome error)
    client: str  # the client's address
    who: str | None = None  # script or login name (never a secret)
    service_ms: float | None = None  # a hit's service time (worker, SQL, encoding)


def format_line(record: RequestRecord, fmt: str) -> str:
    """The record as one logfmt or JSON line."""
    fields: dict[str, Any] = {  # by hand: dataclasses.asdict deep-copies every value
        "method": record.method, "entity_type": record.entity_type, "outcome": record.outcome,
        "reason": record.reason, "rows": record.rows, "ms": round(record.ms, 1), "status": record.status,
        "client": record.client, "who": record.who}
    if fmt == "json":
        return json.dumps(fields, separators=(",", ":"), ensure_ascii=True)
    return " ".join(f"{k}={_logfmt_value(v)}" for k, v in fields.items() if v is not None)


def _logfmt_value(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\\') or not text.isprintable():
        return json.dumps(text, ensure_ascii=True)
    return text


def who(auth: Any) -> str | None:
    """The script or login name of an API3 auth dict (never its key, password or token)."""
    if not isinstance(auth, dict):
        return None
    for key in ("script_name", "user_login"):
        name = auth.get(key)
        if isinstance(name, str) and name:
            return name[:64]
    return "session" if auth.get("session_token") else None


class ConnectionNoise(logging.Filter):
    """Demote mitmproxy's per-connection info lines to debug (kept at ``termlog_verbosity=debug``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and record.getMessage().startswith(_NOISE):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


_noise = ConnectionNoise()


def quiet_connections(on: bool) -> None:
    """Demote (``on``) or restore mitmproxy's connection lines; keep (``on``) or let again the
    access lines out of mitmproxy's deprecated ``add_log`` event (:class:`NoLegacyEvent`)."""
    logger = logging.getLogger(MITM_SERVER_LOGGER)
    for handler in logging.getLogger().handlers:
        if type(handler).__name__ == LEGACY_HANDLER:
            (handler.addFilter if on else handler.removeFilter)(_no_legacy)
    if on:
        logger.addFilter(_noise)
    else:
        logger.removeFilter(_noise)


#: mitmproxy's root log handler that turns every record into an ``add_log`` event for all addons.
LEGACY_HANDLER = "LegacyLogEvents"


class NoLegacyEvent(logging.Filter):
    """Access lines skip mitmproxy's deprecated ``add_log`` event: each would be dispatched to
    every addon on the event loop (a wake-up and ~40 hook calls per request). mitmdump's
    terminal, mitmweb's event log and any standard ``logging`` handler still get them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != log.name


_no_legacy = NoLegacyEvent()
