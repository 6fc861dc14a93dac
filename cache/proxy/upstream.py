"""The proxy's one HTTP client for SG: a write sent exactly once; rows read back after a write.

shotgun_api3 re-sends a request that got HTTP 502 or 504, and httplib2 re-sends once on
a connection that closed without an answer. A proxy that relays a write and loses SG's
connection after sending it must therefore answer with something that is neither: an
error in SG's envelope saying the write may have been applied. This module sends a
write on a fresh connection (never a reused one, which may have gone stale after the
bytes left) and tells apart "not sent" from "sent, outcome unknown".

:func:`post_json` reads rows back with the same client (a read: its failure only leaves the
rows to the ingester). TLS is verified as mitmproxy verifies SG (:func:`tls_context`).
"""

from __future__ import annotations

import http.client
import json
import logging
import ssl
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cache import __version__

log = logging.getLogger("sgcache.upstream")

#: Request headers not forwarded: hop-by-hop ones, and those this module sets itself.
_SKIP_REQUEST = {
    "connection", "keep-alive", "proxy-authorization", "proxy-connection", "te", "trailer",
    "transfer-encoding", "upgrade", "content-length", "accept-encoding", "host",
}
_SKIP_RESPONSE = {
    "connection", "keep-alive", "proxy-authenticate", "te", "trailer", "transfer-encoding",
    "upgrade", "content-length",
}
CONNECT_TIMEOUT = 10.0
#: SG may take long over a big batch; the client itself waits forever by default.
RESPONSE_TIMEOUT = 600.0
#: Reading rows back is worth only a short wait: the ingester fetches them otherwise.
READ_TIMEOUT = 10.0


class NotSent(Exception):
    """SG could not be reached: nothing of the request left the proxy."""


class OutcomeUnknown(Exception):
    """The request was sent but no complete answer came back: it may have been applied."""


class BadStatus(Exception):
    """SG answered a read with an HTTP error status."""


@dataclass
class Reply:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes


def send_once(
    scheme: str,
    host: str,
    port: int,
    path: str,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    ssl_context: ssl.SSLContext | None = None,
    response_timeout: float = RESPONSE_TIMEOUT,
) -> Reply:
    """POST ``body`` to SG on a new connection; raise NotSent or OutcomeUnknown on failure.

    ``ssl_context`` None: the default roots; connecting gives up after :data:`CONNECT_TIMEOUT`,
    waiting for the answer after ``response_timeout`` (per socket operation)."""
    host_header = host if port in (80, 443) else f"{host}:{port}"
    if scheme == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            host, port, timeout=CONNECT_TIMEOUT, context=ssl_context or ssl.create_default_context()
        )
    else:
        conn = http.client.HTTPConnection(host, port, timeout=CONNECT_TIMEOUT)
    try:
        try:
            conn.connect()
        except (OSError, http.client.HTTPException) as exc:
            raise NotSent(f"cannot connect to {host_header}: {exc}") from exc
        try:
            conn.putrequest("POST", path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", host_header)
            for name, value in headers:
                if name.lower() not in _SKIP_REQUEST:
                    conn.putheader(name, value)
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            if conn.sock is not None:
                conn.sock.settimeout(response_timeout)
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise OutcomeUnknown(f"connection to {host_header} lost after sending: {exc}") from exc
        kept = [(k, v) for k, v in response.getheaders() if k.lower() not in _SKIP_RESPONSE]
        return Reply(response.status, response.reason, kept, data)
    finally:
        conn.close()


def post_json(url: str, payload: Any, ssl_context: ssl.SSLContext | None = None,
              timeout: float = READ_TIMEOUT) -> Any:
    """POST ``payload`` as JSON to ``url`` (SG's API3 endpoint) and decode the JSON answer.

    For reads only (a failure raises; nobody re-sends): NotSent, OutcomeUnknown, BadStatus
    for an HTTP status of 400 or more, ValueError for an answer that is not JSON."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    headers = [("Content-Type", "application/json; charset=utf-8"), ("User-Agent", f"sgcache/{__version__}")]
    reply = send_once(scheme, parts.hostname or "", port, path, headers, json.dumps(payload).encode(),
                      ssl_context, response_timeout=timeout)
    if reply.status >= 400:
        raise BadStatus(f"HTTP {reply.status} {reply.reason}")
    return json.loads(reply.body)


def tls_context(insecure: bool, cafile: str | None) -> ssl.SSLContext:
    """Verify SG as mitmproxy does (``ssl_insecure``, ``ssl_verify_upstream_trusted_ca``):
    no check at all when ``insecure``, else the trusted CA file or the default roots."""
    if insecure:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=cafile or None)
