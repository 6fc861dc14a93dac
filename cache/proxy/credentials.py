"""Which answers may teach the credential cache what SG authenticated (the policy: cache/proxy/auth.py).

Only SG's own answers count: not one the proxy made (a hit, a refusal, an offline answer),
not a replay, not one another addon made without connecting to SG, and only a body that
shotgun_api3 would decode as JSON. See docs/auth.md.
"""

from __future__ import annotations

from typing import Any

from cache.proxy.auth import CredentialCache

from .flowstate import FlowState


def answered_by_sg(state: FlowState, replayed: bool, server_connected: bool) -> bool:
    """Whether a flow's answer is SG's own: sent by the addon itself (``state.from_sg``), or by
    mitmproxy over a connection it opened to SG (``server_connected``); never a replay
    (``replayed``) or an answer the proxy made (``state.answered_here``)."""
    if state.answered_here or replayed:
        return False
    return state.from_sg or server_connected


def decodes_as_json(content_type: str) -> bool:
    """Whether shotgun_api3 decodes an answer with this Content-Type as JSON (its own test)."""
    content_type = content_type.strip().lower()
    return not content_type or content_type.startswith(("application/json", "text/javascript"))


def record_answer(credentials: CredentialCache, state: FlowState, site: str, reply: Any, *,
                  replayed: bool, server_connected: bool, content_type: str) -> None:
    """Tell ``credentials`` what SG's decoded ``reply`` says of the request's auth at ``site``
    (nothing, unless the answer is SG's own; a non-JSON answer counts as no reply)."""
    if not answered_by_sg(state, replayed, server_connected):
        return
    credentials.observe(state.method, site, state.auth, reply if decodes_as_json(content_type) else None)
