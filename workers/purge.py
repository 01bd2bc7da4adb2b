"""Removing a forgotten user's job data from Redis."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from producer import keys
from producer.arq_adapter import delete_jobs
from producer.contract import DeadLetter


async def purge_user_jobs(redis: Any, user_id: str, keep: set[str]) -> None:
    """Remove a forgotten user's job arguments, results, read answers and dead letters from Redis.

    Writes still waiting in the user's log were enqueued after the forget and stay. Outcomes of
    earlier writes stay too (ids and counts only), so that whoever waits for them is answered. So
    do reads still queued or running: they answer from what the forget left, and a reader waiting
    for a read that was taken away would hear "no worker" instead.
    """
    pending = set()
    for raw in await redis.lrange(keys.write_log(user_id), 0, -1):
        with contextlib.suppress(json.JSONDecodeError, TypeError, KeyError):
            pending.add(json.loads(raw)["op_id"])
    writes = {_text(j) for j in await redis.zrange(keys.user_jobs(user_id), 0, -1)} - keep - pending
    reads = {_text(j) for j in await redis.smembers(keys.user_reads(user_id))}
    reads -= await _queued(redis, reads)  # they run after the forget, and someone waits for them
    async with redis.pipeline(transaction=False) as pipe:
        delete_jobs(pipe, writes | reads, keys.QUEUES)
        for job_id in writes | reads:
            pipe.delete(keys.reply(job_id))
        if writes:
            pipe.zrem(keys.user_jobs(user_id), *writes)
        if reads:
            pipe.srem(keys.user_reads(user_id), *reads)
        await pipe.execute()
    for raw in await redis.lrange(keys.DEAD_LETTERS, 0, -1):
        if DeadLetter.model_validate_json(raw).user_id == user_id:
            await redis.lrem(keys.DEAD_LETTERS, 0, raw)


async def _queued(redis: Any, job_ids: set[str]) -> set[str]:
    """Those of `job_ids` still on a queue (arq keeps a job there until it has run)."""
    ordered = sorted(job_ids)
    async with redis.pipeline(transaction=False) as pipe:
        for job_id in ordered:
            for queue in keys.QUEUES:
                pipe.zscore(queue, job_id)
        scores = await pipe.execute()
    per_job = len(keys.QUEUES)
    return {j for i, j in enumerate(ordered) if any(s is not None for s in scores[i * per_job:(i + 1) * per_job])}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
