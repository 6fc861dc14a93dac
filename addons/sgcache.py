"""mitmproxy addon: answer SG API3 reads from the sgcache replica, pass everything else.

    mitmdump -s addons/sgcache.py --set sgcache_db=sqlite:///sgcache.db

The addon is thin: its hooks decode ``POST /api3/json``, dispatch to the policies in
:mod:`cache.proxy` (no mitmproxy there; unit-tested without a proxy) and to the replica's
:mod:`cache.proxy.service` in worker threads (never on mitmproxy's event loop), and answer. Every
answer is marked ``X-SGCache: hit`` or ``X-SGCache: pass; reason=...``. What one flow's hooks
share is its :class:`~cache.proxy.flowstate.FlowState`.

Its options are declared in :mod:`cache.mitm.options`, its flow helpers are in
:mod:`cache.mitm.flows`, and the operator's view (status page, metrics, access log, audit
options) is the second addon, :class:`cache.mitm.ops_addon.SGCacheOps`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import ssl
import sys
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions, http

try:
    import cache  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cache.mitm.flows import (  # noqa: E402
    body_size,
    call_of,
    client_chose_destination,
    declared_size,
    form_of,
    forwarded_hosts,
    made_response,
    one_host,
    one_line_refusals,
    peer_of,
    quick_ack,
    reverse_targets,
    transport_writer,
)
from cache.mitm.ops_addon import SGCacheOps  # noqa: E402
from cache.mitm.options import REPLICA_OPTIONS  # noqa: E402
from cache.mitm.options import declare as declare_options  # noqa: E402
from cache.private import install_redaction, url_secrets  # noqa: E402
from cache.proxy import upstream  # noqa: E402
from cache.proxy.answers import HEADER, Answer, pass_header  # noqa: E402
from cache.proxy.auth import CredentialCache  # noqa: E402
from cache.proxy.calls import SGAnswer, SiteCalls  # noqa: E402
from cache.proxy.drain import InFlight, end_process_if_stuck, next_page_expected  # noqa: E402
from cache.proxy.flowstate import state_of  # noqa: E402
from cache.proxy.guard import RelayGuard  # noqa: E402
from cache.proxy.memory import Trimmer  # noqa: E402
from cache.proxy.outage import never_connected  # noqa: E402
from cache.proxy.replica import Refused, Replica, ReplicaOptions  # noqa: E402
from cache.proxy.rest import is_rest_write  # noqa: E402
from cache.proxy.routing import (  # noqa: E402
    API3_PATH,
    api3_path,
    decrypt_patterns,
    is_api3,
    may_be_api3,
    served_site,
)
from cache.proxy.sending import WRITE_METHODS  # noqa: E402
from cache.proxy.service import CacheService  # noqa: E402
from cache.proxy.uploads import changed_types, is_upload  # noqa: E402
from cache.proxy.uploads import refused as upload_refused  # noqa: E402
from cache.read.relative import RelativeDates, fixed_clock, system_now, zone_named  # noqa: E402
from cache.replica.site import Site, SiteError  # noqa: E402

log = logging.getLogger("sgcache")


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
        #: The path of the site's API3 calls (shotgun_api3's, from sgcache_site's URL).
        self.api_path = API3_PATH
        self.in_flight = InFlight()
        self.trimmer = Trimmer(self.executor)  # memory back to the system after large bodies
        self._tls_context: tuple[tuple[bool, str | None], ssl.SSLContext] | None = None
        #: Client connection id -> why a connection to the site, opened for it, failed (refused, DNS,
        #: TLS) while it waited: only that makes a flow's error an outage (never a client hanging up).
        self._site_unreachable: dict[str, str] = {}

    @property
    def service(self) -> CacheService | None:
        return self.replica.service

    @property
    def site(self) -> Site | None:
        return self.replica.site

    def load(self, loader: Any) -> None:
        one_line_refusals()
        declare_options(loader)  # cache/mitm/options.py

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
                site = served_site(options.sgcache_site, reverse_targets(options.mode))
                self.replica.configure_site(site)
                self.api_path = api3_path(site) if site else API3_PATH
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
        if "sgcache_write_wait" in updated:
            if options.sgcache_write_wait < 0:
                raise exceptions.OptionsError("sgcache_write_wait: 0 or more")
            self.replica.wait_for_writes(options.sgcache_write_wait / 1000)
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
        # What is alive now lives as long as the process (modules, the replica's tables and
        # plans): out of the collector's sight, each full collection scans only what came after
        # (one took about 40 ms of the event loop with the replica open, stopping every request).
        gc.freeze()

    async def done(self) -> None:
        """Stopping (SIGTERM): answer the requests in flight first (cache/proxy/drain.py)."""
        await self.in_flight.drain()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.write_executor.shutdown(wait=False, cancel_futures=True)
        self.calls.writes.pool.close()
        self.replica.close()
        if ctx.master.should_exit.is_set():  # the process stops (not a reload of this script)
            end_process_if_stuck()

    def client_connected(self, client: Any) -> None:
        """Stopping: no new connections (cache/proxy/drain.py)."""
        if self.in_flight.draining:
            client.error = "sgcache is stopping"

    def client_disconnected(self, client: Any) -> None:
        self._site_unreachable.pop(client.id, None)

    # -- hooks: where clients may make the proxy connect (cache/proxy/guard.py) -------------
    async def http_connect(self, flow: http.HTTPFlow) -> None:
        """Tunnel only where the relay policy allows (the site, port 443 of non-local hosts, ...)."""
        if client_chose_destination(flow.client_conn):
            r = flow.request
            self._respond(flow, await self.guard.connect(r.host, r.port, peer_of(flow), state_of(flow.metadata)))

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Refuse destinations the relay policy forbids; acknowledge an API3 header segment at once.

        shotgun_api3 sends headers and body in separate segments with Nagle's algorithm
        on; if the proxy delays its ACK (Linux: up to 40 ms) every call pays that wait.
        """
        state = state_of(flow.metadata)  # until its response or error hook:
        self.in_flight.start(flow.id, lambda: state.method in WRITE_METHODS)
        r = flow.request
        if client_chose_destination(flow.client_conn):
            refusal = await self.guard.request(r.method, r.scheme, r.host, r.port, peer_of(flow), state_of(flow.metadata))
            if refusal is not None:
                self._respond(flow, refusal)
                return
        if self._is_site_api3(flow):
            quick_ack(flow.client_conn.id)
            flow.request.stream = False  # the body must be read to be answered locally

    async def responseheaders(self, flow: http.HTTPFlow) -> None:
        """SG's answer to the site's API3 is read whole (learnt from), even with ``stream_large_bodies``;
        but one larger than ``sgcache_max_answer`` (not learnt from) is streamed to the client. A streamed
        answer to a call the proxy did not decode (``FlowState.undecoded``) marks before its headers leave;
        so does SG's answer to a REST API write (``FlowState.rest_write``), streamed or not."""
        response, state = flow.response, state_of(flow.metadata)
        if response is not None and self._is_site_api3(flow):
            limit = self.calls.reads.max_answer
            streamed = bool(limit) and not self._answered_here(flow) and declared_size(response) > limit
            response.stream = streamed
            if streamed and state.pass_reason is not None:  # its headers leave now: marked here, not in the response hook
                response.headers[HEADER] = pass_header(state.pass_reason)
        if response is not None and state.rest_write:  # before any of the answer leaves
            state.rest_write = False
            await self.calls.rest_answered(flow.request.method, flow.request.path, response.status_code)
        if response is not None and response.stream and state.undecoded:
            state.undecoded = False  # streamed unread: taken as an answer too large to decode
            await self.calls.undecoded_answered(response.status_code, None, flow.request.raw_content,
                                                flow.request.headers.get("content-encoding", ""))

    async def server_connect(self, data: Any) -> None:
        """The last word on every upstream connection a client's choice opens (belt to the hooks above)."""
        server = data.server
        if self.site is not None and server.address is not None and self.site.is_host(*server.address[:2]):
            # SG is asked for (and its certificate checked against) the site's name, never the name
            # a client's TLS handshake gave: a mismatch would fail the connection, an outage for all
            server.sni = self.site.host
        if client_chose_destination(data.client) and server.address is not None:
            refused = await self.guard.upstream(server.address[0], server.address[1], bool(server.tls))
            if refused is not None:
                server.error = refused

    def server_connect_error(self, data: Any) -> None:
        """A connection could not be made (refused, DNS, timeout): to the site, SG is unreachable."""
        self._connect_failed(data.client, data.server)

    def tls_failed_server(self, data: Any) -> None:
        """A TLS handshake with a server failed: with the site, SG is unreachable."""
        self._connect_failed(data.context.client, data.conn)

    def _connect_failed(self, client: Any, server: Any) -> None:
        """Note for the client's flow (its error hook) that SG could not be reached; not when the
        client left first (its hang-up cancels the connection: no outage of SG's)."""
        site = self.site
        if site is not None and server.address is not None and site.is_host(*server.address[:2]) and client.connected:
            self._site_unreachable[client.id] = str(server.error)

    def server_connected(self, data: Any) -> None:
        """Drop a connection whose name resolved to a local address after it was checked (DNS rebinding)."""
        server = data.server
        if not client_chose_destination(data.client) or server.address is None or not server.peername:
            return
        if self.guard.peer_refused(server.address[0], server.address[1], str(server.peername[0])):
            try:
                transport_writer(data.client.id, server).close()
            except Exception:  # noqa: BLE001 - mitmproxy internals moved: say so loudly
                log.error("sgcache: could not drop the connection to %s", server.address, exc_info=True)

    # -- hooks: API3 calls to the site ---------------------------------------------------
    async def request(self, flow: http.HTTPFlow) -> None:
        r = flow.request
        if flow.response is not None:
            return
        if not is_api3(r.method, r.path, self.api_path):
            if may_be_api3(r.method, r.path, self.api_path) and self._to_site(r):
                state_of(flow.metadata).undecoded = True  # SG may route it as API3: its success marks
            elif is_rest_write(r.method, r.path) and self._to_site(r):
                state_of(flow.metadata).rest_write = True  # SG's answer (or none) marks: responseheaders
            return
        state = state_of(flow.metadata)
        if self.site is None:
            await self.calls.service()  # a replica that opens late may name the site
        state.site_api3 = self._site_api3_now(flow)  # decided here, for the flow's later hooks
        if not state.site_api3:
            # another host's API3 (or no site known): SG's answer, untouched; nothing learnt
            self.calls.passes(state, "other-site" if self.site is not None else "no-site")
            return
        try:
            outcome = await self.calls.request(call_of(flow), state)
        except Exception:  # noqa: BLE001 - a bug; mitmproxy would send the request on
            if not state.sent:
                log.exception("sgcache: %s request passes untouched after an error", state.method or "API3")
                self.calls.passes(state, "internal-error")
                return
            # the proxy's sender had it: SG may have it; mitmproxy must not send it again
            log.exception("sgcache: error after a %s was handed to SG", state.method)
            outcome = await self.calls.failed_after_sending(state)
        if isinstance(outcome, Answer):
            self._respond(flow, outcome)
        elif outcome is not None:  # SG's reply to a write the proxy sent itself
            headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in outcome.headers]
            flow.response = http.Response.make(outcome.status, outcome.body, headers)
            flow.response.reason = outcome.reason

    async def response(self, flow: http.HTTPFlow) -> None:
        state = state_of(flow.metadata)
        try:
            if self._is_site_upload(flow) and not self._upload_refused(flow):
                await self._uploaded(flow)
            if state.undecoded and (response := flow.response) is not None:  # (not a hit: no work there)
                await self.calls.undecoded_answered(response.status_code,
                                                    lambda: response.get_content(strict=False) or b"",
                                                    flow.request.raw_content,
                                                    flow.request.headers.get("content-encoding", ""))
            await self._learn(flow)
        finally:
            if (self.in_flight.draining and flow.response is not None
                    and not next_page_expected(state.method, state.args, state.rows)):
                flow.response.headers["Connection"] = "close"  # stopping: the client goes elsewhere
            self.in_flight.end(flow.id)
            self.trimmer.after(body_size(flow))

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
        outcome = await self.calls.answer(call_of(flow), state, sg)
        if isinstance(outcome, Answer):
            self._respond(flow, outcome)
        elif outcome is not None:
            response.set_content(outcome)

    async def error(self, flow: http.HTTPFlow) -> None:
        """SG could not be reached (refused, DNS, TLS): go offline for a while (cache/proxy/outage.py)."""
        self.in_flight.end(flow.id)
        self.trimmer.after(body_size(flow))
        if flow.response is not None or flow.error is None:
            return
        # SG may have applied an upload or a REST write before its connection broke: marked, while the
        # client waits for it (a client that hung up does not read its write back, and marking for it
        # would let anyone turn caching off with requests it abandons; the ingester brings it)
        if flow.client_conn.connected and self._is_site_upload(flow):
            await self._uploaded(flow)
        if flow.client_conn.connected and state_of(flow.metadata).rest_write:
            await self.calls.rest_answered(flow.request.method, flow.request.path, None)
        server = flow.server_conn
        # an outage only when a connection to SG failed while the client waited: a client that hangs
        # up (or resets its stream) before SG was reached is no sign of SG being down
        sg_failed = self._site_unreachable.pop(flow.client_conn.id, None) is not None and flow.client_conn.connected
        self.calls.connection_failed(state_of(flow.metadata), flow.request.host, flow.error.msg,
                                     sg_failed and never_connected(server.timestamp_tcp_setup, bool(server.tls),
                                                                   server.timestamp_tls_setup))

    # -- helpers ---------------------------------------------------------------------------
    def _respond(self, flow: http.HTTPFlow, answer: Answer | None) -> None:
        """Answer the flow with the proxy's own answer (None: no answer, the flow goes on)."""
        if answer is not None:
            flow.response = made_response(answer.status, answer.body, answer.headers)

    def _is_site_api3(self, flow: http.HTTPFlow) -> bool:
        """An API3 call to the site this replica copies (scheme, host, port and Host header); the
        request hook's decision once it made one (the later hooks of the flow follow it)."""
        decided = state_of(flow.metadata).site_api3
        return decided if decided is not None else self._site_api3_now(flow)

    def _site_api3_now(self, flow: http.HTTPFlow) -> bool:
        r = flow.request
        return is_api3(r.method, r.path, self.api_path) and self._to_site(r)

    def _to_site(self, r: http.Request) -> bool:
        """Sent to the site: its scheme, host and port, and every name SG's front end may route
        by names it: the Host header, an absolute request line's host (``POST http://other/...``;
        reverse mode sends it on as written, rewriting only the Host header), HTTP/2's ``:authority``
        and its ``host`` header (mitmproxy sends the latter on as HTTP/1's Host; it checks that the two
        match only with ``validate_inbound_headers``) and a forwarded host (``X-Forwarded-Host``,
        ``Forwarded: host=``: a front end may take the tenant from it)."""
        site = self.site
        return (site is not None and one_host(r) and site.matches(r.scheme, r.host, r.port, r.host_header)
                and (not r.authority or site.matches(r.scheme, r.host, r.port, r.authority))
                and all(site.matches(r.scheme, r.host, r.port, name) for name in r.headers.get_all("host"))
                and all(site.matches(r.scheme, r.host, r.port, name) for name in forwarded_hosts(r)))

    @staticmethod
    def _answered_here(flow: http.HTTPFlow) -> bool:
        """The proxy made the flow's answer itself (a hit, a refusal, SG's reply to a write it sent)."""
        state = state_of(flow.metadata)
        return state.answered_here or state.from_sg

    def _is_site_upload(self, flow: http.HTTPFlow) -> bool:
        """An upload form to the site, which may change entities (cache/proxy/uploads.py)."""
        r = flow.request
        return is_upload(r.method, r.path) and self._to_site(r)

    @staticmethod
    def _upload_refused(flow: http.HTTPFlow) -> bool:
        """SG refused the upload form (bad credentials, say): nothing changed, nothing to mark."""
        response = flow.response
        return response is not None and upload_refused(response.status_code, response.get_content(strict=False))

    async def _uploaded(self, flow: http.HTTPFlow) -> None:
        """Mark what an upload form may have changed; reads of it pass until the ingester has it.
        Done before the client has SG's answer; the form (maybe a large file) is parsed off the loop."""
        request = flow.request
        types = await asyncio.get_running_loop().run_in_executor(self.executor, lambda: changed_types(form_of(request)))
        await self.calls.uploaded(types)

    def _tls(self) -> ssl.SSLContext:
        """Verify SG as mitmproxy does: its trusted CA option, or the default roots (one context
        while the options stay: kept connections are reused under the context that made them)."""
        key = (ctx.options.ssl_insecure, ctx.options.ssl_verify_upstream_trusted_ca or None)
        if self._tls_context is None or self._tls_context[0] != key:
            self._tls_context = (key, upstream.tls_context(*key))
        return self._tls_context[1]


_cache = SGCache()
addons = [_cache, SGCacheOps(_cache)]
