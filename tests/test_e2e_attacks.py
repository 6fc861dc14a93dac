"""A client that writes its own JSON: bodies whose objects repeat a key, which JSON parsers read
differently (Python's and orjson take the last value, others the first). The proxy must never
credit SG's acceptance of one credential to another, nor miss a write SG applied, whichever value
SG takes: a real mitmdump in front of a fake SG that takes the first (tests/fakesg/server.py).
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import shotgun_api3

from .rig import KEY, RIG_OPTIONS, SCRIPT, Rig

#: A script SG accepts but restricts by a permission rule set: not listed in sgcache_scripts.
RESTRICTED, RESTRICTED_KEY = "restricted", "rk-2e9d41c7-restricted"


def shots(code: str | None = None) -> dict[str, Any]:
    conditions = [] if code is None else [{"path": "code", "relation": "is", "values": [code]}]
    return {"type": "Shot", "return_fields": ["code"], "sorts": [{"field_name": "id", "direction": "asc"}],
            "filters": {"logical_operator": "and", "conditions": conditions},
            "paging": {"entities_per_page": 500, "current_page": 1}, "return_only": "active"}


def first_key_rig(workdir: Path, db_url: str) -> Rig:
    """Only the script ``SCRIPT`` is served; SG also accepts ``RESTRICTED``, and takes the first
    value of a repeated key."""
    rig = Rig(workdir, db_url, proxy=RIG_OPTIONS + [f"sgcache_scripts={SCRIPT}"])
    rig.site.add_script(RESTRICTED, RESTRICTED_KEY, generate_events=False)
    return rig


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, module_db_url: str) -> Iterator[Rig]:
    """:func:`first_key_rig` for the tests that change nothing at SG."""
    with first_key_rig(tmp_path_factory.mktemp("rig"), module_db_url) as rig:
        rig.server.take_first_duplicate_key()
        yield rig


def post_raw(rig: Rig, body: bytes) -> tuple[str, Any]:
    """One API3 POST of ``body`` as written, through the proxy: (X-SGCache header, decoded reply)."""
    assert rig.proxy is not None
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": f"http://{rig.proxy.address}"}))
    req = urllib.request.Request(rig.server.url + "/api3/json", data=body, method="POST",
                                 headers={"Content-Type": "application/json; charset=utf-8"})
    with opener.open(req, timeout=30) as resp:
        return resp.headers.get("X-SGCache", ""), json.loads(resp.read())


def post(rig: Rig, method: str, auth: dict[str, Any], args: Any) -> tuple[str, Any]:
    return post_raw(rig, json.dumps({"method_name": method, "params": [auth, args]}).encode())


def j(value: Any) -> str:
    return json.dumps(value)


def verified(rig: Rig) -> dict[str, str]:
    """The listed script's auth, verified by SG (its reads of every Shot hit)."""
    good = {"script_name": SCRIPT, "script_key": KEY}
    post(rig, "read", good, shots())
    header, _ = post(rig, "read", good, shots())
    assert header == "hit", header
    return good


def _auth_body(restricted: str, listed: str, args: str) -> str:
    """A read whose auth dict is ``restricted`` then ``listed`` (JSON object members, unbraced)."""
    return f'{{"method_name":"read","params":[{{{restricted},{listed}}},{args}]}}'


def _repeated_auth_keys(forged: str, args: str) -> str:
    return _auth_body(f'"script_name":"{RESTRICTED}","script_key":"{RESTRICTED_KEY}"',
                      f'"script_name":"{SCRIPT}","script_key":"{forged}"', args)


def _escaped_auth_keys(forged: str, args: str) -> str:
    return _auth_body(f'"script_name":"{RESTRICTED}","script_key":"{RESTRICTED_KEY}"',
                      f'"script\\u005fname":"{SCRIPT}","scr\\u0069pt_key":"{forged}"', args)


def _repeated_params(forged: str, args: str) -> str:
    restricted = j({"script_name": RESTRICTED, "script_key": RESTRICTED_KEY})
    listed = j({"script_name": SCRIPT, "script_key": forged})
    return f'{{"method_name":"read","params":[{restricted},{args}],"params":[{listed},{args}]}}'


@pytest.mark.parametrize("spell", [_repeated_auth_keys, _escaped_auth_keys, _repeated_params],
                         ids=["repeated-auth-keys", "escaped-auth-keys", "repeated-params"])
def test_sgs_acceptance_of_one_script_never_verifies_another_named_by_a_repeated_key(rig: Rig, spell: Any) -> None:
    """The restricted script's holder sends a read whose auth names it first and the listed script,
    with a made-up key, last. SG (first value wins) accepts the restricted script; a proxy that took
    the last value would note the listed script's made-up key as accepted, and serve the whole
    replica to it from then on."""
    forged = f"forged-{spell.__name__}"
    header, reply = post_raw(rig, spell(forged, j(shots())).encode())
    assert "results" in reply, reply  # SG accepted the restricted script
    assert header.startswith("pass"), header
    before = rig.reads()
    header, reply = post(rig, "read", {"script_name": SCRIPT, "script_key": forged}, shots())
    assert header == "pass; reason=auth-unverified", (header, reply)
    assert reply.get("error_code") == 102, reply  # SG's own refusal
    assert rig.reads() == before + 1


def test_a_write_named_by_a_repeated_method_name_is_read_back_right(tmp_path: Path, db_url: str) -> None:
    """``{"method_name": "update", ..., "method_name": "read"}``: SG (first value wins) applies the
    update; a proxy that took the read would learn nothing, and serve the old value from then on."""
    with first_key_rig(tmp_path, db_url) as rig:
        rig.server.take_first_duplicate_key()
        _write_named_by_a_repeated_method_name(rig)


def _write_named_by_a_repeated_method_name(rig: Rig) -> None:
    good = verified(rig)
    first = post(rig, "read", good, shots())[1]["results"]["entities"][0]
    renamed = f"{first['code']}-renamed"
    update = {"type": "Shot", "id": first["id"], "fields": [{"field_name": "code", "value": renamed}]}
    fresh = {**good, "x_client": "attacks"}  # the same script, an auth dict not verified yet: it passes
    body = f'{{"method_name":"update","params":[{j(fresh)},{j(update)}],"method_name":"read"}}'
    header, reply = post_raw(rig, body.encode())
    assert "results" in reply, reply
    assert rig.direct().find_one("Shot", [["id", "is", first["id"]]], ["code"])["code"] == renamed  # SG applied it
    header, reply = post(rig, "read", good, shots())
    codes = {e["id"]: e["code"] for e in reply["results"]["entities"]}
    assert codes[first["id"]] == renamed, (header, codes[first["id"]])


def test_a_read_repeating_auth_keys_does_not_turn_caching_off(rig: Rig) -> None:
    """A read SG answers whose body the proxy leaves alone is no write: the others' reads still hit."""
    good = verified(rig)
    header, reply = post_raw(rig, _repeated_auth_keys("forged-read", j(shots())).encode())
    assert "results" in reply and header.startswith("pass"), (header, reply)
    before = rig.reads()
    header, _ = post(rig, "read", good, shots())
    assert header == "hit" and rig.reads() == before


@pytest.mark.parametrize("code", ["script_name", "sc\u00e9ne", '"method_name"'], ids=["key-name", "escape", "quoted"])
def test_reads_spelling_a_key_name_or_an_escape_in_their_values_still_hit(rig: Rig, code: str) -> None:
    """The check for repeated keys refuses no body that repeats none."""
    good = verified(rig)
    post(rig, "read", good, shots(code))
    before = rig.reads()
    header, reply = post(rig, "read", good, shots(code))
    assert header == "hit" and reply["results"]["entities"] == [] and rig.reads() == before, (header, reply)


def test_a_key_sg_refuses_with_one_auth_dict_is_refused_with_every_other(tmp_path: Path, db_url: str) -> None:
    """A key verified in several auth dicts (SG ignores keys it does not know, so a client may add
    its own: up to four are kept per credential) is revoked at SG. SG's refusal of it in one of them
    ends them all: the revoked key gets no hit from then on, whichever extra keys its holder sends
    (before: the others hit until sgcache_auth_ttl, 300 s, after SG had refused the key)."""
    with Rig(tmp_path, db_url) as rig:
        rig.site.add_script("revokee", "rv-key", generate_events=False)
        plain = {"script_name": "revokee", "script_key": "rv-key"}
        tagged = {**plain, "x_tag": "other-client"}
        for auth in (plain, tagged):
            post(rig, "read", auth, shots())  # SG verifies it (a pass)
            header, _ = post(rig, "read", auth, shots())
            assert header == "hit", header
        rig.site.revoke_script("revokee")
        header, reply = post(rig, "schema_read", tagged, None)  # SG refuses the key
        assert header == "pass; reason=method" and reply.get("error_code") == 102, (header, reply)
        before = rig.reads()
        header, reply = post(rig, "read", plain, shots())
        assert header == "pass; reason=auth-unverified", (header, reply)
        assert reply.get("error_code") == 102 and rig.reads() == before + 1, reply


def h2_post(rig: Rig, headers: list[tuple[str, str]], body: bytes) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/2 request through the proxy (CONNECT, then TLS with ALPN h2): (status, headers, body)."""
    import socket
    import ssl

    import h2.config
    import h2.connection
    import h2.events

    assert rig.proxy is not None and rig.proxy.port is not None
    host = f"localhost:{rig.server.port}"
    raw = socket.create_connection(("127.0.0.1", rig.proxy.port), timeout=15)
    raw.sendall(f"CONNECT {host} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = raw.recv(4096)
        assert chunk, head
        head += chunk
    assert head.split(b" ", 2)[1] == b"200", head
    context = ssl.create_default_context(cafile=str(rig.proxy.ca_cert))
    context.set_alpn_protocols(["h2"])
    sock = context.wrap_socket(raw, server_hostname="localhost")
    assert sock.selected_alpn_protocol() == "h2"
    conn = h2.connection.H2Connection(h2.config.H2Configuration(validate_outbound_headers=False))
    conn.initiate_connection()
    stream = conn.get_next_available_stream_id()
    conn.send_headers(stream, headers + [("content-length", str(len(body)))])
    conn.send_data(stream, body, end_stream=True)
    sock.sendall(conn.data_to_send())
    status, answer, data = 0, {}, b""
    with sock:
        while True:
            chunk = sock.recv(65536)
            assert chunk, "the proxy closed the connection"
            for event in conn.receive_data(chunk):
                if isinstance(event, h2.events.ResponseReceived):
                    answer = {k.decode(): v.decode() for k, v in event.headers}
                    status = int(answer[":status"])
                elif isinstance(event, h2.events.DataReceived):
                    data += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    return status, answer, data
            sock.sendall(conn.data_to_send())


def test_an_http2_host_header_naming_another_tenant_never_verifies_a_credential_for_the_site(
        tmp_path: Path, db_url: str) -> None:
    """HTTP/2 carries the site's name in ``:authority`` and may carry a ``host`` header too; mitmproxy
    sends the latter on as HTTP/1's Host, and checks the two match only with its option
    validate_inbound_headers (on by default). Off, a request naming the site in ``:authority`` and
    another tenant in ``host`` reached the other tenant, whose acceptance of its own script was
    credited to the site: the site's replica then went to a credential the site refuses."""
    from .fakesg import FakeSite

    intruder = {"script_name": "intruder", "script_key": "ik-staging-only"}
    staging = FakeSite.basic()
    staging.add_script(intruder["script_name"], intruder["script_key"])
    with Rig(tmp_path, db_url, tls=True, proxy=RIG_OPTIONS + ["validate_inbound_headers=false"]) as rig:
        rig.server.route_host_to("staging.example", staging)
        body = json.dumps({"method_name": "read", "params": [intruder, shots()]}).encode()
        status, headers, data = h2_post(rig, [
            (":method", "POST"), (":scheme", "https"), (":authority", f"localhost:{rig.server.port}"),
            (":path", "/api3/json"), ("host", "staging.example"), ("content-type", "application/json")], body)
        assert status == 200 and "results" in json.loads(data), data  # the other tenant accepted it
        assert staging.count("read") == 1  # it reached the other tenant
        sg = rig.client(script_name=intruder["script_name"], api_key=intruder["script_key"])
        before = rig.reads()
        with pytest.raises(shotgun_api3.AuthenticationFault):  # the site's own refusal, not a hit
            sg.find("Shot", [], ["code"])
        assert rig.reads() == before + 1
        assert headers.get("x-sgcache") == "pass; reason=other-site", headers


def test_a_socks5_client_cannot_reach_a_local_service_through_the_proxy(tmp_path: Path, db_url: str) -> None:
    """In SOCKS5 mode (``--mode socks5``) the client names each destination, as in regular mode: the
    relay policy applies, and a tunnel to a loopback service on another port than the site's (the
    database's, say) is refused. Before, only regular mode was checked, and the proxy was a door."""
    import socket
    import threading

    from .proxyharness import Proxy

    with socket.create_server(("127.0.0.1", 0)) as service:  # an internal service on loopback
        reached: list[bytes] = []

        def serve() -> None:
            service.settimeout(20)
            try:
                conn, _ = service.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                conn.sendall(b"internal-secret\n")
                try:
                    reached.append(conn.recv(100))
                except OSError:
                    pass

        threading.Thread(target=serve, daemon=True).start()
        port = service.getsockname()[1]
        with Rig(tmp_path, db_url, proxy=False) as rig:
            (tmp_path / "socks").mkdir()
            socks = Proxy(tmp_path / "socks", db_url, rig.schema_path, RIG_OPTIONS + [f"sgcache_site={rig.url}"],
                          mode="socks5")
            socks.start()
            try:
                assert socks.port is not None
                with socket.create_connection(("127.0.0.1", socks.port), timeout=15) as sock:
                    sock.sendall(b"\x05\x01\x00")
                    assert sock.recv(2) == b"\x05\x00"
                    sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + port.to_bytes(2, "big"))
                    reply = sock.recv(10)
                    got = b""
                    if reply[1:2] == b"\x00":  # granted (mitmproxy connects lazily: on the client's data)
                        sock.sendall(b"hello\n")
                        try:
                            while chunk := sock.recv(100):
                                got += chunk
                        except OSError:
                            pass
                assert b"internal-secret" not in got and not reached, (got, reached)
                assert "refused" in socks.output()
                # the site itself stays reachable through it
                body = json.dumps({"method_name": "info", "params": []}).encode()
                with socket.create_connection(("127.0.0.1", socks.port), timeout=15) as sock:
                    sock.sendall(b"\x05\x01\x00")
                    assert sock.recv(2) == b"\x05\x00"
                    sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1")
                                 + rig.server.port.to_bytes(2, "big"))
                    assert sock.recv(10)[1:2] == b"\x00"
                    sock.sendall(f"POST /api3/json HTTP/1.1\r\nHost: 127.0.0.1:{rig.server.port}\r\n"
                                 f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
                    answer = b""
                    while chunk := sock.recv(65536):
                        answer += chunk
                assert answer.startswith(b"HTTP/1.1 200") and b'"version"' in answer, answer[:300]
            finally:
                socks.stop()
