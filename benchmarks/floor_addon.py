"""The floor: what any mitmproxy addon pays to answer an API3 read from memory.

    mitmdump -s benchmarks/floor_addon.py

Each ``read`` body passes to SG once; SG's answer is remembered by the request's exact bytes
and replayed to every later identical request. No checks at all (not for real use): the
cost left is mitmproxy's own plus a dict lookup, the figure sgcache's hits are measured against.
"""

from __future__ import annotations

import socket

from mitmproxy import ctx, http


class Floor:
    def __init__(self) -> None:
        self.answers: dict[bytes, tuple[bytes, str]] = {}

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # the same quick ACK as sgcache (shotgun_api3 sends headers and body in two segments)
        if flow.request.path.endswith("/api3/json"):
            handler = ctx.master.addons.get("proxyserver").connections.get(flow.client_conn.id)
            sock = handler.transports[handler.client].writer.get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)

    def request(self, flow: http.HTTPFlow) -> None:
        known = self.answers.get(flow.request.content or b"")
        if known is not None:
            flow.response = http.Response.make(200, known[0], {"Content-Type": known[1]})

    def response(self, flow: http.HTTPFlow) -> None:
        body = flow.request.content or b""
        if flow.response and flow.response.status_code == 200 and b'"method_name": "read"' in body[:64]:
            self.answers[body] = (flow.response.content or b"", flow.response.headers.get("content-type", ""))


addons = [Floor()]
