"""The reader: the read engine's entry point, with its plan cache and its memory of slow requests."""

from __future__ import annotations

import collections
import hashlib
import json
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from sqlalchemy.engine import Connection

from ..errors import Passthrough
from ..replica import pending
from ..replica.store import Store
from . import eventlog
from .budget import ReadBudget, SlowRequests
from .execute import run_plan
from .limits import MAX_PLAN_KEY, PLAN_CACHE_SIZE, check_size
from .plan import Plan
from .planner import plan_read
from .relative import RelativeDates
from .state import ReplicaState

#: A request whose last run (pending check, statements, rows) took less than this is "fast".
FAST_READ_SECONDS = 0.001


class Reader:
    """Answers API3 ``read`` requests from a :class:`Store`."""

    def __init__(self, store: Store, plan_cache_size: int = PLAN_CACHE_SIZE):
        self.store = store
        self.schema = store.schema
        # Pipelines repeat the same reads: the same request (same JSON) reuses its plan while the
        # replica's state (primed fields, pending fetches) is unchanged.
        self._plans: collections.OrderedDict[str, tuple[Any, Plan]] = collections.OrderedDict()
        self._plans_lock = threading.Lock()
        self._plan_cache_size = plan_cache_size
        self._slow = SlowRequests()  # requests that overran their budget lately
        # requests (by key) whose last run took less than FAST_READ_SECONDS (cache/proxy/inline.py)
        self._fast: collections.OrderedDict[str, None] = collections.OrderedDict()
        #: relative-date filters are served in this zone (None: they pass)
        self.relative: RelativeDates | None = None

    def read(
        self, conn: Connection, params: Mapping[str, Any], replica_state: ReplicaState,
        budget: ReadBudget | None = None, check_pending: bool = False, key: str | None = None,
        remember_slow: bool = True,
    ) -> dict[str, Any]:
        """Answer a read; the value of ``results`` in SG's reply.

        With a ``budget``, a read that would cost more passes (``slow-read``), and so does the
        same request again for :data:`~cache.read.budget.SLOW_MEMORY_SECONDS` (without touching
        the database) unless not ``remember_slow``. With ``check_pending``, a read touching a
        pending-write marker (cache/replica/pending.py) passes. ``key``: :func:`request_key`
        of ``params`` when the caller has it.
        """
        check_size(params)
        if key is None:
            key = request_key(params)
        digest = None
        if budget is not None and key is not None:
            digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
            if self._slow.recent(digest):
                raise Passthrough("slow-read", "overran its budget recently")
        plan = self._plan(params, replica_state, key)
        started = time.perf_counter()
        if check_pending:
            pending.check_read(conn, self.store.pending, plan.touched)
        # events above the ingester's cursor may be missing, and so may given-up ids SG shows later
        check_page, given_up = False, None
        if plan.entity_type == eventlog.EVENT_TYPE:
            check_page = eventlog.check_read(params, replica_state.event_cursor)
            given_up = eventlog.first_given_up(conn, self.store.given_up, params,
                                               replica_state.event_cursor)  # type: ignore[arg-type]
            if not check_page:
                eventlog.check_given_up(None, given_up)
        if budget is None:
            result = self.execute(conn, plan)
        else:
            try:
                with budget.watching(conn):
                    result = self.execute(conn, plan, budget)
            except Passthrough as exc:
                if exc.reason == "slow-read" and digest is not None and remember_slow:
                    self._slow.remember(digest)
                if key is not None:
                    self._note_speed(key, FAST_READ_SECONDS)
                raise
        if key is not None:
            self._note_speed(key, time.perf_counter() - started)
        if check_page:
            eventlog.check_answer(params, result, replica_state.event_cursor)  # type: ignore[arg-type]
            eventlog.check_given_up(result, given_up)
        return result

    def reusable(self, params: Mapping[str, Any], replica_state: ReplicaState, key: str) -> bool:
        """Whether this read's answer depends on nothing but the database (and the request): not
        on the clock (relative dates) nor on the ingester's cursor (EventLogEntry pages)."""
        plan = self._plan(params, replica_state, key)
        return not plan.timed and plan.entity_type != eventlog.EVENT_TYPE

    def fast(self, key: str) -> bool:
        """Whether the request with this key took less than :data:`FAST_READ_SECONDS` in the
        database when it last ran (a request not seen lately is not fast)."""
        return key in self._fast

    def _note_speed(self, key: str, seconds: float) -> None:
        if len(key) > MAX_PLAN_KEY:
            return
        with self._plans_lock:
            if seconds < FAST_READ_SECONDS:
                self._fast[key] = None
                self._fast.move_to_end(key)
                while len(self._fast) > self._plan_cache_size:
                    self._fast.popitem(last=False)
            else:
                self._fast.pop(key, None)

    def plan(self, params: Mapping[str, Any], replica_state: ReplicaState) -> Plan:
        """Check a read against the schema and build its SQL, or raise Passthrough."""
        check_size(params)
        return self._plan(params, replica_state, request_key(params))

    @property
    def plan_cache_size(self) -> int:
        """Plans kept for reuse (``sgcache_plan_cache``); the least recently used go first."""
        return self._plan_cache_size

    @plan_cache_size.setter
    def plan_cache_size(self, size: int) -> None:
        with self._plans_lock:
            self._plan_cache_size = max(0, size)
            while len(self._plans) > self._plan_cache_size:
                self._plans.popitem(last=False)

    def plans_cached(self) -> int:
        """How many plans the cache holds."""
        return len(self._plans)

    def execute(self, conn: Connection, plan: Plan, budget: ReadBudget | None = None) -> dict[str, Any]:
        """Run a plan (each statement within ``budget`` when given)."""
        return run_plan(conn, self.store, plan, budget)

    def _plan(self, params: Mapping[str, Any], replica_state: ReplicaState, key: str | None) -> Plan:
        if (key is None or _JSON_NUL in key) and _holds_nul(params):
            # PostgreSQL refuses NUL in text and SQLite's LIKE stops at it: SG answers it
            raise Passthrough("filter-value", "NUL character")
        if key is not None and len(key) > MAX_PLAN_KEY:
            key = None  # a huge request (thousands of ids): not worth keeping
        fingerprint = replica_state.fingerprint if key is not None else None
        if key is not None:
            with self._plans_lock:
                cached = self._plans.get(key)
                if cached is not None and cached[0] == fingerprint:
                    self._plans.move_to_end(key)
                    return cached[1]
        odd = _beyond_the_database(params)
        if odd is not None:  # SQLite refuses it, psycopg2 cannot send it: SG's answer is not known
            raise Passthrough("filter-value", odd)
        plan = plan_read(self.store, params, replica_state, self.relative)
        if key is not None and not plan.timed and self._plan_cache_size > 0:
            with self._plans_lock:
                self._plans[key] = (fingerprint, plan)
                self._plans.move_to_end(key)
                while len(self._plans) > self._plan_cache_size:
                    self._plans.popitem(last=False)
        return plan


#: How :func:`request_key` writes a NUL character (every string in a key is ASCII-escaped JSON).
_JSON_NUL = "\\u0000"


def _leaves(value: Any) -> Iterator[Any]:
    """Every string (keys too) and scalar of a decoded JSON ``value``."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, Mapping):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)
        else:
            yield node


def _holds_nul(value: Any) -> bool:
    """Whether a NUL character is in any string (key or value) of a decoded JSON ``value``."""
    return any(isinstance(leaf, str) and "\x00" in leaf for leaf in _leaves(value))


#: The integers a database column holds (BIGINT; SG's own are narrower).
_INT_RANGE = range(-(2**63), 2**63)


def _beyond_the_database(value: Any) -> str | None:
    """What in a decoded JSON ``value`` no database of the replica can take as a parameter: an
    integer past 64 bits, or text with a lone surrogate (JSON's ``"\\ud800"``, not UTF-8); else None."""
    for leaf in _leaves(value):
        if isinstance(leaf, str):
            if not leaf.isascii():
                try:
                    leaf.encode("utf-8")
                except UnicodeEncodeError:
                    return "a lone surrogate in text"
        elif isinstance(leaf, int) and not isinstance(leaf, bool) and leaf not in _INT_RANGE:
            return "an integer past 64 bits"
    return None


def request_key(params: Any) -> str | None:
    """The request as canonical JSON (None when it is not JSON-able)."""
    try:
        return json.dumps(params, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return None
