"""mitmproxy flows as the policies in :mod:`cache.proxy` see them, and the few places the addon
reaches into mitmproxy (script-loader logging, reverse-mode specs, a client connection's socket).

The mitmproxy side of the proxy lives in this package (:mod:`cache.mitm`): ``addons/sgcache.py``
assembles its addons; the policies they call stay mitmproxy-free in :mod:`cache.proxy`.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Sequence
from typing import Any

from mitmproxy import ctx, http
from mitmproxy.net.http import status_codes
from mitmproxy.proxy import mode_specs

from ..proxy.calls import Call
from ..proxy.replica import OneLineRefusal
from ..proxy.sending import Outgoing

log = logging.getLogger("sgcache")


def made_response(status: int, body: bytes, headers: dict[str, str]) -> http.Response:
    """The proxy's own answer as mitmproxy's response: ``headers`` and its Content-Length, the body
    as it is (what ``Response.make`` gives for a body without Content-Encoding, made directly: a
    hit's share of the event loop's time)."""
    fields = [(k.encode("utf-8", "surrogateescape"), v.encode("utf-8", "surrogateescape")) for k, v in headers.items()]
    fields.append((b"content-length", str(len(body)).encode()))
    now = time.time()
    return http.Response(b"HTTP/1.1", status, status_codes.RESPONSES.get(status, "").encode(),
                         http.Headers(fields), body, None, now, now)


def one_line_refusals() -> None:
    """A refused option (a bad sgcache_db, schema, site...) is one line in mitmdump's output, not a
    traceback: the script loader logs it through ``mitmproxy.addons.script``."""
    script_log = logging.getLogger("mitmproxy.addons.script")
    if not any(isinstance(f, OneLineRefusal) for f in script_log.filters):
        script_log.addFilter(OneLineRefusal())


def call_of(flow: http.HTTPFlow) -> Call:
    """The flow's request, as the policies in cache.proxy see it."""
    r = flow.request
    return Call(Outgoing(r.scheme, r.host, r.port, r.path, list(r.headers.items(multi=True)), r.raw_content or b""),
                flow.client_conn.id)


def body_size(flow: http.HTTPFlow) -> int:
    """The bytes of the flow's request and answer held in memory (streamed ones are not)."""
    size = len(flow.request.raw_content or b"")
    return size + (len(flow.response.raw_content or b"") if flow.response is not None else 0)


def declared_size(response: http.Response) -> int:
    """The answer's Content-Length (0 when it declares none)."""
    try:
        return int(response.headers.get("content-length", "0"))
    except ValueError:
        return 0


def form_of(request: http.Request) -> dict[str, str]:
    """The text fields of an urlencoded or multipart form (empty when it cannot be read)."""
    try:
        if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            return {k.decode("utf-8", "replace"): v.decode("utf-8", "replace")
                    for k, v in request.multipart_form.items() if len(v) <= 1024}
        return dict(request.urlencoded_form.items())
    except Exception:  # noqa: BLE001 - an unreadable form names no type: every type is marked
        log.debug("upload form not readable", exc_info=True)
        return {}


def reverse_targets(modes: Sequence[str]) -> list[tuple[str, str, int]]:
    """(scheme, host, port) of each reverse-proxy mode (``--mode reverse:https://site``)."""
    targets = []
    for text in modes:
        try:
            spec = mode_specs.ProxyMode.parse(text)
        except ValueError:
            continue  # mitmproxy refuses it itself
        if isinstance(spec, mode_specs.ReverseMode):
            targets.append((spec.scheme, spec.address[0], spec.address[1]))
    return targets


def one_host(request: http.Request) -> bool:
    """Exactly one name SG's front end routes by: a Host header (or HTTP/2's ``:authority``), and
    not two (HTTP/2 lets a client send ``host`` twice beside ``:authority``). A request naming no
    host (HTTP/1.0 in absolute form: mitmproxy sends it on in origin form, without one) or two
    may go to whichever site SG's front end picks, so it is not taken for the site's."""
    return request.host_header is not None and len(request.headers.get_all("host")) <= 1


#: Headers a front end may take a request's host from instead of ``Host`` (Rails does, from
#: X-Forwarded-Host, when it trusts the proxy in front of it).
FORWARDED_HOST_HEADERS = frozenset({b"x-forwarded-host", b"x-original-host", b"x-host"})


def forwarded_hosts(request: http.Request) -> list[str]:
    """The names a front end may route ``request`` by besides its Host header: those of
    X-Forwarded-Host (a list), X-Original-Host, X-Host, and the ``host=`` of RFC 7239's Forwarded."""
    names: list[str] = []
    for key, value in request.headers.fields:
        key = key.lower()
        if key in FORWARDED_HOST_HEADERS:
            names.extend(name.strip() for name in value.decode("latin-1").split(","))
        elif key == b"forwarded":
            for pair in value.decode("latin-1").replace(",", ";").split(";"):
                name, sep, given = pair.partition("=")
                if sep and name.strip().lower() == "host":
                    names.append(given.strip().strip('"'))
    return names


def peer_of(flow: http.HTTPFlow) -> str:
    """The client's address, for the log."""
    peer = flow.client_conn.peername
    return str(peer[0]) if peer else "?"


#: The proxy modes in which a client names each destination itself: regular (an HTTP proxy) and SOCKS5.
CLIENT_CHOSEN_MODES = frozenset({"RegularMode", "Socks5Mode"})


def client_chose_destination(client: Any) -> bool:
    """Whether the client chose the destination (regular or SOCKS5 proxy mode): the relay policy applies."""
    return type(getattr(client, "proxy_mode", None)).__name__ in CLIENT_CHOSEN_MODES


def transport_writer(client_id: str, server: Any = None) -> Any:
    """The asyncio writer of a client connection (or of one of its ``server`` connections).

    mitmproxy internals: no hook exposes the sockets, so this reaches into the proxyserver
    addon's connection handlers. The one place that does; it raises when they moved, and
    every caller fails soft.
    """
    handler = ctx.master.addons.get("proxyserver").connections.get(client_id)
    return handler.transports[handler.client if server is None else server].writer


def quick_ack(client_id: str) -> None:
    """Set TCP_QUICKACK on a client connection's socket (Linux): a pending ACK goes out now."""
    option = getattr(socket, "TCP_QUICKACK", None)
    if option is None:
        return
    try:
        transport_writer(client_id).get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, option, 1)
    except Exception:  # noqa: BLE001 - mitmproxy internals moved: only latency is lost
        log.debug("TCP_QUICKACK not set", exc_info=True)
