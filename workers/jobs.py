"""arq job functions. Each takes `ctx` and plain arguments, validates them with the contract, and
acts through an `AsyncScopedMemory` built for the job's user.

Writes are ordered per user: the producer appends each write to the user's log in Redis and
enqueues an `apply_write` job for it. Whoever holds the user's lease applies the whole log from
its head, in order; the other jobs of that user find their outcome already written. Other users'
logs are applied in parallel. Each op is idempotent (memory ids come from idempotency keys), so an
op re-applied after a crash stores nothing twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

import structlog
from arq import Retry
from pydantic import ValidationError

from producer import keys
from producer.contract import (
    AddRequest,
    DeadLetter,
    ForgetRequest,
    ListRequest,
    SearchRequest,
    WriteOp,
    WriteOutcome,
    check_user_id,
    describe,
)
from workers.backends.base import BackendUnavailable, InvalidCursor
from workers.scoped import AsyncScopedMemory

log = structlog.get_logger("memfleet.worker")

OUTCOME_TTL = 24 * 3600
REPLY_TTL = 60  # an answer nobody popped (its reader gave up) expires
READ_TRIES = 3
DRAIN_LIMIT = 64  # ops one lease holder applies before it hands over
# Lua: release the lease only if we still hold it.
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"

P = ParamSpec("P")
R = TypeVar("R")


class InvalidJob(ValueError):
    """A job whose arguments break the contract; it is failed at once, never retried."""


class WriteDeadLettered(RuntimeError):
    """The job's write could not be applied and went to the dead-letter list."""


def _validated(model: Any, payload: Any) -> Any:
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise InvalidJob(describe(exc)) from None


def _lease_ms(ctx: dict[str, Any]) -> int:
    # Longer than any one op may run (the job timeout), so a live holder never loses its lease;
    # a dead holder's lease lapses and the next job of the user takes over.
    return int((ctx["config"].job_timeout + 5) * 1000)


def backoff(tries: int, retry_after: float | None = None, base: float = 0.5, cap: float = 30.0) -> float:
    """Exponential backoff with full jitter; a server's Retry-After is a floor."""
    delay = random.uniform(0, min(cap, base * 2 ** max(tries - 1, 0)))
    return max(delay, retry_after or 0.0)


def observed(kind: str) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Log one line per job run (ids, kind, duration, outcome; never content) and count it."""

    def wrap(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(fn)
        async def run(*args: P.args, **kwargs: P.kwargs) -> R:
            ctx: dict[str, Any] = args[0]  # type: ignore[assignment]
            start = time.perf_counter()
            bound = log.bind(
                job_id=ctx.get("job_id"), kind=kind, user_id=_user_of(args[1:]), attempt=ctx.get("job_try")
            )
            outcome = "ok"
            try:
                return await fn(*args, **kwargs)
            except Retry:
                outcome = "retry"
                raise
            except asyncio.CancelledError:
                outcome = "cancelled"  # arq's job timeout, or shutdown
                raise
            except InvalidJob as exc:
                outcome = "invalid"
                bound = bound.bind(error=str(exc))
                raise
            except Exception as exc:
                outcome = "failed"
                bound = bound.bind(error=exc.__class__.__name__)
                raise
            finally:
                ms = round((time.perf_counter() - start) * 1000, 1)
                await ctx["redis"].hincrby(keys.STATS, f"{kind}:{outcome}", 1)
                (bound.info if outcome in ("ok", "retry") else bound.warning)("job", outcome=outcome, duration_ms=ms)

        return run

    return wrap


def _user_of(args: tuple[Any, ...]) -> str | None:
    first = args[0] if args else None
    if isinstance(first, dict):
        first = first.get("user_id")
    return first if isinstance(first, str) and len(first) <= 128 else None


# -- reads --------------------------------------------------------------------------------------------


def replying(fn: Callable[[dict[str, Any], dict[str, Any]], Awaitable[Any]]) -> Callable[..., Awaitable[None]]:
    """Push a read's answer (or why there is none) to the list its reader is blocked on.

    The answer is not kept as an arq result: it holds memory text, and the reader's BLPOP
    removes it from Redis the moment it is read.
    """

    @functools.wraps(fn)
    async def run(ctx: dict[str, Any], request: dict[str, Any]) -> None:
        try:
            result = await fn(ctx, request)
        except Retry:
            raise
        except InvalidJob as exc:
            await _reply(ctx, {"error": str(exc), "rejected": True})
            raise
        except Exception as exc:
            await _reply(ctx, {"error": f"the worker could not answer: {exc.__class__.__name__}"})
            raise
        await _reply(ctx, {"ok": result})

    return run


async def _reply(ctx: dict[str, Any], body: dict[str, Any]) -> None:
    key = keys.reply(ctx["job_id"])
    async with ctx["redis"].pipeline(transaction=True) as pipe:
        pipe.rpush(key, json.dumps(body))
        pipe.expire(key, REPLY_TTL)
        await pipe.execute()


def _retry_read(ctx: dict[str, Any], exc: BackendUnavailable) -> Retry:
    if ctx["job_try"] >= READ_TRIES:
        raise exc  # the reader is told, rather than left waiting for its timeout
    return Retry(defer=backoff(ctx["job_try"], exc.retry_after, base=0.1, cap=2.0))


@observed("search")
@replying
async def search(ctx: dict[str, Any], request: dict[str, Any]) -> list[dict[str, Any]]:
    req: SearchRequest = _validated(SearchRequest, request)
    memory = AsyncScopedMemory(req.user_id, ctx["backend"])
    try:
        records = await memory.search(req.query, limit=req.limit, filters=req.filters)
    except BackendUnavailable as exc:
        raise _retry_read(ctx, exc) from exc
    await _count_foreign(ctx, memory)
    return [r.model_dump() for r in records]


@observed("list")
@replying
async def list_memories(ctx: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    req: ListRequest = _validated(ListRequest, request)
    memory = AsyncScopedMemory(req.user_id, ctx["backend"])
    try:
        page = await memory.get_all(limit=req.limit, cursor=req.cursor)
    except BackendUnavailable as exc:
        raise _retry_read(ctx, exc) from exc
    except InvalidCursor as exc:
        raise InvalidJob(f"invalid cursor: {exc}") from None
    await _count_foreign(ctx, memory)
    return page.model_dump()


async def _count_foreign(ctx: dict[str, Any], memory: AsyncScopedMemory) -> None:
    if memory.foreign_dropped:
        await ctx["redis"].hincrby(keys.STATS, "foreign_dropped", memory.foreign_dropped)


# -- writes -------------------------------------------------------------------------------------------


@observed("write")
async def apply_write(ctx: dict[str, Any], user_id: str, op_id: str) -> dict[str, Any]:
    try:
        user_id = check_user_id(user_id)
    except ValueError as exc:
        raise InvalidJob(str(exc)) from None
    redis = ctx["redis"]
    done = await redis.get(keys.write_outcome(op_id))
    if done is not None:
        outcome = WriteOutcome.model_validate_json(done)
        if outcome.error:
            raise WriteDeadLettered(f"write {op_id} is in the dead-letter list: {outcome.error}")
        return outcome.model_dump()
    token = uuid.uuid4().hex
    if not await redis.set(keys.write_lease(user_id), token, px=_lease_ms(ctx), nx=True):
        # Another job holds the user's lease and applies the whole log, ours included: we only
        # come back to collect the outcome, so waiting longer costs nothing but saves churn.
        raise Retry(defer=min(0.05 * 2 ** min(ctx["job_try"], 7), 5.0) * random.uniform(0.5, 1.0))
    try:
        return await _drain(ctx, user_id, op_id, token)
    finally:
        await redis.eval(_RELEASE, 1, keys.write_lease(user_id), token)


async def _drain(ctx: dict[str, Any], user_id: str, op_id: str, token: str) -> dict[str, Any]:
    """Apply the user's log from its head. The lease holder applies every waiting op, not just its
    own, so a user's backlog drains at the store's pace instead of one lease hand-over per op."""
    redis = ctx["redis"]
    log_key = keys.write_log(user_id)
    # Hand over well inside arq's job timeout (arq does not retry a job it timed out).
    budget = ctx["config"].job_timeout / 2
    deadline = time.monotonic() + budget
    for _ in range(DRAIN_LIMIT):
        raw = await redis.lindex(log_key, 0)
        if raw is None or time.monotonic() > deadline:
            break
        try:
            op: WriteOp = _validated(WriteOp, json.loads(raw))
            if op.request.user_id != user_id:
                raise InvalidJob("the write belongs to another user than the log it is in")
        except (InvalidJob, json.JSONDecodeError) as exc:
            # Nobody can apply it, and it must not block the user's later writes.
            await _dead_letter(ctx, user_id, raw, f"invalid write: {exc}", tries=1)
            continue
        if await redis.exists(keys.write_outcome(op.op_id)):
            # Already applied: a copy left by an enqueue that Redis took but whose reply was lost,
            # then re-sent. Applying it again could undo a later write (a stale forget).
            await redis.lpop(log_key)
            continue
        try:
            async with asyncio.timeout(budget):
                outcome = await _apply(ctx, op)
        except (BackendUnavailable, TimeoutError) as exc:
            retry_after = exc.retry_after if isinstance(exc, BackendUnavailable) else None
            failures = await redis.hincrby(keys.STATS, f"op-failures:{op.op_id}", 1)
            if failures >= ctx["max_tries"]:
                await _dead_letter(ctx, user_id, raw, f"{exc.__class__.__name__}: {exc}", failures)
                continue
            raise Retry(defer=backoff(failures, retry_after)) from exc
        except Exception as exc:
            # A permanent failure (the store refused the write): retrying cannot help, and the
            # op must not block the user's later writes. It stays visible in the dead-letter list.
            await _dead_letter(ctx, user_id, raw, f"{exc.__class__.__name__}: {exc}", tries=1)
            continue
        async with redis.pipeline(transaction=True) as pipe:
            pipe.set(keys.write_outcome(op.op_id), outcome.model_dump_json(), ex=OUTCOME_TTL)
            pipe.lpop(log_key)
            pipe.hdel(keys.STATS, f"op-failures:{op.op_id}")
            pipe.pexpire(keys.write_lease(user_id), _lease_ms(ctx))
            await pipe.execute()
    done = await redis.get(keys.write_outcome(op_id))
    if done is None:
        if await redis.llen(log_key):
            raise Retry(defer=0.01)  # drained our share; the rest (ours included) on the next turn
        raise InvalidJob(f"write {op_id} is not in the user's write log (forgotten, or never written)")
    outcome = WriteOutcome.model_validate_json(done)
    if outcome.error:
        raise WriteDeadLettered(f"write {op_id} is in the dead-letter list: {outcome.error}")
    return outcome.model_dump()


async def _apply(ctx: dict[str, Any], op: WriteOp) -> WriteOutcome:
    request = op.request
    memory = AsyncScopedMemory(request.user_id, ctx["backend"])
    if isinstance(request, AddRequest):
        if request.infer and not ctx["backend"].can_infer:
            request = request.model_copy(update={"infer": False})
        ids, duplicates = await memory.add(request)
        return WriteOutcome(op_id=op.op_id, kind="add", stored=len(ids), duplicates=duplicates, memory_ids=ids)
    assert isinstance(request, ForgetRequest)
    deleted = await memory.delete_all()
    await purge_user_jobs(ctx["redis"], request.user_id, keep={op.op_id})
    return WriteOutcome(op_id=op.op_id, kind="forget", deleted=deleted)


async def _dead_letter(ctx: dict[str, Any], user_id: str, raw: bytes, reason: str, tries: int) -> None:
    """Move the head of the user's write log to the dead-letter list, with the reason."""
    redis = ctx["redis"]
    try:
        parsed = json.loads(raw)
        op_id, kind = str(parsed["op_id"]), parsed["request"]["kind"]
    except (json.JSONDecodeError, TypeError, KeyError):
        op_id, kind = "?", None
    letter = DeadLetter(job_id=op_id, user_id=user_id, reason=reason, tries=tries, failed_at=time.time(),
                        op=raw.decode(errors="replace"))
    failed = WriteOutcome(op_id=op_id, kind=kind if kind in ("add", "forget") else None, error=reason)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.rpush(keys.DEAD_LETTERS, letter.model_dump_json())
        pipe.set(keys.write_outcome(op_id), failed.model_dump_json(), ex=OUTCOME_TTL)
        pipe.lpop(keys.write_log(user_id))
        pipe.hdel(keys.STATS, f"op-failures:{op_id}")
        await pipe.execute()
    # The log names the kind of failure only: exception texts may quote what the store was sent.
    log.error("dead_letter", op_id=op_id, user_id=user_id, error=reason.split(":", 1)[0], tries=tries)


async def purge_user_jobs(redis: Any, user_id: str, keep: set[str]) -> None:
    """Remove a forgotten user's job arguments, results, read answers and dead letters from Redis.

    Writes still waiting in the user's log were enqueued after the forget and stay. Outcomes of
    earlier writes stay too (ids and counts only), so that whoever waits for them is answered.
    """
    pending = set()
    for raw in await redis.lrange(keys.write_log(user_id), 0, -1):
        with contextlib.suppress(json.JSONDecodeError, TypeError, KeyError):
            pending.add(json.loads(raw)["op_id"])
    writes = {_text(j) for j in await redis.smembers(keys.user_jobs(user_id))} - keep - pending
    reads = {_text(j) for j in await redis.smembers(keys.user_reads(user_id))}
    async with redis.pipeline(transaction=False) as pipe:
        for job_id in writes | reads:
            pipe.delete(keys.ARQ_JOB + job_id, keys.ARQ_RESULT + job_id, keys.ARQ_RETRY + job_id, keys.reply(job_id))
            for queue in keys.QUEUES:
                pipe.zrem(queue, job_id)
        if writes:
            pipe.srem(keys.user_jobs(user_id), *writes)
        pipe.delete(keys.user_reads(user_id))
        await pipe.execute()
    for raw in await redis.lrange(keys.DEAD_LETTERS, 0, -1):
        if DeadLetter.model_validate_json(raw).user_id == user_id:
            await redis.lrem(keys.DEAD_LETTERS, 0, raw)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
