"""What the addon knows of one flow between its hooks: one typed object under one metadata key.

The request hook decodes an API3 body and decides (pass, answer, send); the response and
error hooks act on that decision later. Everything they share lives in :class:`FlowState`.

The state is kept as a plain dict under ``flow.metadata["sgcache"]``, and :class:`FlowState`
is a typed view of it: mitmproxy deep-copies metadata when it copies a flow, and writes it
with flows it saves (``mitmdump -w``, mitmweb), which only works for plain values (a dataclass
instance there would make saving every API3 flow fail).
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any, Generic, TypeVar, overload

#: The one ``flow.metadata`` key the addon uses.
KEY = "sgcache"

T = TypeVar("T")


class _Field(Generic[T]):
    """One typed entry of the state dict, read with a default when never set."""

    def __init__(self, default: T) -> None:
        self.default = default
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, state: None, owner: type) -> _Field[T]: ...
    @overload
    def __get__(self, state: FlowState, owner: type) -> T: ...
    def __get__(self, state: FlowState | None, owner: type) -> T | _Field[T]:
        if state is None:
            return self
        return state.data().get(self.name, self.default)

    def __set__(self, state: FlowState, value: T) -> None:
        state.data(create=True)[self.name] = value


class FlowState:
    """The addon's state for one flow (see :func:`state_of`)."""

    #: The API3 method of the request body; None when the addon did not decode the body.
    method = _Field[str | None](None)
    #: The request's auth dict and arguments, as decoded (a write's arguments are learnt from).
    auth = _Field[Any](None)
    args = _Field[Any](None)
    #: Why the request passes to SG: the ``X-SGCache: pass; reason=`` token. None: it does not.
    pass_reason = _Field[str | None](None)
    #: The proxy made this answer itself (a hit or a refusal): there is nothing to learn from it.
    answered_here = _Field[bool](False)
    #: The answer is a hit (from the replica), with its entities and service time (ms): for the metrics.
    hit = _Field[bool](False)
    rows = _Field[int | None](None)
    service_ms = _Field[float | None](None)
    #: SG's own answer, which the addon sent and relayed itself (a write sent once).
    from_sg = _Field[bool](False)
    #: The HTTP status SG answered with (relayed, replaced, or to a write the proxy sent itself);
    #: None: no answer from SG (yet).
    sg_status = _Field[int | None](None)
    #: The proxy's own sender took the request: mitmproxy must never send it as well.
    sent = _Field[bool](False)
    #: Where the replica stood just before a write was sent (see CacheService.learn).
    write_mark = _Field[Any](None)
    #: SG's answer to the write the addon sent was learnt in the trip that sent it (and the
    #: credentials' outcome recorded): the response hook has nothing left to learn.
    learnt = _Field[bool](False)
    #: A POST to the site that may be an API3 call the proxy did not decode (another spelling of
    #: the API3 path, a body it cannot read): SG's success envelope marks every cached type pending.
    undecoded = _Field[bool](False)
    #: A REST API call to the site that may change entities (cache/proxy/rest.py): SG's answer, unless
    #: a refusal, or a broken connection marks every cached type pending.
    rest_write = _Field[bool](False)
    #: The request hook's decision: an API3 call to the site (None: not decided yet).
    site_api3 = _Field[bool | None](None)
    #: Why the relay policy refused the destination (for whoever inspects the flow).
    refused = _Field[str | None](None)

    def __init__(self, metadata: MutableMapping[str, Any]) -> None:
        self._metadata = metadata

    def data(self, create: bool = False) -> dict[str, Any]:
        """The state's dict in the flow's metadata (an empty one, not stored, until written)."""
        if create:
            return self._metadata.setdefault(KEY, {})
        return self._metadata.get(KEY) or {}

    def __repr__(self) -> str:
        return f"FlowState({self.data()!r})"


def state_of(metadata: MutableMapping[str, Any]) -> FlowState:
    """The state of the flow whose ``metadata`` this is (nothing is stored until a field is set)."""
    return FlowState(metadata)
