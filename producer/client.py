"""The API an app server calls: enqueue memory jobs for a user and, for reads, wait for the answer."""

from __future__ import annotations

import asyncio
import builtins
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from arq.connections import ArqRedis
from pydantic import BaseModel
from redis.exceptions import ConnectionError as RedisConnectionError

from producer import counters, keys
from producer.arq_adapter import WriteEnqueuer, delete_jobs, jobs_in_progress, queue_job, queue_state
from producer.contract import (
    AddRequest,
    DeadLetter,
    DeleteRequest,
    EncodedMessage,
    ExportedMemory,
    ExportPage,
    ExportRequest,
    ForgetRequest,
    GetRequest,
    HistoryEvent,
    HistoryRequest,
    ImportRequest,
    ListRequest,
    MemoryChange,
    MemoryPage,
    MemoryRecord,
    Message,
    OwnersRequest,
    SearchRequest,
    UpdateRequest,
    WriteKind,
    WriteOp,
    WriteOutcome,
    WriteRequest,
    check_expiry,
    check_future,
    new_op_ids,
    parse,
)
from producer.doorbell import ring
from producer.errors import (
    JobFailed,
    JobRejected,
    MemfleetError,
    MemoryNotFound,
    NoWorkerError,
    RedisUnavailable,
    WriteDeadLettered,
    WriteNotReplicated,
    WriteTimeout,
)
from producer.redis_pool import check_redis, redis_pool
from producer.settings import ProducerSettings

# Writes per MULTI/EXEC when enqueueing many at once.
SUBMIT_CHUNK = 500
# First poll interval when waiting for writes; it backs off to 100 ms.
RESULT_POLL = 0.005

P = ParamSpec("P")
R = TypeVar("R")


def _expiry(value: str | datetime | None) -> str | None:
    return None if value is None else check_expiry(value)


class FleetStats(BaseModel):
    queued: dict[str, int]
    in_progress: int
    completed: int
    failed: int
    dead_letters: int
    foreign_dropped: int
    oldest_queued_seconds: float | None
    workers: list[str]
    counters: dict[str, int]


class EncoderCounts(BaseModel):
    """One encoder thread of a worker since the worker started."""

    busy_seconds: float = 0.0  # its rate over time is the thread's utilisation (0 to 1)
    cpu_seconds: float = 0.0  # CPU time inside the model (busy, less waiting for a core)
    texts: int = 0
    batches: int = 0


class EncoderUse(BaseModel):
    """What a worker publishes under `keys.ENCODER_USE`: its bulk thread (writes) and its query
    thread (searches), which run beside each other."""

    bulk: EncoderCounts
    query: EncoderCounts


def _redis_lost(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Redis already retries for about three minutes (`producer.redis_pool`); a
    connection error that still reaches a public method means Redis is gone: say so plainly."""

    @functools.wraps(fn)
    async def call(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except MemfleetError:
            raise  # ours already say what happened (NoWorkerError is a TimeoutError, an OSError)
        except (RedisConnectionError, OSError) as exc:
            # Not redis-py's message: it names hosts and ports, and reaches HTTP answers.
            raise RedisUnavailable(f"lost Redis ({exc.__class__.__name__}); retry shortly") from exc

    return call


class WriteHandle:
    """A write that was accepted. `outcome()` waits until it has taken effect."""

    def __init__(self, client: Memfleet, op_id: str, user_id: str, kind: WriteKind) -> None:
        self._client = client
        self.op_id = op_id
        self.user_id = user_id
        self.kind = kind

    async def outcome(self, timeout: float | None = None) -> WriteOutcome:
        """Wait until the write has taken effect; raise `WriteDeadLettered` if it was dead-lettered,
        `MemoryNotFound` if it named a memory the user does not have (and so did nothing)."""
        (outcome,) = await self._client.wait([self], timeout)
        if outcome.error:
            raise WriteDeadLettered(f"write {self.op_id} failed: {outcome.error}")
        if outcome.not_found:
            raise MemoryNotFound(outcome.not_found)
        return outcome


class Memfleet:
    """Producer client. Use as `async with Memfleet.connect() as fleet: ...`."""

    def __init__(self, redis: ArqRedis, settings: ProducerSettings) -> None:
        self.redis = redis
        self.settings = settings
        self._writes = WriteEnqueuer(redis, keys.BULK_QUEUE, keys.APPLY_WRITE, keys.USER_JOBS_TTL, keys.USER_JOBS_MAX,
                                     wait_replicas=settings.wait_replicas, wait_timeout=settings.redis_wait_timeout)

    @classmethod
    async def connect(cls, settings: ProducerSettings | None = None) -> Memfleet:
        settings = settings or ProducerSettings()
        await check_redis(settings)
        return cls(redis_pool(settings, keys.BULK_QUEUE), settings)

    async def __aenter__(self) -> Memfleet:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self.redis.aclose()

    # -- writes: ordered per user through the user's write log -------------------------------------

    async def add(
        self,
        user_id: str,
        messages: Sequence[Message | dict[str, Any] | str],
        *,
        metadata: dict[str, Any] | None = None,
        infer: bool = False,
        expires_at: str | datetime | None = None,
    ) -> WriteHandle:
        """Add messages as one write; each becomes a memory (with `infer`, the facts an LLM finds in
        them). `expires_at` (ISO 8601 or a datetime; UTC if it has no zone): when they expire."""
        request = parse(AddRequest, {
            "user_id": user_id,
            "messages": [{"content": m} if isinstance(m, str) else m for m in messages],
            "metadata": metadata or {},
            "infer": infer,
            "expires_at": _expiry(expires_at),
        })
        check_future(request.expires_at)
        return (await self.submit([request]))[0]

    async def update(
        self,
        user_id: str,
        memory_id: str,
        *,
        text: str | None = None,
        metadata: dict[str, Any] | None = None,
        timestamp: str | None = None,
        expires_at: str | datetime | None = None,
        clear_expiry: bool = False,
    ) -> WriteHandle:
        """Change one memory: its text (embedded and indexed again), its metadata (replaced), when it
        was said, or its expiry (`clear_expiry`: it no longer expires). What is left out stays."""
        change = {"memory_id": memory_id, "text": text, "metadata": metadata, "timestamp": timestamp,
                  "expires_at": _expiry(expires_at), "clear_expiry": clear_expiry}
        return await self.update_many(user_id, [change])

    async def update_many(self, user_id: str, changes: Sequence[MemoryChange | dict[str, Any]]) -> WriteHandle:
        """Change up to 100 memories of one user in one write: all of them, or none if any id is
        not the user's (then `outcome()` raises `MemoryNotFound`)."""
        request = parse(UpdateRequest, {"user_id": user_id, "changes": list(changes)})
        for change in request.changes:
            check_future(change.expires_at)
        return (await self.submit([request]))[0]

    async def delete(self, user_id: str, memory_id: str) -> WriteHandle:
        """Delete one memory, leaving no text of it behind (docs/isolation.md, "Lifecycle")."""
        return await self.delete_many(user_id, [memory_id])

    async def delete_many(self, user_id: str, memory_ids: Sequence[str]) -> WriteHandle:
        """Delete up to 100 memories of one user: all of them, or none if any id is not the user's."""
        return (await self.submit([parse(DeleteRequest, {"user_id": user_id, "memory_ids": list(memory_ids)})]))[0]

    async def restore(self, user_id: str, memories: Sequence[ExportedMemory | dict[str, Any]]) -> WriteHandle:
        """Store up to 100 exported memories (`export`) of one user again, with their ids and
        history; one that is already there is left as it is, so restoring twice stores each once."""
        return (await self.submit([parse(ImportRequest, {"user_id": user_id, "memories": list(memories)})]))[0]

    async def forget(self, user_id: str) -> WriteHandle:
        return (await self.submit([parse(ForgetRequest, {"user_id": user_id})]))[0]

    @_redis_lost
    async def submit(self, requests: Iterable[WriteRequest]) -> builtins.list[WriteHandle]:
        """Enqueue validated writes in one round trip, each after the user's earlier writes."""
        requests = builtins.list(requests)
        ops = [WriteOp(op_id=op_id, request=r) for op_id, r in zip(new_op_ids(len(requests)), requests, strict=True)]
        await self._enqueue([(op.op_id, op.request.user_id, op.model_dump_json()) for op in ops])
        return [WriteHandle(self, op.op_id, op.request.user_id, op.request.kind) for op in ops]

    @_redis_lost
    async def submit_encoded(
        self, adds: Sequence[tuple[str, Sequence[EncodedMessage]]]
    ) -> builtins.list[WriteHandle]:
        """`submit` for adds of (user id, messages encoded by `contract.encode_message`): bulk ingest's
        path, which encodes each message as it reads it (`WriteOp.encode_add`)."""
        op_ids = new_op_ids(len(adds))
        await self._enqueue([
            (op_id, user_id, WriteOp.encode_add(op_id, user_id, messages))
            for op_id, (user_id, messages) in zip(op_ids, adds, strict=True)
        ])
        return [WriteHandle(self, op_id, user_id, "add") for op_id, (user_id, _) in zip(op_ids, adds, strict=True)]

    async def _enqueue(self, ops: Sequence[tuple[str, str, str | bytes]]) -> None:
        # Each op (id, user, JSON) goes into its user's log and onto the queue in one atomic step:
        # accepted with its job, or not at all. Steps are bounded so that no one of them holds
        # Redis up for long.
        for start in range(0, len(ops), SUBMIT_CHUNK):
            replicas = await self._writes.enqueue([
                (keys.write_log(user_id), keys.user_jobs(user_id), op_id, op_json, (user_id, op_id))
                for op_id, user_id, op_json in ops[start : start + SUBMIT_CHUNK]
            ])
            self._check_replicated(replicas)

    def _check_replicated(self, replicas: int) -> None:
        wanted = self.settings.wait_replicas
        if replicas < wanted:
            raise WriteNotReplicated(
                f"Redis took the write(s), but only {replicas} of the {wanted} replica(s) asked for "
                f"(MEMFLEET_REDIS_WAIT_REPLICAS) confirmed them within {self.settings.redis_wait_timeout:g}s: "
                "not acknowledged, as a failover now could lose them. Check the replicas (INFO replication); "
                "submitting again with the same message ids stores nothing twice"
            )

    # -- reads: interactive queue, result read once and deleted ------------------------------------

    async def search(
        self,
        user_id: str,
        query: str,
        *,
        limit: int = 10,
        filters: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> list[MemoryRecord]:
        request = parse(SearchRequest, {"user_id": user_id, "query": query, "limit": limit, "filters": filters or {}})
        result = await self._read(keys.SEARCH, request, timeout)
        return [MemoryRecord.model_validate(r) for r in result]

    async def list(
        self, user_id: str, *, limit: int = 100, cursor: str | None = None, timeout: float | None = None
    ) -> MemoryPage:
        request = parse(ListRequest, {"user_id": user_id, "limit": limit, "cursor": cursor})
        return MemoryPage.model_validate(await self._read(keys.LIST, request, timeout))

    async def get(self, user_id: str, memory_id: str, *, timeout: float | None = None) -> MemoryRecord:
        """One memory; `MemoryNotFound` if the user has no such memory (another user's id alike)."""
        request = parse(GetRequest, {"user_id": user_id, "memory_id": memory_id})
        return MemoryRecord.model_validate(await self._read(keys.GET, request, timeout))

    async def history(
        self, user_id: str, memory_id: str, *, timeout: float | None = None
    ) -> builtins.list[HistoryEvent]:
        """A memory's ADD, UPDATE and DELETE events, oldest first. A deleted memory's events say
        when it changed and went, never what it said."""
        request = parse(HistoryRequest, {"user_id": user_id, "memory_id": memory_id})
        return [HistoryEvent.model_validate(e) for e in await self._read(keys.HISTORY, request, timeout)]

    async def export_page(self, user_id: str, *, limit: int = 100, cursor: str | None = None,
                          timeout: float | None = None) -> ExportPage:
        request = parse(ExportRequest, {"user_id": user_id, "limit": limit, "cursor": cursor})
        return ExportPage.model_validate(await self._read(keys.EXPORT, request, timeout))

    async def export(self, user_id: str, *, page_size: int = 100) -> AsyncIterator[ExportedMemory]:
        """Every memory of the user with its history, a page at a time (bounded memory)."""
        cursor: str | None = None
        while True:
            page = await self.export_page(user_id, limit=page_size, cursor=cursor)
            for memory in page.memories:
                yield memory
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def owners(
        self, memory_ids: Sequence[str], *, timeout: float | None = None
    ) -> dict[str, builtins.list[str]]:
        """The users holding each memory id: not scoped to a user, so for callers that may act for
        any user (an app key on mem0's routes, which name a memory by id alone)."""
        request = parse(OwnersRequest, {"memory_ids": list(memory_ids)})
        owners: dict[str, builtins.list[str]] = await self._read(keys.OWNERS, request, timeout)
        return owners

    @_redis_lost
    async def _read(self, function: str, request: Any, timeout: float | None) -> Any:
        job_id = f"r-{uuid.uuid4().hex}"
        timeout = timeout or self.settings.search_timeout
        user_id = getattr(request, "user_id", None)
        async with self.redis.pipeline(transaction=True) as pipe:
            if user_id is not None:
                pipe.sadd(keys.user_reads(user_id), job_id)
                pipe.expire(keys.user_reads(user_id), keys.USER_READS_TTL)
            queue_job(pipe, self.redis, function, (request.model_dump(),), job_id, keys.INTERACTIVE_QUEUE)
            ring(pipe, keys.INTERACTIVE_DOORBELL)
            await pipe.execute()
        # The worker pushes the answer onto a list only this call reads: BLPOP wakes as soon as it
        # lands (no polling), and takes it out of Redis in the same step.
        popped = await self.redis.blpop([keys.reply(job_id)], timeout=timeout)  # type: ignore[arg-type,misc]
        if popped is None:
            # Nobody is waiting for this read any more: take it off the queue rather than run it later.
            async with self.redis.pipeline(transaction=False) as pipe:
                delete_jobs(pipe, [job_id], [keys.INTERACTIVE_QUEUE])
                await pipe.execute()
            raise NoWorkerError(
                f"no worker answered within {timeout:g}s; start one with `memfleet worker` "
                "(or `arq workers.WorkerSettings`) against the same REDIS_URL"
            )
        reply = json.loads(popped[1])
        if "not_found" in reply:
            raise MemoryNotFound(reply["not_found"])
        if "error" in reply:
            raise (JobRejected if reply.get("rejected") else JobFailed)(reply["error"])
        return reply["ok"]

    @_redis_lost
    async def wait(
        self, handles: Sequence[WriteHandle], timeout: float | None = None
    ) -> builtins.list[WriteOutcome]:
        """Wait for many writes at once (one MGET per round, however many are outstanding)."""
        deadline = time.monotonic() + (timeout or self.settings.write_timeout)
        outcomes: dict[str, WriteOutcome] = {}
        delay = RESULT_POLL
        while True:
            waiting = [h for h in handles if h.op_id not in outcomes]
            if not waiting:
                return [outcomes[h.op_id] for h in handles]
            for handle, outcome in zip(waiting, await self.outcomes(waiting), strict=True):
                if outcome is not None:
                    outcomes[handle.op_id] = outcome
            if len(outcomes) < len(handles):
                if time.monotonic() > deadline:
                    raise WriteTimeout(
                        f"{len(handles) - len(outcomes)} write(s) did not take effect in time; they stay queued. "
                        "Is a worker running and keeping up (`memfleet stats`)?"
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, 0.1)

    @_redis_lost
    async def outcomes(self, handles: Sequence[WriteHandle]) -> builtins.list[WriteOutcome | None]:
        """The outcome of each write that has taken effect, None for the others; no waiting."""
        found: builtins.list[WriteOutcome | None] = []
        for start in range(0, len(handles), 1000):
            values = await self.redis.mget([keys.write_outcome(h.op_id) for h in handles[start : start + 1000]])
            found += [None if v is None else WriteOutcome.model_validate_json(v) for v in values]
        return found

    # -- dead letters ----------------------------------------------------------------------------------

    @_redis_lost
    async def dead_letters(self) -> builtins.list[DeadLetter]:
        """The dead letters, oldest first (at most `dead_letter_max`, none older than `dead_letter_max_age`)."""
        await self.settings.dead_letter_limits.prune(self.redis)
        return [DeadLetter.model_validate_json(raw) for raw in await self.redis.lrange(keys.DEAD_LETTERS, 0, -1)]  # type: ignore[misc]

    @_redis_lost
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
                pipe.zadd(keys.user_jobs(op.request.user_id), {job_id: time.time() * 1000})
                queue_job(pipe, self.redis, keys.APPLY_WRITE, (op.request.user_id, op.op_id), job_id, keys.BULK_QUEUE)
                await pipe.execute()
            retried += 1
        return retried

    @_redis_lost
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

    # -- health ---------------------------------------------------------------------------------------

    @_redis_lost
    async def encoder_use(self) -> dict[str, EncoderUse]:
        """Each live worker's encoder counters, by worker (`<host>:<pid>`, as in `stats().workers`).

        Workers of the hosted backend have no encoder and publish nothing.
        """
        names = [k async for k in self.redis.scan_iter(match=keys.ENCODER_USE + "*", count=1000)]
        if not names:
            return {}
        found: dict[str, EncoderUse] = {}
        for name, raw in zip(names, await self.redis.mget(names), strict=True):
            if raw is None:
                continue  # expired between SCAN and MGET: that worker is gone
            try:
                found[name.decode().removeprefix(keys.ENCODER_USE)] = EncoderUse.model_validate_json(raw)
            except ValueError:
                continue  # not a worker's record: one bad key must not take the whole scrape down
        return dict(sorted(found.items()))

    @_redis_lost
    async def stats(self) -> FleetStats:
        now_ms = time.time() * 1000
        queues = await queue_state(self.redis, keys.QUEUES, now_ms)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.STATS)
            self.settings.dead_letter_limits.prune(pipe)  # answers how many are left
            replies = await pipe.execute()
        depth = {q.rsplit(":", 1)[-1]: state.depth for q, state in queues.items()}
        oldest = [state.oldest_ms for state in queues.values() if state.oldest_ms is not None]
        fleet = counters.reported(replies[-2])
        health = [k.decode() async for k in self.redis.scan_iter(match=keys.WORKER_HEALTH + "*", count=1000)]
        workers = sorted({h.removeprefix(keys.WORKER_HEALTH).rsplit(":", 1)[0] for h in health})
        return FleetStats(
            queued=depth,
            in_progress=await jobs_in_progress(self.redis),
            completed=counters.completed(fleet),
            failed=counters.failed(fleet),
            dead_letters=replies[-1],
            foreign_dropped=fleet.get(counters.FOREIGN_DROPPED, 0),
            oldest_queued_seconds=round((now_ms - min(oldest)) / 1000, 3) if oldest else None,
            workers=workers,
            counters=fleet,
        )
