"""A memory as the embedded backend stores it and hands it back: its id, derived from its
idempotency key (`memory_id`), its payload (mem0's format, `workers.mem0_adapter`) and the record
or export a caller reads."""

from __future__ import annotations

import builtins
import uuid
from datetime import UTC, datetime
from typing import Any

from producer.contract import AddRequest, ExportedMemory, HistoryEvent, MemoryChange, MemoryRecord, Message
from workers import mem0_adapter
from workers.backends import pg_lifecycle, pg_store
from workers.backends.base import InvalidCursor
from workers.backends.indexing import Said, dense_text, keyword_line

# Memory ids are uuid5(namespace, user id + idempotency key): the same message of the same user
# always lands on the same row, whichever worker writes it and however often.
ID_NAMESPACE = uuid.UUID("6f9b1c52-7d1e-4f0e-9b8a-2f6c1d3e5a70")


def memory_id(user_id: str, key: str) -> str:
    return str(uuid.uuid5(ID_NAMESPACE, f"{user_id}\0{key}"))


def page_cursor(cursor: str | None) -> str | None:
    """A page cursor (the last id of the page before) as the memory id it is."""
    if cursor is None:
        return None
    try:
        return str(uuid.UUID(cursor))
    except ValueError:
        raise InvalidCursor("the cursor is not a next_cursor this service returned") from None


def changed(payload: dict[str, Any], change: MemoryChange, now: str) -> tuple[dict[str, Any], str | None, str | None]:
    """A memory's payload after `change`, the text to embed it by if its text changed, and its new
    own keyword line if its text or its date changed (else None)."""
    new = mem0_adapter.changed_payload(payload, now, text=change.text, metadata=change.metadata,
                                       timestamp=change.timestamp)
    said = said_in(new)
    dense = dense_text(said) if change.text is not None else None
    keywords = keyword_line(said) if change.text is not None or change.timestamp is not None else None
    return new, dense, keywords


def restored_payload(user_id: str, memory: ExportedMemory) -> dict[str, Any]:
    return mem0_adapter.new_payload(user_id, memory.text, metadata=memory.metadata, role=memory.role, name=memory.name,
                                    timestamp=memory.timestamp,
                                    created_at=memory.created_at or datetime.now(UTC).isoformat(),
                                    updated_at=memory.updated_at)


def exported(user_id: str, stored: pg_lifecycle.Stored, events: builtins.list[dict[str, Any]]) -> ExportedMemory:
    found = record(user_id, stored.row)
    return ExportedMemory(
        user_id=user_id, id=found.id, text=found.text, role="assistant" if found.role == "assistant" else "user",
        name=found.name, timestamp=found.timestamp, metadata=found.metadata, created_at=found.created_at,
        updated_at=found.updated_at, expires_at=found.expires_at, context_for=list(stored.context_of),
        history=[HistoryEvent.model_validate(e) for e in events],
    )


def said_in(payload: dict[str, Any]) -> Said:
    """The message a stored memory's payload holds."""
    fields = mem0_adapter.read_payload(payload)
    return Said(fields.text, fields.name, fields.timestamp)


def said_of(message: Message) -> Said:
    return Said(message.content, message.name, message.timestamp)


def message_payload(user_id: str, request: AddRequest, message: Message) -> dict[str, Any]:
    """The payload of an infer=False message: the request's metadata and the message's, with its
    text, role, speaker and timestamp."""
    return mem0_adapter.new_payload(user_id, message.content, metadata={**request.metadata, **message.metadata},
                                    role=message.role, name=message.name, timestamp=message.timestamp,
                                    created_at=datetime.now(UTC).isoformat())


def record(user_id: str, row: pg_store.Row) -> MemoryRecord:
    fields = mem0_adapter.read_payload(row.payload)
    return MemoryRecord(
        # A row whose payload names another user than its key is reported as that user's, so that
        # AsyncScopedMemory drops it rather than hand it out.
        id=row.id,
        user_id=str(mem0_adapter.payload_user(row.payload, user_id)),
        text=fields.text,
        name=fields.name,
        timestamp=fields.timestamp,
        role=fields.role,
        score=row.score,
        metadata=mem0_adapter.caller_metadata(row.payload),
        created_at=fields.created_at,
        updated_at=fields.updated_at,
        expires_at=row.expires_at,
    )
