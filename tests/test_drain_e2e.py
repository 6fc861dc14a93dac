"""A proxy stopping (SIGTERM) while a client pages through a find(): the call gets every page.

shotgun_api3's find() asks for page after page on one connection. While the proxy stops, an
answer closes its connection (the client goes elsewhere), except one that filled its page: the
next page's request comes at once on the same connection and is answered too (cache/proxy/drain.py).
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from .rig import Rig
from .wait import wait_until


def test_a_find_paging_while_the_proxy_stops_gets_every_page(tmp_path: Path, db_url: str) -> None:
    with Rig(tmp_path, db_url) as rig:
        proxy = rig.proxy
        assert proxy is not None and proxy.proc is not None
        expected = rig.direct().find("Shot", [], ["code"], order=[{"field_name": "id", "direction": "asc"}])
        sg = rig.client(proxy)
        sg.find_one("Project", [])
        sg.config._records_per_page = 2  # six pages of Shots
        pages: list[int] = []
        real_call = sg._call_rpc

        def call(method: str, params: Any, *args: Any, **kwargs: Any) -> Any:
            result = real_call(method, params, *args, **kwargs)
            if method == "read":
                pages.append(params["paging"]["current_page"])
                if len(pages) == 1:  # the proxy starts stopping between the first and second page
                    proxy.proc.send_signal(signal.SIGTERM)
                    wait_until(lambda: proxy.lines_with("sgcache: stopping"), 10, "the proxy to start stopping")
            return result

        sg._call_rpc = call
        got = sg.find("Shot", [], ["code"], order=[{"field_name": "id", "direction": "asc"}])
        assert [r["code"] for r in got] == [r["code"] for r in expected]
        assert pages == [1, 2, 3, 4, 5, 6, 7] or pages == [1, 2, 3, 4, 5, 6]
        assert proxy.proc.wait(10) == 0
