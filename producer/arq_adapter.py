"""What the producer takes from arq beyond its public API, in one place, for arq 0.28.0 only.

arq's maintainers have declared it maintenance-only (arq #510), so our dependence on its insides
is kept small and visible here and in its worker-side twin, `workers.arq_worker`; the tests in
tests/test_arq_adapter.py state both as a contract. This side:

- checks that the pinned arq is installed (`check_version`), on import, for both sides;
- names the Redis keys arq keeps a job under (`arq.constants`), and removes or counts them
  (`delete_jobs`, `jobs_in_progress`) for forget's clean-up, a read nobody waits for and stats;
- reads a queue as arq keeps it, a sorted set of job ids by enqueue time (`queue_state`);
- sends the two commands `ArqRedis.enqueue_job` sends, inside our own MULTI/EXEC (`queue_job`),
  or, for many writes at once, inside one Lua script (`WriteEnqueuer`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import msgpack  # type: ignore[import-untyped]
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix, retry_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms
from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

ARQ_VERSION = "0.28.0"

# The keys arq keeps a job under, each followed by the job id: its body (function and arguments),
# its result, the mark of a worker running it, and its count of tries.
ARQ_JOB = job_key_prefix
ARQ_RESULT = result_key_prefix
ARQ_IN_PROGRESS = in_progress_key_prefix
ARQ_RETRY = retry_key_prefix


def check_version(installed: str) -> None:
    if installed != ARQ_VERSION:
        raise ImportError(
            f"memfleet needs arq=={ARQ_VERSION} (it relies on arq's internals, see producer/arq_adapter.py); "
            f"arq {installed} is installed: pip install 'arq=={ARQ_VERSION}'"
        )


check_version(version("arq"))


def delete_jobs(pipe: Pipeline, job_ids: Iterable[str], queues: Sequence[str]) -> None:
    """Add to `pipe` the commands that take jobs off `queues` and remove what arq keeps of them:
    their arguments, results and counts of tries. A job a worker runs now is not stopped."""
    for job_id in job_ids:
        pipe.delete(ARQ_JOB + job_id, ARQ_RESULT + job_id, ARQ_RETRY + job_id)
        for queue in queues:
            pipe.zrem(queue, job_id)


async def jobs_in_progress(redis: ArqRedis) -> int:
    """How many jobs workers are running now, fleet-wide (arq marks each while it runs)."""
    return len([k async for k in redis.scan_iter(match=ARQ_IN_PROGRESS + "*", count=1000)])


@dataclass(frozen=True)
class QueueState:
    depth: int  # jobs waiting, deferred ones included
    oldest_ms: float | None  # when the oldest job due now was enqueued (Unix ms); None: none is due


async def queue_state(redis: ArqRedis, queues: Sequence[str], now_ms: float) -> dict[str, QueueState]:
    """Each queue's depth and oldest due job, read in one round trip."""
    async with redis.pipeline(transaction=False) as pipe:
        for queue in queues:
            pipe.zcard(queue)
            pipe.zrangebyscore(queue, 0, now_ms, start=0, num=1, withscores=True)
        replies = await pipe.execute()
    return {queue: QueueState(replies[2 * i], replies[2 * i + 1][0][1] if replies[2 * i + 1] else None)
            for i, queue in enumerate(queues)}


def queue_job(pipe: Pipeline, redis: ArqRedis, function: str, args: tuple[Any, ...], job_id: str, queue: str) -> None:
    """Add the commands that put job `job_id` on `queue` to `pipe` (a transaction of `redis`).

    arq's `enqueue_job` checks for an existing job under a WATCH. When the connection drops under
    that WATCH (a Redis restart), redis-py raises WatchError, which arq reads as "already queued"
    and answers None: the job is silently lost. Our job ids are fresh, so that check buys nothing;
    queueing the job in the caller's transaction means it is accepted with the caller's records,
    or not at all. These are the two commands `ArqRedis.enqueue_job` sends.
    """
    now = timestamp_ms()
    body = serialize_job(function, args, {}, None, now, serializer=redis.job_serializer)
    pipe.psetex(ARQ_JOB + job_id, redis.expires_extra_ms, body)
    pipe.zadd(queue, {job_id: now})


# KEYS[1]: the queue. ARGV: job-set TTL (ms), job-set size, arq job TTL (ms), enqueue time (ms), then
# the writes as one MessagePack array of [log key, job-set key, arq job key, op JSON, op id, job body].
# One argument for all of them, because redis-py packs each argument in Python; the per-write keys
# are not declared in KEYS, which only Redis Cluster needs, and arq does not run on Cluster.
# Per write it sends what `queue_job` and a write's transaction send (RPUSH, PSETEX, ZADD), and adds
# the op id to the user's job set, a sorted set by enqueue time that keeps the newest ids within
# the TTL only, however long the user writes.
_ENQUEUE_WRITES = """
local jobs_ttl, jobs_max, job_ttl, now = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local writes = cmsgpack.unpack(ARGV[5])
for _, w in ipairs(writes) do
  redis.call('rpush', w[1], w[4])
  redis.call('sadd', KEYS[2], w[7])
  redis.call('zadd', w[2], now, w[5])
  redis.call('zremrangebyscore', w[2], '-inf', '(' .. string.format('%d', now - jobs_ttl))
  redis.call('zremrangebyrank', w[2], 0, -jobs_max - 1)
  redis.call('pexpire', w[2], jobs_ttl)
  redis.call('psetex', w[3], job_ttl, w[6])
  redis.call('zadd', KEYS[1], now, w[5])
end
return #writes
"""


class WriteEnqueuer:
    """Puts writes into their users' logs and their jobs on a queue, in one step: all or none.

    With `wait_replicas`, each step is followed by Redis's WAIT on the same connection: `enqueue`
    returns once that many replicas have the writes too, or `wait_timeout` seconds have passed, and
    says how many did.
    """

    def __init__(self, redis: ArqRedis, queue: str, function: str, pending: str, user_jobs_ttl: int,
                 user_jobs_max: int, wait_replicas: int = 0, wait_timeout: float = 1.0) -> None:
        self.redis = redis
        self.queue = queue
        self.function = function
        self.pending = pending  # the set of users with writes in their logs
        self.user_jobs_ttl = user_jobs_ttl  # seconds an op id stays in its user's job set
        self.user_jobs_max = user_jobs_max  # op ids a user's job set keeps, the newest
        self.wait_replicas = wait_replicas
        self.wait_timeout = wait_timeout
        self._script: AsyncScript = redis.register_script(_ENQUEUE_WRITES)

    async def enqueue(self, writes: Sequence[tuple[str, str, str, str | bytes, tuple[Any, ...], str]]) -> int:
        """`writes`: (log key, job-set key, job id, the op as JSON, the job's arguments, the user id),
        in order; each user is added to `pending` (the set of users with writes in their logs).
        Returns how many replicas acknowledged them (0 when not asked to wait)."""
        now = timestamp_ms()
        serializer = self.redis.job_serializer
        packed = msgpack.packb(
            [(log_key, jobs_key, ARQ_JOB + job_id, op_json, job_id,
              serialize_job(self.function, args, {}, None, now, serializer=serializer), user_id)
             for log_key, jobs_key, job_id, op_json, args, user_id in writes],
            use_bin_type=False,  # Redis's Lua MessagePack reads only the original string type
        )
        args = [self.user_jobs_ttl * 1000, self.user_jobs_max, self.redis.expires_extra_ms, now, packed]
        if not self.wait_replicas:
            await self._script(keys=[self.queue, self.pending], args=args)
            return 0
        try:
            return await self._run_and_wait(args)
        except NoScriptError:
            # The pipeline was re-sent to a new primary (a failover) that does not have the script yet:
            # it ran nowhere. Sending it again loads the script first.
            return await self._run_and_wait(args)

    async def _run_and_wait(self, args: list[Any]) -> int:
        # One pipeline, so one connection: WAIT counts the replicas that have this connection's writes.
        # Were the connection to break, the pipeline is re-sent whole, on a new connection.
        async with self.redis.pipeline(transaction=False) as pipe:
            await self._script(keys=[self.queue, self.pending], args=args, client=pipe)
            pipe.wait(self.wait_replicas, int(self.wait_timeout * 1000))
            _, replicas = await pipe.execute()
        return int(replicas)
