"""`AsyncScopedMemory`: a view of one user's memories. No call can name another user."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import structlog

from producer.contract import (
    AddRequest,
    DeleteRequest,
    ExportedMemory,
    ExportPage,
    HistoryEvent,
    ImportRequest,
    MemoryChange,
    MemoryPage,
    MemoryRecord,
    Message,
    UpdateRequest,
    check_filters,
    check_memory_id,
    check_user_id,
    parse,
)
from workers.backends.base import Fence, MemoryBackend

log = structlog.get_logger("memfleet.security")


class AsyncScopedMemory:
    """Bound to one validated user id for life; cheap to build per job over a shared backend.

    Every result is checked against the scope before it leaves: a record of another user is
    dropped, logged as a security event (ids only) and counted in `foreign_dropped`.
    """

    __slots__ = ("_backend", "_fence", "_user_id", "foreign_dropped")

    def __init__(self, user_id: str, backend: MemoryBackend, *, fence: Fence | None = None) -> None:
        """`fence`: the lease the view's writes are applied under (a job of the user's write log);
        the store refuses them once a newer holder has written."""
        self._user_id = check_user_id(user_id)
        self._backend = backend
        self._fence = fence
        self.foreign_dropped = 0

    @property
    def user_id(self) -> str:
        return self._user_id

    async def add(
        self,
        messages: Sequence[Message | dict[str, Any] | str],
        *,
        metadata: dict[str, Any] | None = None,
        infer: bool = False,
        expires_at: str | None = None,
    ) -> tuple[list[str], int]:
        """Store `messages` for this view's user; return (ids of new memories, number already stored).

        Nothing here can name a user: the request is built with the view's own id.
        """
        request = parse(AddRequest, {
            "user_id": self._user_id,
            "messages": [{"content": m} if isinstance(m, str) else m for m in messages],
            "metadata": metadata or {},
            "infer": infer,
            "expires_at": expires_at,
        })
        return await self._backend.add(self._user_id, request, request.idempotency_keys(), fence=self._fence)

    async def search(self, query: str, *, limit: int = 10, filters: dict[str, Any] | None = None) -> list[MemoryRecord]:
        records = await self._backend.search(self._user_id, query, limit, check_filters(dict(filters or {})))
        return self._own(records)

    async def get_all(self, *, limit: int = 100, cursor: str | None = None) -> MemoryPage:
        page = await self._backend.list(self._user_id, limit, cursor)
        return MemoryPage(memories=self._own(page.memories), next_cursor=page.next_cursor)

    async def get(self, memory_id: str) -> MemoryRecord | None:
        """The memory, or None if this user has no such memory (another user's id included)."""
        record = await self._backend.get(self._user_id, check_memory_id(memory_id))
        return None if record is None else next(iter(self._own([record])), None)

    async def history(self, memory_id: str) -> list[HistoryEvent] | None:
        return await self._backend.history(self._user_id, check_memory_id(memory_id))

    async def update(self, changes: Sequence[MemoryChange | dict[str, Any]]) -> list[str]:
        """Apply the changes, all or none; return the ids that are not this user's memories."""
        request = parse(UpdateRequest, {"user_id": self._user_id, "changes": list(changes)})
        return await self._backend.update(self._user_id, list(request.changes), fence=self._fence)

    async def delete(self, memory_ids: Sequence[str]) -> list[str]:
        """Delete the memories, all or none; return the ids that are not this user's memories."""
        request = parse(DeleteRequest, {"user_id": self._user_id, "memory_ids": list(memory_ids)})
        return await self._backend.delete(self._user_id, request.memory_ids, fence=self._fence)

    async def export(self, *, limit: int = 100, cursor: str | None = None) -> ExportPage:
        page = await self._backend.export(self._user_id, limit, cursor)
        own = [m for m in page.memories if m.user_id == self._user_id]
        self._count_foreign([m.id for m in page.memories if m.user_id != self._user_id])
        return ExportPage(memories=own, next_cursor=page.next_cursor)

    async def restore(self, memories: Sequence[ExportedMemory | dict[str, Any]]) -> tuple[list[str], int]:
        """Store exported memories of this user again; (ids stored now, number already there)."""
        request = parse(ImportRequest, {"user_id": self._user_id, "memories": list(memories)})
        return await self._backend.restore(self._user_id, list(request.memories), fence=self._fence)

    async def delete_all(self) -> int:
        return await self._backend.forget(self._user_id, fence=self._fence)

    async def count(self) -> int:
        return await self._backend.count(self._user_id)

    def _own(self, records: list[MemoryRecord]) -> list[MemoryRecord]:
        self._count_foreign([r.id for r in records if r.user_id != self._user_id])
        return [r for r in records if r.user_id == self._user_id]

    def _count_foreign(self, memory_ids: list[str]) -> None:
        if memory_ids:
            self.foreign_dropped += len(memory_ids)
            log.error("foreign_memory_dropped", user_id=self._user_id, backend=self._backend.name,
                      dropped=len(memory_ids), memory_ids=memory_ids)
