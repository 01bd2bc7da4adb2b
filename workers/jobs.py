"""arq job functions. Each takes `ctx` and plain arguments, validates them with the contract, and
acts through an `AsyncScopedMemory` built for the job's user.

Reads answer through `workers.replies`; writes go through the user's `workers.write_log.WriteLog`.
"""

from __future__ import annotations

import functools
from typing import Any

from arq import Retry

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
from producer.errors import InvalidRequest, MemoryNotFound
from workers.backends.base import BackendUnavailable, Fence, InvalidCursor, MemoryBackend
from workers.observability import observed
from workers.purge import purge_user_jobs
from workers.replies import replying
from workers.scoped import AsyncScopedMemory
from workers.state import WorkerState
from workers.write_log import WriteLog, backoff

READ_TRIES = 3


def _retry_read(ctx: dict[str, Any], exc: BackendUnavailable) -> Retry:
    if ctx["job_try"] >= READ_TRIES:
        raise exc  # the reader is told, rather than left waiting for its timeout
    return Retry(defer=backoff(ctx["job_try"], exc.retry_after, base=0.1, cap=2.0))


@replying
@observed("search")
async def search(ctx: dict[str, Any], request: dict[str, Any]) -> list[dict[str, Any]]:
    req = parse(SearchRequest, request)
    memory = AsyncScopedMemory(req.user_id, WorkerState.of(ctx).backend)
    try:
        records = await memory.search(req.query, limit=req.limit, filters=req.filters)
    except BackendUnavailable as exc:
        raise _retry_read(ctx, exc) from exc
    await _count_foreign(ctx, memory)
    return [r.model_dump() for r in records]


@replying
@observed("list")
async def list_memories(ctx: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    req = parse(ListRequest, request)
    memory = AsyncScopedMemory(req.user_id, WorkerState.of(ctx).backend)
    try:
        page = await memory.get_all(limit=req.limit, cursor=req.cursor)
    except BackendUnavailable as exc:
        raise _retry_read(ctx, exc) from exc
    except InvalidCursor as exc:
        raise InvalidRequest(f"invalid cursor: {exc}") from None
    await _count_foreign(ctx, memory)
    return page.model_dump()


@observed("get")
@replying
async def get_memory(ctx: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    req = parse(GetRequest, request)
    memory = AsyncScopedMemory(req.user_id, WorkerState.of(ctx).backend)
    try:
        record = await memory.get(req.memory_id)
    except BackendUnavailable as exc:
        raise _retry_read(ctx, exc) from exc
    await _count_foreign(ctx, memory)
    if record is None:
        raise MemoryNotFound([req.memory_id])
    return record.model_dump()


@observed("history")
@replying
async def memory_history(ctx: dict[str, Any], request: dict[str, Any]) -> list[dict[str, Any]]:
    req = parse(HistoryRequest, request)
    memory = AsyncScopedMemory(req.user_id, WorkerState.of(ctx).backend)
    try:
        events = await memory.history(req.memory_id)
    except BackendUnavailable as exc:
        raise _retry_read(ctx, exc) from exc
    if events is None:
        raise MemoryNotFound([req.memory_id])
    return [e.model_dump() for e in events]


@observed("export")
@replying
async def export_memories(ctx: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    req = parse(ExportRequest, request)
    memory = AsyncScopedMemory(req.user_id, WorkerState.of(ctx).backend)
    try:
        page = await memory.export(limit=req.limit, cursor=req.cursor)
    except BackendUnavailable as exc:
        raise _retry_read(ctx, exc) from exc
    except InvalidCursor as exc:
        raise InvalidRequest(f"invalid cursor: {exc}") from None
    await _count_foreign(ctx, memory)
    return page.model_dump()


@observed("owners")
@replying
async def memory_owners(ctx: dict[str, Any], request: dict[str, Any]) -> dict[str, list[str]]:
    """Unscoped by design (contract.OwnersRequest): user ids only, for an app key's request."""
    req = parse(OwnersRequest, request)
    try:
        return await WorkerState.of(ctx).backend.owners(req.memory_ids)
    except BackendUnavailable as exc:
        raise _retry_read(ctx, exc) from exc


async def _count_foreign(ctx: dict[str, Any], memory: AsyncScopedMemory) -> None:
    if memory.foreign_dropped:
        await ctx["redis"].hincrby(keys.STATS, "foreign_dropped", memory.foreign_dropped)


@observed("write")
async def apply_write(ctx: dict[str, Any], user_id: str, op_id: str) -> dict[str, Any]:
    user_id = check_user_id(user_id)
    state = WorkerState.of(ctx)
    writes = WriteLog(ctx["redis"], functools.partial(apply_op, state.backend, ctx["redis"]),
                      max_tries=state.config.max_tries, job_timeout=state.config.job_timeout,
                      dead_letters=state.config.dead_letter_limits)
    return (await writes.run(user_id, op_id, attempt=ctx["job_try"])).model_dump()


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
