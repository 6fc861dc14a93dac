"""A write's trip through the proxy: sent to SG exactly once, then learnt from.

Relayed by mitmproxy, a write whose SG connection broke after sending would get mitmproxy's
502, and shotgun_api3 re-sends on 502: the write could be applied twice. So the proxy sends
writes itself (:mod:`.upstream`), on connections of its own (kept alive between writes), and a
lost answer becomes an error in SG's envelope instead, which no client re-sends:

- not sent (SG unreachable): ``sg-unreachable``, and SG counts as down (:mod:`.outage`);
- sent, no answer: ``outcome-unknown``; what the write could have changed is marked pending
  in the replica (its reads pass) until the ingester is past it.

SG's answer to a write is then written into the replica (:meth:`Writes.learn`), so the writer
reads its write back; an answer that was partial is completed by reading the rows from SG
with the writer's own credentials. Learning never fails the write: what it misses, the
ingester brings. A write's answer is learnt in the same worker trip that sent it, before the
client has it (:meth:`Writes.send` with ``learn``); one that is not (SG's error, an answer too
large to decode, no replica open) is left to the response hook, as any answer that passed.
Neither the mark read before sending nor learning holds a write longer than
``sgcache_write_wait`` on a database that hangs (cache/proxy/dbwait.py): what they did not do
is deferred (this proxy's reads of it pass until it is marked).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from cache.errors import Passthrough
from cache.proxy.service import CacheService

from . import answers, upstream
from .answers import Answer
from .flowstate import FlowState
from .outage import Outages
from .replica import Replica

log = logging.getLogger("sgcache")

WRITE_METHODS = frozenset({"create", "update", "delete", "revive", "batch"})


@dataclass(frozen=True)
class Outgoing:
    """The client's request, as it is sent to SG."""

    scheme: str
    host: str
    port: int
    path: str
    headers: Sequence[tuple[str, str]]
    body: bytes


class Writes:
    """Sends writes once and learns from SG's answers, both in ``write_executor`` (a big batch
    can take SG minutes: never in the replica's pool, ``executor``, which reads keep busy; one
    thread hop each way); the replica's learner bounds the answers learnt at once (its ``LEARNERS``)."""

    def __init__(self, executor: Executor, write_executor: Executor, outages: Outages) -> None:
        self.executor = executor
        self.write_executor = write_executor
        self.outages = outages
        self.pool = upstream.Pool()  # connections to SG kept alive between writes
        #: Whether a partial answer's rows may be read back with the writer's credentials and stored
        #: for every reader: only those the cache would serve (SG may hide fields from the others).
        self.may_read_back: Callable[[Any], bool] = lambda auth: False

    async def send(self, replica: Replica, request: Outgoing, state: FlowState, tls: ssl.SSLContext | None,
                   learn: Callable[[CacheService, upstream.Reply], None] | None = None) -> upstream.Reply | Answer:
        """Send the write in ``request`` (decoded in ``state``) to SG once: SG's reply, or the
        error answer that stands in for it. ``state.write_mark`` is set for :meth:`learn`;
        ``learn(service, reply)``, when given, runs in the same worker trip once SG has answered
        (never raises: see :meth:`learn_now`)."""
        loop = asyncio.get_running_loop()
        method = state.method or "write"
        service = replica.service
        state.sent = True

        def mark_and_send() -> upstream.Reply:
            # one thread hop, in the write pool (a busy replica pool never delays a write):
            # where the ingester stood before SG saw the write (see learn), then the write
            if service is not None:
                state.write_mark = service.write_mark()
            reply = upstream.send_once(request.scheme, request.host, request.port, request.path,
                                       list(request.headers), request.body, tls, upstream.RESPONSE_TIMEOUT, self.pool)
            if learn is not None and service is not None:
                try:
                    learn(service, reply)
                except Exception:  # noqa: BLE001 - a bug: SG's answer still goes back (the response hook learns)
                    log.exception("could not learn from SG's answer to a %s in the trip that sent it", method)
            return reply

        try:
            return await loop.run_in_executor(self.write_executor, mark_and_send)
        except upstream.NotSent as exc:
            self.outages.note(request.host, str(exc))
            return answers.unreachable(request.host, method)
        except upstream.Unsendable as exc:  # this request's own fault: SG is not down
            log.warning("%s not sent to %s: %s", method, request.host, exc)
            return answers.refusal(f"sgcache: {exc}; the {method} was not sent", "unsendable")
        except Exception as exc:  # noqa: BLE001 - OutcomeUnknown, or a bug: never a re-send either way
            if not isinstance(exc, upstream.OutcomeUnknown):
                log.exception("unexpected error sending a %s", method)
            log.warning("%s sent to %s but no answer came back: %s", method, request.host, exc)
            return await self.outcome_unknown(replica, state,
                                              f"the connection to SG broke after the {method} was sent")

    async def outcome_unknown(self, replica: Replica, state: FlowState, what: str) -> Answer:
        """A write SG may have applied, its answer lost (``what`` happened): everything it could have
        changed is marked pending, and the client gets SG's error envelope (never a re-send). Never raises."""
        method = state.method or "write"
        try:
            if replica.service is not None:  # it may have been applied: its effects are unknown
                await asyncio.get_running_loop().run_in_executor(self.executor, replica.service.outcome_unknown,
                                                                 method, state.args)
            else:
                replica.defer(method, state.args)
        except Exception:  # noqa: BLE001 - a stopping pool, a bug: the answer must still go back
            log.exception("could not mark what a %s whose outcome is unknown may have changed", method)
        return answers.refusal(f"sgcache: {what}; it may have been applied. Check before retrying.",
                               "outcome-unknown")

    async def learn(self, service: CacheService, state: FlowState, results: Any, url: str,
                    tls: Callable[[], ssl.SSLContext]) -> None:
        """Write SG's ``results`` for the write in ``state`` into the replica; when they were
        partial, read the whole rows from SG at ``url`` (TLS per ``tls()``) with the writer's
        credentials. Never raises (the ingester brings what is missed)."""
        try:
            context = tls()
        except Exception as exc:  # noqa: BLE001 - learning is best effort; the client has SG's answer
            log.warning("%s answer not recorded (%s); the ingester will bring it", state.method, type(exc).__name__)
            return
        # one thread hop, in the write pool: the replica's worker pool may be busy with reads
        await asyncio.get_running_loop().run_in_executor(
            self.write_executor, self.learn_now, service, state, results, url, context)

    def learn_now(self, service: CacheService, state: FlowState, results: Any, url: str,
                  context: ssl.SSLContext | None) -> None:
        """:meth:`learn` in this thread (a worker's); never raises."""
        method = state.method
        try:
            to_fetch = service.learn(method, state.args, results, state.write_mark)
            if to_fetch and state.auth and self.may_read_back(state.auth):
                # the answer was partial: read the whole rows now, so the writer reads its write
                service.fetch_rows(url, state.auth, to_fetch, context)
            elif to_fetch:  # left queued for the ingester (its script sees every field); passed till then
                service.left_queued({entity_type for entity_type, _id in to_fetch})
        except Passthrough as exc:
            log.info("%s answer not recorded (%s); the ingester will bring it", method, exc.reason)
        except Exception as exc:  # noqa: BLE001 - learning is best effort; the client has SG's answer
            log.warning("%s answer not recorded (%s); the ingester will bring it", method, type(exc).__name__)
