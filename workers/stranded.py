"""Stranded writes: a user's log holding writes that no queued job will apply.

Every write is enqueued with a job, and any job of a user drains the user's whole log
(`workers.write_log`). A write is stranded when its job ended without applying it and no other job
of the user is left on the queue. arq ends a job for good when it times it out, and a worker
paused past its job timeout (SIGSTOP, a stalled VM) wakes to find every job it ran timed out;
write jobs that meet Redis away are retried (`workers.jobs.apply_write`), but a job whose record
was lost with a Redis that failed over before replicating it is gone too.

So every `interval` seconds one worker of the fleet looks for such logs and queues one job for
each: a write waits at most about two intervals longer, and is not lost. A job too many is
harmless: it finds the write applied (its outcome) and ends. It looks only at the users with
writes in flight (`keys.PENDING_USERS`, kept in the same Lua steps that push and pop a log), so a
round costs what is in flight, however many users the fleet has.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from typing import Any

import structlog
from redis.exceptions import RedisError

from producer import keys
from producer.arq_adapter import queue_job

log = structlog.get_logger("memfleet.worker")

LOGS = keys.write_log("*")  # the pattern that matches every user's log
# Lua: take a user (ARGV[1]) out of the pending set (KEYS[2]) if the log (KEYS[1]) is empty.
_FORGET_IF_EMPTY = "if redis.call('llen', KEYS[1]) == 0 then return redis.call('srem', KEYS[2], ARGV[1]) end return 0"


async def requeue_stranded_writes(redis: Any, *, whole_keyspace: bool = False) -> int:
    """Queue a job for each user whose log has writes but no job on the queue; return how many.

    The users looked at are those of `keys.PENDING_USERS`. With `whole_keyspace`, every write log
    is looked at and its user put in that set: logs written before the set existed (an upgrade),
    or by a producer that does not keep it, are found too. That scans every key, so a worker does
    it once, on its first round."""
    if whole_keyspace:
        async for key in redis.scan_iter(match=LOGS, count=1000):
            await redis.sadd(keys.PENDING_USERS, _user_of(key))
    requeued = 0
    async for member in redis.sscan_iter(keys.PENDING_USERS, count=1000):
        user_id = member.decode() if isinstance(member, bytes) else str(member)
        head = await _head_op_id(redis, keys.write_log(user_id))
        if head is None:  # drained since: the set forgets the user, unless a write came meanwhile
            await redis.eval(_FORGET_IF_EMPTY, 2, keys.write_log(user_id), keys.PENDING_USERS, user_id)
            continue
        if await _any_queued(redis, [head]):
            continue  # the head's own job is there: the usual case, one command each
        # Retried and requeued jobs have ids of their own; the user's job set names them all.
        jobs = [j.decode() if isinstance(j, bytes) else j for j in await redis.zrange(keys.user_jobs(user_id), 0, -1)]
        if await _any_queued(redis, jobs):
            continue
        job_id = f"{head}-s{uuid.uuid4().hex[:6]}"
        async with redis.pipeline(transaction=True) as pipe:
            pipe.zadd(keys.user_jobs(user_id), {job_id: time.time() * 1000})  # so that forget finds it
            queue_job(pipe, redis, keys.APPLY_WRITE, (user_id, head), job_id, keys.BULK_QUEUE)
            await pipe.execute()
        log.warning("stranded_write_requeued", user_id=user_id, op_id=head)
        requeued += 1
    return requeued


async def watch_for_stranded_writes(redis: Any, interval: float) -> None:
    """`requeue_stranded_writes` every `interval` seconds, until cancelled: by one worker of the
    fleet a round, whichever takes `keys.STRANDED_CHECK` first. A worker's first round that it
    takes also looks at the whole keyspace."""
    swept = False
    while True:
        await asyncio.sleep(interval)
        try:
            if await redis.set(keys.STRANDED_CHECK, os.getpid(), nx=True, px=max(1, int(interval * 900))):
                await requeue_stranded_writes(redis, whole_keyspace=not swept)
                swept = True
        except (RedisError, OSError) as exc:
            log.warning("stranded_writes_not_checked", error=exc.__class__.__name__)  # next round will


def _user_of(key: bytes | str) -> str:
    text = key.decode() if isinstance(key, bytes) else key
    return text[text.index("{") + 1:text.rindex("}")]


async def _head_op_id(redis: Any, key: bytes | str) -> str | None:
    """The op id of the write at the head of a log; None if the log is empty or its head cannot be
    read (left to the user's next job, which dead-letters it)."""
    head = await redis.lindex(key, 0)
    with contextlib.suppress(json.JSONDecodeError, TypeError, KeyError):
        return None if head is None else str(json.loads(head)["op_id"])
    return None


async def _any_queued(redis: Any, job_ids: list[str]) -> bool:
    """Whether any of these jobs is on the queue (arq keeps a job there while it runs and between
    its tries, and takes it off when it ends)."""
    async with redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.zscore(keys.BULK_QUEUE, job_id)
        scores = await pipe.execute()
    return any(s is not None for s in scores)
