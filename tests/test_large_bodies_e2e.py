"""Large bodies through the proxy (fake SG server, mitmdump, a real shotgun_api3 client): a write
too large to decode, and answers larger than ``sgcache_max_answer``, go through, and the writer
reads its write back right (SG answers the reads the replica cannot be sure of)."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from cache.proxy import api3

from .rig import KEY, SCRIPT, Rig


def test_large_writes_and_answers_go_through_and_read_back_right(tmp_path: Path, db_url: str) -> None:
    with Rig(tmp_path, db_url, proxy=["sgcache_max_lag=0", "sgcache_max_answer=1"]) as rig:
        sg = rig.client()
        sg.find_one("Project", [])  # SG accepts the credentials: hits from now on
        shot = sg.find_one("Shot", [["code", "is", "sh010"]], ["id"])
        rig.wait_hit(lambda: sg.find_one("Shot", [["id", "is", shot["id"]]], ["description"]),
                     lambda r: r is not None and r["description"] is None, script=SCRIPT)

        # 2 MB: decoded and sent once, but SG's answer (over 1 MB) is not read: marked pending
        # 32 MB and more: too large to decode, sent once as a write may be, every type marked pending
        for size in (2 * 1024 * 1024, api3.MAX_BODY + 1024 * 1024):
            big = "y" * size
            assert sg.update("Shot", shot["id"], {"description": big})["description"] == big
            served = rig.reads()
            assert sg.find_one("Shot", [["id", "is", shot["id"]]], ["description"])["description"] == big
            assert rig.reads() == served + 1  # SG's answer, streamed through
        assert rig.site.count("update") == 2  # each sent once
        header, reply = raw_read(rig, shot["id"])  # SG's streamed answer is marked too
        assert header == "pass; reason=pending-write" and len(reply["results"]["entities"][0]["description"]) == size


def test_a_large_write_is_marked_again_once_sg_answers_it(tmp_path: Path, db_url: str) -> None:
    """SG takes a while over a body too large to decode, and an ingester poll runs meanwhile (the
    write not committed yet). Every cached type is marked once SG answered (a mark made before, the
    poll would have cleared, being later than it): the writer's read back is SG's, not the old row."""
    with Rig(tmp_path, db_url) as rig:
        rig.run("ingest-events", "--once")  # the cursor where the scan left it
        sg, direct = rig.client(), rig.direct()
        shot = direct.find_one("Shot", [["code", "is", "sh010"]], ["code"])
        read = lambda: sg.find_one("Shot", [["id", "is", shot["id"]]], ["code"])  # noqa: E731
        rig.wait_hit(read, lambda r: r is not None and r["code"] == "sh010", script=SCRIPT)
        call = rig.site.call

        def slow_updates(method: str, params: Any) -> Any:
            if method == "update":
                time.sleep(4.0)  # SG working through a big request
            return call(method, params)

        rig.site.call = slow_updates  # type: ignore[method-assign]
        big = "z" * (api3.MAX_BODY + 1024)
        done: list[Any] = []
        writer = threading.Thread(target=lambda: done.append(
            sg.update("Shot", shot["id"], {"code": "sh010-renamed", "description": big})))
        writer.start()
        time.sleep(2.0)  # the proxy sent the write; SG works on it
        rig.run("ingest-events", "--once")  # a poll meanwhile (every second in production)
        writer.join(60)
        assert done and done[0]["code"] == "sh010-renamed"
        assert read()["code"] == "sh010-renamed", "the writer read its large write back stale"


def test_a_large_body_sg_refuses_does_not_turn_caching_off(tmp_path: Path, db_url: str) -> None:
    """A client without credentials posts a body over ``api3.MAX_BODY``; SG refuses it (its error
    envelope), so nothing changed. Before: every cached type was marked pending before the body was
    sent (whoever sent it) and again after, and every client's reads passed (pending-write) until
    the ingester caught up (without one, for good)."""
    with Rig(tmp_path, db_url) as rig:
        sg = rig.client()
        sg.find_one("Project", [])
        shot = sg.find_one("Shot", [["code", "is", "sh010"]], ["id"])
        assert raw_read(rig, shot["id"])[0] == "hit"
        args = {"type": "Shot", "filters": {"logical_operator": "and", "conditions": []}, "return_fields": ["code"],
                "padding": "p" * (api3.MAX_BODY + 1024)}
        body = json.dumps({"method_name": "read", "params": [{"script_name": "nobody", "script_key": "x"}, args]})
        status, header, reply = raw_post(rig, body.encode())
        assert status == 200 and json.loads(reply)["exception"] is True and header == "pass; reason=large-body"
        assert raw_read(rig, shot["id"])[0] == "hit", "a refused large body turned caching off"


def raw_post(rig: Rig, body: bytes, path: str = "/api3/json",
             headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    """POST ``body`` to the site's ``path`` through the proxy: (status, X-SGCache header, body)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": f"http://{rig.proxy.address}"}))
    req = urllib.request.Request(rig.server.url + path, data=body, method="POST",
                                 headers=headers or {"Content-Type": "application/json; charset=utf-8"})
    with opener.open(req, timeout=120) as resp:
        return resp.status, resp.headers.get("X-SGCache", ""), resp.read()


def raw_read(rig: Rig, shot_id: int) -> tuple[str, Any]:
    """A read of the Shot's description through the proxy: (X-SGCache header, decoded reply)."""
    args = {"type": "Shot", "return_fields": ["description"], "return_only": "active",
            "filters": {"logical_operator": "and", "conditions": [{"path": "id", "relation": "is", "values": [shot_id]}]},
            "paging": {"entities_per_page": 1, "current_page": 1}}
    body = json.dumps({"method_name": "read", "params": [{"script_name": SCRIPT, "script_key": KEY}, args]}).encode()
    _status, header, reply = raw_post(rig, body)
    return header, json.loads(reply)
