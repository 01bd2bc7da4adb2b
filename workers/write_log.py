"""Each user's writes, applied in enqueue order by whoever holds the user's lease.

The producer appends each write to the user's log in Redis and enqueues an `apply_write` job for
it. The rules, one test each in tests/test_write_log.py:

1. A write whose outcome is already written is answered from it, without taking the lease.
2. Only the holder of the user's lease applies writes; another job of the user retries later.
3. The holder applies the log from its head, in order, its own write and everyone else's, for at
   most `drain_limit` writes, each within half the job timeout, starting none after the first
   quarter of it; then it hands over, so that arq never times the job out.
4. A write that cannot be read, or names another user than its log, is dead-lettered unapplied.
5. A write that already has an outcome (a copy left by a re-sent enqueue) is dropped, not applied
   again: applying it could undo a later write (a stale forget).
6. A transient failure (the store is away, or the write timed out) retries the job with backoff;
   the write's `max_tries`-th failure dead-letters it. So does an unexpected one (not a
   `MemfleetError`: a bug, a library's failure), whose traceback is logged without messages.
   The LLM of fact extraction being away (`LLMUnavailable`: down, slow, 429, 5xx) is retried
   with backoff for as long as it lasts, without spending the write's tries: the outage is not
   the write's fault, and dead-lettering would take the user's inferred writes out of their
   order. Their later writes wait meanwhile.
7. A refusal of ours (a `MemfleetError`: the store rejected the write itself) dead-letters it at
   once: retrying cannot help, and it must not block the user's later writes.
8. A job whose write is neither in the log nor answered is invalid.
9. Fencing (design invariant 10). Each taking of the lease carries a token that grows per user
   (`_ACQUIRE`), and the store records it in the same transaction that applies a write, refusing
   an older one (`FencedOut`): a holder paused past its lease, whose thread wakes to send its
   write after another holder applied later ones (a forget, say), writes nothing. In Redis, a
   write leaves the log only while its holder still holds the lease and it is still the log's
   head (`_FINISH`), so a holder that wakes late never pops a write it did not apply.
10. A dead letter's reason (also the write's outcome, and what its waiter is told) is our own
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from arq import Retry

from producer import keys
from producer.contract import WRITE_KINDS, DeadLetter, WriteOp, WriteOutcome, parse
from producer.counters import op_failures, op_llm_waits
from producer.dead_letters import PRUNE_LUA, DeadLetterLimits
from producer.errors import InvalidRequest, MemfleetError, WriteDeadLettered
from workers.backends.base import BackendUnavailable, Fence, FencedOut, LLMUnavailable

log = structlog.get_logger("memfleet.worker")

DRAIN_LIMIT = 64
# Lua: release the lease only if we still hold it.
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
# Lua: take the user's lease (KEYS[1]) with a fresh token, or answer false if someone holds it. The
# token is Redis's clock in microseconds, and above the user's last token (KEYS[2]): it grows per
# user even if that key is lost, as it may be when a replica that missed it is promoted.
_ACQUIRE = """
if redis.call('exists', KEYS[1]) == 1 then return false end
local now = redis.call('time')
local token = math.max(tonumber(now[1]) * 1000000 + tonumber(now[2]), tonumber(redis.call('get', KEYS[2]) or '0') + 1)
token = string.format('%.0f', token)
redis.call('set', KEYS[2], token, 'EX', ARGV[2])
redis.call('set', KEYS[1], token, 'PX', ARGV[1])
return token
"""
# Lua: take the head of the user's log (KEYS[2]) off it, only if the lease (KEYS[1]) is still ours
# (ARGV[1]) and the head is still the write we took (ARGV[2]); then record its outcome (KEYS[3],
# ARGV[3] for ARGV[4] s), forget its failures (KEYS[4] field ARGV[5]), extend the lease (ARGV[6] ms)
# and its LLM waits (field ARGV[8]), and, for a write that failed, push its dead letter (KEYS[5],
# ARGV[7] if not empty) as `producer.dead_letters` does: now ARGV[9], at most ARGV[10] letters of at
# most ARGV[11] seconds. A log left empty takes its user (ARGV[12]) out of the pending set (KEYS[6]).
_FINISH = PRUNE_LUA + """
if redis.call('get', KEYS[1]) ~= ARGV[1] or redis.call('lindex', KEYS[2], 0) ~= ARGV[2] then return 0 end
redis.call('lpop', KEYS[2])
if redis.call('llen', KEYS[2]) == 0 then redis.call('srem', KEYS[6], ARGV[12]) end
if ARGV[3] ~= '' then redis.call('set', KEYS[3], ARGV[3], 'EX', ARGV[4]) end
redis.call('hdel', KEYS[4], ARGV[5], ARGV[8])
redis.call('pexpire', KEYS[1], ARGV[6])
if ARGV[7] ~= '' then
  push_dead_letter(KEYS[5], ARGV[7], tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11]))
end
return 1
"""

ApplyOp = Callable[[WriteOp, Fence], Awaitable[WriteOutcome]]


class LeaseLost(MemfleetError):
    """This holder's lease lapsed while it worked (it was paused, or its Redis was away): another
    holder has the user's log now, so this one stops at once and touches nothing more."""


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
            lease = keys.write_lease(user_id)
            token = await self.redis.eval(_ACQUIRE, 2, lease, keys.write_fence(user_id), self.lease_ms,
                                           keys.FENCE_TTL)
            if not token:
                # The holder applies our write too: we only come back for the outcome, so waiting
                # longer costs nothing but saves churn.
                raise Retry(defer=backoff(attempt, base=0.05, cap=5.0))
            fence = Fence(user_id, int(token))
            try:
                await self._drain(fence)
            except LeaseLost:
                log.warning("lease_lost", user_id=user_id, token=fence.token)
            finally:
                await self.redis.eval(_RELEASE, 1, lease, str(fence.token))
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

    async def _drain(self, fence: Fence) -> None:
        # Hand over well inside arq's job timeout: arq ends a job it timed out for good, and a
        # write whose job ended so waits for the user's next job. Each write may take half the
        # job timeout; a new one starts only in the first quarter, so the drain ends by 3/4.
        budget = self.job_timeout / 2
        last_start = time.monotonic() + budget / 2
        for _ in range(self.drain_limit):
            head = await self.redis.lindex(keys.write_log(fence.user_id), 0)
            if head is None or time.monotonic() > last_start:
                return
            await self._apply_head(fence, head, budget)

    async def _apply_head(self, fence: Fence, raw: bytes, budget: float) -> None:
        """Apply, drop or dead-letter the head of the user's log (rules 4-7, 9)."""
        user_id = fence.user_id
        try:
            op = parse(WriteOp, json.loads(raw))
            if op.request.user_id != user_id:
                raise InvalidRequest("the write belongs to another user than the log it is in")
        except (InvalidRequest, json.JSONDecodeError) as exc:
            await self._dead_letter(fence, raw, f"invalid write: {exc}", tries=1)
            return
        if await self.redis.exists(keys.write_outcome(op.op_id)):
            await self._finish(fence, raw, op.op_id, None)
            return
        try:
            async with asyncio.timeout(budget):
                outcome = await self.apply(op, fence)
        except FencedOut as exc:
            raise LeaseLost() from exc
        except LLMUnavailable as exc:
            waits = int(await self.redis.hincrby(keys.STATS, op_llm_waits(op.op_id), 1))
            raise Retry(defer=backoff(waits, exc.retry_after)) from exc
        except (BackendUnavailable, TimeoutError) as exc:
            await self._retry_or_dead_letter(fence, raw, op.op_id, exc)
        except MemfleetError as exc:  # ours: the write itself is refused, and would be again
            await self._dead_letter(fence, raw, _reason(exc), tries=1)
        except Exception as exc:
            # Not ours: a bug, or a failure of a library we do not know. Its traceback goes to
            # the log (classes and frames, no message: producer.logs), and it is tried again.
            log.exception("write_failed_unexpectedly", op_id=op.op_id, user_id=user_id)
            await self._retry_or_dead_letter(fence, raw, op.op_id, exc)
        else:
            await self._finish(fence, raw, op.op_id, outcome)

    async def _retry_or_dead_letter(self, fence: Fence, raw: bytes, op_id: str, exc: Exception) -> None:
        """Count a failure of the write; retry it with backoff, or dead-letter it at its `max_tries`-th."""
        failures = int(await self.redis.hincrby(keys.STATS, op_failures(op_id), 1))
        if failures < self.max_tries:
            retry_after = exc.retry_after if isinstance(exc, BackendUnavailable) else None
            raise Retry(defer=backoff(failures, retry_after)) from exc
        await self._dead_letter(fence, raw, _reason(exc), failures)

    async def _finish(self, fence: Fence, raw: bytes, op_id: str, outcome: WriteOutcome | None,
                      letter: DeadLetter | None = None) -> None:
        """Take the head `raw` off the log with its outcome (none: it had one already) and dead
        letter, if the lease is still ours and `raw` still the head; else raise `LeaseLost`."""
        done = await self.redis.eval(
            _FINISH, 6, keys.write_lease(fence.user_id), keys.write_log(fence.user_id), keys.write_outcome(op_id),
            keys.STATS, keys.DEAD_LETTERS, keys.PENDING_USERS,
            str(fence.token), raw, "" if outcome is None else outcome.model_dump_json(), keys.OUTCOME_TTL,
            op_failures(op_id), self.lease_ms, "" if letter is None else letter.model_dump_json(),
            op_llm_waits(op_id), time.time() if letter is None else letter.failed_at, self.dead_letters.max_count,
            self.dead_letters.max_age, fence.user_id,
        )
        if not done:
            raise LeaseLost()

    async def _dead_letter(self, fence: Fence, raw: bytes, reason: str, tries: int) -> None:
        """Move the head of the user's log to the dead-letter list, with the reason; its outcome
        says so, for whoever waits for it."""
        try:
            parsed = json.loads(raw)
            op_id, kind = str(parsed["op_id"]), parsed["request"]["kind"]
        except (json.JSONDecodeError, TypeError, KeyError):
            op_id, kind = "?", None
        letter = DeadLetter(job_id=op_id, user_id=fence.user_id, reason=reason, tries=tries, failed_at=time.time(),
                            op=raw.decode(errors="replace"))
        failed = WriteOutcome(op_id=op_id, kind=kind if kind in WRITE_KINDS else None, error=reason)
        await self._finish(fence, raw, op_id, failed, letter)
        # The log names the kind of failure only.
        log.error("dead_letter", op_id=op_id, user_id=fence.user_id, error=reason.split(":", 1)[0], tries=tries)


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
