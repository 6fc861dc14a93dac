"""mitmproxy addon: answer SG API3 reads from the sgcache replica, pass everything else.

    mitmdump -s addons/sgcache.py --set sgcache_db=sqlite:///sgcache.db

The addon is thin: it decodes ``POST .../api3/json``, asks :mod:`cache.service` in a
worker thread (never on mitmproxy's event loop), and marks every answer with
``X-SGCache: hit`` or ``X-SGCache: pass; reason=...``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import sys
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions, http

try:
    import cache  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cache import api3  # noqa: E402
from cache.auth import CredentialCache  # noqa: E402
from cache.errors import Passthrough  # noqa: E402
from cache.service import CacheService  # noqa: E402

log = logging.getLogger("sgcache")

DEFAULT_SCHEMA = str(Path(__file__).resolve().parent.parent / "schema" / "basic.yml")
WRITE_METHODS = {"create", "update", "delete", "revive", "batch"}
HEADER = "X-SGCache"
#: A read the database has not answered by then goes upstream.
READ_TIMEOUT = 5.0


class SGCache:
    """Serve cacheable API3 reads locally; learn from writes flowing past."""

    def __init__(self) -> None:
        self.service: CacheService | None = None
        self.credentials = CredentialCache()
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="sgcache")

    def load(self, loader: Any) -> None:
        loader.add_option("sgcache_db", str, "sqlite:///sgcache.db", "Replica database URL (SQLAlchemy).")
        loader.add_option("sgcache_schema", str, DEFAULT_SCHEMA, "Cached-subset schema YAML file.")
        loader.add_option(
            "sgcache_max_lag", int, 60,
            "Serve reads only while the ingester's heartbeat is younger than this many seconds (0: no check).",
        )
        loader.add_option("sgcache_auth_ttl", int, 300, "Seconds SG's acceptance of a credential is trusted.")
        loader.add_option(
            "sgcache_allow_users", bool, False,
            "Also serve human-user sessions and sudo_as_login (SG filters those by permission rules).",
        )

    def configure(self, updated: set[str]) -> None:
        if "sgcache_auth_ttl" in updated or "sgcache_allow_users" in updated:
            self.credentials = CredentialCache(
                ttl=ctx.options.sgcache_auth_ttl, allow_users=ctx.options.sgcache_allow_users
            )
        if updated & {"sgcache_db", "sgcache_schema", "sgcache_max_lag"}:
            old, self.service = self.service, None
            if old is not None:
                old.close()
            try:
                self.service = CacheService(
                    ctx.options.sgcache_db, ctx.options.sgcache_schema, ctx.options.sgcache_max_lag
                )
            except Exception as exc:
                raise exceptions.OptionsError(f"sgcache: cannot open the replica: {exc}") from exc
            log.info("sgcache: replica %s, schema %s", _safe_url(ctx.options.sgcache_db), ctx.options.sgcache_schema)

    def done(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.service is not None:
            self.service.close()

    # -- hooks ---------------------------------------------------------------------------
    async def request(self, flow: http.HTTPFlow) -> None:
        if not _is_api3(flow):
            return
        req = api3.decode_request(flow.request.get_content(strict=False) or b"")
        if req is None:
            self._mark_pass(flow, "not-api3")
            return
        flow.metadata["sgcache_method"] = req.method
        flow.metadata["sgcache_auth"] = req.auth
        flow.metadata["sgcache_args"] = req.args
        if req.method != "read":
            self._mark_pass(flow, "method")
            return
        reason = self.credentials.kind_reason(req.auth)
        if reason is None and not self.credentials.accepted(req.auth or {}):
            reason = "auth-unverified"
        if reason is None:
            reason = await self._answer(flow, req.args)
        if reason is not None:
            self._mark_pass(flow, reason)

    async def _answer(self, flow: http.HTTPFlow, args: Any) -> str | None:
        service = self.service
        if service is None:
            return "no-replica"
        loop = asyncio.get_running_loop()
        try:
            results = await asyncio.wait_for(
                loop.run_in_executor(self.executor, service.read, args), READ_TIMEOUT
            )
            body = await loop.run_in_executor(self.executor, api3.encode_results, results)
        except Passthrough as exc:
            if exc.detail:
                log.debug("pass %s: %s", exc.reason, exc.detail)
            return exc.reason
        except TimeoutError:
            log.warning("replica too slow; passing through")
            return "db-timeout"
        except Exception:  # noqa: BLE001 - fail open, never a traceback to the client
            log.exception("unexpected error answering a read; passing through")
            return "internal-error"
        service.count(None)
        flow.metadata["sgcache_hit"] = True
        flow.response = http.Response.make(
            200, body, {"Content-Type": "application/json; charset=utf-8", HEADER: "hit"}
        )
        return None

    def _mark_pass(self, flow: http.HTTPFlow, reason: str) -> None:
        flow.metadata["sgcache_pass"] = reason
        if self.service is not None:
            self.service.count(reason)

    async def response(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get("sgcache_hit") or "sgcache_pass" not in flow.metadata or flow.response is None:
            return
        flow.response.headers[HEADER] = f"pass; reason={flow.metadata['sgcache_pass']}"
        method = flow.metadata.get("sgcache_method")
        if method is None or flow.response.status_code != 200:
            return
        reply = await asyncio.get_running_loop().run_in_executor(
            self.executor, api3.decode_response, flow.response.get_content(strict=False) or b""
        )
        auth = flow.metadata.get("sgcache_auth")
        if auth and self.credentials.kind_reason(auth) is None and reply is not None:
            rejected = api3.is_error(reply) and reply.get("error_code") == api3.AUTH_ERROR_CODE
            self.credentials.record(auth, not rejected)
        if method == "info" and isinstance(reply, dict) and self.service is not None:
            await self._add_info(flow, reply)
        elif method in WRITE_METHODS and isinstance(reply, dict) and "results" in reply and self.service:
            args = flow.metadata.get("sgcache_args")
            await asyncio.get_running_loop().run_in_executor(
                self.executor, self.service.learn, method, args, reply["results"]
            )

    async def _add_info(self, flow: http.HTTPFlow, reply: dict[str, Any]) -> None:
        assert self.service is not None
        extra = await asyncio.get_running_loop().run_in_executor(self.executor, self.service.info)
        target = reply["results"] if isinstance(reply.get("results"), dict) else reply
        target["sgcache"] = extra
        flow.response.set_content(json.dumps(reply).encode("utf-8"))


def _is_api3(flow: http.HTTPFlow) -> bool:
    return flow.request.method == "POST" and flow.request.path.split("?", 1)[0].endswith("/api3/json")


def _safe_url(url: str) -> str:
    """A database URL without its password, for the log."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return url


addons = [SGCache()]
