"""The read worker wakes on the producer's doorbell instead of polling on a timer."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from arq import func
from arq.connections import ArqRedis, create_pool

from producer.enqueue import queue_job, ring
from producer.services import RedisServer
from producer.settings import ProducerSettings
from workers.worker import DoorbellWorker

QUEUE, DOORBELL = "q", "q:doorbell"


@pytest.fixture
async def pool() -> AsyncIterator[ArqRedis]:
    redis = RedisServer().start()
    try:
        connection = await create_pool(ProducerSettings(redis_url=redis.url).arq_redis_settings())
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


async def _run(pool: ArqRedis, work: Any, *, idle_poll: float, max_jobs: int = 10) -> asyncio.Task[None]:
    worker = DoorbellWorker(functions=[func(work, name="work")], queue_name=QUEUE, redis_pool=pool,
                            doorbell=DOORBELL, idle_poll=idle_poll, max_jobs=max_jobs, poll_delay=0.005,
                            handle_signals=False, keep_result=0)
    task = asyncio.create_task(worker.main())
    await asyncio.sleep(0.3)  # idle, blocked on the doorbell
    return task


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_an_idle_worker_starts_a_rung_job_at_once_and_an_unrung_one_at_its_idle_poll(pool: ArqRedis) -> None:
    started: dict[str, float] = {}

    async def work(ctx: dict[str, Any], name: str) -> None:
        started[name] = time.monotonic()

    task = await _run(pool, work, idle_poll=2.0)
    try:
        queued = time.monotonic()
        await _enqueue(pool, "work", "rung")
        await _wait_for(lambda: "rung" in started, 5)
        assert started["rung"] - queued < 0.5, "the doorbell did not wake the worker"

        queued = time.monotonic()
        await _enqueue(pool, "work", "unrung", doorbell=False)  # queued by hand: no token
        await _wait_for(lambda: "unrung" in started, 5)
        assert started["unrung"] - queued > 0.5, "the worker was not asleep on the doorbell"
    finally:
        await _stop(task)


async def test_a_full_worker_takes_the_next_job_when_a_slot_frees(pool: ArqRedis) -> None:
    """Both tokens arrive while the only slot is busy; the second job must not wait for idle_poll."""
    done: list[float] = []

    async def work(ctx: dict[str, Any], name: str) -> None:
        await asyncio.sleep(0.2)
        done.append(time.monotonic())

    task = await _run(pool, work, idle_poll=5.0, max_jobs=1)
    try:
        queued = time.monotonic()
        await _enqueue(pool, "work", "first")
        await _enqueue(pool, "work", "second")
        await _wait_for(lambda: len(done) == 2, 10)
        assert done[1] - queued < 1.5, "the second job waited for the idle poll"
    finally:
        await _stop(task)


async def test_doorbell_tokens_are_capped_when_no_worker_takes_them(pool: ArqRedis) -> None:
    for _ in range(200):
        await _enqueue(pool, "work", "x")
    assert await pool.llen(DOORBELL) == 64  # type: ignore[misc]


async def _wait_for(condition: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)
