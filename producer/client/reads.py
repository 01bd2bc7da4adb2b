"""Reads: each is a job on the interactive queue whose answer the worker pushes to a list only
its reader pops (`workers.replies` is the other side), so it leaves nothing behind in Redis."""

from __future__ import annotations

import builtins
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from producer import keys
from producer.arq_adapter import delete_jobs, queue_job
from producer.client.base import ClientBase, redis_lost
from producer.contract import (
    ExportedMemory,
    ExportPage,
    ExportRequest,
    GetRequest,
    HistoryEvent,
    HistoryRequest,
    ListRequest,
    MemoryPage,
    MemoryRecord,
    OwnersRequest,
    SearchRequest,
    parse,
)
from producer.doorbell import ring
from producer.errors import JobFailed, JobRejected, MemoryNotFound, NoWorkerError


class Reads(ClientBase):
    """Reads of one user's memories, each answered by a worker within the read's timeout."""

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

    @redis_lost
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
