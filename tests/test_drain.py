"""cache/proxy/drain.py: on SIGTERM the proxy answers the requests in flight before it stops."""

from __future__ import annotations

import asyncio

from cache.proxy.drain import InFlight, next_page_expected


def test_an_idle_proxy_stops_at_once_and_refuses_new_connections() -> None:
    flows = InFlight()
    assert not flows.draining
    assert asyncio.run(flows.drain()) == 0
    assert flows.draining


def test_reads_in_flight_are_answered_first() -> None:
    async def main() -> tuple[int, list[str]]:
        flows = InFlight()
        ended: list[str] = []
        for n in ("a", "b"):
            flows.start(n, lambda: False)

        async def answer(n: str) -> None:
            await asyncio.sleep(0.01)
            ended.append(n)
            flows.end(n)

        tasks = [asyncio.create_task(answer(n)) for n in ("a", "b")]
        left = await flows.drain(timeout=30)
        await asyncio.gather(*tasks)
        return left, ended

    left, ended = asyncio.run(main())
    assert left == 0 and sorted(ended) == ["a", "b"]


def test_a_read_past_the_bound_is_left_but_a_write_never_is() -> None:
    async def main() -> tuple[int, int, bool]:
        flows = InFlight()
        flows.start("read", lambda: False)
        stuck_read = await flows.drain(timeout=0.01)  # a read that never ends: left behind
        flows.end("read")
        is_write = [False]
        flows.start("write", lambda: is_write[0])
        is_write[0] = True  # decoded as a write after its headers came
        released = asyncio.Event()

        async def sg_answers() -> None:
            await asyncio.sleep(0.05)  # past the bound below
            released.set()
            flows.end("write")

        task = asyncio.create_task(sg_answers())
        left = await flows.drain(timeout=0.01)
        await task
        return stuck_read, left, released.is_set()

    stuck_read, left, released = asyncio.run(main())
    assert stuck_read == 1
    assert left == 0 and released  # drain returned only after SG's answer to the write


def test_an_answer_that_fills_its_page_expects_the_next_page() -> None:
    paging = {"paging": {"entities_per_page": 2, "current_page": 1}}
    assert next_page_expected("read", paging, 2)
    assert not next_page_expected("read", paging, 1)  # the last page
    assert not next_page_expected("read", paging, None)  # not decoded, no rows known
    assert not next_page_expected("update", paging, 2)
    assert not next_page_expected("read", {"paging": {"entities_per_page": True}}, 2)
    assert not next_page_expected("read", {"paging": "odd"}, 2)
    assert not next_page_expected("read", None, 2)
