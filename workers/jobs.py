"""arq job functions. Each takes `ctx` and plain arguments, validates them with the contract, and
acts through an `AsyncScopedMemory` built for the job's user.

Reads answer through `workers.replies`; writes go through the user's `workers.write_log.WriteLog`.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from arq import Retry
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer import keys
from producer.contract import (
    AddRequest,
    DeleteRequest,
    ExportRequest,
    ForgetRequest,
    GetRequest,
    HistoryRequest,
    ImportRequest,
    ListRequest,
    OwnersRequest,
    SearchRequest,
    UpdateRequest,
    WriteOp,
    WriteOutcome,
    check_user_id,
    parse,
)
from producer.counters import FOREIGN_DROPPED
from producer.errors import InvalidRequest, MemoryNotFound
from workers.backends.base import BackendUnavailable, Fence, InvalidCursor, MemoryBackend
from workers.observability import observed
from workers.purge import purge_user_jobs
from workers.replies import replying
from workers.scoped import AsyncScopedMemory
from workers.state import WorkerState
from workers.write_log import WriteLog, backoff

READ_TRIES = 3
T = TypeVar("T")
ScopedRead = TypeVar("ScopedRead", SearchRequest, ListRequest, GetRequest, HistoryRequest, ExportRequest)


def _retry_read(ctx: dict[str, Any], exc: BackendUnavailable) -> Retry:
    if ctx["job_try"] >= READ_TRIES:
        raise exc  # the reader is told, rather than left waiting for its timeout
    return Retry(defer=backoff(ctx["job_try"], exc.retry_after, base=0.1, cap=2.0))


async def _read(ctx: dict[str, Any], model: type[ScopedRead], request: dict[str, Any],
                read: Callable[[AsyncScopedMemory, ScopedRead], Awaitable[T]]) -> T:
    """Validate a read, run it through a view of its user's memories, and count what was dropped.

    The store being away is retried (`READ_TRIES`); a cursor it never handed out is the reader's
    mistake; a record of another user is dropped by the view and counted here.
    """
    req = parse(model, request)
    memory = AsyncScopedMemory(req.user_id, WorkerState.of(ctx).backend)
    try:
        answer = await read(memory, req)
    except BackendUnavailable as exc:
        raise _retry_read(ctx, exc) from exc
    except InvalidCursor as exc:
        raise InvalidRequest(f"invalid cursor: {exc}") from None
    if memory.foreign_dropped:
        await ctx["redis"].hincrby(keys.STATS, FOREIGN_DROPPED, memory.foreign_dropped)
    return answer


@replying
@observed("search")
async def search(ctx: dict[str, Any], request: dict[str, Any]) -> list[dict[str, Any]]:
    async def run(memory: AsyncScopedMemory, req: SearchRequest) -> list[dict[str, Any]]:
        return [r.model_dump() for r in await memory.search(req.query, limit=req.limit, filters=req.filters)]

    return await _read(ctx, SearchRequest, request, run)


@replying
@observed("list")
async def list_memories(ctx: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    async def run(memory: AsyncScopedMemory, req: ListRequest) -> dict[str, Any]:
        return (await memory.get_all(limit=req.limit, cursor=req.cursor)).model_dump()

    return await _read(ctx, ListRequest, request, run)


def _found(answer: T | None, memory_id: str) -> T:
    """A read's answer about one memory; None is the user having no such memory (another user's
    id alike), which the reader hears as `MemoryNotFound`."""
    if answer is None:
        raise MemoryNotFound([memory_id])
    return answer


@replying
@observed("get")
async def get_memory(ctx: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    async def run(memory: AsyncScopedMemory, req: GetRequest) -> dict[str, Any]:
        return _found(await memory.get(req.memory_id), req.memory_id).model_dump()

    return await _read(ctx, GetRequest, request, run)


@replying
@observed("history")
async def memory_history(ctx: dict[str, Any], request: dict[str, Any]) -> list[dict[str, Any]]:
    async def run(memory: AsyncScopedMemory, req: HistoryRequest) -> list[dict[str, Any]]:
        return [e.model_dump() for e in _found(await memory.history(req.memory_id), req.memory_id)]

    return await _read(ctx, HistoryRequest, request, run)


@replying
@observed("export")
async def export_memories(ctx: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    async def run(memory: AsyncScopedMemory, req: ExportRequest) -> dict[str, Any]:
        return (await memory.export(limit=req.limit, cursor=req.cursor)).model_dump()

    return await _read(ctx, ExportRequest, request, run)


@replying
@observed("owners")
async def memory_owners(ctx: dict[str, Any], request: dict[str, Any]) -> dict[str, list[str]]:
    """Unscoped by design (contract.OwnersRequest): user ids only, for an app key's request."""
    req = parse(OwnersRequest, request)
    try:
        return await WorkerState.of(ctx).backend.owners(req.memory_ids)
    except BackendUnavailable as exc:
        raise _retry_read(ctx, exc) from exc


@observed("write")
async def apply_write(ctx: dict[str, Any], user_id: str, op_id: str) -> dict[str, Any]:
    user_id = check_user_id(user_id)
    state = WorkerState.of(ctx)
    writes = WriteLog(ctx["redis"], functools.partial(apply_op, state.backend, ctx["redis"]),
                      max_tries=state.config.max_tries, job_timeout=state.config.job_timeout,
                      dead_letters=state.config.dead_letter_limits)
    try:
        return (await writes.run(user_id, op_id, attempt=ctx["job_try"])).model_dump()
    except (RedisConnectionError, RedisTimeoutError) as exc:
        # Redis went away mid-write. arq would record any other exception as the job's end and
        # drop the job, leaving the write in its user's log with nobody to apply it; retried, the
        # job finds it applied (its outcome) or applies it, once Redis is back.
        raise Retry(defer=backoff(ctx["job_try"], base=0.5, cap=5.0)) from exc


async def apply_op(backend: MemoryBackend, redis: Any, op: WriteOp, fence: Fence) -> WriteOutcome:
    """Apply one write of the log to the store, under the lease `fence` names."""
    request = op.request
    memory = AsyncScopedMemory(request.user_id, backend, fence=fence)
    if isinstance(request, AddRequest):
        infer = request.infer and backend.can_infer
        ids, duplicates = await memory.add(request.messages, metadata=request.metadata, infer=infer,
                                           expires_at=request.expires_at, op_id=op.op_id)
        return WriteOutcome(op_id=op.op_id, kind="add", stored=len(ids), duplicates=duplicates, memory_ids=ids)
    if isinstance(request, UpdateRequest):
        missing = await memory.update(request.changes)
        return WriteOutcome(op_id=op.op_id, kind="update", updated=0 if missing else len(request.changes),
                            not_found=missing)
    if isinstance(request, DeleteRequest):
        missing = await memory.delete(request.memory_ids)
        return WriteOutcome(op_id=op.op_id, kind="delete", deleted=0 if missing else len(request.memory_ids),
                            not_found=missing)
    if isinstance(request, ImportRequest):
        ids, duplicates = await memory.restore(request.memories)
        return WriteOutcome(op_id=op.op_id, kind="import", stored=len(ids), duplicates=duplicates, memory_ids=ids)
    assert isinstance(request, ForgetRequest)
    deleted = await memory.delete_all()
    await purge_user_jobs(redis, request.user_id, keep={op.op_id})
    return WriteOutcome(op_id=op.op_id, kind="forget", deleted=deleted)
