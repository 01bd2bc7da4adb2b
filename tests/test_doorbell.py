"""The read worker wakes on the producer's doorbell instead of polling on a timer."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from arq import func
from arq.connections import ArqRedis

from producer import wire
from producer.arq_adapter import queue_job
from producer.doorbell import ring
from producer.redis_pool import redis_pool
from producer.services import RedisServer
from producer.settings import ProducerSettings
from tests.support import eventually
from workers.arq_worker import DoorbellWorker

QUEUE, DOORBELL = "q", "q:doorbell"
# Longer than any test waits: a job that starts at all was started by the doorbell, not the timer.
NEVER = 600.0


@pytest.fixture
async def pool() -> AsyncIterator[ArqRedis]:
    redis = RedisServer().start()
    try:
        connection = redis_pool(ProducerSettings(redis_url=redis.url))
        yield connection
        await connection.aclose()
    finally:
        redis.stop()


async def _enqueue(pool: ArqRedis, function: str, *args: Any, doorbell: bool = True) -> None:
    async with pool.pipeline(transaction=True) as pipe:
        queue_job(pipe, pool, function, args, uuid.uuid4().hex, QUEUE)
        if doorbell:
            ring(pipe, DOORBELL)
        await pipe.execute()


async def _blocked_on_doorbell(pool: ArqRedis) -> bool:
    clients = await pool.client_list()
    return any(c.get("cmd") == "blpop" for c in clients)


async def _run(pool: ArqRedis, work: Any, *, idle_poll: float, max_jobs: int = 10) -> asyncio.Task[None]:
    worker = DoorbellWorker(functions=[func(work, name="work")], queue_name=QUEUE, redis_pool=pool,
                            doorbell=DOORBELL, idle_poll=idle_poll, max_jobs=max_jobs, poll_delay=0.005,
                            handle_signals=False, keep_result=0, job_serializer=wire.dumps,
                            job_deserializer=wire.loads)
    task = asyncio.create_task(worker.main())
    await eventually(lambda: _blocked_on_doorbell(pool), 10, "the idle worker to block on the doorbell")
    return task


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_an_idle_worker_sleeps_on_the_doorbell_and_a_rung_job_wakes_it(pool: ArqRedis) -> None:
    started: list[str] = []

    async def work(ctx: dict[str, Any], name: str) -> None:
        started.append(name)

    task = await _run(pool, work, idle_poll=NEVER)
    try:
        await _enqueue(pool, "work", "rung")
        await eventually(lambda: started == ["rung"], 10, "the doorbell to wake the worker")
        await eventually(lambda: _blocked_on_doorbell(pool), 10, "the worker to go back to sleep on the doorbell")
    finally:
        await _stop(task)


async def test_a_job_queued_without_a_token_starts_at_the_idle_poll(pool: ArqRedis) -> None:
    started: list[str] = []

    async def work(ctx: dict[str, Any], name: str) -> None:
        started.append(name)

    task = await _run(pool, work, idle_poll=0.2)
    try:
        await _enqueue(pool, "work", "unrung", doorbell=False)  # queued by hand: no token
        await eventually(lambda: started == ["unrung"], 10, "the idle poll to pick up an unrung job")
    finally:
        await _stop(task)


async def test_a_full_worker_takes_the_next_job_when_a_slot_frees(pool: ArqRedis) -> None:
    """Both tokens arrive while the only slot is busy; the second job must not wait for idle_poll."""
    done: list[str] = []

    async def work(ctx: dict[str, Any], name: str) -> None:
        await asyncio.sleep(0.2)
        done.append(name)

    task = await _run(pool, work, idle_poll=NEVER, max_jobs=1)
    try:
        await _enqueue(pool, "work", "first")
        await _enqueue(pool, "work", "second")
        # Enqueued in the same millisecond, the two have equal scores, and arq takes them in id order.
        await eventually(lambda: sorted(done) == ["first", "second"], 10, "the freed slot to take the other job")
    finally:
        await _stop(task)


async def test_doorbell_tokens_are_capped_when_no_worker_takes_them(pool: ArqRedis) -> None:
    for _ in range(200):
        await _enqueue(pool, "work", "x")
    assert await pool.llen(DOORBELL) == 64  # type: ignore[misc]
