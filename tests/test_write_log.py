"""The write log's rules (workers/write_log.py), one test each, in process against a real redis-server.

The store is the `apply` callable the log is given: here one that records what it applied and
fails where a test asks it to.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from arq import Retry
from redis.asyncio import Redis
from structlog.testing import capture_logs

from producer import keys
from producer.client import Memfleet
from producer.contract import AddRequest, DeadLetter, ForgetRequest, Message, WriteOp, WriteOutcome
from producer.dead_letters import DeadLetterLimits
from producer.errors import InvalidRequest, WriteDeadLettered
from producer.services import RedisServer
from producer.settings import ProducerSettings
from tests.support import uid
from workers.backends.base import BackendRejected, BackendUnavailable, Fence, LLMUnavailable
from workers.write_log import WriteLog


@dataclass
class Store:
    """Applies writes by noting their ids; raises the exceptions queued for an op first."""

    applied: list[str] = field(default_factory=list)
    failures: dict[str, list[BaseException]] = field(default_factory=dict)
    delay: float = 0.0

    async def __call__(self, op: WriteOp, fence: Fence) -> WriteOutcome:
        if self.failures.get(op.op_id):
            raise self.failures[op.op_id].pop(0)
        await asyncio.sleep(self.delay)
        self.applied.append(op.op_id)
        return WriteOutcome(op_id=op.op_id, kind=op.request.kind, stored=1)


def write_log(redis: Redis, store: Store, max_tries: int = 3, job_timeout: float = 30.0, **kw: Any) -> WriteLog:
    return WriteLog(redis, store, max_tries=max_tries, job_timeout=job_timeout, **kw)


async def logged(redis: Redis, user: str, count: int = 1, author: str | None = None) -> list[WriteOp]:
    """Append `count` adds to `user`'s log (written by `author`, if a test forges one)."""
    ops = [WriteOp.new(AddRequest(user_id=author or user, messages=[Message(content=f"note {i}")]))
           for i in range(count)]
    for op in ops:
        await redis.rpush(keys.write_log(user), op.model_dump_json())  # type: ignore[misc]
    return ops


async def log_of(redis: Redis, user: str) -> list[str]:
    return [json.loads(raw)["op_id"] for raw in await redis.lrange(keys.write_log(user), 0, -1)]  # type: ignore[misc]


async def dead_letters(redis: Redis) -> list[dict[str, str]]:
    return [json.loads(raw) for raw in await redis.lrange(keys.DEAD_LETTERS, 0, -1)]  # type: ignore[misc]


async def test_1_an_answered_write_is_returned_without_the_lease(redis: Redis) -> None:
    user, store = uid(), Store()
    (op,) = await logged(redis, user)
    answered = WriteOutcome(op_id=op.op_id, kind="add", stored=1)
    await redis.set(keys.write_outcome(op.op_id), answered.model_dump_json())
    await redis.set(keys.write_lease(user), "someone else")
    assert await write_log(redis, store).run(user, op.op_id, attempt=1) == answered
    assert store.applied == []

    failed = WriteOutcome(op_id=op.op_id, kind="add", error="RuntimeError: refused")
    await redis.set(keys.write_outcome(op.op_id), failed.model_dump_json())
    with pytest.raises(WriteDeadLettered, match="refused"):
        await write_log(redis, store).run(user, op.op_id, attempt=1)


async def test_2_only_the_lease_holder_applies(redis: Redis) -> None:
    user, store = uid(), Store()
    (op,) = await logged(redis, user)
    await redis.set(keys.write_lease(user), "someone else")
    with pytest.raises(Retry):
        await write_log(redis, store).run(user, op.op_id, attempt=3)
    assert store.applied == [] and await log_of(redis, user) == [op.op_id]
    assert await redis.get(keys.write_lease(user)) == b"someone else", "another holder's lease is not ours to free"


async def test_3_the_holder_applies_the_whole_log_in_order_then_hands_over(redis: Redis) -> None:
    user, store = uid(), Store()
    ops = await logged(redis, user, 3)
    outcome = await write_log(redis, store).run(user, ops[1].op_id, attempt=1)
    assert outcome.op_id == ops[1].op_id
    assert store.applied == [o.op_id for o in ops], "every waiting write, in order, not only the job's own"
    assert await log_of(redis, user) == [] and not await redis.exists(keys.write_lease(user))

    # A long log is handed over after `drain_limit` writes: the job comes back for the rest.
    more = await logged(redis, user, 5)
    with pytest.raises(Retry):
        await write_log(redis, store, drain_limit=2).run(user, more[-1].op_id, attempt=1)
    assert store.applied[3:] == [o.op_id for o in more[:2]]
    assert await log_of(redis, user) == [o.op_id for o in more[2:]] and not await redis.exists(keys.write_lease(user))


async def test_3_no_write_starts_past_the_first_quarter_of_the_job_timeout(redis: Redis) -> None:
    """arq ends a job it timed out for good: the drain must end well before. Each write may take
    half the job timeout; one that took more than a quarter is the last of its turn."""
    user, store = uid(), Store(delay=0.45)
    ops = await logged(redis, user, 3)
    with pytest.raises(Retry):
        await write_log(redis, store, job_timeout=1.0).run(user, ops[-1].op_id, attempt=1)
    assert store.applied == [ops[0].op_id]
    assert await log_of(redis, user) == [o.op_id for o in ops[1:]]


async def test_4_unreadable_and_forged_writes_are_dead_lettered_unapplied(redis: Redis) -> None:
    user, intruder, store = uid(), uid("intruder"), Store()
    await redis.rpush(keys.write_log(user), b"{not json")  # type: ignore[misc]
    (forged,) = await logged(redis, user, author=intruder)
    (genuine,) = await logged(redis, user)
    with capture_logs() as logs:
        await write_log(redis, store).run(user, genuine.op_id, attempt=1)
    assert store.applied == [genuine.op_id]
    letters = await dead_letters(redis)
    assert [d["job_id"] for d in letters] == ["?", forged.op_id]
    assert "invalid write" in letters[0]["reason"] and "another user" in letters[1]["reason"]
    assert all(d["user_id"] == user for d in letters)
    events = [e for e in logs if e["event"] == "dead_letter"]
    assert len(events) == 2 and "note 0" not in repr(logs), "dead letters are logged without their content"


async def test_5_a_copy_of_an_applied_write_is_dropped_not_applied_again(redis: Redis) -> None:
    user, store = uid(), Store()
    first, second = await logged(redis, user, 2)
    done = WriteOutcome(op_id=first.op_id, kind="add", stored=1)
    await redis.set(keys.write_outcome(first.op_id), done.model_dump_json())  # applied before: this is a copy
    await write_log(redis, store).run(user, second.op_id, attempt=1)
    assert store.applied == [second.op_id] and await log_of(redis, user) == []


@pytest.mark.parametrize("transient", ["unavailable", "timeout"])
async def test_6_transient_failures_retry_with_backoff_until_max_tries_then_dead_letter(
    redis: Redis, transient: str
) -> None:
    user = uid()
    op, later = await logged(redis, user, 2)
    if transient == "unavailable":
        store = Store(failures={op.op_id: [BackendUnavailable("store away", retry_after=2.0) for _ in range(3)]})
        log = write_log(redis, store, max_tries=3)
    else:  # slower than the drain's budget, half the job timeout
        log = write_log(redis, Store(delay=1.0), max_tries=3, job_timeout=0.1)
    for attempt in (1, 2):
        with pytest.raises(Retry) as retry:
            await log.run(user, op.op_id, attempt=attempt)
        if transient == "unavailable":
            assert (retry.value.defer_score or 0) >= 2000, "a server's Retry-After is a floor"
        assert await log_of(redis, user) == [op.op_id, later.op_id], "the write stays at the head"
        assert not await redis.exists(keys.write_lease(user)), "a retry frees the lease"
    with pytest.raises(WriteDeadLettered):
        await log.run(user, op.op_id, attempt=3)
    (letter,) = await dead_letters(redis)
    assert letter["job_id"] == op.op_id and int(letter["tries"]) == 3
    assert await redis.hget(keys.STATS, f"op-failures:{op.op_id}") is None  # type: ignore[misc]


async def test_6_an_llm_outage_is_waited_out_in_order_without_spending_tries(redis: Redis) -> None:
    user = uid()
    op, later = await logged(redis, user, 2)
    outage = [LLMUnavailable("the LLM failed (rate_limited, HTTP 429)", retry_after=1.0) for _ in range(5)]
    store = Store(failures={op.op_id: [*outage, BackendUnavailable("store away")]})
    log = write_log(redis, store, max_tries=2)
    for attempt in range(1, 7):  # five LLM failures and one store failure: past max_tries=2 in all
        with pytest.raises(Retry) as retry:
            await log.run(user, op.op_id, attempt=attempt)
        if attempt <= 5:
            assert (retry.value.defer_score or 0) >= 1000, "a server's Retry-After is a floor"
        assert await log_of(redis, user) == [op.op_id, later.op_id], "the write stays at the head"
    assert (await log.run(user, op.op_id, attempt=7)).stored == 1
    assert store.applied == [op.op_id, later.op_id] and await dead_letters(redis) == []
    assert not [k for k in await redis.hkeys(keys.STATS) if k.startswith(b"op-failures:")]  # type: ignore[misc]


async def test_7_a_refusal_is_dead_lettered_at_once_and_blocks_nothing(redis: Redis) -> None:
    user = uid()
    op, later = await logged(redis, user, 2)
    store = Store(failures={op.op_id: [BackendRejected("the store refused it")]})
    assert (await write_log(redis, store).run(user, later.op_id, attempt=1)).stored == 1
    assert store.applied == [later.op_id]
    (letter,) = await dead_letters(redis)
    assert letter["job_id"] == op.op_id and letter["reason"].startswith("BackendRejected: ")
    with pytest.raises(WriteDeadLettered):
        await write_log(redis, store).run(user, op.op_id, attempt=1)


async def test_6_an_unexpected_failure_is_logged_with_its_frames_and_tried_again(redis: Redis) -> None:
    """A bug may be a passing one (a race): the write is tried again, up to `max_tries`, and each
    failure leaves its traceback in the log, with no message, since a message may quote the write."""
    user = uid()
    (op,) = await logged(redis, user, 1)
    store = Store(failures={op.op_id: [KeyError("the secret text of the write")]})
    with capture_logs() as logs, pytest.raises(Retry):
        await write_log(redis, store, max_tries=3).run(user, op.op_id, attempt=1)
    (failed,) = [e for e in logs if e["event"] == "write_failed_unexpectedly"]
    assert failed["op_id"] == op.op_id and failed["exc_info"] is True
    assert (await write_log(redis, store, max_tries=3).run(user, op.op_id, attempt=2)).stored == 1
    assert store.applied == [op.op_id] and await dead_letters(redis) == []


async def test_8_a_write_neither_logged_nor_answered_is_invalid(redis: Redis) -> None:
    user = uid()
    await redis.rpush(keys.write_log(uid()), WriteOp.new(ForgetRequest(user_id=user)).model_dump_json())  # type: ignore[misc]
    with pytest.raises(InvalidRequest, match="not in the user's write log"):
        await write_log(redis, Store()).run(user, "w-unknown", attempt=1)


async def test_9_lease_tokens_grow_and_a_holder_that_lost_its_lease_pops_nothing(redis: Redis) -> None:
    user = uid()
    (op, later) = await logged(redis, user, 2)
    tokens: list[int] = []

    class LosesItsLease(Store):
        """Applies the first write while its lease lapses and another holder takes the user."""

        async def __call__(self, applied: WriteOp, fence: Fence) -> WriteOutcome:
            tokens.append(fence.token)
            await redis.set(keys.write_lease(user), "a newer holder")
            return await super().__call__(applied, fence)

    store = LosesItsLease()
    with capture_logs() as logs, pytest.raises(Retry):
        await write_log(redis, store).run(user, op.op_id, attempt=1)
    # It applied its write in the store, but may not take it off the log: the newer holder
    # (whose lease it must not extend or release) applies it again, idempotently, then the next.
    assert store.applied == [op.op_id]
    assert await log_of(redis, user) == [op.op_id, later.op_id]
    assert await redis.get(keys.write_outcome(op.op_id)) is None
    assert await redis.get(keys.write_lease(user)) == b"a newer holder"
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["lease_lost"]

    # Tokens grow per user, also when the last one was lost (a promoted replica may lack it).
    await redis.delete(keys.write_lease(user))
    for _ in range(2):
        await redis.delete(keys.write_lease(user))
        with contextlib.suppress(Retry):
            await write_log(redis, LosesItsLease()).run(user, op.op_id, attempt=1)
        await redis.delete(keys.write_fence(user))
    assert tokens == sorted(tokens) and len(set(tokens)) == 3


async def test_10_a_reason_is_ours_never_the_stores_message(redis: Redis) -> None:
    """A database's error quotes the statement's data, the user's messages: it is named by class only,
    in the outcome, the dead letter, the log and what the waiter is told."""
    user, secret = uid(), "my bank PIN is 4921"
    (op,) = await logged(redis, user)
    store = Store(failures={op.op_id: [RuntimeError(f"value too long: {secret}")]})
    with capture_logs() as logs, pytest.raises(WriteDeadLettered) as told:
        await write_log(redis, store, max_tries=1).run(user, op.op_id, attempt=1)
    (letter,) = await dead_letters(redis)
    outcome = await redis.get(keys.write_outcome(op.op_id))
    assert letter["reason"] == ("RuntimeError: the memory store could not apply the write "
                                "(the worker's log has the op id)")
    assert secret not in str(told.value) and secret not in repr(logs) and secret.encode() not in (outcome or b"")
    # Our own errors are written for the client, and keep their words.
    (ours,) = await logged(redis, user)
    store.failures[ours.op_id] = [InvalidRequest("the write names no message")]
    with pytest.raises(WriteDeadLettered, match="the write names no message"):
        await write_log(redis, store).run(user, ours.op_id, attempt=1)


async def test_10_dead_letters_are_bounded_in_count_and_age(redis: Redis, private_redis: RedisServer) -> None:
    user = uid()
    limits = DeadLetterLimits(max_count=3, max_age=3600)
    forged = await logged(redis, user, 5, author=uid("intruder"))
    with pytest.raises(WriteDeadLettered):
        await write_log(redis, Store(), dead_letters=limits).run(user, forged[-1].op_id, attempt=1)
    assert [d["job_id"] for d in await dead_letters(redis)] == [o.op_id for o in forged[-3:]], "the newest 3"
    assert 0 < await redis.ttl(keys.DEAD_LETTERS) <= 3600

    # Letters older than the age limit go at the next push...
    now = time.time()
    await redis.delete(keys.DEAD_LETTERS)
    for age in (7200, 5000, 10):
        letter = DeadLetter(job_id=f"aged-{age}", user_id=user, reason="r", tries=1, failed_at=now - age, op="")
        await DeadLetterLimits(max_count=10, max_age=10_000).push(redis, letter.model_dump_json(), now - age)
    assert len(await dead_letters(redis)) == 3
    (fresh,) = await logged(redis, user, author=uid("intruder"))
    with pytest.raises(WriteDeadLettered):
        await write_log(redis, Store(), dead_letters=limits).run(user, fresh.op_id, attempt=1)
    assert [d["job_id"] for d in await dead_letters(redis)] == ["aged-10", fresh.op_id]
    # ...and when they are read, even if nothing was pushed since.
    async with await Memfleet.connect(ProducerSettings(redis_url=private_redis.url, dead_letter_max_age=60)) as fleet:
        assert [d.job_id for d in await fleet.dead_letters()] == ["aged-10", fresh.op_id]
        aged = DeadLetter(job_id="aged-10", user_id=user, reason="r", tries=1, failed_at=now - 120, op="")
        await redis.lset(keys.DEAD_LETTERS, 0, aged.model_dump_json())  # type: ignore[misc]
        assert (await fleet.stats()).dead_letters == 1
        assert [d.job_id for d in await fleet.dead_letters()] == [fresh.op_id]
