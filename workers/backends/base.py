"""What every memory backend offers. Each method takes the user id it is scoped to, explicitly.

Backends are shared by all jobs of a worker process; `AsyncScopedMemory` is the only caller and
always passes its own, validated user id.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from typing import Any, Protocol

from producer.contract import (
    AddRequest,
    ExportedMemory,
    ExportPage,
    HistoryEvent,
    MemoryChange,
    MemoryPage,
    MemoryRecord,
)
from producer.errors import BackendError, InvalidRequest


@dataclass(frozen=True)
class Fence:
    """The lease a write is applied under (workers.write_log, rule 9): a store that can, records
    `token` in the transaction that applies the write and refuses a token older than the last."""

    user_id: str
    token: int


class FencedOut(BackendError):
    """A newer holder of the user's lease has written: this write was refused, and its holder must
    stop working on the user (it lost its lease while paused)."""


class BackendUnavailable(BackendError):
    """The store behind a backend cannot be reached right now; the job should be retried later."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BackendRejected(BackendError):
    """The store refused the request itself (the hosted platform's 4xx other than 408/429):
    retrying cannot help, so the write is dead-lettered at once with the reason."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class InvalidCursor(InvalidRequest):
    """A list cursor this backend never handed out."""


class ForgetIncomplete(BackendUnavailable):
    """Memories of the user were still found after a forget; retrying finishes the job."""


class MemoryBackend(Protocol):
    name: str
    #: fact extraction (`infer=True`) is possible: an LLM is configured
    can_infer: bool

    async def add(self, user_id: str, request: AddRequest, keys: list[str], *,
                  fence: Fence | None = None) -> tuple[list[str], int]:
        """Store the request's messages; return (ids of new memories, number already stored)."""
        ...

    async def search(
        self, user_id: str, query: str, limit: int, filters: dict[str, Any]
    ) -> list[MemoryRecord]: ...

    async def list(self, user_id: str, limit: int, cursor: str | None) -> MemoryPage: ...

    async def forget(self, user_id: str, *, fence: Fence | None = None) -> int:
        """Delete everything kept for the user; return how many memories went."""
        ...

    async def count(self, user_id: str) -> int: ...

    # -- one memory at a time (docs/isolation.md, "Lifecycle") --------------------------------------
    # An id that is not the user's answers exactly as one that never existed: None, or listed among
    # the ids not found. A write that names such an id applies nothing.

    async def get(self, user_id: str, memory_id: str) -> MemoryRecord | None: ...

    async def history(self, user_id: str, memory_id: str) -> builtins.list[HistoryEvent] | None:
        """The memory's events, oldest first; a deleted or expired memory's carry no text."""
        ...

    async def update(self, user_id: str, changes: builtins.list[MemoryChange], *,
                     fence: Fence | None = None) -> builtins.list[str]:
        """Apply every change, or none if any id is not the user's; return the ids not found."""
        ...

    async def delete(self, user_id: str, memory_ids: builtins.list[str], *,
                     fence: Fence | None = None) -> builtins.list[str]:
        """Delete every memory named, or none if any is not the user's; return the ids not found.
        A deleted memory leaves no text behind: not in the index, not in its history."""
        ...

    async def export(self, user_id: str, limit: int, cursor: str | None) -> ExportPage: ...

    async def restore(self, user_id: str, memories: builtins.list[ExportedMemory], *,
                      fence: Fence | None = None) -> tuple[builtins.list[str], int]:
        """Store exported memories again (with their ids where the store allows it); return (ids
        stored now, number that were already there)."""
        ...

    async def owners(self, memory_ids: builtins.list[str]) -> dict[str, builtins.list[str]]:
        """The users holding each memory id. Unscoped: for app keys only (contract.OwnersRequest)."""
        ...

    async def sweep_expired(self) -> int:
        """Delete some memories whose expiry has passed, as `delete` does; return how many."""
        ...

    async def close(self) -> None: ...
