"""SG (or its load balancer) answering a write with an HTTP error after it applied it, and one
client's gateway timeout: a real shotgun_api3 client through a real proxy to the fake SG."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import shotgun_api3
from prometheus_client.parser import text_string_to_metric_families

from .fakesg import server as fakesg_server
from .rig import SCRIPT, Rig
from .wait import wait_until


@pytest.fixture
def gateway_timeout(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Each entry arms the fake SG once: it applies the next API3 call, then its load balancer
    answers 504 instead of SG's answer (the backend finished after the balancer gave up)."""
    armed: list[str] = []
    original = fakesg_server._Handler._send

    def send(self: Any, status: int, payload: Any, content_type: str = fakesg_server.JSON_CONTENT_TYPE) -> None:
        if armed and isinstance(payload, dict) and "results" in payload:
            armed.pop()
            data = b"<html><body><h1>504 Gateway Time-out</h1></body></html>"
            self.send_response(504)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        original(self, status, payload, content_type)

    monkeypatch.setattr(fakesg_server._Handler, "_send", send)
    yield armed


@pytest.mark.parametrize("options", [[], ["sgcache_offline=false"]], ids=["default", "no-offline"])
def test_a_write_answered_504_is_neither_sent_again_nor_read_back_stale(
        tmp_path: Path, db_url: str, gateway_timeout: list[str], options: list[str]) -> None:
    """SG applied the update, its balancer answered 504: the outcome is unknown to the proxy as when
    the connection breaks after sending. The client gets SG's error envelope saying so (relayed, the
    504 made shotgun_api3 send the write again), and its read right after is SG's row, not the
    replica's old one (before: nothing marked; with offline answers on, the re-send was refused as
    "not sent" and the old row served once the outage window ended)."""
    with Rig(tmp_path, db_url, proxy=["sgcache_max_lag=0", *options]) as rig:
        sg, direct = rig.client(), rig.direct()
        shot = direct.find_one("Shot", [["code", "is", "sh010"]], ["code"])
        read = lambda: sg.find_one("Shot", [["id", "is", shot["id"]]], ["description"])  # noqa: E731
        rig.wait_hit(read, lambda r: r is not None, script=SCRIPT)
        updates = rig.site.count("update", type="Shot")
        gateway_timeout.append("update")
        with pytest.raises(shotgun_api3.Fault, match="may have been applied"):
            sg.update("Shot", shot["id"], {"description": "changed behind a 504"})
        assert rig.site.count("update", type="Shot") == updates + 1  # sent once
        assert read()["description"] == "changed behind a 504", "the replica's old row was served"
        proj = direct.find_one("Project", [])
        gateway_timeout.append("create")
        with pytest.raises(shotgun_api3.Fault, match="may have been applied"):
            sg.create("Shot", {"code": "made-once", "project": proj})
        assert len(direct.find("Shot", [["code", "is", "made-once"]])) == 1, "the create was applied twice"


def test_one_clients_gateway_timeout_does_not_refuse_the_others(tmp_path: Path, db_url: str,
                                                               gateway_timeout: list[str]) -> None:
    """One client's heavy request (a summarize over a big site) outlasts the balancer, which answers
    504 for it alone; SG is up. Another client's write a moment later goes to SG (before: the 504
    counted as an outage and every other client's writes were refused for 10 s, "not sent")."""
    with Rig(tmp_path, db_url) as rig:
        heavy, other, direct = rig.client(), rig.client(), rig.direct()
        heavy.MAX_ATTEMPTS = 1  # shotgun_api3 would re-send the 504ed read (harmless, but slower)
        other.find_one("Project", [])
        shot = direct.find_one("Shot", [["code", "is", "sh010"]], ["code"])
        gateway_timeout.append("summarize")
        with pytest.raises(shotgun_api3.ProtocolError):
            heavy.summarize("Shot", [], [{"field": "id", "type": "count"}])
        assert other.update("Shot", shot["id"], {"description": "via proxy"})["description"] == "via proxy"


def test_sgs_5xx_to_a_write_is_counted_as_an_upstream_error(tmp_path: Path, db_url: str,
                                                            gateway_timeout: list[str]) -> None:
    """The client of a write SG answered 504 gets the proxy's "may have been applied" answer, and
    the operator's metric still counts SG's 5xx (before: only a 5xx the client got as it was)."""
    with Rig(tmp_path, db_url, proxy=["sgcache_max_lag=0", "sgcache_status=127.0.0.1:0"]) as rig:
        assert rig.proxy is not None
        status_url = wait_until(lambda: (m := re.search(r"status page at (http://[\d.]+:\d+/)", rig.proxy.output()))
                                and m.group(1), 10, "the status page's address")

        def errors() -> float:
            with urllib.request.urlopen(status_url + "metrics", timeout=10) as resp:
                text = resp.read().decode()
            return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
                       if s.name == "sgcache_upstream_errors_total" and s.labels.get("kind") == "http-5xx")

        sg, direct = rig.client(), rig.direct()
        shot = direct.find_one("Shot", [["code", "is", "sh010"]], ["code"])
        before = errors()
        gateway_timeout.append("update")
        with pytest.raises(shotgun_api3.Fault, match="may have been applied"):
            sg.update("Shot", shot["id"], {"description": "changed behind a 504"})
        wait_until(lambda: errors() == before + 1, 5, "SG's 504 counted")
