"""Sending a write to SG exactly once.

shotgun_api3 re-sends a request that got HTTP 502 or 504, and httplib2 re-sends once on
a connection that closed without an answer. A proxy that relays a write and loses SG's
connection after sending it must therefore answer with something that is neither: an
error in SG's envelope saying the write may have been applied. This module sends a
write on a fresh connection (never a reused one, which may have gone stale after the
bytes left) and tells apart "not sent" from "sent, outcome unknown".
"""

from __future__ import annotations

import http.client
import logging
import ssl
from collections.abc import Iterable
from dataclasses import dataclass

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


class NotSent(Exception):
    """SG could not be reached: nothing of the request left the proxy."""


class OutcomeUnknown(Exception):
    """The request was sent but no complete answer came back: it may have been applied."""


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
) -> Reply:
    """POST ``body`` to SG on a new connection; raise NotSent or OutcomeUnknown on failure."""
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
                conn.sock.settimeout(RESPONSE_TIMEOUT)
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise OutcomeUnknown(f"connection to {host_header} lost after sending: {exc}") from exc
        kept = [(k, v) for k, v in response.getheaders() if k.lower() not in _SKIP_RESPONSE]
        return Reply(response.status, response.reason, kept, data)
    finally:
        conn.close()
