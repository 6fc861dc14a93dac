"""API3 calls the proxy does not decode (a fake SG that routes leniently, mitmdump, a real shotgun_api3
client reading back): a write posted to another spelling of the API3 path, or with a body the proxy
cannot read, reaches SG untouched; once SG answers it with success, every cached type is marked pending
before the writer has the answer, so the writer reads its write back right. SG's refusal marks nothing."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from .fakesg import FakeSite
from .rig import KEY, RIG_OPTIONS, SCRIPT, Rig, populate
from .test_large_bodies_e2e import raw_post

JSON_HEADERS = {"Content-Type": "application/json; charset=utf-8"}


def update_body(shot_id: int, value: str, script: str = SCRIPT, key: str = KEY, field: str = "code") -> bytes:
    """An API3 update of a Shot's field, as shotgun_api3 sends it."""
    args = {"type": "Shot", "id": shot_id, "fields": [{"field_name": field, "value": value}]}
    return json.dumps({"method_name": "update", "params": [{"script_name": script, "script_key": key}, args]}).encode()


def lenient_rig(tmp_path: Path, db_url: str, proxy: list[str] | None = None) -> Rig:
    """A rig whose fake SG takes API3 calls at other spellings of the path and gzip bodies."""
    rig = Rig(tmp_path, db_url, proxy=proxy or True)
    rig.server.lenient_api3 = True
    return rig


@pytest.mark.parametrize(("path", "encoding"), [("/api3/json?x=1", ""), ("/api3/json/", ""), ("/API3/json", ""),
                                                ("/api3/json", "gzip")])
def test_a_write_the_proxy_does_not_decode_is_read_back_right(tmp_path: Path, db_url: str, path: str,
                                                              encoding: str) -> None:
    """Before: the write passed untouched and unmarked (not the API3 path, or ``content-encoding``),
    SG applied it, and the writer's read back was the old row, a hit, until the ingester caught up."""
    with lenient_rig(tmp_path, db_url) as rig:
        sg = rig.client()
        shot = sg.find_one("Shot", [["code", "is", "sh010"]], ["code"])
        read = lambda: sg.find_one("Shot", [["id", "is", shot["id"]]], ["code"])  # noqa: E731
        before = rig.reads()
        assert read()["code"] == "sh010" and rig.reads() == before, "a hit to begin with"
        body, headers = update_body(shot["id"], "renamed"), dict(JSON_HEADERS)
        if encoding:
            body, headers["Content-Encoding"] = gzip.compress(body), encoding
        status, _header, reply = raw_post(rig, body, path, headers)
        assert status == 200 and json.loads(reply)["results"]["code"] == "renamed"  # SG applied it
        assert read()["code"] == "renamed", "the writer read its write back stale"


def test_reads_and_refused_calls_the_proxy_does_not_decode_mark_nothing(tmp_path: Path, db_url: str) -> None:
    """A client without credentials posting writes to other spellings of the API3 path (or bodies the
    proxy cannot read) gets SG's error envelope: nothing changed. A read posted so gets SG's answer,
    and changed nothing either. Every client's reads stay hits."""
    with lenient_rig(tmp_path, db_url) as rig:
        sg = rig.client()
        query = ("Shot", [["code", "is", "sh010"]], ["code"])
        shot = sg.find_one(*query)
        before = rig.reads()
        assert sg.find_one(*query) and rig.reads() == before, "a hit to begin with"
        refused = update_body(shot["id"], "nope", "nobody", "nothing")
        gzipped = {**JSON_HEADERS, "Content-Encoding": "gzip"}
        for path, body, headers in [("/api3/json/", refused, JSON_HEADERS), ("/api3/json", gzip.compress(refused), gzipped),
                                    ("/api3/json?x=1", b"\xff not json", JSON_HEADERS)]:
            status, _header, reply = raw_post(rig, body, path, headers)
            assert status == 200 and json.loads(reply)["exception"] is True, reply
        read = json.dumps({"method_name": "read", "params": [{"script_name": SCRIPT, "script_key": KEY}, {
            "type": "Shot", "filters": {"logical_operator": "and", "conditions": []}, "return_fields": ["code"],
            "paging": {"entities_per_page": 500, "current_page": 1}}]}).encode()
        for path, body, headers in [("/api3/json/", read, JSON_HEADERS), ("/api3/json", gzip.compress(read), gzipped)]:
            status, _header, reply = raw_post(rig, body, path, headers)
            assert status == 200 and json.loads(reply)["results"]["entities"], reply
        before = rig.reads()
        assert sg.find_one(*query)["code"] == "sh010" and rig.reads() == before, "a call that changed nothing marked"


def test_a_streamed_answer_to_a_write_the_proxy_did_not_decode_is_marked_before_it_leaves(
        tmp_path: Path, db_url: str) -> None:
    """SG's answer (over ``sgcache_max_answer``) is streamed to the client unread: every cached type
    is marked before its headers leave, as for an answer too large to decode."""
    with lenient_rig(tmp_path, db_url, ["sgcache_max_lag=0", "sgcache_max_answer=1"]) as rig:
        sg = rig.client()
        shot = sg.find_one("Shot", [["code", "is", "sh010"]], ["description"])
        read = lambda: sg.find_one("Shot", [["id", "is", shot["id"]]], ["description"])  # noqa: E731
        before = rig.reads()
        assert read()["description"] is None and rig.reads() == before, "a hit to begin with"
        big = "d" * (2 * 1024 * 1024)
        body = gzip.compress(update_body(shot["id"], big, field="description"))
        status, _header, reply = raw_post(rig, body, "/api3/json", {**JSON_HEADERS, "Content-Encoding": "gzip"})
        assert status == 200 and json.loads(reply)["results"]["description"] == big
        assert read()["description"] == big, "the writer read its write back stale"


def test_a_field_deleted_by_a_call_the_proxy_did_not_decode_is_not_served_after_the_ingester_passes(
        tmp_path: Path, db_url: str) -> None:
    """``schema_field_delete`` posted to ``/api3/json/`` (SG logs no event for it): every type was marked,
    but the field stayed primed, so once the ingester's polls cleared the markers the replica answered
    for a field SG no longer has. Now its field is un-primed, as for the decoded call."""
    import time

    import shotgun_api3

    with lenient_rig(tmp_path, db_url) as rig:
        sg = rig.client()
        read = lambda: sg.find("Shot", [["sg_cut_in", "greater_than", 1000]], ["code", "sg_cut_in"])  # noqa: E731
        rig.wait_hit(read, lambda r: len(r) > 0, script=SCRIPT)
        delete = json.dumps({"method_name": "schema_field_delete", "params": [
            {"script_name": SCRIPT, "script_key": KEY}, {"type": "Shot", "field_name": "sg_cut_in"}]}).encode()
        status, _header, reply = raw_post(rig, delete, "/api3/json/", JSON_HEADERS)
        assert status == 200 and json.loads(reply)["results"] is True  # SG deleted it
        rig.run("ingest-events", "--once")
        time.sleep(1.1)  # markers clear at the first poll a second after them (pending.MARGIN) ...
        rig.run("ingest-events", "--once")  # ... this one's
        with pytest.raises(shotgun_api3.Fault, match="sg_cut_in"):
            read()


def populate_with_version(site: FakeSite) -> None:
    """The rig's studio and a Version of its first Shot (``sg_uploaded_movie`` is cached)."""
    populate(site)
    shot = site.find_direct("Shot", [["code", "is", "sh010"]], ["project"])[0]
    site.create_direct("Version", {"code": "v001", "project": shot["project"],
                                   "entity": {"type": "Shot", "id": shot["id"]}})


def upload_form(version_id: int, boundary: str = "sgcacheboundary") -> tuple[bytes, str]:
    """``upload_file``'s multipart form (as shotgun_api3 sends it) for the Version's ``sg_uploaded_movie``."""
    fields = {"entity_type": "Version", "entity_id": str(version_id), "field_name": "sg_uploaded_movie",
              "display_name": "take.mov", "script_name": SCRIPT, "script_key": KEY}
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="take.mov"\r\n'
                 f"Content-Type: application/octet-stream\r\n\r\n".encode() + b"movie-bytes\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.mark.parametrize("path", ["//upload/upload_file", "/upload/upload_file"])
def test_an_upload_posted_to_another_spelling_of_its_path_is_read_back_right(tmp_path: Path, db_url: str,
                                                                             path: str) -> None:
    """An upload form posted to ``//upload/upload_file`` (SG's router squeezes the slashes) through proxy
    A, read back through proxy B. Before: the proxy took only paths starting ``/upload/`` for uploads, so
    that one passed unmarked; SG linked the file, and the tool's read back through B was the replica's
    old row (``sg_uploaded_movie`` None), a hit, until the ingester caught up."""
    rig = Rig(tmp_path, db_url, populate_site=populate_with_version)
    rig.server.lenient_api3 = True
    with rig:
        proxy_b = rig.start_proxy(RIG_OPTIONS)
        b = rig.client(proxy_b)
        version = rig.direct().find_one("Version", [["code", "is", "v001"]], ["sg_uploaded_movie"])
        assert version["sg_uploaded_movie"] is None
        b.find_one("Project", [])  # unseen credentials pass once; SG accepting them enables hits
        read = lambda: b.find_one("Version", [["id", "is", version["id"]]], ["sg_uploaded_movie"])  # noqa: E731
        before = rig.reads()
        assert read()["sg_uploaded_movie"] is None and rig.reads() == before, "a hit to begin with"
        body, content_type = upload_form(version["id"])
        status, _header, reply = raw_post(rig, body, path, {"Content-Type": content_type})
        assert status == 200 and reply.startswith(b"1"), reply  # SG linked the file
        movie = rig.direct().find_one("Version", [["id", "is", version["id"]]], ["sg_uploaded_movie"])
        assert movie["sg_uploaded_movie"] is not None
        assert read() == movie, "the tool read its upload back stale through proxy B"
