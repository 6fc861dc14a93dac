"""What the proxy does with one API3 call to its site, and what SG's answer to it teaches.

A call (decoded by the addon) is, in this order:

1. answered offline while SG is down (:mod:`.outage`, :mod:`.offline`);
2. a write: sent to SG exactly once by the proxy itself (:mod:`.sending`);
3. any other method but ``read``: passed (``method``);
4. a read: answered from the replica when SG accepted its credentials at this site
   (cache/proxy/auth.py) and the replica can answer it (:mod:`.reads`); else passed with the reason.

SG's answer then teaches the credential cache (:mod:`.credentials`), gains the ``sgcache`` key
when it answers ``info``, and is written into the replica when it answers a write. A 502, 503
or 504 means SG is down: a read it failed is answered from the replica instead, marked stale.
A call that may be a write the proxy cannot see into (a body too large or not decoded, another
spelling of the API3 path) marks every cached type pending once SG answered it, unless SG refused it.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Collection
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from cache.proxy import api3
from cache.proxy.auth import CredentialCache, site_of
from cache.proxy.service import CacheService

from . import answers, rest, upstream
from .answers import Answer
from .credentials import record_answer
from .flowstate import FlowState
from .offline import InfoCopies
from .outage import Outages
from .reads import Reads
from .replica import Replica
from .sending import WRITE_METHODS, Outgoing, Writes

if TYPE_CHECKING:
    from cache.audit.shadow import Audit

log = logging.getLogger("sgcache")
T = TypeVar("T")

#: Calls that change a field's definition at SG (no event is logged for them).
FIELD_CHANGES = frozenset({"schema_field_update", "schema_field_delete"})
#: Calls whose answers teach the replica: one of these the proxy did not decode marks every type.
LEARNT = WRITE_METHODS | FIELD_CHANGES
#: Request bodies larger than this are decoded in a worker thread, off mitmproxy's event loop.
BIG_BODY = 64 * 1024
#: The proxy's answers to a write that never left it (its sender could not send it).
NOT_SENT = frozenset({"sg-unreachable", "unsendable"})


@dataclass(frozen=True)
class Call:
    """An API3 call to the site: the HTTP request as the client sent it, and its connection."""

    request: Outgoing
    client: str  # the client connection's id (a slow one gets smaller read budgets)

    @property
    def site(self) -> str:
        """The site it goes to (scheme, host, port): credentials are verified per site."""
        return site_of(self.request.scheme, self.request.host, self.request.port)

    @property
    def url(self) -> str:
        r = self.request
        return f"{r.scheme}://{r.host}:{r.port}{r.path}"


@dataclass(frozen=True)
class SGAnswer:
    """SG's answer to a call as the proxy received it (or another addon or a replay made it)."""

    status: int
    body: Callable[[], bytes]  # its decoded body, read only when needed (a 200)
    content_type: str
    replayed: bool  # mitmproxy replayed it (from a file, or a client replay)
    server_connected: bool  # mitmproxy opened a connection to SG for it


class SiteCalls:
    """API3 calls to the site: worker pools for the replica (``executor``) and for writes."""

    def __init__(self, replica: Replica, executor: Executor, write_executor: Executor,
                 tls: Callable[[], ssl.SSLContext], site_learnt: Callable[[], None]) -> None:
        """``tls()``: how SG's certificate is checked; ``site_learnt()``: called when opening the
        replica named the site (the addon then decrypts its host)."""
        self.replica = replica
        self.executor = executor
        self.tls = tls
        self.site_learnt = site_learnt
        self.credentials = CredentialCache()
        self.outages = Outages()
        self.infos = InfoCopies()
        self.reads = Reads(executor)
        self.writes = Writes(executor, write_executor, self.outages)
        self.writes.may_read_back = lambda auth: self.credentials.kind_reason(auth) is None
        #: ``sgcache_offline``: answer from the replica while SG is down.
        self.offline = True
        #: The audit (cache/audit/shadow.py), set by the addon: samples hits, refuses switched-off rules.
        self.audit: Audit | None = None

    async def service(self) -> CacheService | None:
        """The replica's service, re-opened once its back-off has passed (None: pass everything)."""
        known = self.replica.site
        service = await self.replica.current(self.executor)
        if self.replica.site != known:
            self.site_learnt()
        return service

    # -- the request ---------------------------------------------------------------------
    async def request(self, call: Call, state: FlowState) -> Answer | upstream.Reply | None:
        """Handle a call: the proxy's answer, SG's reply to a write the proxy sent, or None:
        the call passes to SG (``state.pass_reason`` says why)."""
        if len(call.request.body) > api3.MAX_BODY:
            return await self._send_large(call, state)
        req = await self._decode(call, state)
        if req is None:
            return None
        state.method, state.auth, state.args = req.method, req.auth, req.args
        if self.outages.is_down(call.request.host, self.offline):
            return await self._answer_offline(call, req, state)
        if req.method in WRITE_METHODS:
            return await self._send_write(call, state)
        if req.method != "read":
            self.passes(state, "method")
            return None
        reason = self.credentials.reason(call.site, req.auth)
        if reason is None:
            outcome = await self.serve_read(call, req.args)
            if isinstance(outcome, Answer):
                if self.audit is not None:
                    https = call.request.scheme == "https"
                    self.audit.offer(call.url, call.site, req.auth, req.args, outcome.body,
                                     self.tls if https else None)
                return self.answered(state, outcome)
            reason = outcome
        self.passes(state, reason)
        return None

    async def _decode(self, call: Call, state: FlowState) -> api3.Api3Request | None:
        """The call's API3 request; None when it passes undecoded (the reason is marked)."""
        encoding = ", ".join(v for k, v in call.request.headers if k.lower() == "content-encoding")
        if encoding.strip().lower() not in ("", "identity"):
            # shotgun_api3 never compresses a request; what SG makes of one is SG's business
            self.passes(state, "content-encoding")
            state.undecoded = True
            return None
        body = call.request.body
        # decoding a huge body on the event loop would stall every other client's request
        req, repeated = await self._run(_decoded, body) if len(body) > BIG_BODY else _decoded(body)
        if req is None or repeated:
            # a key repeated where it decides the call or the credential (any key in a write) may be
            # read otherwise by SG: such a body passes as one the proxy cannot read
            self.passes(state, "repeated-key" if repeated else "not-api3")
            state.undecoded = True
            return None
        return req

    def passes(self, state: FlowState, reason: str) -> None:
        """The request goes to SG; its answer is marked ``pass; reason=<reason>`` (counted)."""
        state.pass_reason = reason
        self.replica.count(reason)

    def answered(self, state: FlowState, answer: Answer) -> Answer:
        """The proxy answers itself (a hit or a refusal, counted): nothing to learn from it."""
        state.answered_here = True
        if answer.reason is not None:
            self.replica.count(answer.reason)
        else:
            state.hit, state.rows = True, answer.rows
            state.service_ms = None if answer.seconds is None else answer.seconds * 1000
        return answer

    async def serve_read(self, call: Call, args: object, offline: bool = False) -> Answer | str:
        """The replica's answer to a read, or the reason it passes."""
        service = await self.service()
        if service is None:
            return "no-replica"
        refused = self.audit.refused(service.schema, args) if self.audit is not None else None
        if refused is not None:
            return refused
        return await self.reads.answer(service, args, call.client, offline)

    async def _send_write(self, call: Call, state: FlowState) -> Answer | upstream.Reply:
        tls = self.tls() if call.request.scheme == "https" else None
        decoded: list[Any] = []

        def learn(service: CacheService, reply: upstream.Reply) -> None:
            # in the worker that sent the write, before the client has SG's answer
            body = reply.body
            if reply.status != 200 or (self.reads.max_answer and len(body) > self.reads.max_answer):
                return  # the response hook deals with it, as with any answer that passed
            answer = api3.decode_response(body)
            decoded.append(answer)
            if isinstance(answer, dict) and "results" in answer:
                self.writes.learn_now(service, state, answer["results"], call.url, tls)
                state.learnt = True

        reply = await self.writes.send(self.replica, call.request, state, tls, learn)
        if isinstance(reply, Answer):
            return self.answered(state, reply)
        state.sg_status = reply.status
        if reply.status >= 500:
            # SG (or its load balancer, past its timeout) failed after the write reached it: it may
            # have been applied. Relayed, a 502 or 504 would be sent again by shotgun_api3.
            what = f"SG answered the {state.method} with HTTP {reply.status} {reply.reason}".rstrip()
            log.warning("%s at %s: its outcome is unknown", what, call.request.host)
            return self.answered(state, await self.writes.outcome_unknown(self.replica, state, what))
        state.from_sg = True  # SG's own answer, relayed by the addon
        self.passes(state, "method")  # SG's answer: the response hook learns from what was not learnt here
        if decoded:
            content_type = ", ".join(v for k, v in reply.headers if k.lower() == "content-type")
            try:  # SG has the write: whatever fails now, its answer goes back (never sent again)
                record_answer(self.credentials, state, call.site, decoded[0], replayed=False,
                              server_connected=False, content_type=content_type)
            except Exception:  # noqa: BLE001 - a bug: the credential is then not remembered
                log.exception("could not note what SG's answer to a %s says of its credentials", state.method)
        return reply

    async def _send_large(self, call: Call, state: FlowState) -> Answer | upstream.Reply:
        """A body too large to decode (``api3.MAX_BODY``) may be a write: it is sent once, as a write
        is, and SG's answer relayed, not decoded. Unless SG's answer shows it changed nothing (a 4xx,
        or its error envelope), every cached type is marked pending before the client has it (reads
        pass until the ingester is past it). Nothing is marked before it is sent: a read meanwhile is
        concurrent with the write (either answer is right), and the mark made once SG answered is
        the one the writer's read back needs (a poll while SG worked on it would clear an earlier one)."""
        if self.outages.is_down(call.request.host, self.offline):
            return self.answered(state, answers.unreachable(call.request.host, "request"))
        reply = await self.writes.send(self.replica, call.request, state, self.tls() if call.request.scheme == "https"
                                       else None)
        if isinstance(reply, Answer):
            if reply.reason not in NOT_SENT:  # sent, no answer: it may have been applied
                await self.uploaded(None)
            return self.answered(state, reply)
        if not await self._judge(api3.changed_nothing, reply.status, reply.body):
            await self.uploaded(None)
        state.sg_status = reply.status
        state.from_sg = True
        self.passes(state, "large-body")
        return reply

    async def _judge(self, test: Callable[[int, bytes], bool], status: int, body: bytes) -> bool:
        """``test(status, body)`` of SG's answer, off the event loop when the body is big."""
        if len(body) > BIG_BODY and len(body) <= api3.SMALL_ANSWER:
            return await self._run(test, status, body)
        return test(status, body)

    async def _answer_offline(self, call: Call, req: api3.Api3Request, state: FlowState) -> Answer:
        """SG is down: serve what the replica can (marked stale), refuse writes in SG's envelope."""
        host = call.request.host
        service = self.replica.service
        if req.method == "read":
            # Offline, only credentials SG accepted before are served (the TTL still applies).
            if self.credentials.reason(call.site, req.auth) is None:
                outcome = await self.serve_read(call, req.args, offline=True)
                if isinstance(outcome, Answer):
                    return self.answered(state, outcome)
        elif req.method == "info" and self.infos.has(host) and service is not None:
            sgcache = await self._run(service.info)
            return self.answered(state, self.infos.offline_answer(host, sgcache))
        return self.answered(state, answers.unreachable(host, req.method))

    def connection_failed(self, state: FlowState, host: str, why: str, never_connected: bool) -> None:
        """mitmproxy could not get SG's answer: SG is down when it ``never_connected``; a
        request SG accepted and then dropped is that request's failure only."""
        if state.method is None:
            return
        if never_connected:
            self.outages.note(host, why)
        else:
            log.info("SG dropped a %s request: %s", state.method, why)

    # -- SG's answer -----------------------------------------------------------------------
    async def answer(self, call: Call, state: FlowState, sg: SGAnswer) -> Answer | bytes | None:
        """Learn from SG's answer to a call that passed. Returns what replaces it: the proxy's
        answer (SG is down: the replica's, stale), a new body (``info`` gains the ``sgcache``
        key), or None (SG's answer stands)."""
        if state.method is None:
            return None
        state.sg_status = sg.status
        if self.outages.note_status(call.request.host, sg.status, call.client):
            if state.method == "read" and self.offline and not self.credentials.reason(call.site, state.auth):
                outcome = await self.serve_read(call, state.args, offline=True)
                if isinstance(outcome, Answer):
                    return self.answered(state, outcome)
            return None
        if sg.status != 200 or state.learnt:  # (a write learnt in the trip that sent it)
            return None
        body = sg.body()
        if self.reads.max_answer and len(body) > self.reads.max_answer:
            # not decoded (sgcache_max_answer): nothing learnt; a write's effects wait for the ingester
            log.info("SG's answer to a %s is %d bytes: not decoded (sgcache_max_answer)", state.method, len(body))
            if state.method in WRITE_METHODS:  # marked pending before the writer has SG's answer
                await self._unlearnt(state.method, state.args)
            return None
        # a write's answer is small: decoded here (a thread hop costs more); a big one off the loop
        reply = await self._run(api3.decode_response, body) if len(body) > BIG_BODY else api3.decode_response(body)
        record_answer(self.credentials, state, call.site, reply, replayed=sg.replayed,
                      server_connected=sg.server_connected, content_type=sg.content_type)
        service = self.replica.service
        if not isinstance(reply, dict):
            return None
        if state.method == "read":
            state.rows = _rows(reply)
        if service is None:  # SG took a write no replica could learn: marked once one opens
            if state.method in WRITE_METHODS and "results" in reply:
                self.replica.defer(state.method, state.args)
            return None
        if state.method == "info":
            return self.infos.add_sgcache(call.request.host, reply, await self._run(service.info))
        if state.method in WRITE_METHODS and "results" in reply:
            await self.writes.learn(service, state, reply["results"], call.url, self.tls)
        elif state.method in FIELD_CHANGES and "results" in reply and isinstance(state.args, dict):
            await self._run(service.field_changed, state.args.get("type"), state.args.get("field_name"))
        return None

    async def undecoded_answered(self, status: int, body: Callable[[], bytes] | None,
                                 request_body: bytes | None, content_encoding: str) -> None:
        """SG answered a POST to the site that may be an API3 call the proxy did not decode (another
        spelling of the API3 path, a body it cannot read; ``FlowState.undecoded``). Its success envelope
        (or an answer too large to decode, or streamed unread: ``body`` None) may report a write: every
        cached type is marked pending before the client has it, unless every lenient reading of the
        request (``request_body``, None when not read; :func:`api3.lenient_calls`) finds a method the
        proxy never learns from (``read``, ``info``, ...); a reading that is a field change
        (``schema_field_update``, ``schema_field_delete``) also un-primes the field it names, as the
        decoded call does. SG's error envelope, or any other status, marks nothing."""
        if status != 200 or (body is not None and not await self._judge(api3.succeeded, status, body())):
            return
        if request_body is not None:
            big = len(request_body) > BIG_BODY
            calls = (await self._run(api3.lenient_calls, request_body, content_encoding) if big
                     else api3.lenient_calls(request_body, content_encoding))
            methods = {method for method, _params in calls}
            if None not in methods and not methods & LEARNT:
                return
            service = self.replica.service
            for method, params in calls:
                args = params[1] if isinstance(params, list) and len(params) > 1 else None
                if method in FIELD_CHANGES and isinstance(args, dict) and service is not None:
                    await self._run(service.field_changed, args.get("type"), args.get("field_name"))
        log.info("SG answered a call the proxy did not decode with success: every cached type is "
                 "pending until the ingester has its events")
        await self.uploaded(None)

    async def rest_answered(self, method: str, path: str, status: int | None) -> None:
        """SG answered a REST API call that may change entities (``status``; None: the connection
        broke after it was sent): unless SG refused it, every cached type is marked pending, and a
        field a schema edit named is un-primed (cache/proxy/rest.py), before the client has the answer."""
        if status is not None and not rest.changed(status):
            return
        named = rest.schema_field(method, path)
        service = self.replica.service
        if named is not None and service is not None:
            await self._run(service.field_edited, *named)
        log.info("SG %s a REST API %s (%s): every cached type is pending until the ingester has its "
                 "events", "answered" if status is not None else "may have applied", method, status or "no answer")
        await self.uploaded(None)

    async def failed_after_sending(self, state: FlowState) -> Answer:
        """The request hook failed after the proxy's sender took a write (a bug): SG may have it,
        so it is answered as a write whose outcome is unknown, never passed on to be sent again."""
        what = f"sgcache failed after the {state.method or 'write'} was handed to SG"
        if state.method is None:  # a body too large to decode: what it could change is unknown
            await self.uploaded(None)
        return self.answered(state, await self.writes.outcome_unknown(self.replica, state, what))

    async def _unlearnt(self, method: str, args: object) -> None:
        """A write SG answered that is not learnt from: what it could have changed is marked pending."""
        service = self.replica.service
        if service is None:
            self.replica.defer(method, args)
        else:
            await self._run(service.outcome_unknown, method, args)

    async def uploaded(self, entity_types: Collection[str] | None) -> None:
        """An upload form to the site was answered (or failed): mark what it may have changed."""
        service = self.replica.service
        if service is None:  # no replica open: the next one to open marks every type first
            self.replica.defer_every_type()
        else:
            await self._run(service.uploaded, entity_types)

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` in the replica's worker pool (blocking work never runs on the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)


def _decoded(body: bytes) -> tuple[api3.Api3Request | None, bool]:
    """The API3 request in ``body`` (None: not one), and whether the body repeats a key that makes it
    ambiguous (:func:`api3.repeats_a_key`; any key in a call whose arguments are learnt)."""
    req = api3.decode_request(body)
    return req, req is not None and api3.repeats_a_key(body, req.method in LEARNT)


def _rows(reply: dict[str, object]) -> int | None:
    """The entities in SG's answer to a read (for the access log)."""
    results = reply.get("results")
    entities = results.get("entities") if isinstance(results, dict) else None
    return len(entities) if isinstance(entities, list) else None
