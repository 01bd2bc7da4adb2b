"""The whole path: producer → Redis/arq → worker processes → AsyncScopedMemory → mem0/pgvector."""

from __future__ import annotations

import asyncio

import pytest

from producer.client import Memfleet
from producer.demo import ALICE, ALICE_SAYS, BOB, BOB_SAYS, _walkthrough
from producer.errors import NoWorkerError
from producer.services import RedisServer
from producer.settings import ProducerSettings
from tests.support import uid


async def test_tutorial_walkthrough_through_the_queue(fleet: Memfleet) -> None:
    checks = await _walkthrough(fleet)
    assert len(checks) == 10 and all(c.ok for c in checks)
    # The walkthrough judges itself: check the state it leaves behind with reads of our own.
    assert (await fleet.list(ALICE)).memories == []
    assert await fleet.search(ALICE, ALICE_SAYS) == []
    assert [r.text for r in (await fleet.list(BOB)).memories] == [BOB_SAYS]
    assert set(r.text for r in await fleet.search(BOB, ALICE_SAYS, limit=10)) <= {BOB_SAYS}


async def test_fifty_users_concurrently_see_only_their_own(fleet: Memfleet) -> None:
    users = [uid("iso") for _ in range(50)]
    facts = {u: [f"{u} fact {i}: my favourite number is {i * 7} and my code is {u[-6:]}" for i in range(5)]
             for u in users}
    handles = await asyncio.gather(*(fleet.add(u, facts[u]) for u in users))
    outcomes = await asyncio.gather(*(h.outcome() for h in handles))
    assert all(o.stored == 5 for o in outcomes)

    async def check(user: str) -> None:
        listed = (await fleet.list(user)).memories
        assert sorted(r.text for r in listed) == sorted(facts[user])
        assert {r.user_id for r in listed} == {user}
        found = await fleet.search(user, "favourite number and code", limit=20)
        assert found, "a user's own memories must be found"
        assert all(r.user_id == user and r.text in facts[user] for r in found)

    await asyncio.gather(*(check(u) for u in users))


async def test_search_filters_on_own_metadata(fleet: Memfleet) -> None:
    user = uid()
    await (await fleet.add(user, ["I love ramen"], metadata={"topic": "food"})).outcome()
    await (await fleet.add(user, ["I fly to Oslo in May"], metadata={"topic": "travel"})).outcome()
    found = await fleet.search(user, "I love ramen and flying to Oslo", filters={"topic": "travel"})
    assert [r.text for r in found] == ["I fly to Oslo in May"]
    assert found[0].metadata["topic"] == "travel"


async def test_list_pages_cover_everything_once(fleet: Memfleet) -> None:
    user = uid()
    texts = [f"note number {i}" for i in range(25)]
    await (await fleet.add(user, texts)).outcome()
    seen: list[str] = []
    cursor = None
    while True:
        page = await fleet.list(user, limit=10, cursor=cursor)
        seen.extend(r.text for r in page.memories)
        cursor = page.next_cursor
        if cursor is None:
            break
    assert sorted(seen) == sorted(texts)


async def test_readd_is_idempotent(fleet: Memfleet) -> None:
    user = uid()
    first = await (await fleet.add(user, ["same words", "other words"])).outcome()
    again = await (await fleet.add(user, ["same words", "other words"])).outcome()
    assert (first.stored, first.duplicates) == (2, 0)
    assert (again.stored, again.duplicates) == (0, 2)
    assert len((await fleet.list(user)).memories) == 2


async def test_search_without_a_worker_says_how_to_start_one() -> None:
    server = RedisServer().start()
    try:
        async with await Memfleet.connect(ProducerSettings(redis_url=server.url)) as lonely:
            with pytest.raises(NoWorkerError, match="memfleet worker"):
                await lonely.search("alice", "anything", timeout=0.5)
            # The abandoned read is taken off the queue rather than run later.
            assert (await lonely.stats()).queued == {"bulk": 0, "interactive": 0}
    finally:
        server.stop()
