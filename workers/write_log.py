"""Each user's writes, applied in enqueue order by whoever holds the user's lease.

The producer appends each write to the user's log in Redis and enqueues an `apply_write` job for
it. The rules, one test each in tests/test_write_log.py:

1. A write whose outcome is already written is answered from it, without taking the lease.
2. Only the holder of the user's lease applies writes; another job of the user retries later.
3. The holder applies the log from its head, in order, its own write and everyone else's, for at
   most `drain_limit` writes and half the job timeout; then it hands over.
4. A write that cannot be read, or names another user than its log, is dead-lettered unapplied.
5. A write that already has an outcome (a copy left by a re-sent enqueue) is dropped, not applied
   again: applying it could undo a later write (a stale forget).
6. A transient failure (the store is away, or the write timed out) retries the job with backoff;
   the write's `max_tries`-th failure dead-letters it.
7. Any other failure dead-letters the write at once: retrying cannot help, and it must not block
   the user's later writes.
8. A job whose write is neither in the log nor answered is invalid.
9. A dead letter's reason (also the write's outcome, and what its waiter is told) is our own
   words: a database's or library's error is named by its class only, since its message may
   quote the write. The dead-letter list is bounded (`producer.dead_letters`).

Each write is idempotent (memory ids come from idempotency keys), so one re-applied after a crash
stores nothing twice.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from arq import Retry

from producer import keys
from producer.contract import DeadLetter, WriteOp, WriteOutcome, parse
from producer.dead_letters import DeadLetterLimits
from producer.errors import InvalidRequest, MemfleetError, WriteDeadLettered
from workers.backends.base import BackendUnavailable

log = structlog.get_logger("memfleet.worker")

OUTCOME_TTL = 24 * 3600
DRAIN_LIMIT = 64
# Lua: release the lease only if we still hold it.
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"

ApplyOp = Callable[[WriteOp], Awaitable[WriteOutcome]]


def backoff(tries: int, retry_after: float | None = None, base: float = 0.5, cap: float = 30.0) -> float:
    """Exponential backoff with full jitter; a server's Retry-After is a floor."""
    delay = random.uniform(0, min(cap, base * 2 ** max(tries - 1, 0)))
    return max(delay, retry_after or 0.0)


@dataclass
class WriteLog:
    redis: Any  # redis.asyncio.Redis (arq's ArqRedis in a worker)
    apply: ApplyOp  # applies one write to the store and says what it did
    max_tries: int
    job_timeout: float
    drain_limit: int = DRAIN_LIMIT
    dead_letters: DeadLetterLimits = field(default_factory=DeadLetterLimits)

    @property
    def lease_ms(self) -> int:
        # Longer than any one write may run (the job timeout), so a live holder never loses its
        # lease; a dead holder's lease lapses and the next job of the user takes over.
        return int((self.job_timeout + 5) * 1000)

    async def run(self, user_id: str, op_id: str, attempt: int) -> WriteOutcome:
        """Make write `op_id` of `user_id` take effect (rules 1-3, 8) and return what it did."""
        outcome = await self._outcome(op_id)
        if outcome is None:
            lease, token = keys.write_lease(user_id), uuid.uuid4().hex
            if not await self.redis.set(lease, token, px=self.lease_ms, nx=True):
                # The holder applies our write too: we only come back for the outcome, so waiting
                # longer costs nothing but saves churn.
                raise Retry(defer=backoff(attempt, base=0.05, cap=5.0))
            try:
                await self._drain(user_id)
            finally:
                await self.redis.eval(_RELEASE, 1, lease, token)
            outcome = await self._outcome(op_id)
        if outcome is None:
            if await self.redis.llen(keys.write_log(user_id)):
                raise Retry(defer=0.01)  # we drained our share; the rest, ours included, next turn
            raise InvalidRequest(f"write {op_id} is not in the user's write log (forgotten, or never written)")
        if outcome.error:
            raise WriteDeadLettered(f"write {op_id} is in the dead-letter list: {outcome.error}")
        return outcome

    async def _outcome(self, op_id: str) -> WriteOutcome | None:
        done = await self.redis.get(keys.write_outcome(op_id))
        return None if done is None else WriteOutcome.model_validate_json(done)

    async def _drain(self, user_id: str) -> None:
        # Hand over well inside arq's job timeout (arq does not retry a job it timed out).
        budget = self.job_timeout / 2
        deadline = time.monotonic() + budget
        for _ in range(self.drain_limit):
            head = await self.redis.lindex(keys.write_log(user_id), 0)
            if head is None or time.monotonic() > deadline:
                return
            await self._apply_head(user_id, head, budget)

    async def _apply_head(self, user_id: str, raw: bytes, budget: float) -> None:
        """Apply, drop or dead-letter the head of the user's log (rules 4-7)."""
        try:
            op = parse(WriteOp, json.loads(raw))
            if op.request.user_id != user_id:
                raise InvalidRequest("the write belongs to another user than the log it is in")
        except (InvalidRequest, json.JSONDecodeError) as exc:
            await self._dead_letter(user_id, raw, f"invalid write: {exc}", tries=1)
            return
        if await self.redis.exists(keys.write_outcome(op.op_id)):
            await self.redis.lpop(keys.write_log(user_id))
            return
        try:
            async with asyncio.timeout(budget):
                outcome = await self.apply(op)
        except (BackendUnavailable, TimeoutError) as exc:
            failures = int(await self.redis.hincrby(keys.STATS, _failures(op.op_id), 1))
            if failures < self.max_tries:
                retry_after = exc.retry_after if isinstance(exc, BackendUnavailable) else None
                raise Retry(defer=backoff(failures, retry_after)) from exc
            await self._dead_letter(user_id, raw, _reason(exc), failures)
        except Exception as exc:
            await self._dead_letter(user_id, raw, _reason(exc), tries=1)
        else:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.set(keys.write_outcome(op.op_id), outcome.model_dump_json(), ex=OUTCOME_TTL)
                pipe.lpop(keys.write_log(user_id))
                pipe.hdel(keys.STATS, _failures(op.op_id))
                pipe.pexpire(keys.write_lease(user_id), self.lease_ms)
                await pipe.execute()

    async def _dead_letter(self, user_id: str, raw: bytes, reason: str, tries: int) -> None:
        """Move the head of the user's log to the dead-letter list, with the reason; its outcome
        says so, for whoever waits for it."""
        try:
            parsed = json.loads(raw)
            op_id, kind = str(parsed["op_id"]), parsed["request"]["kind"]
        except (json.JSONDecodeError, TypeError, KeyError):
            op_id, kind = "?", None
        letter = DeadLetter(job_id=op_id, user_id=user_id, reason=reason, tries=tries, failed_at=time.time(),
                            op=raw.decode(errors="replace"))
        failed = WriteOutcome(op_id=op_id, kind=kind if kind in ("add", "forget") else None, error=reason)
        async with self.redis.pipeline(transaction=True) as pipe:
            self.dead_letters.push(pipe, letter.model_dump_json(), letter.failed_at)
            pipe.set(keys.write_outcome(op_id), failed.model_dump_json(), ex=OUTCOME_TTL)
            pipe.lpop(keys.write_log(user_id))
            pipe.hdel(keys.STATS, _failures(op_id))
            await pipe.execute()
        # The log names the kind of failure only.
        log.error("dead_letter", op_id=op_id, user_id=user_id, error=reason.split(":", 1)[0], tries=tries)


def _failures(op_id: str) -> str:
    return f"op-failures:{op_id}"


def _reason(exc: BaseException) -> str:
    """Why a write failed, fit for its outcome, the dead-letter list, a log line and an HTTP answer.

    Our own errors are written for the client and say it in words. Anything else (a database's or
    a library's error) is named by its class only: PostgreSQL's messages quote the data of the
    statement that failed, which here is the user's messages.
    """
    name = exc.__class__.__name__
    if isinstance(exc, MemfleetError):
        return f"{name}: {exc}"
    if isinstance(exc, TimeoutError):
        return f"{name}: the write did not finish within the job's time"
    return f"{name}: the memory store could not apply the write (the worker's log has the op id)"
