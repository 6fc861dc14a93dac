"""The status server: ``/metrics`` (Prometheus), ``/healthz`` (for load balancers) and ``/`` (the
status page), on a small thread-based HTTP server of its own (never on mitmproxy's event loop).

``/healthz`` answers 200 only while the replica is reachable and fresh (reads are being served),
else 503; the body says why in one line. ``HEAD`` is answered like ``GET``, without the body.

It runs in the proxy's own process, a thread a connection: a connection idle for
:data:`IDLE_SECONDS` is closed, and past :data:`MAX_CONNECTIONS` at once a new one is closed at
once, so clients that connect and send nothing cannot fill the process with threads. The
sidecars' ``--metrics`` server (:func:`serve_metrics`) is bounded the same way.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .metrics import parse_hostport
from .status import ReplicaStatus

log = logging.getLogger("sgcache.ops")

#: A connection that sends nothing for this long is closed (a scrape takes milliseconds).
IDLE_SECONDS = 10.0
#: Connections served at once; more are closed as they arrive.
MAX_CONNECTIONS = 32


class StatusServer:
    """Serves ``registry``, ``health()`` and ``page()`` on ``HOST:PORT`` (port 0: any free port)."""

    def __init__(self, hostport: str, registry: CollectorRegistry, health: Callable[[], ReplicaStatus],
                 page: Callable[[], str]) -> None:
        self.host, port = parse_hostport(hostport)
        self.registry, self.health, self.page = registry, health, page
        self.httpd = _Server((self.host, port), _Handler)
        self.httpd.owner = self
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> StatusServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="sgcache-status", daemon=True)
        self._thread.start()
        log.info("sgcache: status page at %s (metrics at %smetrics, health at %shealthz)", self.url, self.url,
                 self.url)
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)


def serve_metrics(host: str, port: int, registry: CollectorRegistry) -> ThreadingHTTPServer:
    """Serve ``registry`` on every path of ``http://HOST:PORT`` (as prometheus_client's own server
    does) in a daemon thread, with the status server's bounds; returns the running server."""
    httpd = _Server((host, port), _MetricsHandler)
    httpd.registry = registry
    threading.Thread(target=httpd.serve_forever, name="sgcache-metrics", daemon=True).start()
    return httpd


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: StatusServer
    registry: CollectorRegistry  # what _MetricsHandler serves

    def __init__(self, address: tuple[str, int], handler: Any) -> None:
        if ":" in address[0]:
            import socket
            self.address_family = socket.AF_INET6
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            log.debug("status: %s refused, %d connections open", client_address, MAX_CONNECTIONS)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "sgcache-status"
    timeout = IDLE_SECONDS

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        owner = self.server.owner
        path = self.path.split("?", 1)[0]
        try:
            if path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(owner.registry))
            elif path == "/healthz":
                status = owner.health()
                text = "ok: serving reads" if status.healthy else status.problem or "unhealthy"
                self._send(200 if status.healthy else 503, "text/plain; charset=utf-8", f"{text}\n".encode())
            elif path in ("/", "/index.html"):
                self._send(200, "text/html; charset=utf-8", owner.page().encode())
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found: try /, /metrics or /healthz\n")
        except Exception:  # noqa: BLE001 - the status server never takes the proxy down
            log.warning("sgcache: status request %s failed", path, exc_info=True)
            self._send(500, "text/plain; charset=utf-8", b"internal error (see the proxy's log)\n")

    def do_HEAD(self) -> None:  # noqa: N802
        self._head_only = True
        self.do_GET()

    def _send(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if not getattr(self, "_head_only", False):
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the http.server API
        log.debug("status %s %s", self.address_string(), format % args)


class _MetricsHandler(BaseHTTPRequestHandler):
    """``/metrics`` of a sidecar (the ingester, the scanner): the registry on any path."""

    server: _Server
    server_version = "sgcache-metrics"

    def setup(self) -> None:
        self.timeout = IDLE_SECONDS  # read per connection (the socket's timeout): idle ones close
        super().setup()

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        body = generate_latest(self.server.registry)
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the http.server API
        log.debug("metrics %s %s", self.address_string(), format % args)
