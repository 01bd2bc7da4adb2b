"""The mem0 platform's records as memfleet's: a memory, a history event, an export; the platform's
day-granular `expiration_date` as an instant; and a change as the platform's update fields."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from producer.contract import (
    MAX_HISTORY_EVENTS,
    ExportedMemory,
    HistoryEvent,
    MemoryChange,
    MemoryRecord,
    check_memory_id,
)
from producer.errors import InvalidRequest
from workers.backends.base import InvalidCursor

EVENT_NAMESPACE = uuid.UUID("5d1f2a8e-93c4-4b7e-a1f0-6c2e8d4b9a17")
# Platform metadata key holding the id a restored memory was exported with, so that an import run
# twice finds what it stored the first time. Callers never see it (`record` drops it) and cannot
# set or filter on it: caller keys are letters, digits and '_' (contract.check_metadata).
ORIGIN_KEY = "memfleet-origin"


def page_number(cursor: str | None) -> int:
    if cursor is None:
        return 1
    if not (cursor.isascii() and cursor.isdigit()) or int(cursor) < 1:
        raise InvalidCursor("the cursor is not a page number this service returned")
    return int(cursor)


def results_of(response: Any) -> list[dict[str, Any]]:
    """The memories in an answer: the v1.1 `{"results": [...]}` envelope or a bare list."""
    if isinstance(response, list):
        return response
    return list(response.get("results") or [])


def unix_seconds(timestamp: str) -> int:
    """An ISO 8601 time as Unix seconds; a time without a zone is taken as UTC."""
    when = datetime.fromisoformat(timestamp)
    return int((when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp())


def said_at_seconds(memory: ExportedMemory) -> int | None:
    """When an exported memory was said (else made), in Unix seconds; None if unknown or unreadable
    (`created_at` is not checked on import: it is informative)."""
    try:
        return next((unix_seconds(t) for t in (memory.timestamp, memory.created_at) if t), None)
    except ValueError:
        return None


def expiration_day(expires_at: str) -> str:
    """An expiry as the platform's `expiration_date`: the day (UTC) at whose end it falls due.

    The platform expires by day, at the end of the date given, so an expiry inside a day is
    coarsened to the end of that day: set to expire at 10:00, a memory expires at 24:00 (UTC)
    here. An expiry at midnight is the day before's end, and is exact.
    """
    when = datetime.fromisoformat(expires_at)
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    return (when.astimezone(UTC) - timedelta(microseconds=1)).date().isoformat()


def due_at(expiration_date: Any) -> str | None:
    """The platform's `expiration_date` as the instant it falls due: the next midnight, UTC."""
    if not expiration_date:
        return None
    try:
        day = date.fromisoformat(str(expiration_date)[:10])
    except ValueError:
        return None
    return datetime.combine(day + timedelta(days=1), time(), UTC).isoformat()


def is_live(result: dict[str, Any]) -> bool:
    """The platform hides expired memories itself; this makes sure (and agrees with its clock to a day)."""
    due = due_at(result.get("expiration_date"))
    return due is None or datetime.fromisoformat(due) > datetime.now(UTC)


def is_batchable(change: MemoryChange) -> bool:
    """The batch endpoint takes text and metadata only."""
    return change.timestamp is None and change.expires_at is None and not change.clear_expiry


def update_fields(change: MemoryChange, current: dict[str, Any]) -> dict[str, Any]:
    """The platform's update fields for `change` to the memory `current` (its platform record)."""
    fields: dict[str, Any] = {}
    if change.text is not None:
        fields["text"] = change.text
    if change.metadata is not None:  # replaced, but a restored memory keeps where it came from
        origin = (current.get("metadata") or {}).get(ORIGIN_KEY)
        fields["metadata"] = {**change.metadata, **({ORIGIN_KEY: origin} if origin else {})}
    if change.timestamp is not None:
        fields["timestamp"] = unix_seconds(change.timestamp)
    if change.expires_at is not None:
        fields["expiration_date"] = expiration_day(change.expires_at)
    elif change.clear_expiry:
        fields["expiration_date"] = None  # the SDK sends this null; the platform clears the date
    return fields


def to_event(row: dict[str, Any]) -> HistoryEvent:
    # memfleet's history events have UUIDs (an import stores them as such); one the platform gave
    # in another form is named by a UUID derived from it, the same every time.
    event_id = str(row.get("id"))
    try:
        check_memory_id(event_id)
    except InvalidRequest:
        event_id = str(uuid.uuid5(EVENT_NAMESPACE, event_id))
    return HistoryEvent(id=event_id, memory_id=str(row["memory_id"]), event=row["event"],
                        old_text=row.get("old_memory"), new_text=row.get("new_memory"),
                        at=row.get("created_at") or row.get("updated_at"))


def to_exported(user_id: str, record: MemoryRecord, events: list[HistoryEvent]) -> ExportedMemory:
    return ExportedMemory(
        user_id=user_id, id=record.id, text=record.text, role="assistant" if record.role == "assistant" else "user",
        name=record.name or None, metadata=record.metadata, created_at=record.created_at,
        updated_at=record.updated_at, expires_at=record.expires_at, history=events[-MAX_HISTORY_EVENTS:],
    )


def to_record(result: dict[str, Any]) -> MemoryRecord:
    return MemoryRecord(
        id=str(result["id"]),
        # The platform's own answer, never the scope we asked for: the caller drops another user's records.
        user_id=str(result.get("user_id") or ""),
        text=str(result.get("memory") or ""),
        name=result.get("actor_id"),
        role=result.get("role"),
        score=result.get("score"),
        metadata={k: v for k, v in (result.get("metadata") or {}).items() if k != ORIGIN_KEY},
        created_at=result.get("created_at"),
        updated_at=result.get("updated_at"),
        expires_at=due_at(result.get("expiration_date")),
    )
