"""memfleet's JSON API for one memory at a time: get, change, delete, history, batches, export, import.

Like the rest of /api, a request names its `user_id` (an app key) or acts for the user key's own
user. A memory id that is not that user's answers 404 exactly as an unknown one does. Changes are
writes in the user's log, answered once applied (`wait`, the default) or at once with an op id.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from producer.client import Memfleet
from producer.contract import (
    MAX_IDS_PER_WRITE,
    Content,
    Expiry,
    ExportedMemory,
    HistoryEvent,
    MemoryChange,
    MemoryId,
    MemoryRecord,
    Metadata,
    NamedUserId,
    Timestamp,
)
from producer.http.answers import ERROR_RESPONSES
from producer.http.api_routes import WriteAnswer, answer
from producer.http.deps import Fleet, Who
from producer.http.metrics import timed

router = APIRouter(prefix="/api", tags=["memfleet: one memory"], responses=ERROR_RESPONSES)
EXPORT_PAGE = 100


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UpdateBody(_Body):
    user_id: NamedUserId | None = Field(default=None, description="default: the user key's own user")
    text: Content | None = None
    metadata: Metadata | None = Field(default=None, description="replaces the memory's metadata")
    timestamp: Timestamp | None = None
    expires_at: Expiry | None = Field(default=None,
                                      description="ISO 8601 (UTC if no zone); null: the memory no longer expires")
    wait: StrictBool = True


class BatchUpdateBody(_Body):
    user_id: NamedUserId | None = None
    changes: Annotated[list[MemoryChange], Field(min_length=1, max_length=MAX_IDS_PER_WRITE)]
    wait: StrictBool = True


class BatchDeleteBody(_Body):
    user_id: NamedUserId | None = None
    memory_ids: Annotated[list[MemoryId], Field(min_length=1, max_length=MAX_IDS_PER_WRITE)]
    wait: StrictBool = True


class ImportBody(_Body):
    user_id: NamedUserId | None = Field(default=None, description="the user to import into; each memory's "
                                      "own user_id is replaced by it")
    memories: Annotated[list[dict[str, Any]], Field(min_length=1, max_length=MAX_IDS_PER_WRITE,
                                                    description="lines of an export (ExportedMemory)")]
    wait: StrictBool = True


class HistoryAnswer(BaseModel):
    memory_id: str
    events: list[HistoryEvent]


@router.get("/memories/{memory_id}", response_model=MemoryRecord, summary="One memory of a user",
            responses={404: {"description": "the user has no such memory"}})
async def get_memory(memory_id: str, who: Who, fleet: Fleet, request: Request,
                     user_id: Annotated[str | None, Query()] = None) -> MemoryRecord:
    with timed(request, "get"):
        return await fleet.get(who.user_for(user_id), memory_id)


@router.patch("/memories/{memory_id}", response_model=WriteAnswer, summary="Change one memory",
              responses={404: {"description": "the user has no such memory: nothing changed"}})
async def update_memory(memory_id: str, body: UpdateBody, who: Who, fleet: Fleet, request: Request,
                        response: Response) -> WriteAnswer:
    clear = "expires_at" in body.model_fields_set and body.expires_at is None
    handle = await fleet.update(who.user_for(body.user_id), memory_id, text=body.text, metadata=body.metadata,
                                timestamp=body.timestamp, expires_at=body.expires_at, clear_expiry=clear)
    return await answer(fleet, handle, body.wait, request, response)


@router.delete("/memories/{memory_id}", response_model=WriteAnswer, summary="Delete one memory, leaving no text",
               responses={404: {"description": "the user has no such memory"}})
async def delete_memory(memory_id: str, who: Who, fleet: Fleet, request: Request, response: Response,
                        user_id: Annotated[str | None, Query()] = None,
                        wait: Annotated[bool, Query()] = True) -> WriteAnswer:
    return await answer(fleet, await fleet.delete(who.user_for(user_id), memory_id), wait, request, response)


@router.get("/memories/{memory_id}/history", response_model=HistoryAnswer, summary="A memory's changes",
            responses={404: {"description": "the user has no such memory"}})
async def memory_history(memory_id: str, who: Who, fleet: Fleet, request: Request,
                         user_id: Annotated[str | None, Query()] = None) -> HistoryAnswer:
    with timed(request, "history"):
        events = await fleet.history(who.user_for(user_id), memory_id)
    return HistoryAnswer(memory_id=memory_id.lower(), events=events)


@router.post("/memories/batch-update", response_model=WriteAnswer, summary="Change up to 100 memories at once",
             responses={404: {"description": "an id is not the user's: nothing changed"}})
async def batch_update(body: BatchUpdateBody, who: Who, fleet: Fleet, request: Request,
                       response: Response) -> WriteAnswer:
    handle = await fleet.update_many(who.user_for(body.user_id), body.changes)
    return await answer(fleet, handle, body.wait, request, response)


@router.post("/memories/batch-delete", response_model=WriteAnswer, summary="Delete up to 100 memories at once",
             responses={404: {"description": "an id is not the user's: nothing deleted"}})
async def batch_delete(body: BatchDeleteBody, who: Who, fleet: Fleet, request: Request,
                       response: Response) -> WriteAnswer:
    handle = await fleet.delete_many(who.user_for(body.user_id), body.memory_ids)
    return await answer(fleet, handle, body.wait, request, response)


@router.get("/export", summary="Every memory of a user, with its history, as JSON lines",
            response_class=StreamingResponse,
            responses={200: {"content": {"application/x-ndjson": {}},
                             "description": "one ExportedMemory per line; `memfleet import` restores it"}})
async def export(who: Who, fleet: Fleet, user_id: Annotated[str | None, Query()] = None) -> StreamingResponse:
    user = who.user_for(user_id)
    first = await fleet.export_page(user, limit=EXPORT_PAGE)  # errors answer before the stream starts

    async def lines() -> AsyncIterator[bytes]:
        async for memory in _pages(fleet, user, first.memories, first.next_cursor):
            yield memory.model_dump_json().encode() + b"\n"

    filename = f"memfleet-{user}.jsonl"
    return StreamingResponse(lines(), media_type="application/x-ndjson",
                             headers={"Content-Disposition": f'attachment; filename="{filename}"'})


async def _pages(fleet: Memfleet, user: str, memories: list[ExportedMemory],
                 cursor: str | None) -> AsyncIterator[ExportedMemory]:
    while True:
        for memory in memories:
            yield memory
        if cursor is None:
            return
        page = await fleet.export_page(user, limit=EXPORT_PAGE, cursor=cursor)
        memories, cursor = page.memories, page.next_cursor


@router.post("/import", response_model=WriteAnswer, summary="Restore up to 100 exported memories",
             responses={422: {"description": "a line is not an exported memory"}})
async def import_memories(body: ImportBody, who: Who, fleet: Fleet, request: Request,
                          response: Response) -> WriteAnswer:
    user = who.user_for(body.user_id)
    handle = await fleet.restore(user, [{**m, "user_id": user} for m in body.memories])
    return await answer(fleet, handle, body.wait, request, response)
