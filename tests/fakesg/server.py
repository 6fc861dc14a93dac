"""HTTP front end of the fake SG site: ``POST /api3/json``, a little of the REST API under ``/api/v1``
(tests/fakesg/rest.py), the file endpoints (uploads, storage, downloads: tests/fakesg/files.py), and
an echo for every other request.

Malformed JSON bodies on /api3/json get HTTP 200 with an SG error envelope (error_code 103): the client only
reads envelopes from 200 replies, so this surfaces as ``shotgun_api3.Fault`` with a readable message rather
than a bare ProtocolError.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import re
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from . import rest
from .site import ERR_BAD_REQUEST, FakeSite

log = logging.getLogger(__name__)

API_PATH = "/api3/json"
JSON_CONTENT_TYPE = "application/json; charset=utf-8"


class _Handler(BaseHTTPRequestHandler):
    """One request handler; ``server.site`` is the FakeSite."""

    protocol_version = "HTTP/1.1"  # keep-alive, like SG behind its load balancer
    disable_nagle_algorithm = True  # else every reply stalls ~40 ms on delayed ACK
    wbufsize = -1  # buffered writes: headers and body leave in one segment (flushed by the base class)
    server_version = "FakeSG/1.0"

    @property
    def site(self) -> FakeSite:
        hostless = self.server.hostless_site  # type: ignore[attr-defined]
        host = self.headers.get("Host")
        if hostless is not None and host is None:
            return hostless  # a front end's default virtual host answers a request naming no host
        named = self.server.named_sites.get((host or "").partition(":")[0].lower())  # type: ignore[attr-defined]
        if named is not None:
            return named  # another tenant's virtual host on the same front end
        return self.server.site  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base class signature
        log.debug("%s " + format, self.address_string(), *args)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, status: int, payload: Any, content_type: str = JSON_CONTENT_TYPE) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        body = self._body()
        path = self.path
        self.site.record_raw(self.command, path, {k.lower(): v for k, v in self.headers.items()}, body)
        route = path.split("?", 1)[0]
        if self.server.lenient_api3 and self.command == "POST":  # type: ignore[attr-defined]
            # a lenient router (Rails-style): a trailing slash, any letter case; gzip bodies inflated
            route = route.rstrip("/").lower()
            if route == API_PATH and self.headers.get("Content-Encoding", "").strip().lower() == "gzip":
                body = gzip.decompress(body)
        if self.command == "POST" and route == API_PATH:
            request, answer = decode_call(body, self.server.first_key_wins)  # type: ignore[attr-defined]
            if request is None:
                self._send(200, answer)
                return
            if self.server.latency > 0:  # type: ignore[attr-defined]
                time.sleep(self.server.latency)  # type: ignore[attr-defined] - a hosted site's round trip
            answer = self.site.call(request["method_name"], request.get("params"))
            hold = self.server.take_hold(request["method_name"])  # type: ignore[attr-defined]
            if hold is not None:
                hold.wait(60)  # applied; the answer waits for the test (test hook)
            if self.server.take_drop():  # type: ignore[attr-defined]
                # applied, but the answer never leaves: the connection breaks (test hook)
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self._send(200, answer)
            return
        headers = {k.lower(): v for k, v in self.headers.items()}
        rest_answer = rest.handle(self.site, self.command, path, headers, body)
        if rest_answer is not None:
            status, payload = rest_answer
            if payload is None:
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self._send(status, payload)
            return
        file_path = path
        if self.server.lenient_api3:  # type: ignore[attr-defined]
            file_path = re.sub(r"/+", "/", path)  # Rails squeezes slashes before routing (//upload/...)
        files = self.site.files.handle(self.command, file_path, {k.lower(): v for k, v in self.headers.items()}, body)
        if files is not None:
            status, headers, data = files
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            return
        self._send(200, {"fake_sg_echo": {"method": self.command, "path": path,
                                          "body_sha256": hashlib.sha256(body).hexdigest()}})

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _handle


def _first_wins(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object whose repeated keys keep their first value (as some JSON parsers do)."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        obj.setdefault(key, value)
    return obj


def decode_call(body: bytes, first_key_wins: bool = False) -> tuple[dict[str, Any] | None, Any]:
    """An API3 body as (request, None), or (None, SG's error envelope for a body it cannot read).
    ``first_key_wins``: a key repeated in an object keeps its first value (else its last, Python's)."""
    try:
        request = json.loads(body.decode("utf-8"), object_pairs_hook=_first_wins if first_key_wins else None)
        if not isinstance(request, dict) or not isinstance(request.get("method_name"), str):
            raise ValueError("expected an object with method_name")
    except (ValueError, UnicodeDecodeError) as exc:
        return None, {"exception": True, "error_code": ERR_BAD_REQUEST, "message": f"Invalid request body: {exc}"}
    return request, None


def answer_in_process(site: FakeSite, body: bytes) -> bytes | None:
    """What the server would send for an API3 ``body`` (the JSON bytes), without HTTP; None where its
    handler would fail and drop the connection (a body the fake cannot answer: nested too deep, a
    value of the wrong type where it does not check)."""
    site.record_raw("POST", API_PATH, {}, body)
    try:
        request, answer = decode_call(body)
        if request is not None:
            answer = site.call(request["method_name"], request.get("params"))
        return json.dumps(answer, ensure_ascii=False).encode("utf-8")
    except Exception:  # noqa: BLE001 - over HTTP the handler's thread dies and the connection drops
        return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # The listen backlog. socketserver's default of 5 overflows when many clients open connections at
    # once (16 writers through the proxy, each write on a fresh connection, beside the proxy's relayed
    # reads and the ingester), all in the test process, whose accept loop competes for the GIL: Linux
    # then drops SYNs (connect times out) and handshake ACKs, and a connection the client saw open can
    # be reset after its request was sent ("the connection to SG broke after the update was sent").
    # Deeper than any test's concurrent connections, it never overflows on loopback.
    request_queue_size = 1024

    def __init__(self, addr: tuple[str, int], site: FakeSite, ssl_context: ssl.SSLContext | None,
                 latency: float = 0.0, lenient_api3: bool = False) -> None:
        self.site = site
        self.hostless_site: FakeSite | None = None
        self.named_sites: dict[str, FakeSite] = {}
        self.first_key_wins = False
        self.latency = latency
        self.lenient_api3 = lenient_api3
        self.ssl_context = ssl_context
        self.connections: set[socket.socket] = set()
        self._conn_lock = threading.Lock()
        self.drop_answers = 0
        self.holds: list[tuple[str, threading.Event]] = []
        super().__init__(addr, _Handler)

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = super().get_request()
        if self.ssl_context is not None:
            # The handshake runs on the handler thread (first read), not in the accept loop.
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        with self._conn_lock:
            self.connections.add(sock)
        return sock, addr

    def shutdown_request(self, request: Any) -> None:
        with self._conn_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def take_drop(self) -> bool:
        """True (once per count) when the next API3 answer is to be dropped."""
        with self._conn_lock:
            if self.drop_answers > 0:
                self.drop_answers -= 1
                return True
            return False

    def take_hold(self, method: str) -> threading.Event | None:
        """The event the answer to this API3 call waits for, when a test asked to hold it."""
        with self._conn_lock:
            for i, (held, release) in enumerate(self.holds):
                if held == method:
                    del self.holds[i]
                    return release
            return None

    def drop_connections(self) -> None:
        """Cut every open (keep-alive) connection, as a site going down would."""
        with self._conn_lock:
            conns = list(self.connections)
            self.connections.clear()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class FakeSGServer:
    """Serve a :class:`FakeSite` over HTTP(S) on a background thread.

    ``port=0`` picks a free port at the first :meth:`start`; later restarts reuse it, so a test can take
    the site down (:meth:`stop_listening`) and bring it back (:meth:`start`) at the same URL.
    ``latency``: seconds every API3 call waits before it is answered (a hosted site's round trip; set
    before :meth:`start`). ``lenient_api3`` (set before :meth:`start`): also answer API3 calls posted
    to ``/api3/json/`` or in another letter case, and inflate gzip request bodies, as a lenient router
    might (by default only ``/api3/json``, with or without a query string, and plain bodies); and
    route the file endpoints with doubled slashes squeezed (``//upload/upload_file``), as Rails does.
    """

    def __init__(self, site: FakeSite, host: str = "127.0.0.1", port: int = 0,
                 tls_cert: str | None = None, tls_key: str | None = None, latency: float = 0.0,
                 lenient_api3: bool = False) -> None:
        self.site = site
        self.latency = latency
        self.lenient_api3 = lenient_api3
        self.host = host
        self.port = port
        self.tls_cert = tls_cert
        self.tls_key = tls_key
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"

    @property
    def url(self) -> str:
        """Base URL for ``shotgun_api3.Shotgun(url, ...)``."""
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def listening(self) -> bool:
        return self._httpd is not None

    def start(self) -> FakeSGServer:
        """Bind and serve (no-op if already serving)."""
        if self._httpd is not None:
            return self
        ctx = None
        if self.tls_cert:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(self.tls_cert, self.tls_key)
        self._httpd = _Server((self.host, self.port), self.site, ctx, self.latency, self.lenient_api3)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name=f"fakesg-{self.port}",
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        log.info("fake SG serving on %s", self.url)
        return self

    def route_hostless_to(self, site: FakeSite | None) -> None:
        """Answer requests without a Host header as ``site`` (a front end whose default virtual
        host is another site, as nginx's ``default_server``); None: as the server's own site."""
        assert self._httpd is not None, "server not started"
        self._httpd.hostless_site = site

    def route_host_to(self, name: str, site: FakeSite | None) -> None:
        """Answer requests whose Host header names ``name`` (any port) as ``site``, another tenant of
        the same front end; None: as the server's own site again."""
        assert self._httpd is not None, "server not started"
        if site is None:
            self._httpd.named_sites.pop(name.lower(), None)
        else:
            self._httpd.named_sites[name.lower()] = site

    def take_first_duplicate_key(self, on: bool = True) -> None:
        """Decode an API3 body whose object repeats a key with the key's first value (``on``), as a
        JSON parser may that is not Python's (which, as the proxy's, takes the last)."""
        assert self._httpd is not None, "server not started"
        self._httpd.first_key_wins = on

    def drop_next_answers(self, n: int = 1) -> None:
        """Apply the next ``n`` API3 calls but break the connection instead of answering."""
        assert self._httpd is not None, "server not started"
        with self._httpd._conn_lock:
            self._httpd.drop_answers = n

    def hold_next_answer(self, method: str) -> threading.Event:
        """Apply the next API3 call of ``method`` at once but send its answer only once the event
        returned is set (two writes whose answers cross on the way back)."""
        assert self._httpd is not None, "server not started"
        release = threading.Event()
        with self._httpd._conn_lock:
            self._httpd.holds.append((method, release))
        return release

    def stop_listening(self) -> None:
        """Close the listening socket and cut open connections (SG goes down); :meth:`start` brings it
        back on the same port."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        self._httpd.drop_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None
        log.info("fake SG on port %s stopped", self.port)

    def stop(self) -> None:
        """Stop serving."""
        self.stop_listening()

    def __enter__(self) -> FakeSGServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
