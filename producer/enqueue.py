"""Queueing arq jobs inside the caller's MULTI/EXEC, together with the caller's own records.

arq's `enqueue_job` checks for an existing job under a WATCH. When the connection drops under
that WATCH (a Redis restart), redis-py raises WatchError, which arq reads as "already queued" and
answers None: the job is silently lost while its write sits in the user's log. Our job ids are
fresh, so that check buys nothing; queueing the job in the same transaction as the log entry
(and retrying the whole transaction on a broken connection) means a write is accepted with its
job, or not at all. The two commands are the ones `ArqRedis.enqueue_job` sends.

Reads also `ring` a doorbell that read workers block on between polls (`workers.worker.DoorbellWorker`).

Many writes at once (`WriteEnqueuer`) go in one Lua script instead: the same commands, in the same
order, as atomic as MULTI/EXEC, but one command on the wire instead of five per write. redis-py
spends ~15 µs of Python per pipelined command, which capped bulk ingest at a few thousand writes/s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack  # type: ignore[import-untyped]
from arq.connections import ArqRedis
from arq.jobs import serialize_job
from arq.utils import timestamp_ms
from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript

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


# KEYS[1]: the queue. ARGV: job-set TTL (s), arq job TTL (ms), enqueue time (ms), then the writes as one
# MessagePack array of [log key, job-set key, arq job key, op JSON, op id, job body]. One argument
# for all of them, because redis-py packs each argument in Python; the per-write keys are not
# declared in KEYS, which only Redis Cluster needs, and arq does not run on Cluster.
# Per write it sends what `queue_job` and a write's transaction send: RPUSH, SADD, EXPIRE, PSETEX, ZADD.
_ENQUEUE_WRITES = """
local jobs_ttl, job_ttl, now = ARGV[1], ARGV[2], ARGV[3]
local writes = cmsgpack.unpack(ARGV[4])
for _, w in ipairs(writes) do
  redis.call('rpush', w[1], w[4])
  redis.call('sadd', w[2], w[5])
  redis.call('expire', w[2], jobs_ttl)
  redis.call('psetex', w[3], job_ttl, w[6])
  redis.call('zadd', KEYS[1], now, w[5])
end
return #writes
"""


class WriteEnqueuer:
    """Puts writes into their users' logs and their `apply_write` jobs on the bulk queue, in one step."""

    def __init__(self, redis: ArqRedis, user_jobs_ttl: int) -> None:
        self.redis = redis
        self.user_jobs_ttl = user_jobs_ttl
        self._script: AsyncScript = redis.register_script(_ENQUEUE_WRITES)

    async def enqueue(self, writes: Sequence[tuple[str, str, str]]) -> None:
        """`writes`: (user id, op id, the op as JSON), applied in this order; all or none."""
        now = timestamp_ms()
        serializer = self.redis.job_serializer
        packed = msgpack.packb(
            [(keys.write_log(user), keys.user_jobs(user), keys.ARQ_JOB + op_id, op_json, op_id,
              serialize_job(keys.APPLY_WRITE, (user, op_id), {}, None, now, serializer=serializer))
             for user, op_id, op_json in writes],
            use_bin_type=False,  # Redis's Lua MessagePack reads only the original string type
        )
        await self._script(keys=[keys.BULK_QUEUE], args=[self.user_jobs_ttl, self.redis.expires_extra_ms, now, packed])
