"""One client's connection must never switch the proxy to offline answers (and refuse every other
client's writes): a real mitmdump, raw sockets for the hostile client, a real shotgun_api3 client
for the others. SG is up, but in the last test."""

from __future__ import annotations

import json
import socket
import ssl
import struct
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import shotgun_api3

from .fakesg import FakeSite
from .fakesg import server as fakesg_server
from .proxyharness import Proxy
from .rig import Rig

#: A read with credentials SG refuses: what any client reaching the proxy can send.
READ = json.dumps({"method_name": "read", "params": [
    {"script_name": "nobody", "script_key": "nothing"},
    {"type": "Shot", "filters": {"logical_operator": "and", "conditions": []}, "return_fields": ["code"]},
]}).encode()


def api3_post(host: str, target: str = "/api3/json") -> bytes:
    return (f"POST {target} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(READ)}\r\n\r\n").encode() + READ


def read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def raw_post(port: int, target: str, host: str, content_type: str, body: bytes, extra: str = "") -> bytes:
    """POST ``body`` through the proxy at ``port`` as written (``extra``: more header lines, each
    ending in CRLF; the connection closes after it): the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall((f"POST {target} HTTP/1.1\r\nHost: {host}\r\n{extra}Content-Type: {content_type}\r\n"
                      f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def hang_up_after_a_read(proxy: Proxy, site_url: str) -> None:
    """Send a read through the proxy and reset the connection at once, without waiting for SG."""
    assert proxy.port is not None
    host = site_url.split("://", 1)[1]
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=15) as sock:
        sock.sendall(api3_post(host, f"{site_url}/api3/json"))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close


def writes_go_to_sg(rig: Rig) -> None:
    """Another client's write reaches SG (not refused as "cannot be reached")."""
    sg = rig.client()
    project = sg.find_one("Project", [])
    assert sg.update("Project", project["id"], {"name": "still up"})["name"] == "still up"


def test_a_client_hanging_up_on_its_read_does_not_put_sg_offline(tmp_path: Path, db_url: str) -> None:
    """Before: mitmproxy reported "Client disconnected." for a read whose connection to SG was not
    made yet, the proxy took it for SG being unreachable, and refused everyone's writes for 10 s."""
    with Rig(tmp_path, db_url) as rig:
        assert rig.proxy is not None
        rig.client().find_one("Project", [])
        for _ in range(10):
            hang_up_after_a_read(rig.proxy, rig.url)
        time.sleep(0.3)
        assert "unreachable" not in rig.proxy.output()
        writes_go_to_sg(rig)


def test_a_clients_tls_server_name_does_not_put_sg_offline(tmp_path: Path, db_url: str) -> None:
    """A client tunnels to the site and says another name in its TLS handshake (SNI). Before:
    mitmproxy asked SG for that name, SG's certificate did not match it, and the failed handshake
    put the site offline for every client (writes refused, "cannot be reached")."""
    with Rig(tmp_path, db_url, tls=True, proxy=False) as rig:
        proxy = rig.start_proxy(["sgcache_max_lag=0"])
        assert proxy.port is not None
        rig.client().find_one("Project", [])
        target = f"localhost:{rig.server.port}"
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=15) as raw:
            raw.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            assert read_head(raw).startswith(b"HTTP/1.1 200")
            context = ssl.create_default_context(cafile=str(proxy.ca_cert))
            context.check_hostname = False  # mitmproxy's certificate names what the client said
            with context.wrap_socket(raw, server_hostname="elsewhere.example") as tls:
                tls.sendall(api3_post(target))
                answer = read_head(tls)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]  # SG's own answer (an auth error)
        assert b"X-SGCache: pass; reason=auth-unverified" in answer
        assert "unreachable" not in proxy.output()
        writes_go_to_sg(rig)


def test_a_connection_sg_refuses_while_the_client_waits_is_still_an_outage(tmp_path: Path, db_url: str) -> None:
    """The other side: SG refusing the connection of a read still puts the site offline at once."""
    with Rig(tmp_path, db_url) as rig:
        assert rig.proxy is not None
        rig.client().find_one("Project", [])
        rig.server.stop_listening()
        try:
            sg = rig.client()
            # a new client connection: its first call (info) gets mitmproxy's 502 (connection refused),
            # the proxy is offline from then on, and shotgun_api3's re-send is answered from the replica
            assert sg.find("Shot", [["code", "is", "sh010"]], ["code"])[0]["code"] == "sh010"
            assert rig.proxy.lines_with("unreachable"), "a refused connection to SG is an outage"
        finally:
            rig.server.start()


def test_an_upload_form_sg_refuses_does_not_turn_caching_off(tmp_path: Path, db_url: str) -> None:
    """A client without credentials posts upload forms to the site; SG refuses them ("0..."), so
    nothing changed at SG. Before: every cached type was marked pending all the same, and every
    client's reads passed (pending-write) until an ingester's poll cleared them (without one, for good)."""
    with Rig(tmp_path, db_url) as rig:
        assert rig.proxy is not None
        sg = rig.client()
        query = ("Shot", [["code", "is", "sh010"]], ["code"])
        sg.find(*query)
        before = rig.reads()
        assert sg.find(*query) and rig.reads() == before, "a hit to begin with"
        form = b"script_name=nobody&script_key=nothing&entity_id=1&field_name=image"
        host = rig.url.split("://", 1)[1]
        assert rig.proxy.port is not None
        answer = raw_post(rig.proxy.port, f"{rig.url}/upload/upload_file", host, "application/x-www-form-urlencoded",
                          form)
        assert answer.startswith(b"HTTP/1.1 200") and answer.split(b"\r\n\r\n", 1)[1].startswith(b"0"), answer
        assert sg.find(*query) and rig.reads() == before, "the refused upload turned caching off"


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/upload/upload_file", b"script_name=nobody&script_key=nothing&entity_type=Shot&entity_id=1"),
    ("PUT", "/api/v1/entity/Shot/1", b'{"code": "x"}'),
])
def test_abandoned_uploads_and_rest_writes_do_not_turn_caching_off(tmp_path: Path, db_url: str, method: str,
                                                                   path: str, body: bytes) -> None:
    """A client without credentials sends upload forms or REST writes and hangs up (a reset) before
    SG answers. Before: each failed flow was taken for a write SG may have applied, every cached type
    was marked pending, and every client's reads passed until an ingester's poll."""
    with Rig(tmp_path, db_url) as rig:
        assert rig.proxy is not None and rig.proxy.port is not None
        sg = rig.client()
        query = ("Shot", [["code", "is", "sh010"]], ["code"])
        sg.find(*query)
        host = rig.url.split("://", 1)[1]
        request = (f"{method} {rig.url}{path} HTTP/1.1\r\nHost: {host}\r\n"
                   f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", rig.proxy.port), timeout=15) as sock:
                sock.sendall(request)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close
        time.sleep(0.5)
        before = rig.reads()
        assert sg.find(*query) and rig.reads() == before, "an abandoned request turned caching off"


def test_long_text_filters_do_not_open_the_database_breaker(tmp_path: Path, db_url: str) -> None:
    """A client SG accepted sends reads with a 60,000-character ``contains``. SQLite refuses a LIKE
    pattern that long ("LIKE or GLOB pattern too complex"): before, that counted as the database
    failing, and three such reads opened the breaker: every client's reads passed db-backoff."""
    with Rig(tmp_path, db_url) as rig:
        sg = rig.client()
        sg.find_one("Project", [])
        for relation in ("contains", "not_contains", "ends_with", "contains"):  # consecutive: SG answers them
            assert sg.find("Shot", [["code", relation, "x" * 60_000]], ["code"]) == \
                rig.direct().find("Shot", [["code", relation, "x" * 60_000]], ["code"])
        before = rig.reads()
        assert sg.find("Shot", [["code", "is", "sh010"]], ["code"])
        assert rig.reads() == before, sg.info()["sgcache"]["passes"]


@pytest.fixture
def routes_by_request_line(monkeypatch: pytest.MonkeyPatch) -> dict[str, FakeSite]:
    """Make the fake SG a shared front end that routes a request whose request line is absolute
    (``POST http://tenant/api3/json``) to the tenant it names, as RFC 9112 has an origin server do
    (nginx picks its virtual host so): the returned dict maps such names to their sites."""
    tenants: dict[str, FakeSite] = {}
    plain_site, plain_handle = fakesg_server._Handler.site, fakesg_server._Handler._handle

    def site(self: Any) -> FakeSite:
        return getattr(self, "tenant", None) or plain_site.fget(self)  # type: ignore[attr-defined]

    def handle(self: Any) -> None:
        target = urllib.parse.urlsplit(self.path)
        self.tenant = tenants.get(target.netloc) if target.scheme else None
        if target.scheme:
            self.path = target.path
        plain_handle(self)

    monkeypatch.setattr(fakesg_server._Handler, "site", property(site))
    monkeypatch.setattr(fakesg_server._Handler, "do_POST", handle)
    return tenants


def test_a_request_line_naming_another_tenant_never_verifies_a_credential_for_the_site(
        tmp_path: Path, db_url: str, routes_by_request_line: dict[str, FakeSite]) -> None:
    """Reverse mode: mitmproxy sends the target an absolute-form request line as the client wrote
    it (only the Host header is rewritten). A client owning a script at another tenant of the same
    front end posted ``POST http://other-tenant/api3/json`` with that script's key: the proxy took
    it for the site's (host, port and Host header are the target's), the other tenant accepted the
    key, and the proxy then served that key the site's replica, a site where it does not exist."""
    other = FakeSite.basic()
    other.add_script("intruder", "ik-other-tenant")
    routes_by_request_line["other-tenant.example"] = other
    with Rig(tmp_path, db_url, mode="reverse") as rig:
        assert rig.proxy is not None and rig.proxy.port is not None
        body = json.dumps({"method_name": "read", "params": [
            {"script_name": "intruder", "script_key": "ik-other-tenant"},
            {"type": "Project", "filters": {"logical_operator": "and", "conditions": []}, "return_fields": ["name"]},
        ]}).encode()
        answer = raw_post(rig.proxy.port, "http://other-tenant.example/api3/json", f"127.0.0.1:{rig.proxy.port}",
                          "application/json", body)
        assert b'"results"' in answer, answer  # the other tenant's answer, relayed
        assert b"X-SGCache: pass; reason=other-site" in answer, answer
        intruder = rig.client(script_name="intruder", api_key="ik-other-tenant")
        with pytest.raises(shotgun_api3.AuthenticationFault):
            intruder.find("Shot", [], ["code"])  # the site itself does not know the script


@pytest.mark.parametrize("header", ["X-Forwarded-Host: other-tenant.example",
                                    "Forwarded: for=10.0.0.1;host=other-tenant.example;proto=https",
                                    "X-Original-Host: other-tenant.example", "X-Host: other-tenant.example"])
def test_a_forwarded_host_naming_another_tenant_is_not_the_sites_request(tmp_path: Path, db_url: str,
                                                                         header: str) -> None:
    """A front end (Rails among them) may take the tenant from a forwarded-host header rather than
    from Host: a request naming another tenant there is not taken for the site's (never a hit,
    never verifying a credential for it), as with another Host header."""
    from .rig import KEY, SCRIPT
    with Rig(tmp_path, db_url) as rig:
        assert rig.proxy is not None and rig.proxy.port is not None
        rig.client().find("Shot", [], ["code"])  # the credential is the site's, verified
        body = json.dumps({"method_name": "read", "params": [
            {"script_name": SCRIPT, "script_key": KEY},
            {"type": "Shot", "filters": {"logical_operator": "and", "conditions": []}, "return_fields": ["code"],
             "paging": {"entities_per_page": 500, "current_page": 1}, "return_only": "active"},
        ]}).encode()
        host = rig.url.split("://", 1)[1]

        def sent(extra: str) -> bytes:
            assert rig.proxy is not None and rig.proxy.port is not None
            return raw_post(rig.proxy.port, f"{rig.url}/api3/json", host, "application/json", body, extra)

        control = sent("")
        assert b"X-SGCache: hit" in control, control.split(b"\r\n\r\n")[0]
        assert b"X-SGCache: pass; reason=other-site" in sent(header + "\r\n")
        # the site's own name there is the site's request
        assert b"X-SGCache: hit" in sent(f"{header.split(':', 1)[0]}: {host}\r\n".replace(
            "for=10.0.0.1;host=other-tenant.example;proto=https", f"host={host}"))
