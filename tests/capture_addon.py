"""Test-only mitmproxy addon, loaded after sgcache: writes every answer the proxy gives a client
(status, headers, body) to ``$SGCACHE_TEST_ANSWERS``, for the secret scan (tests/secretscan.py)."""

from __future__ import annotations

import os
import threading

from mitmproxy import http


class CaptureAnswers:
    def __init__(self) -> None:
        self.path = os.environ.get("SGCACHE_TEST_ANSWERS")
        self.lock = threading.Lock()

    def response(self, flow: http.HTTPFlow) -> None:
        if not self.path or flow.response is None:
            return
        response = flow.response
        head = f"--- {flow.request.method} {flow.request.pretty_url} -> {response.status_code}\n"
        headers = "".join(f"{k}: {v}\n" for k, v in response.headers.items(multi=True))
        body = (response.get_content(strict=False) or b"").decode("utf-8", "replace")
        with self.lock, open(self.path, "a", encoding="utf-8") as out:
            out.write(head + headers + "\n" + body + "\n")


addons = [CaptureAnswers()]
