"""The relay policy (cache/proxy/relay.py) as the addon's hooks ask it: where a client may make the proxy connect.

The site's own host is allowed at once; every other decision runs in a worker thread (it may
resolve a name). A refused CONNECT or plain request gets a 403 with a one-line reason; a refused
upstream connection (the last check, whatever the client asked) an error; a connection whose
name resolved to a local address after it was checked (DNS rebinding) is dropped. Every
refusal is logged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor

from cache.proxy.relay import Decision, RelayPolicy
from cache.replica.site import Site

from .answers import Answer, relay_refusal
from .flowstate import FlowState
from .routing import hostport

log = logging.getLogger("sgcache")


class RelayGuard:
    """Applies a :class:`RelayPolicy` for the site (decisions in ``executor``; refusals counted
    with ``count``)."""

    def __init__(self, executor: Executor, count: Callable[[str], None]) -> None:
        self.executor = executor
        self.count = count
        self.policy = RelayPolicy(None)

    def configure(self, site: Site | None, allow_connect: Sequence[str]) -> None:
        """A new policy for ``site`` and the ``sgcache_allow_connect`` globs (ValueError for a bad glob)."""
        self.policy = RelayPolicy(site, allow_connect)

    def _is_site(self, host: str, port: int) -> bool:
        site = self.policy.site
        return site is not None and site.is_host(host, port)

    async def connect(self, host: str, port: int, peer: str, state: FlowState) -> Answer | None:
        """A client's CONNECT: None when allowed, else the refusal to answer with."""
        if self._is_site(host, port):
            return None  # the site: no trip to a worker thread
        decision = await self._decide(self.policy.connect, host, port)
        return None if decision.allowed else self._refuse(f"CONNECT {hostport(host, port)}", decision.reason, peer, state)

    async def request(self, method: str, scheme: str, host: str, port: int, peer: str,
                      state: FlowState) -> Answer | None:
        """A client's plain (absolute-URI) request: None when allowed, else the refusal."""
        site = self.policy.site
        if site is not None and site.matches(scheme, host, port):
            return None
        decision = await self._decide(self.policy.request, scheme, host, port)
        if decision.allowed:
            return None
        return self._refuse(f"{method} {scheme}://{hostport(host, port)}", decision.reason, peer, state)

    async def upstream(self, host: str, port: int, tls: bool) -> str | None:
        """An upstream connection about to open for a client: None when allowed, else the error."""
        if self._is_site(host, port):
            return None
        decision = await self._decide(self.policy.upstream, host, port, tls)
        if decision.allowed:
            return None
        log.warning("sgcache: refused a connection to %s: %s", hostport(host, port), decision.reason)
        return f"sgcache: {hostport(host, port)} refused: {decision.reason}"

    def peer_refused(self, host: str, port: int, peer: str) -> bool:
        """Whether a connection to ``host:port`` that reached ``peer`` must be dropped (logged)."""
        reason = self.policy.peer_refused(host, port, peer)
        if reason is not None:
            log.warning("sgcache: dropped the connection to %s: %s", hostport(host, port), reason)
        return reason is not None

    def _refuse(self, what: str, reason: str, peer: str, state: FlowState) -> Answer:
        """A 403 with a one-line reason; logged and counted."""
        log.warning("sgcache: refused %s from %s: %s", what, peer, reason)
        state.refused = reason
        self.count("relay-refused")
        return relay_refusal(what, reason)

    async def _decide(self, decide: Callable[..., Decision], *args: object) -> Decision:
        return await asyncio.get_running_loop().run_in_executor(self.executor, decide, *args)
