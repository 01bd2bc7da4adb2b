"""The dead-letter list as an operator sees it: list, retry and purge (`producer.dead_letters`
bounds it)."""

from __future__ import annotations

import builtins
import time
import uuid
from collections.abc import Iterable

from producer import keys
from producer.arq_adapter import queue_job
from producer.client.base import ClientBase, redis_lost
from producer.contract import DeadLetter, WriteOp


class DeadLetters(ClientBase):
    """Writes that could not be applied, and jobs refused unread."""

    @redis_lost
    async def dead_letters(self) -> builtins.list[DeadLetter]:
        """The dead letters, oldest first (at most `dead_letter_max`, none older than `dead_letter_max_age`)."""
        await self.settings.dead_letter_limits.prune(self.redis)
        return [DeadLetter.model_validate_json(raw) for raw in await self.redis.lrange(keys.DEAD_LETTERS, 0, -1)]  # type: ignore[misc]

    @redis_lost
    async def retry_dead_letters(self, job_ids: Iterable[str] | None = None) -> int:
        """Put dead-lettered writes back at the end of their users' logs; return how many.

        A retried write is applied after whatever its user wrote since it failed.
        """
        wanted = set(job_ids) if job_ids is not None else None
        retried = 0
        await self.settings.dead_letter_limits.prune(self.redis)
        for raw in await self.redis.lrange(keys.DEAD_LETTERS, 0, -1):  # type: ignore[misc]
            letter = DeadLetter.model_validate_json(raw)
            if wanted is not None and letter.job_id not in wanted:
                continue
            try:
                op = WriteOp.model_validate_json(letter.op)
            except ValueError:
                continue  # an unreadable write cannot be retried; purge it
            if op.request.user_id != letter.user_id:
                continue
            if not await self.redis.lrem(keys.DEAD_LETTERS, 1, raw):  # type: ignore[misc]
                continue  # another retry took it first
            job_id = f"{op.op_id}-r{uuid.uuid4().hex[:6]}"  # fresh: the failed job's arq retry counter may linger
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(keys.write_outcome(op.op_id))
                pipe.rpush(keys.write_log(op.request.user_id), letter.op)
                pipe.sadd(keys.PENDING_USERS, op.request.user_id)
                pipe.zadd(keys.user_jobs(op.request.user_id), {job_id: time.time() * 1000})
                queue_job(pipe, self.redis, keys.APPLY_WRITE, (op.request.user_id, op.op_id), job_id, keys.BULK_QUEUE)
                await pipe.execute()
            retried += 1
        return retried

    @redis_lost
    async def purge_dead_letters(self, job_ids: Iterable[str] | None = None) -> int:
        if job_ids is None:
            count = int(await self.redis.llen(keys.DEAD_LETTERS))  # type: ignore[misc]
            await self.redis.delete(keys.DEAD_LETTERS)
            return count
        wanted = set(job_ids)
        purged = 0
        for raw in await self.redis.lrange(keys.DEAD_LETTERS, 0, -1):  # type: ignore[misc]
            if DeadLetter.model_validate_json(raw).job_id in wanted:
                purged += int(await self.redis.lrem(keys.DEAD_LETTERS, 1, raw))  # type: ignore[misc]
        return purged
