"""Queueing arq jobs inside the caller's MULTI/EXEC, together with the caller's own records.

arq's `enqueue_job` checks for an existing job under a WATCH. When the connection drops under
that WATCH (a Redis restart), redis-py raises WatchError, which arq reads as "already queued" and
answers None: the job is silently lost while its write sits in the user's log. Our job ids are
fresh, so that check buys nothing; queueing the job in the same transaction as the log entry
(and retrying the whole transaction on a broken connection) means a write is accepted with its
job, or not at all. The two commands are the ones `ArqRedis.enqueue_job` sends.

Reads also `ring` a doorbell that read workers block on between polls (`workers.worker.DoorbellWorker`).
"""

from __future__ import annotations

from typing import Any

from arq.connections import ArqRedis
from arq.jobs import serialize_job
from arq.utils import timestamp_ms
from redis.asyncio.client import Pipeline

from producer import keys

# Tokens left by reads that no worker was there to take are capped: a worker that comes up later
# drains at most this many before it sleeps again.
DOORBELL_TOKENS = 64


def queue_job(pipe: Pipeline, redis: ArqRedis, function: str, args: tuple[Any, ...], job_id: str, queue: str) -> None:
    """Add the commands that put job `job_id` on `queue` to `pipe` (a transaction of `redis`)."""
    now = timestamp_ms()
    body = serialize_job(function, args, {}, None, now, serializer=redis.job_serializer)
    pipe.psetex(keys.ARQ_JOB + job_id, redis.expires_extra_ms, body)
    pipe.zadd(queue, {job_id: now})


def ring(pipe: Pipeline, doorbell: str) -> None:
    """Add the commands that wake one idle worker blocked on `doorbell` to `pipe`."""
    pipe.lpush(doorbell, 1)
    pipe.ltrim(doorbell, 0, DOORBELL_TOKENS - 1)
