"""cache/proxy's small policies with plain objects (no mitmproxy): flow state, answers, routing,
outages, the offline info copy, counters, which answers verify a credential."""

from __future__ import annotations

import copy
import gzip
import json
import re
import zlib

import pytest
import shotgun_api3

from cache.proxy import answers, api3
from cache.proxy.auth import CredentialCache, site_of
from cache.proxy.credentials import answered_by_sg, decodes_as_json, record_answer
from cache.proxy.flowstate import KEY, FlowState, state_of
from cache.proxy.metrics import Counters
from cache.proxy.offline import InfoCopies
from cache.proxy.outage import OUTAGE_SECONDS, Outages, never_connected
from cache.proxy.routing import (
    NO_HOST,
    api3_path,
    decrypt_patterns,
    hostport,
    is_api3,
    may_be_api3,
    served_site,
)
from cache.proxy.uploads import changed_types, is_upload, refused
from cache.replica.site import Site, SiteError

SITE = site_of("https", "sg.example.com", 443)
AUTH = {"script_name": "pipeline", "script_key": "k"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_flow_state_is_one_plain_dict_under_one_key() -> None:
    metadata: dict[str, object] = {"other_addon": 1}
    state = state_of(metadata)
    assert state.method is None and state.pass_reason is None and not state.answered_here
    assert state.write_mark is None and not state.from_sg
    assert metadata == {"other_addon": 1}  # reading stores nothing
    state.method, state.args = "update", {"type": "Shot", "id": 1}
    state.pass_reason = "method"
    assert metadata[KEY] == {"method": "update", "args": {"type": "Shot", "id": 1}, "pass_reason": "method"}
    again = state_of(metadata)  # another hook sees the same state
    assert again.method == "update" and again.pass_reason == "method"
    copied = copy.deepcopy(metadata)  # mitmproxy copies metadata with a flow, and saves it
    assert state_of(copied).args == {"type": "Shot", "id": 1}
    json.dumps(metadata)  # plain values only
    assert "pass_reason" in repr(state) and isinstance(state, FlowState)


def test_answers_carry_their_header_and_reason() -> None:
    assert answers.hit(b"{}").headers[answers.HEADER] == "hit"
    assert answers.hit(b"{}", stale=True).headers[answers.HEADER] == "hit; stale"
    refusal = answers.unreachable("sg.example.com", "create")
    assert refusal.status == 200 and refusal.reason == "sg-unreachable"  # SG's envelope: never re-sent
    assert refusal.headers[answers.HEADER] == "pass; reason=sg-unreachable"
    envelope = json.loads(refusal.body)
    assert envelope["exception"] is True and "create was not sent" in envelope["message"]
    relay = answers.relay_refusal("CONNECT 127.0.0.1:22", "port 22 is not allowed")
    assert relay.status == 403 and relay.body.count(b"\n") == 1 and relay.reason == "relay-refused"


def test_only_the_site_and_named_hosts_are_decrypted() -> None:
    site = Site.parse("https://sg.example.com")

    def decrypted(patterns: list[str], hostport_: str) -> bool:
        return any(re.search(p, hostport_, re.IGNORECASE) for p in patterns)

    patterns = decrypt_patterns(site, ["*.Studio.test"])
    assert decrypted(patterns, "sg.example.com:443") and not decrypted(patterns, "sg.example.com:8443")
    assert decrypted(patterns, "a.studio.test:8080") and not decrypted(patterns, "studio.test.evil:443")
    assert decrypt_patterns(None, []) == [NO_HOST] and not decrypted([NO_HOST], "anything:443")
    assert is_api3("POST", "/api3/json") and not is_api3("GET", "/api3/json")
    assert not is_api3("POST", "/upload/api_link_file")
    # only the path shotgun_api3 posts to: no query string, no other path ending in /api3/json
    for other in ("/api3/json?x=1", "/api3/json?", "/some/prefix/api3/json", "/API3/json", "/api3/json/"):
        assert not is_api3("POST", other), other
    assert is_api3("POST", "/sg/api3/json", "/sg/api3/json") and not is_api3("POST", "/api3/json", "/sg/api3/json")
    # ... but a lenient router may take them for API3 calls: SG's success to them marks every type
    for other in ("/api3/json?x=1", "/api3/json?", "/API3/json", "/api3/json/", "//api3//json", "/api3/%6Ason",
                  "/api3/json.json", "/api3/json#x"):
        assert may_be_api3("POST", other), other
    for other in ("/api3/json2", "/some/prefix/api3/json", "/api3", "/upload/upload_file", "/api3/json/x"):
        assert not may_be_api3("POST", other), other
    assert not may_be_api3("GET", "/api3/json/") and may_be_api3("POST", "/SG/api3/json/", "/sg/api3/json")


@pytest.mark.parametrize("url", ["https://sg.example.com", "https://sg.example.com/", "https://sg.example.com/sg",
                                 "https://sg.example.com/sg/", "http://sg.example.com:8080/a/b/",
                                 "https://sg.example.com:443/a/b"])
def test_the_api3_path_is_shotgun_api3s(url: str) -> None:
    client = shotgun_api3.Shotgun(url, script_name="pipeline", api_key="k", connect=False)
    assert api3_path(url) == client.config.api_path
    assert hostport("::1", 443) == "[::1]:443" and hostport("h", 80) == "h:80"


def test_the_reverse_proxy_target_is_the_site() -> None:
    site = "https://studio.shotgunstudio.com"
    reverse = [("https", "Studio.ShotgunStudio.com", 443)]
    assert served_site(site, []) == site
    assert served_site("", []) == ""
    assert served_site("", reverse) == "https://studio.shotgunstudio.com:443"  # the target names the site
    assert served_site(site, reverse + reverse) == site  # the same target twice, the same site
    assert served_site("", [("tcp", "db", 5432), ("http", "sg.lan", 8080)]) == "http://sg.lan:8080"
    for configured, targets in [(site, [("http", "studio.shotgunstudio.com", 443)]),  # another scheme
                                (site, [("https", "other.shotgunstudio.com", 443)]),
                                ("", reverse + [("https", "other.shotgunstudio.com", 443)])]:
        with pytest.raises(SiteError):
            served_site(configured, targets)


def test_upload_forms_name_the_types_they_may_change() -> None:
    assert is_upload("POST", "/upload/upload_file") and is_upload("POST", "/upload/api_link_file?x=1")
    assert is_upload("POST", "/upload/publish_thumbnail") and is_upload("POST", "/upload/share_thumbnail")
    assert not is_upload("POST", "/upload/api_get_upload_link_info")  # hands out a storage URL only
    assert not is_upload("GET", "/upload/upload_file") and not is_upload("POST", "/api3/json")
    # as SG's router reads the path: doubled slashes squeezed, a trailing one dropped
    assert is_upload("POST", "//upload/upload_file") and is_upload("POST", "/upload//api_link_file/")
    assert is_upload("POST", "/%75pload/upload_file") and is_upload("POST", "/Upload/Upload_File")
    assert not is_upload("POST", "//upload/api_get_upload_link_info/") and not is_upload("POST", "//uploads/x")
    assert changed_types({"entity_type": "Version", "field_name": "sg_uploaded_movie"}) == {"Version", "Attachment"}
    assert changed_types({"entities": "Shot_12, Asset_3", "thumbnail_id": "7"}) == {"Shot", "Asset", "Attachment"}
    assert changed_types({}) is None and changed_types({"entity_type": " "}) is None  # any type may have changed


def test_an_upload_form_sg_refused_changed_nothing() -> None:
    assert refused(200, b"0Authentication failed") and refused(403, b"") and refused(413, None)
    assert not refused(200, b"1:7\n") and not refused(200, None)  # linked; or the answer was not read
    assert not refused(502, b"") and not refused(500, b"0oops")  # SG may have linked it before failing


def test_which_api3_answers_show_sg_changed_nothing_or_may_have_changed_something() -> None:
    error, results = api3.encode_error("no"), api3.encode_results({"id": 1})
    big = b'{"exception": true, "pad": "' + b"x" * api3.SMALL_ANSWER + b'"}'
    # a body too large to decode: only SG's refusal leaves the cache on
    assert api3.changed_nothing(200, error) and api3.changed_nothing(403, b"") and api3.changed_nothing(413, b"<html>")
    assert not api3.changed_nothing(200, results) and not api3.changed_nothing(200, b"not json")
    assert not api3.changed_nothing(502, error) and not api3.changed_nothing(500, b"") and not api3.changed_nothing(200, big)
    # a call the proxy did not decode: only SG's success marks
    assert api3.succeeded(200, results) and api3.succeeded(200, big) and api3.succeeded(200, b'{"results": null}')
    assert not api3.succeeded(200, error) and not api3.succeeded(200, b"not json") and not api3.succeeded(200, b"[1]")
    assert not api3.succeeded(404, results) and not api3.succeeded(502, results)


def test_a_body_the_proxy_did_not_decode_is_read_every_way_a_lenient_server_could() -> None:
    read, update = (json.dumps({"method_name": m, "params": []}).encode() for m in ("read", "update"))
    assert api3.lenient_methods(read, "") == {"read"} and api3.lenient_methods(update, "") == {"update"}
    assert api3.lenient_methods(gzip.compress(update), "gzip") == {"update"}  # inflated
    assert api3.lenient_methods(gzip.compress(gzip.compress(read)), "gzip, gzip") == {"read"}
    assert api3.lenient_methods(zlib.compress(read), "Deflate") == {"read"}
    assert api3.lenient_methods(read, "gzip") == {"read"}  # not gzip: only as sent
    assert api3.lenient_methods(read, "br") == {"read"}  # JSON as sent; brotli is not inflated here
    assert api3.lenient_methods(b"\x8b\x0b\x80binary", "br") == {None}  # nothing found: anything
    assert api3.lenient_methods(update.decode().encode("utf-16"), "") == {"update"}
    assert api3.lenient_methods(b'{"method_name": "update", "x": NaN}', "") == {"update"}
    assert api3.lenient_methods(b'{"params": []}', "") == {None} and api3.lenient_methods(b"[]", "") == {None}
    bomb = gzip.compress(b" " * (api3.MAX_BODY + 1))
    assert api3.lenient_methods(bomb, "gzip") == {None}  # not inflated past MAX_BODY
    assert api3.lenient_methods(read + b" " * api3.MAX_BODY, "") == {None}  # nor read
    # a repeated key: its first value or its last
    assert api3.lenient_methods(b'{"method_name": "update", "params": [], "method_name": "read"}', "") == {"update", "read"}


def test_a_body_repeating_a_key_that_decides_the_call_or_the_credential_is_not_decoded() -> None:
    auth = '{"script_name": "a", "script_key": "k"}'
    plain = f'{{"method_name": "read", "params": [{auth}, {{"type": "Shot"}}]}}'.encode()
    assert not api3.repeats_a_key(plain)
    for body in (
        b'{"method_name": "read", "params": [{"script_name": "a", "script_key": "k", "script_name": "b"}, {}]}',
        b'{"method_name": "read", "params": [{"script_name": "a", "script_key": "k", "script\\u005fkey": "x"}, {}]}',
        b'{"method_name": "update", "params": [], "method_name": "read"}',
        b'{"method_name": "read", "params": [{}], "p\\u0061rams": [{}]}',
    ):
        assert api3.decode_request(body) is not None and api3.repeats_a_key(body), body
    # names and escapes in values, other keys repeated in a read's arguments (its caller's own answer)
    for body in (
        b'{"method_name": "read", "params": [{"script_name": "a", "script_key": "k"}, {"code": "script_name"}],'
        b' "x": "\\"params\\" caf\\u00e9"}',
        b'{"method_name": "read", "params": [{"script_name": "a", "script_key": "k"}, {"type": "Shot", "type": "Asset"}]}',
    ):
        assert not api3.repeats_a_key(body), body
    # a write's arguments are learnt: any key repeated there
    update = f'{{"method_name": "update", "params": [{auth}, {{"id": 1, "id": 2}}]}}'.encode()
    assert api3.repeats_a_key(update, every_key=True) and not api3.repeats_a_key(update)
    assert not api3.repeats_a_key(plain, every_key=True)


def test_sg_is_down_only_for_a_while_and_only_at_its_host() -> None:
    clock = Clock()
    outages = Outages(clock)
    assert not outages.is_down("sg.example.com", offline=True)
    outages.note("sg.example.com", "connection refused")
    assert outages.is_down("sg.example.com", offline=True)
    assert not outages.is_down("other.example.com", offline=True)
    clock.now += OUTAGE_SECONDS + 0.1
    assert not outages.is_down("sg.example.com", offline=True)  # time to try SG again
    assert not outages.down_until
    outages.note("sg.example.com", "again")
    assert not outages.is_down("sg.example.com", offline=False)  # offline answers off: SG is tried
    assert not outages.note_status("sg.example.com", 500, "c1") and not outages.down_until  # one request failed
    assert outages.note_status("sg.example.com", 504, "c1") and not outages.down_until  # one client's
    assert outages.note_status("sg.example.com", 503, "c1") and not outages.down_until  # its re-send
    assert outages.note_status("sg.example.com", 502, "c2") and not outages.down_until  # two connections
    clock.now += OUTAGE_SECONDS + 0.1
    assert outages.note_status("sg.example.com", 502, "c3") and not outages.down_until  # the first two are old
    assert outages.note_status("sg.example.com", 503, "c4") and not outages.down_until
    assert outages.note_status("sg.example.com", 503, "c5") and outages.is_down("sg.example.com", offline=True)


@pytest.mark.parametrize(
    ("tcp", "tls", "tls_setup", "down"),
    [(None, False, None, True), (None, True, None, True), (1.0, True, None, True),
     (1.0, False, None, False), (1.0, True, 2.0, False)],
)
def test_a_connection_never_made_is_an_outage_a_dropped_request_is_not(
        tcp: float | None, tls: bool, tls_setup: float | None, down: bool) -> None:
    assert never_connected(tcp, tls, tls_setup) is down


def test_the_info_copy_answers_while_sg_is_down() -> None:
    infos = InfoCopies()
    assert not infos.has("sg.example.com")
    reply = {"version": [8, 0, 0], "sgcache": {"stale": "ignored"}}
    body = json.loads(infos.add_sgcache("sg.example.com", reply, {"hits": 1}))
    assert body == {"version": [8, 0, 0], "sgcache": {"hits": 1}}
    nested = json.loads(infos.add_sgcache("nested.example.com", {"results": {"version": [9]}}, {"hits": 2}))
    assert nested == {"results": {"version": [9], "sgcache": {"hits": 2}}}
    answer = infos.offline_answer("sg.example.com", {"hits": 3})
    assert answer.headers[answers.HEADER] == "hit; stale"
    assert json.loads(answer.body) == {"version": [8, 0, 0], "sgcache": {"hits": 3, "offline": True}}
    # the copy is of what SG answered (nested under results or not), never of the proxy's key
    assert json.loads(infos.offline_answer("nested.example.com", {}).body) == {"version": [9],
                                                                             "sgcache": {"offline": True}}


def test_counters() -> None:
    counters = Counters()
    for reason in (None, None, "method", "auth-unverified", "method"):
        counters.count(reason)
    assert counters.snapshot() == {"hits": 2, "passes": {"method": 2, "auth-unverified": 1}}


def test_only_sg_json_answers_teach_the_credential_cache() -> None:
    credentials = CredentialCache()
    state = state_of({})
    state.method, state.auth = "read", AUTH
    ok = {"results": []}
    record_answer(credentials, state, SITE, ok, replayed=True, server_connected=True, content_type="application/json")
    record_answer(credentials, state, SITE, ok, replayed=False, server_connected=False, content_type="")
    record_answer(credentials, state, SITE, ok, replayed=False, server_connected=True, content_type="text/html")
    assert not credentials.accepted(SITE, AUTH)
    record_answer(credentials, state, SITE, ok, replayed=False, server_connected=True,
                  content_type="application/json; charset=utf-8")
    assert credentials.accepted(SITE, AUTH) and not credentials.accepted(site_of("https", "x", 443), AUTH)
    refused = {"exception": True, "error_code": 102, "message": "bad key"}
    sent_by_proxy = state_of({})
    sent_by_proxy.method, sent_by_proxy.auth, sent_by_proxy.from_sg = "update", AUTH, True
    record_answer(credentials, sent_by_proxy, SITE, refused, replayed=False, server_connected=False, content_type="")
    assert not credentials.accepted(SITE, AUTH)  # SG's own answer to the write the proxy sent


def test_what_counts_as_sg_answering() -> None:
    state = state_of({})
    assert answered_by_sg(state, replayed=False, server_connected=True)
    assert not answered_by_sg(state, replayed=True, server_connected=True)
    state.from_sg = True
    assert answered_by_sg(state, replayed=False, server_connected=False)
    state.answered_here = True
    assert not answered_by_sg(state, replayed=False, server_connected=True)
    assert decodes_as_json("") and decodes_as_json(" Text/Javascript ") and not decodes_as_json("text/plain")
