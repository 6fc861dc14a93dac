"""mitmproxy addon: answer SG API3 reads from the sgcache replica, pass everything else.

    mitmdump -s addons/sgcache.py --set sgcache_db=sqlite:///sgcache.db

The addon is thin: it decodes ``POST .../api3/json``, asks :mod:`cache.service` in a
worker thread (never on mitmproxy's event loop), and marks every answer with
``X-SGCache: hit`` or ``X-SGCache: pass; reason=...``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fnmatch
import json
import logging
import os
import re
import socket
import ssl
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions, http

try:
    import cache  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cache import api3  # noqa: E402
from cache import site as sitemod  # noqa: E402
from cache.auth import CredentialCache, site_of  # noqa: E402
from cache.errors import Passthrough  # noqa: E402
from cache.pairs import DEFAULT_PAIRS_FILE, PairsError, load_pairs_file  # noqa: E402
from cache.private import install_redaction, redact, safe_url, url_secrets  # noqa: E402
from cache.proxy import upstream  # noqa: E402
from cache.read import READ_BUDGET_SECONDS  # noqa: E402
from cache.relay import RelayPolicy  # noqa: E402
from cache.schema import Schema, SchemaError  # noqa: E402
from cache.service import DEFAULT_MAX_LAG, CacheService  # noqa: E402

log = logging.getLogger("sgcache")

#: The replica's URL when ``sgcache_db`` is not given: ``SGCACHE_DB`` keeps a password off the command line.
DEFAULT_DB = "sqlite:///sgcache.db"
DEFAULT_SCHEMA = str(Path(__file__).resolve().parent.parent / "schema" / "basic.yml")
WRITE_METHODS = {"create", "update", "delete", "revive", "batch"}
HEADER = "X-SGCache"
#: Request bodies larger than this are decoded in a worker thread, off mitmproxy's event loop.
BIG_BODY = 64 * 1024
#: A client connection whose read overran the read budget gets this fraction of the budget (never
#: below SLOW_CLIENT_MIN_BUDGET) for this many seconds: its repeated slow reads then cost a tenth
#: as much, while its hits (milliseconds) are not affected. Per connection, not per host or
#: script: the other processes of a farm node using the same script keep the whole budget.
SLOW_CLIENT_SECONDS = 30.0
SLOW_CLIENT_FRACTION = 0.1
SLOW_CLIENT_MIN_BUDGET = 0.05
#: With the replica unopenable, how often the addon tries again.
SERVICE_RETRY_SECONDS = 5.0
#: A read the database has not answered by then goes upstream.
READ_TIMEOUT = 5.0
#: After SG failed to answer, requests are served offline for this long before SG is tried again.
OUTAGE_SECONDS = 10.0
#: An allow_hosts entry that matches nothing (an empty allow_hosts would decrypt everything).
NO_HOST = r"\A(?!)"
#: Upstream statuses that mean the site (or its load balancer) is down, not that one request failed.
OUTAGE_STATUSES = {502, 503, 504}


class SGCache:
    """Serve cacheable API3 reads locally; learn from writes flowing past."""

    def __init__(self) -> None:
        self.service: CacheService | None = None
        self._retry_at = 0.0
        self.credentials = CredentialCache()
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="sgcache")
        # writes wait on SG (a big batch can take minutes): never in the replica's pool
        self.write_executor = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="sgcache-w")
        self.hosts: list[str] = []
        #: The site named by sgcache_site / SGCACHE_SITE; ``site`` is the one served (it may
        #: come from the replica when none is configured).
        self.configured_site: sitemod.Site | None = None
        self.site: sitemod.Site | None = None
        self.relay = RelayPolicy(None)
        self._warned_no_site = False
        self.down_until: dict[str, float] = {}
        self.last_info: dict[str, dict[str, Any]] = {}
        self.slow_clients: dict[str, float] = {}  # client connection id -> until

    def load(self, loader: Any) -> None:
        loader.add_option(
            "sgcache_db", str, os.environ.get("SGCACHE_DB") or DEFAULT_DB,
            f"Replica database URL (SQLAlchemy); default: the SGCACHE_DB environment variable, else {DEFAULT_DB}.",
        )
        loader.add_option("sgcache_schema", str, DEFAULT_SCHEMA, "Cached-subset schema YAML file.")
        loader.add_option(
            "sgcache_max_lag", int, int(DEFAULT_MAX_LAG),
            "Serve reads only while the ingester's heartbeat is younger than this many seconds (0: no check). "
            "The ingester beats on every poll, at least every 3 s when idle.",
        )
        loader.add_option(
            "sgcache_read_budget", int, int(READ_BUDGET_SECONDS * 1000),
            "Milliseconds one read may run in the database; a read past it is stopped and passes "
            "(slow-read) without counting as a database failure (0: no budget).",
        )
        loader.add_option("sgcache_auth_ttl", int, 300, "Seconds SG's acceptance of a credential is trusted.")
        loader.add_option(
            "sgcache_allow_users", bool, False,
            "Also serve human-user sessions and sudo_as_login (SG filters those by permission rules).",
        )
        loader.add_option(
            "sgcache_scripts", Sequence[str], [],
            "Serve cached answers only to these API script names (repeatable; default: every script "
            "SG accepts). List the scripts whose permission rule set lets them read everything.",
        )
        loader.add_option(
            "sgcache_site", str, os.environ.get("SGCACHE_SITE", ""),
            "The SG site this replica copies (https://studio.shotgunstudio.com; default $SGCACHE_SITE, "
            "else the site stored in the replica). Only its requests are answered or learned from.",
        )
        loader.add_option(
            "sgcache_hosts", Sequence[str], [],
            "Other hosts to decrypt besides the site's (globs, repeatable); their requests pass "
            "untouched (reason=other-site). TLS to any other host is tunnelled, not decrypted.",
        )
        loader.add_option(
            "sgcache_allow_connect", Sequence[str], [],
            "host:port globs (repeatable) the proxy may connect to besides the site and port 443 "
            "(80 for http://) of non-local hosts, e.g. 'files.studio.internal:8443'.",
        )
        loader.add_option(
            "sgcache_pairs", str, "",
            "SG's paired link fields (YAML, see schema/pairs.yml, the default); pairs learned by "
            "the ingester are added from the database.",
        )
        loader.add_option(
            "sgcache_offline", bool, True,
            "When SG cannot be reached, answer cacheable reads from the replica (marked stale) "
            "and give writes an error naming the outage.",
        )

    def configure(self, updated: set[str]) -> None:
        if "sgcache_site" in updated:
            try:
                self.configured_site = (sitemod.Site.parse(ctx.options.sgcache_site)
                                        if ctx.options.sgcache_site.strip() else None)
            except sitemod.SiteError as exc:
                raise exceptions.OptionsError(f"sgcache_site: {exc}") from exc
            self.site = self.configured_site
        if updated & {"sgcache_auth_ttl", "sgcache_allow_users", "sgcache_scripts"}:
            self.credentials = CredentialCache(
                ttl=ctx.options.sgcache_auth_ttl,
                allow_users=ctx.options.sgcache_allow_users,
                scripts=ctx.options.sgcache_scripts or None,
            )
        if "sgcache_db" in updated:
            # whatever logs an error about the database (here, SQLAlchemy, mitmproxy) never shows its password
            install_redaction(url_secrets(ctx.options.sgcache_db))
        if updated & {"sgcache_db", "sgcache_schema", "sgcache_max_lag", "sgcache_read_budget", "sgcache_pairs", "sgcache_site"}:
            old, self.service = self.service, None
            if old is not None:
                old.close()
            try:  # a bad schema file is the operator's mistake: refuse it
                Schema.load(ctx.options.sgcache_schema)
            except SchemaError as exc:
                raise exceptions.OptionsError(f"sgcache: {exc}") from exc
            try:
                load_pairs_file(ctx.options.sgcache_pairs or DEFAULT_PAIRS_FILE)
            except PairsError as exc:
                raise exceptions.OptionsError(f"sgcache: {exc}") from exc
            self._retry_at = 0.0
            self.site = self.configured_site  # a site learnt from the previous replica is not this one's
            try:
                self._open_service(strict=True)
            except sitemod.SiteMismatch as exc:  # the wrong replica: refuse to start
                raise exceptions.OptionsError(f"sgcache: {exc}") from exc
        if updated & {"sgcache_site", "sgcache_hosts", "sgcache_allow_connect", "sgcache_db"}:
            self._apply_site()

    def _apply_site(self) -> None:
        """Decrypt the site's host plus ``sgcache_hosts``; rebuild the relay policy."""
        site = self.site
        self.hosts = [h.lower() for h in ctx.options.sgcache_hosts]
        regexes = [_host_regex(h) for h in self.hosts]
        if site is not None:
            regexes.insert(0, f"^{re.escape(site.host)}:{site.port}$")
        # Only these are decrypted; other CONNECT tunnels pass through untouched.
        ctx.options.update(allow_hosts=regexes or [NO_HOST])
        try:
            self.relay = RelayPolicy(site, ctx.options.sgcache_allow_connect)
        except ValueError as exc:
            raise exceptions.OptionsError(str(exc)) from exc
        if site is None and not self._warned_no_site:
            self._warned_no_site = True
            log.warning("sgcache: no SG site known (set sgcache_site or SGCACHE_SITE, or prime the replica "
                        "with scripts/scan): every request passes (reason=no-site)")

    def _open_service(self, strict: bool = False) -> CacheService | None:
        """Open the replica; when the database is down, pass everything and retry later (fail open).

        The replica must copy the configured site: a mismatch raises :class:`SiteMismatch` when
        ``strict`` (start-up), else it is logged and the replica is not used."""
        try:
            service = CacheService(ctx.options.sgcache_db, ctx.options.sgcache_schema, ctx.options.sgcache_max_lag,
                                   max(0, ctx.options.sgcache_read_budget) / 1000,
                                   pairs_path=ctx.options.sgcache_pairs or None)
        except Exception as exc:  # noqa: BLE001 - the proxy must run without its database
            self._retry_at = time.monotonic() + SERVICE_RETRY_SECONDS
            # a warning, not an error: mitmdump exits on an error logged during start-up
            log.warning("sgcache: cannot open the replica %s (%s); passing everything through, retrying in %.0fs",
                        _safe_url(ctx.options.sgcache_db),
                        redact(f"{type(exc).__name__}: {exc}", url_secrets(ctx.options.sgcache_db)),
                        SERVICE_RETRY_SECONDS)
            return None
        try:
            site = sitemod.resolve(service.store, self.configured_site)
        except sitemod.SiteMismatch as exc:
            service.close()
            self._retry_at = time.monotonic() + SERVICE_RETRY_SECONDS
            if strict:
                raise
            log.error("sgcache: %s; passing everything through", exc)
            return None
        except Exception as exc:  # noqa: BLE001 - database trouble: fail open, try again later
            service.close()
            self._retry_at = time.monotonic() + SERVICE_RETRY_SECONDS
            log.warning("sgcache: cannot read the replica's site %s (%s); passing everything through, "
                        "retrying in %.0fs", _safe_url(ctx.options.sgcache_db), exc, SERVICE_RETRY_SECONDS)
            return None
        if site is not None and self.configured_site is None:
            log.info("sgcache: no sgcache_site set: serving the site stored in the replica, %s", site)
        self.site = site
        self.service = service
        log.info("sgcache: replica %s of %s, schema %s", _safe_url(ctx.options.sgcache_db),
                 site or "no site yet", ctx.options.sgcache_schema)
        return self.service

    async def _current_service(self) -> CacheService | None:
        """The service, re-trying to open it (off the event loop) once its back-off has passed."""
        if self.service is None and time.monotonic() >= self._retry_at:
            self._retry_at = time.monotonic() + SERVICE_RETRY_SECONDS
            known = self.site
            await asyncio.get_running_loop().run_in_executor(self.executor, self._open_service)
            if self.site != known:  # learnt from the replica: decrypt its host from now on
                self._apply_site()
        return self.service

    def running(self) -> None:
        # Answering locally must not need an upstream connection (eager would also fail the
        # CONNECT when SG is down, before the addon sees the request).
        if ctx.options.connection_strategy != "lazy":
            ctx.options.update(connection_strategy="lazy")

    def done(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.write_executor.shutdown(wait=False, cancel_futures=True)
        if self.service is not None:
            self.service.close()

    # -- hooks ---------------------------------------------------------------------------
    async def http_connect(self, flow: http.HTTPFlow) -> None:
        """Tunnel only where the relay policy allows (the site, port 443 of non-local hosts, ...)."""
        if not _relaying(flow):
            return
        r = flow.request
        if self.site is not None and self.site.is_host(r.host, r.port):
            return  # the site: no trip to a worker thread
        decision = await asyncio.get_running_loop().run_in_executor(self.executor, self.relay.connect, r.host, r.port)
        if not decision.allowed:
            self._refuse_relay(flow, f"CONNECT {_hostport(r.host, r.port)}", decision.reason)

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Refuse destinations the relay policy forbids; acknowledge an API3 header segment at once.

        shotgun_api3 sends headers and body in separate segments with Nagle's algorithm
        on; if the proxy delays its ACK (Linux: up to 40 ms) every call pays that wait.
        """
        r = flow.request
        if _relaying(flow) and not (self.site is not None and self.site.matches(r.scheme, r.host, r.port)):
            decision = await asyncio.get_running_loop().run_in_executor(
                self.executor, self.relay.request, r.scheme, r.host, r.port)
            if not decision.allowed:
                self._refuse_relay(flow, f"{r.method} {r.scheme}://{_hostport(r.host, r.port)}", decision.reason)
                return
        if self._is_sg_api3(flow):
            quick_ack(flow.client_conn.id)
            flow.request.stream = False  # the body must be read to be answered locally

    async def server_connect(self, data: Any) -> None:
        """The last word on every upstream connection a client's choice opens (belt to the hooks above)."""
        client, server = data.client, data.server
        if type(getattr(client, "proxy_mode", None)).__name__ != "RegularMode" or server.address is None:
            return
        host, port = server.address[0], server.address[1]
        if self.site is not None and self.site.is_host(host, port):
            return
        loop = asyncio.get_running_loop()
        tunnel = await loop.run_in_executor(self.executor, self.relay.connect, host, port)
        if tunnel.allowed:
            return
        plain = await loop.run_in_executor(self.executor, self.relay.request,
                                           "https" if server.tls else "http", host, port)
        if not plain.allowed:
            log.warning("sgcache: refused a connection to %s: %s", _hostport(host, port), plain.reason)
            server.error = f"sgcache: {_hostport(host, port)} refused: {plain.reason}"

    def server_connected(self, data: Any) -> None:
        """Drop a connection whose name resolved to a local address after it was checked (DNS rebinding)."""
        server = data.server
        if type(getattr(data.client, "proxy_mode", None)).__name__ != "RegularMode":
            return
        if server.address is None or not server.peername:
            return
        reason = self.relay.peer_refused(server.address[0], server.address[1], str(server.peername[0]))
        if reason is not None:
            log.warning("sgcache: dropped the connection to %s: %s",
                        _hostport(server.address[0], server.address[1]), reason)
            _close_server(data.client.id, server)

    def _refuse_relay(self, flow: http.HTTPFlow, what: str, reason: str) -> None:
        """Answer 403 with a one-line reason, and log it."""
        peer = flow.client_conn.peername
        log.warning("sgcache: refused %s from %s: %s", what, peer[0] if peer else "?", reason)
        flow.metadata["sgcache_refused"] = reason
        if self.service is not None:
            self.service.count("relay-refused")
        flow.response = http.Response.make(
            403, f"sgcache: {what} refused: {reason}\n".encode(),
            {"Content-Type": "text/plain; charset=utf-8", HEADER: "pass; reason=relay-refused"},
        )

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or not _is_api3(flow):
            return
        if self.site is None:
            await self._current_service()  # a replica that opens late may name the site
        if not self._is_sg_api3(flow):
            # another host's API3 (or no site known): SG's answer, untouched; nothing learnt
            self._mark_pass(flow, "other-site" if self.site is not None else "no-site")
            return
        encoding = flow.request.headers.get("content-encoding", "").strip().lower()
        if encoding not in ("", "identity"):
            # shotgun_api3 never compresses a request; what SG makes of one is SG's business
            self._mark_pass(flow, "content-encoding")
            return
        body = flow.request.raw_content or b""
        if len(body) > BIG_BODY:  # decoding a huge body would stall every other client's request
            req = await asyncio.get_running_loop().run_in_executor(self.executor, api3.decode_request, body)
        else:
            req = api3.decode_request(body)
        if req is None:
            self._mark_pass(flow, "not-api3")
            return
        flow.metadata["sgcache_method"] = req.method
        flow.metadata["sgcache_auth"] = req.auth
        flow.metadata["sgcache_args"] = req.args
        if self._sg_down(flow):
            await self._answer_offline(flow, req)
            return
        if req.method in WRITE_METHODS:
            await self._send_write(flow, req.method)
            return
        if req.method != "read":
            self._mark_pass(flow, "method")
            return
        reason = self._auth_reason(flow, req.auth)
        if reason is None:
            reason = await self._answer(flow, req.args)
        if reason is not None:
            self._mark_pass(flow, reason)

    async def _send_write(self, flow: http.HTTPFlow, method: str) -> None:
        """Send a write to SG once, on a connection of its own.

        Relayed by mitmproxy, a write whose SG connection broke after sending would get
        mitmproxy's 502, and shotgun_api3 re-sends on 502: the write could be applied twice.
        Here a lost answer becomes an error in SG's envelope instead, which no client re-sends.
        """
        r = flow.request
        context = _upstream_ssl_context() if r.scheme == "https" else None
        if self.service is not None:  # where the ingester stood before SG saw the write (see learn)
            flow.metadata["sgcache_write_mark"] = await asyncio.get_running_loop().run_in_executor(
                self.executor, self.service.write_mark)
        try:
            reply = await asyncio.get_running_loop().run_in_executor(
                self.write_executor, upstream.send_once, r.scheme, r.host, r.port, r.path,
                list(r.headers.items(multi=True)), r.raw_content or b"", context,
            )
        except upstream.NotSent as exc:
            self._note_outage(flow, str(exc))
            self._refuse(flow, f"sgcache: the SG site {r.host} cannot be reached; {method} was not sent",
                         "sg-unreachable")
            return
        except Exception as exc:  # noqa: BLE001 - OutcomeUnknown, or a bug: never a re-send either way
            if not isinstance(exc, upstream.OutcomeUnknown):
                log.exception("unexpected error sending a %s", method)
            log.warning("%s sent to %s but no answer came back: %s", method, r.host, exc)
            if self.service is not None:  # it may have been applied: its effects are unknown
                await asyncio.get_running_loop().run_in_executor(
                    self.executor, self.service.outcome_unknown, method, flow.metadata.get("sgcache_args"))
            self._refuse(
                flow,
                f"sgcache: the connection to SG broke after the {method} was sent; it may have been "
                "applied. Check before retrying.",
                "outcome-unknown",
            )
            return
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers]
        flow.response = http.Response.make(reply.status, reply.body, headers)
        flow.response.reason = reply.reason
        flow.metadata["sgcache_from_sg"] = True  # SG's own answer, relayed by the addon
        self._mark_pass(flow, "method")  # SG's answer: the response hook learns from it

    def _refuse(self, flow: http.HTTPFlow, message: str, reason: str) -> None:
        """Answer with SG's error envelope (HTTP 200: the client raises it, never re-sends it)."""
        flow.metadata["sgcache_hit"] = True  # a local answer: nothing to learn from it
        flow.response = http.Response.make(
            200, api3.encode_error(message),
            {"Content-Type": "application/json; charset=utf-8", HEADER: f"pass; reason={reason}"},
        )
        if self.service is not None:
            self.service.count(reason)

    def _auth_reason(self, flow: http.HTTPFlow, auth: Any) -> str | None:
        """Why this request's credentials may not be served from the cache (None: they may)."""
        return self.credentials.reason(_site(flow), auth)

    # -- SG unreachable ------------------------------------------------------------------
    def _sg_down(self, flow: http.HTTPFlow) -> bool:
        until = self.down_until.get(flow.request.host)
        if until is None:
            return False
        if time.monotonic() < until and ctx.options.sgcache_offline:
            return True
        del self.down_until[flow.request.host]  # time to try SG again
        return False

    def _note_outage(self, flow: http.HTTPFlow, why: str) -> None:
        if flow.request.host not in self.down_until:
            log.warning("SG at %s unreachable (%s): serving offline for %.0fs", flow.request.host, why, OUTAGE_SECONDS)
        self.down_until[flow.request.host] = time.monotonic() + OUTAGE_SECONDS

    async def _answer_offline(self, flow: http.HTTPFlow, req: api3.Api3Request) -> None:
        """SG is down: serve what the replica can (marked stale), refuse writes in SG's envelope."""
        if req.method == "read":
            # Offline, only credentials SG accepted before are served (the TTL still applies).
            if self._auth_reason(flow, req.auth) is None:
                if await self._answer(flow, req.args, offline=True) is None:
                    return
        elif req.method == "info" and flow.request.host in self.last_info and self.service is not None:
            info = dict(self.last_info[flow.request.host])
            info["sgcache"] = await asyncio.get_running_loop().run_in_executor(self.executor, self.service.info)
            info["sgcache"]["offline"] = True
            flow.response = http.Response.make(
                200, json.dumps(info).encode(), {"Content-Type": "application/json; charset=utf-8",
                                                  HEADER: "hit; stale"})
            flow.metadata["sgcache_hit"] = True
            return
        self._refuse(flow, f"sgcache: the SG site {flow.request.host} cannot be reached; {req.method} was not sent",
                     "sg-unreachable")

    def error(self, flow: http.HTTPFlow) -> None:
        """SG could not be reached (refused, DNS, TLS): go offline for a while.

        A connection SG accepted and then dropped is that request's failure, not an outage:
        one hostile body must not switch the proxy to offline answers for everybody.
        """
        if "sgcache_method" not in flow.metadata or flow.response is not None or flow.error is None:
            return
        server = flow.server_conn
        if server.timestamp_tcp_setup is None or (server.tls and server.timestamp_tls_setup is None):
            self._note_outage(flow, flow.error.msg)
        else:
            log.info("SG dropped a %s request: %s", flow.metadata["sgcache_method"], flow.error.msg)

    async def _answer(self, flow: http.HTTPFlow, args: Any, offline: bool = False) -> str | None:
        service = await self._current_service()
        if service is None:
            return "no-replica"
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        began: list[float] = []  # set by the worker: an empty list means the read never left the queue
        client = flow.client_conn.id
        budget = None
        if self.slow_clients.get(client, 0.0) > time.monotonic():
            budget = max(service.read_budget * SLOW_CLIENT_FRACTION, min(service.read_budget, SLOW_CLIENT_MIN_BUDGET))
        try:
            body = await asyncio.wait_for(
                loop.run_in_executor(self.executor, _read_encoded, service, args, offline, began, budget),
                READ_TIMEOUT,
            )
        except Passthrough as exc:
            if exc.detail:
                log.debug("pass %s: %s", exc.reason, exc.detail)
            if exc.reason == "slow-read" and "recently" not in exc.detail:
                self._note_slow_client(client)
            return exc.reason
        except TimeoutError:
            if not began:
                # every worker busy: this request's wait, not a sign the database is down
                log.info("no worker free for a read in %.0fs; passing through", READ_TIMEOUT)
                return "busy"
            log.warning("replica too slow; passing through")
            service.note_timeout()
            return "db-timeout"
        except Exception:  # noqa: BLE001 - fail open, never a traceback to the client
            log.exception("unexpected error answering a read; passing through")
            return "internal-error"
        service.count(None)
        log.debug("hit in %.2f ms", (time.perf_counter() - started) * 1000)
        flow.metadata["sgcache_hit"] = True
        flow.response = http.Response.make(
            200, body, {"Content-Type": "application/json; charset=utf-8", HEADER: "hit; stale" if offline else "hit"}
        )
        return None

    def _note_slow_client(self, client: str) -> None:
        now = time.monotonic()
        if len(self.slow_clients) > 10_000:
            self.slow_clients = {k: v for k, v in self.slow_clients.items() if v > now}
        self.slow_clients[client] = now + SLOW_CLIENT_SECONDS

    def _mark_pass(self, flow: http.HTTPFlow, reason: str) -> None:
        flow.metadata["sgcache_pass"] = reason
        if self.service is not None:
            self.service.count(reason)

    async def response(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get("sgcache_hit") or "sgcache_pass" not in flow.metadata or flow.response is None:
            return
        flow.response.headers[HEADER] = f"pass; reason={flow.metadata['sgcache_pass']}"
        method = flow.metadata.get("sgcache_method")
        if method is None:
            return
        if flow.response.status_code in OUTAGE_STATUSES:
            self._note_outage(flow, f"HTTP {flow.response.status_code}")
            if method == "read" and ctx.options.sgcache_offline and not self._auth_reason(
                flow, flow.metadata.get("sgcache_auth")
            ):
                await self._answer(flow, flow.metadata.get("sgcache_args"), offline=True)
            return
        if flow.response.status_code != 200:
            return
        reply = await asyncio.get_running_loop().run_in_executor(
            self.executor, api3.decode_response, flow.response.get_content(strict=False) or b""
        )
        auth = flow.metadata.get("sgcache_auth")
        if _answered_by_sg(flow):
            self.credentials.observe(method, _site(flow), auth, reply if _is_json(flow.response) else None)
        if method == "info" and isinstance(reply, dict) and self.service is not None:
            await self._add_info(flow, reply)
        elif method in WRITE_METHODS and isinstance(reply, dict) and "results" in reply and self.service:
            await self._learn(flow, self.service, method, auth, reply)

    async def _learn(self, flow: http.HTTPFlow, service: CacheService, method: str, auth: Any,
                     reply: dict[str, Any]) -> None:
        """Write SG's answer to a write into the replica; never raises (the ingester brings what is missed)."""
        args = flow.metadata.get("sgcache_args")
        loop = asyncio.get_running_loop()
        try:
            to_fetch = await loop.run_in_executor(self.executor, service.learn, method, args, reply["results"],
                                                  flow.metadata.get("sgcache_write_mark"))
            if to_fetch and auth:
                # the answer was partial: read the whole rows now, so the writer reads its write
                url = f"{flow.request.scheme}://{flow.request.host}:{flow.request.port}{flow.request.path}"
                await loop.run_in_executor(
                    self.executor, service.fetch_rows, url, auth, to_fetch, _upstream_ssl_context()
                )
        except Passthrough as exc:
            log.info("%s answer not recorded (%s); the ingester will bring it", method, exc.reason)
        except Exception as exc:  # noqa: BLE001 - learning is best effort; the client has SG's answer
            log.warning("%s answer not recorded (%s); the ingester will bring it", method, type(exc).__name__)

    async def _add_info(self, flow: http.HTTPFlow, reply: dict[str, Any]) -> None:
        assert self.service is not None
        extra = await asyncio.get_running_loop().run_in_executor(self.executor, self.service.info)
        target = reply["results"] if isinstance(reply.get("results"), dict) else reply
        self.last_info[flow.request.host] = {k: v for k, v in target.items() if k != "sgcache"}
        target["sgcache"] = extra
        flow.response.set_content(json.dumps(reply).encode("utf-8"))


    def _is_sg_api3(self, flow: http.HTTPFlow) -> bool:
        """An API3 call to the site this replica copies (scheme, host, port and Host header)."""
        r = flow.request
        return (self.site is not None and _is_api3(flow)
                and self.site.matches(r.scheme, r.host, r.port, r.host_header))


def _is_api3(flow: http.HTTPFlow) -> bool:
    return flow.request.method == "POST" and flow.request.path.split("?", 1)[0].endswith("/api3/json")


def _relaying(flow: http.HTTPFlow) -> bool:
    """Whether the client chose the destination (regular proxy mode): the relay policy applies."""
    return type(getattr(flow.client_conn, "proxy_mode", None)).__name__ == "RegularMode"


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _site(flow: http.HTTPFlow) -> str:
    """The site a request goes to (scheme, host, port): credentials are verified per site."""
    return site_of(flow.request.scheme, flow.request.host, flow.request.port)


def _answered_by_sg(flow: http.HTTPFlow) -> bool:
    """Whether the flow's response is SG's own (not made by this addon, a replay or another addon)."""
    if flow.metadata.get("sgcache_hit") or flow.is_replay is not None:
        return False
    return bool(flow.metadata.get("sgcache_from_sg")) or flow.server_conn.timestamp_start is not None


def _is_json(response: http.Response) -> bool:
    """Whether shotgun_api3 decodes this answer as JSON (its content-type test)."""
    content_type = response.headers.get("content-type", "").strip().lower()
    return not content_type or content_type.startswith(("application/json", "text/javascript"))


def _read_encoded(
    service: CacheService, args: Any, offline: bool, began: list[float] | None = None, budget: float | None = None
) -> bytes:
    """Answer a read and encode SG's envelope, in one trip to a worker thread."""
    if began is not None:
        began.append(time.monotonic())
    if budget is None:
        return api3.encode_results(service.read(args, offline))
    return api3.encode_results(service.read(args, offline, budget))


def _upstream_ssl_context() -> ssl.SSLContext:
    """Verify SG as mitmproxy does: its trusted CA option, or the default roots."""
    return upstream.tls_context(ctx.options.ssl_insecure, ctx.options.ssl_verify_upstream_trusted_ca or None)


def quick_ack(client_id: str) -> None:
    """Set TCP_QUICKACK on a client connection's socket (Linux); a pending ACK goes out now."""
    option = getattr(socket, "TCP_QUICKACK", None)
    if option is None:
        return
    try:
        handler = ctx.master.addons.get("proxyserver").connections.get(client_id)
        sock = handler.transports[handler.client].writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, option, 1)
    except Exception:  # noqa: BLE001 - mitmproxy internals moved: only latency is lost
        log.debug("TCP_QUICKACK not set", exc_info=True)


def _close_server(client_id: str, server: Any) -> None:
    """Close an open upstream connection (mitmproxy has no hook result for it)."""
    try:
        handler = ctx.master.addons.get("proxyserver").connections.get(client_id)
        handler.transports[server].writer.close()
    except Exception:  # noqa: BLE001 - mitmproxy internals moved: say so loudly
        log.error("sgcache: could not drop the connection to %s", server.address, exc_info=True)


def _host_regex(glob: str) -> str:
    """An allow_hosts regex (matched against ``host:port``) for a host glob."""
    return "^" + fnmatch.translate(glob.lower()).removeprefix("(?s:").removesuffix(")\\Z") + "(:\\d+)?$"


def _safe_url(url: str) -> str:
    """A database URL without its password, for the log."""
    return safe_url(url)


addons = [SGCache()]
