"""`AsyncScopedMemory`: a view of one user's memories. No call can name another user."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import structlog

from producer.contract import AddRequest, MemoryPage, MemoryRecord, Message, check_filters, check_user_id, parse
from workers.backends.base import MemoryBackend

log = structlog.get_logger("memfleet.security")


class AsyncScopedMemory:
    """Bound to one validated user id for life; cheap to build per job over a shared backend.

    Every result is checked against the scope before it leaves: a record of another user is
    dropped, logged as a security event (ids only) and counted in `foreign_dropped`.
    """

    __slots__ = ("_backend", "_user_id", "foreign_dropped")

    def __init__(self, user_id: str, backend: MemoryBackend) -> None:
        self._user_id = check_user_id(user_id)
        self._backend = backend
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
    ) -> tuple[list[str], int]:
        """Store `messages` for this view's user; return (ids of new memories, number already stored).

        Nothing here can name a user: the request is built with the view's own id.
        """
        request = parse(AddRequest, {
            "user_id": self._user_id,
            "messages": [{"content": m} if isinstance(m, str) else m for m in messages],
            "metadata": metadata or {},
            "infer": infer,
        })
        return await self._backend.add(self._user_id, request, request.idempotency_keys())

    async def search(self, query: str, *, limit: int = 10, filters: dict[str, Any] | None = None) -> list[MemoryRecord]:
        records = await self._backend.search(self._user_id, query, limit, check_filters(dict(filters or {})))
        return self._own(records)

    async def get_all(self, *, limit: int = 100, cursor: str | None = None) -> MemoryPage:
        page = await self._backend.list(self._user_id, limit, cursor)
        return MemoryPage(memories=self._own(page.memories), next_cursor=page.next_cursor)

    async def delete_all(self) -> int:
        return await self._backend.forget(self._user_id)

    async def count(self) -> int:
        return await self._backend.count(self._user_id)

    def _own(self, records: list[MemoryRecord]) -> list[MemoryRecord]:
        own = [r for r in records if r.user_id == self._user_id]
        dropped = len(records) - len(own)
        if dropped:
            self.foreign_dropped += dropped
            log.error(
                "foreign_memory_dropped",
                user_id=self._user_id,
                backend=self._backend.name,
                dropped=dropped,
                memory_ids=[r.id for r in records if r.user_id != self._user_id],
            )
        return own
