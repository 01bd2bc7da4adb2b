"""What reads answer: memories as records, a page of them, and a memory's history."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from producer.contract.rules import ContractModel, MemoryId, StoredText, Timestamp


class HistoryEvent(ContractModel):
    """One change of a memory. A deleted memory's events keep when things happened, never its text."""

    id: MemoryId  # the event's own id (a UUID)
    memory_id: MemoryId
    event: Literal["ADD", "UPDATE", "DELETE"]
    old_text: StoredText | None = None
    new_text: StoredText | None = None
    at: Timestamp | None = None  # when it happened (ISO 8601)


class MemoryRecord(ContractModel):
    id: str
    user_id: str
    text: str  # the message as written, without the speaker and date it is indexed with
    name: str | None = None  # who said it
    timestamp: str | None = None  # when it was said (ISO 8601), if the writer said
    role: str | None = None  # user or assistant
    score: float | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: str | None = None
    updated_at: str | None = None
    expires_at: str | None = None  # ISO 8601, UTC; None: never


class MemoryPage(ContractModel):
    memories: list[MemoryRecord]
    next_cursor: str | None = None
