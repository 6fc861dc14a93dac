"""The proxy's one HTTP client for SG: a write sent exactly once; rows read back after a write.

shotgun_api3 re-sends a request that got HTTP 502 or 504, and httplib2 re-sends once on
a connection that closed without an answer. A proxy that relays a write and loses SG's
connection after sending it must therefore answer with something that is neither: an
error in SG's envelope saying the write may have been applied. This module sends a
write once and tells apart "not sent" from "sent, outcome unknown".

Connections are kept alive between writes (:class:`Pool`: a few per site, for a short idle
time; against a hosted https site a new one costs a TLS handshake). A kept connection is
checked just before a request is written on it: one SG closed (or that holds stray bytes)
is dropped and another taken, or a new one made; that is the only retry, and no byte of the
request has been written then. Once any may have been, a failure is "outcome unknown",
whatever connection carried it.

:func:`post_json` reads rows back with the same client (a read: its failure only leaves the
rows to the ingester). TLS is verified as mitmproxy verifies SG (:func:`tls_context`).
"""

from __future__ import annotations

import http.client
import json
import logging
import select
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
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
#: Idle connections kept per site, and for how long (well under the usual server keep-alive
#: timeouts of 60 s and more, so SG rarely closes one just as a write goes out on it).
POOL_SIZE = 8
POOL_IDLE_SECONDS = 15.0


class NotSent(Exception):
    """SG could not be reached: nothing of the request left the proxy."""


class Unsendable(Exception):
    """The request cannot be written as HTTP (a path that is not ASCII, a bad header): nothing
    left the proxy, and SG is not down."""


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


class Pool:
    """Idle keep-alive connections to SG, per (scheme, host, port, TLS context): at most
    ``size`` each, none older than ``idle_seconds``. Thread-safe."""

    def __init__(self, size: int = POOL_SIZE, idle_seconds: float = POOL_IDLE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.size, self.idle_seconds, self._clock = size, idle_seconds, clock
        self._idle: dict[tuple[object, ...], list[tuple[float, http.client.HTTPConnection]]] = {}
        self._lock = threading.Lock()
        self.made = 0  # connections opened (for tests and the log)

    def take(self, key: tuple[object, ...]) -> http.client.HTTPConnection | None:
        """The most recently used idle connection still open, or None (stale ones are closed)."""
        while True:
            with self._lock:
                idle = self._idle.get(key)
                if not idle:
                    return None
                since, conn = idle.pop()
            if self._clock() - since < self.idle_seconds and _still_open(conn):
                return conn
            conn.close()

    def give(self, key: tuple[object, ...], conn: http.client.HTTPConnection) -> None:
        """Keep ``conn`` (its last answer read whole) for the next request, or close it."""
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < self.size:
                idle.append((self._clock(), conn))
                return
        conn.close()

    def close(self) -> None:
        """Close every idle connection."""
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for _since, conn in conns:
                conn.close()


def _still_open(conn: http.client.HTTPConnection) -> bool:
    """Whether an idle connection can carry a request: nothing to read on it (a peer's close or
    stray bytes make it readable)."""
    sock = conn.sock
    if sock is None:
        return False
    try:
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return False
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


def send_once(
    scheme: str,
    host: str,
    port: int,
    path: str,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    ssl_context: ssl.SSLContext | None = None,
    response_timeout: float = RESPONSE_TIMEOUT,
    pool: Pool | None = None,
) -> Reply:
    """POST ``body`` to SG once; raise NotSent or OutcomeUnknown on failure.

    ``ssl_context`` None: the default roots; connecting gives up after :data:`CONNECT_TIMEOUT`,
    waiting for the answer after ``response_timeout`` (per socket operation). With ``pool``, a
    kept connection is used when one is open, and the connection is kept after a whole answer."""
    host_header = host if port in (80, 443) else f"{host}:{port}"
    key = (scheme, host, port, ssl_context)  # the context itself: a connection is reused only under it
    conn = pool.take(key) if pool is not None else None
    if conn is None:
        if scheme == "https":
            conn = http.client.HTTPSConnection(
                host, port, timeout=CONNECT_TIMEOUT, context=ssl_context or ssl.create_default_context()
            )
        else:
            conn = http.client.HTTPConnection(host, port, timeout=CONNECT_TIMEOUT)
        try:
            conn.connect()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise NotSent(f"cannot connect to {host_header}: {exc}") from exc
        if pool is not None:
            pool.made += 1
    keep = False
    try:
        try:  # only buffered: nothing has left yet
            conn.putrequest("POST", path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", host_header)
            for name, value in headers:
                if name.lower() not in _SKIP_REQUEST:  # the client's bytes, as mitmproxy decoded them
                    conn.putheader(_as_sent(name), _as_sent(value))
            conn.putheader("Content-Length", str(len(body)))
        except (ValueError, http.client.HTTPException) as exc:  # UnicodeEncodeError is a ValueError
            raise Unsendable(f"the request cannot be sent as HTTP: {exc}") from exc
        # from here on, bytes of the request may have left: never sent again
        try:
            conn.endheaders(body)
            if conn.sock is not None:
                conn.sock.settimeout(response_timeout)
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise OutcomeUnknown(f"connection to {host_header} lost after sending: {exc}") from exc
        kept = [(k, v) for k, v in response.getheaders() if k.lower() not in _SKIP_RESPONSE]
        keep = pool is not None and not response.will_close
        return Reply(response.status, response.reason, kept, data)
    finally:
        if keep:
            assert pool is not None
            if conn.sock is not None:
                conn.sock.settimeout(CONNECT_TIMEOUT)
            pool.give(key, conn)
        else:
            conn.close()


def _as_sent(text: str) -> bytes:
    """A header's name or value as the client sent it (mitmproxy decodes them as UTF-8, keeping
    any other byte as a surrogate: http.client would encode latin-1, or fail)."""
    return text.encode("utf-8", "surrogateescape")


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
