"""What the proxy keeps in memory is bounded by its options: the plan cache (``sgcache_plan_cache``),
the answers (``sgcache_max_answer``), the credentials (``sgcache_auth_cache``); freed memory goes back to the system after large bodies."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from cache.errors import Passthrough
from cache.proxy.auth import CredentialCache
from cache.proxy.inline import InlineReads
from cache.proxy.memory import Trimmer
from cache.proxy.reads import Reads, read_encoded
from cache.read import Reader, ReplicaState
from cache.replica.schema import Schema
from cache.replica.store import Store

from .paths import BASIC_SCHEMA


@pytest.fixture
def reader(db_url: str) -> Iterator[tuple[Reader, ReplicaState]]:
    store = Store.open(db_url, Schema.load(BASIC_SCHEMA))
    primed = {name: set(entity.fields) for name, entity in store.schema.entities.items()}
    yield Reader(store, plan_cache_size=2), ReplicaState(primed)
    store.dispose()


def shots_after(cut_in: int) -> dict[str, Any]:
    return {"type": "Shot", "return_fields": ["code"], "return_only": "active",
            "filters": {"logical_operator": "and", "conditions": [
                {"path": "sg_cut_in", "relation": "greater_than", "values": [cut_in]}]},
            "paging": {"entities_per_page": 50, "current_page": 1}}


def test_the_plan_cache_keeps_the_most_recently_used_plans_up_to_its_size(
        reader: tuple[Reader, ReplicaState]) -> None:
    r, state = reader
    first, second = r.plan(shots_after(1), state), r.plan(shots_after(2), state)
    assert r.plan(shots_after(1), state) is first  # reused, and now the most recent
    third = r.plan(shots_after(3), state)
    assert r.plans_cached() == 2
    assert r.plan(shots_after(1), state) is first and r.plan(shots_after(3), state) is third
    assert r.plan(shots_after(2), state) is not second  # the least recently used went first
    r.plan_cache_size = 1  # shrinking evicts at once
    assert r.plans_cached() == 1
    r.plan_cache_size = 0  # none kept
    assert r.plans_cached() == 0
    assert r.plan(shots_after(4), state) is not r.plan(shots_after(4), state)
    assert r.plans_cached() == 0


class AnsweringService:
    """The part of CacheService a read uses: answers every read with ``rows`` Shots."""

    read_budget = 0.0
    inline = InlineReads(None)  # no inline reads: every read goes to a worker

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.counted: list[str | None] = []

    def read(self, args: Any, allow_stale: bool = False) -> dict[str, Any]:
        return {"entities": [{"type": "Shot", "id": i, "code": "x" * 100} for i in range(self.rows)]}

    def count(self, reason: str | None) -> None:
        self.counted.append(reason)


def test_an_answer_larger_than_the_bound_passes_with_its_reason() -> None:
    service: Any = AnsweringService(rows=10)
    body, rows = read_encoded(service, {}, False, max_answer=0)  # 0: no bound
    assert rows == 10 and len(body) > 1000
    assert read_encoded(service, {}, False, max_answer=len(body))[0] == body
    with pytest.raises(Passthrough) as refused:
        read_encoded(service, {}, False, max_answer=len(body) - 1)
    assert refused.value.reason == "large-answer"

    async def answer(reads: Reads) -> Any:
        return await reads.answer(service, {}, "client")

    with ThreadPoolExecutor(1) as executor:
        reads = Reads(executor)
        reads.max_answer = 1000
        assert asyncio.run(answer(reads)) == "large-answer"
        reads.max_answer = len(body)
        assert asyncio.run(answer(reads)).body == body
    assert service.counted == [None]  # the hit only; the pass is counted by its caller


def test_memory_is_trimmed_after_a_large_body_at_most_once_per_interval() -> None:
    trims: list[int] = []

    async def flows(trimmer: Trimmer, then: int) -> None:
        trimmer.after(999)  # small: nothing
        await asyncio.sleep(0.05)
        assert trims == []
        trimmer.after(1000)
        trimmer.after(5000)  # one trim already on its way
        while trimmer.trims < 1:
            await asyncio.sleep(0.01)
        trimmer.after(1000)
        if then == 2:  # due at once: wait for it (a full collection may take a while on a loaded machine)
            while trimmer.trims < 2:
                await asyncio.sleep(0.01)
        else:  # due in an hour: it cannot have run
            await asyncio.sleep(0.1)
        assert len(trims) == then

    with ThreadPoolExecutor(1) as executor:
        often = Trimmer(executor, threshold=1000, delay=0.0, interval=0.0, trim=lambda: trims.append(1))
        asyncio.run(asyncio.wait_for(flows(often, then=2), 30))
        trims.clear()
        seldom = Trimmer(executor, threshold=1000, delay=0.0, interval=3600, trim=lambda: trims.append(1),
                         clock=lambda: 0.0)
        asyncio.run(asyncio.wait_for(flows(seldom, then=1), 30))  # the second waits an hour


def test_the_credential_cache_forgets_the_closest_to_expiry_past_its_size() -> None:
    now = [0.0]
    creds = CredentialCache(ttl=300, clock=lambda: now[0], max_entries=3)
    site = "https://sg.example.com:443"
    scripts = [{"script_name": f"s{i}", "script_key": f"k{i}"} for i in range(5)]

    def accept(i: int, at: float) -> None:
        now[0] = at
        creds.observe("read", site, scripts[i], {"results": []})

    for i, at in enumerate((0, 100, 200)):
        accept(i, at)
    accept(3, 250)  # a fourth, none expired: the closest to expiry is forgotten
    assert len(creds._accepted) == 3
    assert not creds.accepted(site, scripts[0])
    assert all(creds.accepted(site, auth) for auth in scripts[1:4])
    accept(4, 450)  # s1 expired at 400: swept, the others kept
    assert len(creds._accepted) == 3
    assert all(creds.accepted(site, auth) for auth in scripts[2:5])


def test_one_credential_with_endless_made_up_auth_keys_displaces_only_its_own_entries() -> None:
    """SG ignores auth keys it does not know, so a client with one good credential could have
    thousands of auth dicts verified (``{"script_name": .., "script_key": .., "x": "1"}``, ``"2"``,
    ...); before, they filled the cache and pushed every other client's credential out (their next
    read passed). Now one credential keeps at most MAX_VARIANTS of them, the latest."""
    from cache.proxy.auth import MAX_VARIANTS

    creds = CredentialCache(ttl=300, max_entries=100)
    site = "https://sg.example.com:443"
    others = [{"script_name": f"s{i}", "script_key": f"k{i}"} for i in range(50)]
    for auth in others:
        creds.observe("read", site, auth, {"results": []})
    flooder = {"script_name": "f", "script_key": "fk"}
    variants = [{**flooder, "x": str(i)} for i in range(5000)]
    for auth in [flooder, *variants]:
        creds.observe("read", site, auth, {"results": []})
    assert all(creds.accepted(site, auth) for auth in others)
    assert [creds.accepted(site, auth) for auth in variants[-MAX_VARIANTS - 1:]] == [False] + [True] * MAX_VARIANTS
    assert not creds.accepted(site, flooder)  # its own plain entry went first: its next read passes once
    assert len(creds._accepted) == len(others) + MAX_VARIANTS
    assert len(creds._variants) == len(others) + 1
    creds.observe("read", site, variants[-1], {"exception": True, "error_code": 102})  # SG refuses it now
    # ... in every auth dict it was verified in
    assert not any(creds.accepted(site, auth) for auth in variants) and len(creds._accepted) == len(others)
    assert len(creds._variants) == len(others)


def test_kept_answers_are_bounded_by_their_option() -> None:
    from cache.proxy.answercache import AnswerCache

    version = (object(), 1)
    kept = AnswerCache(max_bytes=300)
    for i in range(5):
        kept.put(f"k{i}", version, b"x" * 100, 1)
    assert len(kept) == 3 and kept.get("k0", version) is None and kept.get("k4", version) == (b"x" * 100, 1)
    kept.resize(150)  # sgcache_answer_cache lowered while running: the oldest go
    assert len(kept) == 1 and kept.get("k4", version) is not None
    kept.resize(0)  # 0: none kept, none taken
    kept.put("k5", version, b"y", 1)
    assert len(kept) == 0 and kept.get("k5", version) is None
    assert AnswerCache().get("k", version) is None
