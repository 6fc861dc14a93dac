"""mitmproxy addon: answer SG API3 reads from the sgcache replica, pass everything else.

    mitmdump -s addons/sgcache.py --set sgcache_db=sqlite:///sgcache.db

The addon is thin: its hooks decode ``POST .../api3/json``, dispatch to the policies in
:mod:`cache.proxy` (no mitmproxy there; unit-tested without a proxy) and to the replica's
:mod:`cache.proxy.service` in worker threads (never on mitmproxy's event loop), and answer. Every
answer is marked ``X-SGCache: hit`` or ``X-SGCache: pass; reason=...``. What one flow's hooks
share is its :class:`~cache.proxy.flowstate.FlowState`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import socket
import ssl
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions, http
from mitmproxy.proxy import mode_specs

try:
    import cache  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cache.audit.shadow import Audit, AuditOptions  # noqa: E402
from cache.ops.access import FORMATS, RequestRecord, quiet_connections, who  # noqa: E402
from cache.ops.operations import Operations  # noqa: E402
from cache.private import install_redaction, url_secrets  # noqa: E402
from cache.proxy import upstream  # noqa: E402
from cache.proxy.answercache import ANSWER_CACHE_MB  # noqa: E402
from cache.proxy.answers import HEADER, Answer, pass_header  # noqa: E402
from cache.proxy.auth import MAX_CREDENTIALS, CredentialCache  # noqa: E402
from cache.proxy.calls import Call, SGAnswer, SiteCalls  # noqa: E402
from cache.proxy.drain import InFlight  # noqa: E402
from cache.proxy.flowstate import state_of  # noqa: E402
from cache.proxy.guard import RelayGuard  # noqa: E402
from cache.proxy.memory import MAX_ANSWER_MB, Trimmer  # noqa: E402
from cache.proxy.outage import never_connected  # noqa: E402
from cache.proxy.replica import OneLineRefusal, Refused, Replica, ReplicaOptions  # noqa: E402
from cache.proxy.routing import decrypt_patterns, is_api3, served_site  # noqa: E402
from cache.proxy.sending import WRITE_METHODS, Outgoing  # noqa: E402
from cache.proxy.service import DEFAULT_MAX_LAG, CacheService  # noqa: E402
from cache.proxy.uploads import changed_types, is_upload  # noqa: E402
from cache.read import READ_BUDGET_SECONDS  # noqa: E402
from cache.read.limits import PLAN_CACHE_SIZE  # noqa: E402
from cache.read.relative import RelativeDates, fixed_clock, system_now, zone_named  # noqa: E402
from cache.replica.site import Site, SiteError  # noqa: E402
from cache.shipped import basic_schema  # noqa: E402

log = logging.getLogger("sgcache")

#: The replica's URL when ``sgcache_db`` is not given: ``SGCACHE_DB`` keeps a password off the command line.
DEFAULT_DB = "sqlite:///sgcache.db"
DEFAULT_SCHEMA = str(basic_schema())
#: Options that re-open the replica when they change.
REPLICA_OPTIONS = {"sgcache_db", "sgcache_schema", "sgcache_max_lag", "sgcache_read_budget", "sgcache_pairs",
                   "sgcache_site", "mode"}


class SGCache:
    """Serve cacheable API3 reads locally; learn from writes flowing past."""

    def __init__(self) -> None:
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="sgcache")
        # writes wait on SG (a big batch can take minutes): never in the replica's pool
        self.write_executor = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="sgcache-w")
        self.replica = Replica()  # with the site served: sgcache_site's, else the replica's own
        self.calls = SiteCalls(self.replica, self.executor, self.write_executor, self._tls, self._apply_site)
        self.guard = RelayGuard(self.executor, self.replica.count)
        self._warned_no_site = False
        self.in_flight = InFlight()
        self.trimmer = Trimmer(self.executor)  # memory back to the system after large bodies
        self._tls_context: tuple[tuple[bool, str | None], ssl.SSLContext] | None = None

    @property
    def service(self) -> CacheService | None:
        return self.replica.service

    @property
    def site(self) -> Site | None:
        return self.replica.site

    def load(self, loader: Any) -> None:
        _one_line_refusals()
        loader.add_option(
            "sgcache_db", str, os.environ.get("SGCACHE_DB") or DEFAULT_DB,
            f"Replica database URL (SQLAlchemy); default: the SGCACHE_DB environment variable, else {DEFAULT_DB}.",
        )
        loader.add_option("sgcache_schema", str, os.environ.get("SGCACHE_SCHEMA") or DEFAULT_SCHEMA,
                          "Cached-subset schema YAML file; default: the SGCACHE_SCHEMA environment variable, "
                          "else the shipped schema/basic.yml.")
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
            "sgcache_auth_cache", int, MAX_CREDENTIALS,
            "Credentials SG accepted remembered at most; past it the closest to expiry are forgotten "
            "(their next read passes once).",
        )
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
            "else the reverse-proxy target of --mode reverse:URL, else the site stored in the replica). "
            "Only its requests are answered or learned from.",
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
        self._load_relative_dates(loader)
        self._load_bounds(loader)

    def _load_bounds(self, loader: Any) -> None:
        """What the proxy keeps in memory (cache/proxy/memory.py)."""
        loader.add_option(
            "sgcache_plan_cache", int, PLAN_CACHE_SIZE,
            "Read plans kept for reuse (the least recently used go first; 0: none). Each costs "
            "tens of kB: this bounds most of the proxy's memory.",
        )
        loader.add_option(
            "sgcache_answer_cache", int, ANSWER_CACHE_MB,
            "MB of encoded answers kept for reuse while the replica is unchanged (SQLite; 0: none).",
        )
        loader.add_option(
            "sgcache_max_answer", int, MAX_ANSWER_MB,
            "MB: a cached answer larger than this passes (large-answer); SG's answers larger than "
            "this are relayed without being read (0: no bound).",
        )

    def _load_relative_dates(self, loader: Any) -> None:
        """Relative-date filters (cache/read/relative.py, docs/semantics.md)."""
        loader.add_option(
            "sgcache_timezone", str, "",
            "IANA time zone (e.g. Europe/London) in which relative-date filters (in_last, in_next, "
            "in_calendar_*) are served; set it to the site's time zone. Empty: they pass to SG.",
        )
        loader.add_option(
            "sgcache_clock", str, "",
            "For tests and replays only: the proxy's time for relative-date filters, stopped at this "
            "ISO 8601 instant (e.g. 2026-03-08T03:30:00Z). Empty: the system clock.",
        )

    def _configure_relative_dates(self, updated: set[str]) -> None:
        if not updated & {"sgcache_timezone", "sgcache_clock"}:
            return
        options = ctx.options
        try:
            clock = fixed_clock(options.sgcache_clock) if options.sgcache_clock.strip() else system_now
        except ValueError as exc:
            raise exceptions.OptionsError(f"sgcache_clock: not an ISO 8601 time: {options.sgcache_clock!r}") from exc
        name = options.sgcache_timezone.strip()
        try:
            self.replica.serve_relative(RelativeDates(zone_named(name), clock) if name else None)
        except ValueError as exc:
            raise exceptions.OptionsError(f"sgcache_timezone: {exc}") from exc

    def configure(self, updated: set[str]) -> None:
        options = ctx.options
        if "termlog_verbosity" in updated and hasattr(options, "termlog_verbosity"):
            # mitmproxy sets the root logger to DEBUG and turns every record into an add_log event
            # for all its addons (on the event loop): records nobody shows are not made at all
            logging.getLogger("sgcache").setLevel(options.termlog_verbosity.upper())
        if updated & {"sgcache_site", "mode"}:
            try:
                site = served_site(options.sgcache_site, _reverse_targets(options.mode))
                self.replica.configure_site(site)
            except SiteError as exc:
                raise exceptions.OptionsError(f"sgcache_site: {exc}") from exc
            if site and not options.sgcache_site.strip():
                log.info("sgcache: serving the reverse-proxy target %s as the site", self.replica.configured_site)
        if updated & {"sgcache_auth_ttl", "sgcache_allow_users", "sgcache_scripts", "sgcache_auth_cache"}:
            if options.sgcache_auth_cache < 1:
                raise exceptions.OptionsError("sgcache_auth_cache: 1 or more")
            self.calls.credentials = CredentialCache(
                ttl=options.sgcache_auth_ttl, allow_users=options.sgcache_allow_users,
                scripts=options.sgcache_scripts or None, max_entries=options.sgcache_auth_cache)
        if "sgcache_offline" in updated:
            self.calls.offline = options.sgcache_offline
        if "sgcache_plan_cache" in updated:
            if options.sgcache_plan_cache < 0:
                raise exceptions.OptionsError("sgcache_plan_cache: 0 or more")
            self.replica.keep_plans(options.sgcache_plan_cache)
        if "sgcache_answer_cache" in updated:
            if options.sgcache_answer_cache < 0:
                raise exceptions.OptionsError("sgcache_answer_cache: 0 or more")
            self.replica.keep_answers(options.sgcache_answer_cache * 1024 * 1024)
        if "sgcache_max_answer" in updated:
            if options.sgcache_max_answer < 0:
                raise exceptions.OptionsError("sgcache_max_answer: 0 or more")
            self.calls.reads.max_answer = options.sgcache_max_answer * 1024 * 1024
        self._configure_relative_dates(updated)
        if "sgcache_db" in updated:
            # whatever logs an error about the database (here, SQLAlchemy, mitmproxy) never shows its password
            install_redaction(url_secrets(options.sgcache_db))
        if updated & REPLICA_OPTIONS:
            replica_options = ReplicaOptions(options.sgcache_db, options.sgcache_schema, options.sgcache_max_lag,
                                             max(0, options.sgcache_read_budget) / 1000, options.sgcache_pairs or None)
            try:
                self.replica.reopen(replica_options)
            except Refused as exc:  # a bad schema or pairs file, or the wrong replica
                raise exceptions.OptionsError(f"sgcache: {exc}") from exc
        if updated & {"sgcache_site", "sgcache_hosts", "sgcache_allow_connect", "sgcache_db", "mode"}:
            self._apply_site()

    def _apply_site(self) -> None:
        """Decrypt the site's host plus ``sgcache_hosts``; rebuild the relay policy."""
        site = self.site
        # Only these are decrypted; other CONNECT tunnels pass through untouched.
        ctx.options.update(allow_hosts=decrypt_patterns(site, ctx.options.sgcache_hosts))
        try:
            self.guard.configure(site, ctx.options.sgcache_allow_connect)
        except ValueError as exc:
            raise exceptions.OptionsError(str(exc)) from exc
        if site is None and not self._warned_no_site:
            self._warned_no_site = True
            log.warning("sgcache: no SG site known (set sgcache_site or SGCACHE_SITE, or prime the replica "
                        "with sgcache-scan --full): every request passes (reason=no-site)")

    def running(self) -> None:
        # Answering locally must not need an upstream connection (eager would also fail the
        # CONNECT when SG is down, before the addon sees the request).
        if ctx.options.connection_strategy != "lazy":
            ctx.options.update(connection_strategy="lazy")

    async def done(self) -> None:
        """Stopping (SIGTERM): answer the requests in flight first (cache/proxy/drain.py)."""
        await self.in_flight.drain()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.write_executor.shutdown(wait=False, cancel_futures=True)
        self.calls.writes.pool.close()
        self.replica.close()

    def client_connected(self, client: Any) -> None:
        """Stopping: no new connections (cache/proxy/drain.py)."""
        if self.in_flight.draining:
            client.error = "sgcache is stopping"

    # -- hooks: where clients may make the proxy connect (cache/proxy/guard.py) -------------
    async def http_connect(self, flow: http.HTTPFlow) -> None:
        """Tunnel only where the relay policy allows (the site, port 443 of non-local hosts, ...)."""
        if _client_chose_destination(flow.client_conn):
            r = flow.request
            self._respond(flow, await self.guard.connect(r.host, r.port, _peer(flow), state_of(flow.metadata)))

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Refuse destinations the relay policy forbids; acknowledge an API3 header segment at once.

        shotgun_api3 sends headers and body in separate segments with Nagle's algorithm
        on; if the proxy delays its ACK (Linux: up to 40 ms) every call pays that wait.
        """
        state = state_of(flow.metadata)  # until its response or error hook:
        self.in_flight.start(flow.id, lambda: state.method in WRITE_METHODS)
        r = flow.request
        if _client_chose_destination(flow.client_conn):
            refusal = await self.guard.request(r.method, r.scheme, r.host, r.port, _peer(flow), state_of(flow.metadata))
            if refusal is not None:
                self._respond(flow, refusal)
                return
        if self._is_site_api3(flow):
            quick_ack(flow.client_conn.id)
            flow.request.stream = False  # the body must be read to be answered locally

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """SG's answer to the site's API3 is read whole (learnt from), even with ``stream_large_bodies``;
        but one larger than ``sgcache_max_answer`` (not learnt from) is streamed to the client."""
        if flow.response is not None and self._is_site_api3(flow):
            limit = self.calls.reads.max_answer
            streamed = bool(limit) and not self._answered_here(flow) and _declared_size(flow.response) > limit
            flow.response.stream = streamed
            reason = state_of(flow.metadata).pass_reason
            if streamed and reason is not None:  # its headers leave now: marked here, not in the response hook
                flow.response.headers[HEADER] = pass_header(reason)

    async def server_connect(self, data: Any) -> None:
        """The last word on every upstream connection a client's choice opens (belt to the hooks above)."""
        server = data.server
        if _client_chose_destination(data.client) and server.address is not None:
            refused = await self.guard.upstream(server.address[0], server.address[1], bool(server.tls))
            if refused is not None:
                server.error = refused

    def server_connected(self, data: Any) -> None:
        """Drop a connection whose name resolved to a local address after it was checked (DNS rebinding)."""
        server = data.server
        if not _client_chose_destination(data.client) or server.address is None or not server.peername:
            return
        if self.guard.peer_refused(server.address[0], server.address[1], str(server.peername[0])):
            try:
                _transport_writer(data.client.id, server).close()
            except Exception:  # noqa: BLE001 - mitmproxy internals moved: say so loudly
                log.error("sgcache: could not drop the connection to %s", server.address, exc_info=True)

    # -- hooks: API3 calls to the site ---------------------------------------------------
    async def request(self, flow: http.HTTPFlow) -> None:
        r = flow.request
        if flow.response is not None or not is_api3(r.method, r.path):
            return
        state = state_of(flow.metadata)
        if self.site is None:
            await self.calls.service()  # a replica that opens late may name the site
        if not self._is_site_api3(flow):
            # another host's API3 (or no site known): SG's answer, untouched; nothing learnt
            self.calls.passes(state, "other-site" if self.site is not None else "no-site")
            return
        outcome = await self.calls.request(_call(flow), state)
        if isinstance(outcome, Answer):
            self._respond(flow, outcome)
        elif outcome is not None:  # SG's reply to a write the proxy sent itself
            headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in outcome.headers]
            flow.response = http.Response.make(outcome.status, outcome.body, headers)
            flow.response.reason = outcome.reason

    async def response(self, flow: http.HTTPFlow) -> None:
        try:
            if self._is_site_upload(flow):
                await self._uploaded(flow)
            await self._learn(flow)
        finally:
            if self.in_flight.draining and flow.response is not None:
                flow.response.headers["Connection"] = "close"  # stopping: the client goes elsewhere
            self.in_flight.end(flow.id)
            self.trimmer.after(_body_size(flow))

    async def _learn(self, flow: http.HTTPFlow) -> None:
        """Mark SG's answer (pass) and learn from it; it may be replaced (cache/proxy/calls.py)."""
        state, response = state_of(flow.metadata), flow.response
        if state.answered_here or state.pass_reason is None or response is None:
            return
        response.headers[HEADER] = pass_header(state.pass_reason)
        if state.method is None:  # not decoded: SG's answer is all there is
            return
        sg = SGAnswer(response.status_code, lambda: response.get_content(strict=False) or b"",
                      response.headers.get("content-type", ""), flow.is_replay is not None,
                      flow.server_conn.timestamp_start is not None)
        outcome = await self.calls.answer(_call(flow), state, sg)
        if isinstance(outcome, Answer):
            self._respond(flow, outcome)
        elif outcome is not None:
            response.set_content(outcome)

    async def error(self, flow: http.HTTPFlow) -> None:
        """SG could not be reached (refused, DNS, TLS): go offline for a while (cache/proxy/outage.py)."""
        self.in_flight.end(flow.id)
        self.trimmer.after(_body_size(flow))
        if flow.response is not None or flow.error is None:
            return
        if self._is_site_upload(flow):  # SG may have linked it before the connection broke
            await self._uploaded(flow)
        server = flow.server_conn
        self.calls.connection_failed(state_of(flow.metadata), flow.request.host, flow.error.msg,
                                     never_connected(server.timestamp_tcp_setup, bool(server.tls),
                                                     server.timestamp_tls_setup))

    # -- helpers ---------------------------------------------------------------------------
    def _respond(self, flow: http.HTTPFlow, answer: Answer | None) -> None:
        """Answer the flow with the proxy's own answer (None: no answer, the flow goes on)."""
        if answer is not None:
            flow.response = http.Response.make(answer.status, answer.body, answer.headers)

    def _is_site_api3(self, flow: http.HTTPFlow) -> bool:
        """An API3 call to the site this replica copies (scheme, host, port and Host header)."""
        r = flow.request
        return (self.site is not None and is_api3(r.method, r.path)
                and self.site.matches(r.scheme, r.host, r.port, r.host_header))

    @staticmethod
    def _answered_here(flow: http.HTTPFlow) -> bool:
        """The proxy made the flow's answer itself (a hit, a refusal, SG's reply to a write it sent)."""
        state = state_of(flow.metadata)
        return state.answered_here or state.from_sg

    def _is_site_upload(self, flow: http.HTTPFlow) -> bool:
        """An upload form to the site, which may change entities (cache/proxy/uploads.py)."""
        r = flow.request
        return (self.site is not None and is_upload(r.method, r.path)
                and self.site.matches(r.scheme, r.host, r.port, r.host_header))

    async def _uploaded(self, flow: http.HTTPFlow) -> None:
        """Mark what an upload form may have changed; reads of it pass until the ingester has it.
        Done before the client has SG's answer; the form (maybe a large file) is parsed off the loop."""
        request = flow.request
        types = await asyncio.get_running_loop().run_in_executor(self.executor, lambda: changed_types(_form(request)))
        await self.calls.uploaded(types)

    def _tls(self) -> ssl.SSLContext:
        """Verify SG as mitmproxy does: its trusted CA option, or the default roots (one context
        while the options stay: kept connections are reused under the context that made them)."""
        key = (ctx.options.ssl_insecure, ctx.options.ssl_verify_upstream_trusted_ca or None)
        if self._tls_context is None or self._tls_context[0] != key:
            self._tls_context = (key, upstream.tls_context(*key))
        return self._tls_context[1]


def _one_line_refusals() -> None:
    """A refused option (a bad sgcache_db, schema, site...) is one line in mitmdump's output, not a
    traceback: the script loader logs it through ``mitmproxy.addons.script``."""
    script_log = logging.getLogger("mitmproxy.addons.script")
    if not any(isinstance(f, OneLineRefusal) for f in script_log.filters):
        script_log.addFilter(OneLineRefusal())


def _call(flow: http.HTTPFlow) -> Call:
    """The flow's request, as the policies in cache.proxy see it."""
    r = flow.request
    return Call(Outgoing(r.scheme, r.host, r.port, r.path, list(r.headers.items(multi=True)), r.raw_content or b""),
                flow.client_conn.id)


def _body_size(flow: http.HTTPFlow) -> int:
    """The bytes of the flow's request and answer held in memory (streamed ones are not)."""
    size = len(flow.request.raw_content or b"")
    return size + (len(flow.response.raw_content or b"") if flow.response is not None else 0)


def _declared_size(response: http.Response) -> int:
    """The answer's Content-Length (0 when it declares none)."""
    try:
        return int(response.headers.get("content-length", "0"))
    except ValueError:
        return 0


def _form(request: http.Request) -> dict[str, str]:
    """The text fields of an urlencoded or multipart form (empty when it cannot be read)."""
    try:
        if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            return {k.decode("utf-8", "replace"): v.decode("utf-8", "replace")
                    for k, v in request.multipart_form.items() if len(v) <= 1024}
        return dict(request.urlencoded_form.items())
    except Exception:  # noqa: BLE001 - an unreadable form names no type: every type is marked
        log.debug("upload form not readable", exc_info=True)
        return {}


def _reverse_targets(modes: Sequence[str]) -> list[tuple[str, str, int]]:
    """(scheme, host, port) of each reverse-proxy mode (``--mode reverse:https://site``)."""
    targets = []
    for text in modes:
        try:
            spec = mode_specs.ProxyMode.parse(text)
        except ValueError:
            continue  # mitmproxy refuses it itself
        if isinstance(spec, mode_specs.ReverseMode):
            targets.append((spec.scheme, spec.address[0], spec.address[1]))
    return targets


def _peer(flow: http.HTTPFlow) -> str:
    """The client's address, for the log."""
    peer = flow.client_conn.peername
    return str(peer[0]) if peer else "?"


def _client_chose_destination(client: Any) -> bool:
    """Whether the client chose the destination (regular proxy mode): the relay policy applies."""
    return type(getattr(client, "proxy_mode", None)).__name__ == "RegularMode"


def _transport_writer(client_id: str, server: Any = None) -> Any:
    """The asyncio writer of a client connection (or of one of its ``server`` connections).

    mitmproxy internals: no hook exposes the sockets, so this reaches into the proxyserver
    addon's connection handlers. The one place that does; it raises when they moved, and
    every caller fails soft.
    """
    handler = ctx.master.addons.get("proxyserver").connections.get(client_id)
    return handler.transports[handler.client if server is None else server].writer


def quick_ack(client_id: str) -> None:
    """Set TCP_QUICKACK on a client connection's socket (Linux): a pending ACK goes out now."""
    option = getattr(socket, "TCP_QUICKACK", None)
    if option is None:
        return
    try:
        _transport_writer(client_id).get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, option, 1)
    except Exception:  # noqa: BLE001 - mitmproxy internals moved: only latency is lost
        log.debug("TCP_QUICKACK not set", exc_info=True)


class SGCacheOps:
    """The operator's view (cache/ops): status page, /metrics and /healthz on ``sgcache_status``,
    one access-log line per API3 request. Runs after :class:`SGCache`: its hooks see each flow's outcome."""

    def __init__(self, cache: SGCache) -> None:
        self.ops = Operations(cache.replica)
        self._running = False
        self.audit = Audit(lambda: cache.replica.service, self.ops.metrics.registry, self.ops.observer.label)
        cache.calls.audit = self.audit
        self.ops.audit = self.audit.rows

    def load(self, loader: Any) -> None:
        loader.add_option(
            "sgcache_status", str, "",
            "HOST:PORT for the status page (/), Prometheus metrics (/metrics) and the health check "
            "(/healthz), e.g. 127.0.0.1:9180 (empty: off). Each mitmdump process needs its own port.",
        )
        loader.add_option(
            "sgcache_access_log", str, "logfmt",
            "One line per API3 request at info level (method, type, hit/pass and reason, rows, ms, client); "
            "off, logfmt or json. When on, mitmproxy's per-connection lines move to debug.",
            choices=FORMATS,
        )
        self._load_audit(loader)

    def _load_audit(self, loader: Any) -> None:
        """The audit (shadow reads, cache/audit/)."""
        loader.add_option(
            "sgcache_audit", int, 1,
            "Percent of hits (0-100) also read from SG in the background and compared (0: off). "
            "Relative-date hits are all sampled until 100 of them agreed.",
        )
        loader.add_option("sgcache_audit_rate", int, 5,
                          "At most this many audit reads per second are sent to SG (0: no limit).")
        loader.add_option(
            "sgcache_audit_enforce", bool, False,
            "A disagreement switches off the rules the read relied on (their reads pass with reason "
            "audit-disabled) until an operator clears them (sgcache-audit --clear).",
        )

    def configure(self, updated: set[str]) -> None:
        if updated & {"sgcache_audit", "sgcache_audit_rate", "sgcache_audit_enforce"}:
            o = ctx.options
            if not 0 <= o.sgcache_audit <= 100:
                raise exceptions.OptionsError("sgcache_audit: a percent, 0 to 100")
            if o.sgcache_audit_rate < 0:
                raise exceptions.OptionsError("sgcache_audit_rate: 0 or more")
            self.audit.configure(AuditOptions(o.sgcache_audit, o.sgcache_audit_rate, o.sgcache_audit_enforce))
        if "sgcache_access_log" in updated:
            fmt = ctx.options.sgcache_access_log
            self.ops.observer.access_format = fmt
            quiet_connections(fmt != "off")
            # mitmdump's default one line per flow (flow_detail=1) repeats what the access log says
            if fmt != "off" and "flow_detail" in ctx.options and ctx.options.flow_detail == 1:
                ctx.options.update(flow_detail=0)
        if "sgcache_status" in updated and self._running:
            self.ops.serve(ctx.options.sgcache_status)

    def running(self) -> None:
        self._running = True
        self.ops.serve(ctx.options.sgcache_status)

    def done(self) -> None:
        self.audit.close()
        self.ops.close()
        quiet_connections(False)

    def client_connected(self, client: Any) -> None:
        self.ops.observer.connections(1)

    def client_disconnected(self, client: Any) -> None:
        self.ops.observer.connections(-1)

    def response(self, flow: http.HTTPFlow) -> None:
        state = state_of(flow.metadata)
        # SG answered 502/503/504: its answer stands, or (a read) the replica's replaced it
        if state.method is not None and ((flow.response is not None and flow.response.status_code in (502, 503, 504)
                                          and not state.answered_here) or (state.hit and state.pass_reason)):
            self.ops.observer.upstream_error("http-5xx")
        self._finished(flow, "hit" if state.hit else "pass")

    def error(self, flow: http.HTTPFlow) -> None:
        if flow.response is None and flow.error is not None:
            state = state_of(flow.metadata)
            if state.method is not None:
                connected = flow.server_conn.timestamp_tcp_setup is not None
                self.ops.observer.upstream_error("dropped" if connected else "connect")
            self._finished(flow, "error")

    def _finished(self, flow: http.HTTPFlow, outcome: str) -> None:
        """Count and log an API3 request the cache decided on (refused destinations are logged apart)."""
        state = state_of(flow.metadata)
        if state.refused is not None or not (state.hit or state.pass_reason is not None):
            return
        args = state.args
        observer = self.ops.observer
        record = RequestRecord(
            method=state.method or "-",
            entity_type=observer.label(args.get("type") if isinstance(args, dict) else None),
            outcome=outcome, reason=None if outcome == "hit" else state.pass_reason, rows=state.rows,
            ms=max(0.0, (time.time() - flow.request.timestamp_start) * 1000),
            status=flow.response.status_code if flow.response is not None else None,
            client=_peer(flow), who=who(state.auth), service_ms=state.service_ms)
        observer.count(record)
        try:  # logged once the answer is on its way (mitmproxy sends it when this hook returns)
            asyncio.get_running_loop().call_soon(observer.log, record)
        except RuntimeError:  # no event loop running (unit tests): now
            observer.log(record)


_cache = SGCache()
addons = [_cache, SGCacheOps(_cache)]
