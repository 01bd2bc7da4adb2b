"""memfleet's JSON API for one memory at a time: get, change, delete, history, batches, export, import.

Like the rest of /api, a request names its `user_id` (an app key) or acts for the user key's own
user. A memory id that is not that user's answers 404 exactly as an unknown one does. Changes are
writes in the user's log, answered once applied (`wait`, the default) or at once with an op id.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool
from pydantic.json_schema import SkipJsonSchema

from producer.client import Memfleet
from producer.contract import (
    MAX_IDS_PER_WRITE,
    MEMORY_ID_PATTERN,
    MEMORY_ID_RULE,
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
    at_least_one_of,
)
from producer.http.answers import ERROR_RESPONSES, ErrorAnswer
from producer.http.api_routes import WriteAnswer, accepted, answer
from producer.http.deps import Fleet, Who
from producer.http.metrics import timed

router = APIRouter(prefix="/api", tags=["memfleet: one memory"], responses=ERROR_RESPONSES)
MemoryIdPath = Annotated[str, Path(pattern=MEMORY_ID_PATTERN, description=MEMORY_ID_RULE)]
NOT_FOUND = {"model": ErrorAnswer, "description": "the user has no such memory (an id of another user alike)"}
NONE_CHANGED = {"model": ErrorAnswer, "description": "an id is not the user's: nothing changed"}
EXPORT_PAGE = 100


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UpdateBody(_Body):
    model_config = ConfigDict(json_schema_extra=at_least_one_of("text", "metadata", "timestamp", "expires_at"))

    user_id: NamedUserId | None = Field(default=None, description="default: the user key's own user")
    text: Content | SkipJsonSchema[None] = None
    metadata: Metadata | SkipJsonSchema[None] = Field(default=None, description="replaces the memory's metadata")
    timestamp: Timestamp | SkipJsonSchema[None] = None
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
    memories: Annotated[list[ExportedMemory], Field(min_length=1, max_length=MAX_IDS_PER_WRITE,
                                                    json_schema_extra={"uniqueItems": True},
                                                    description="lines of an export")]
    wait: StrictBool = True


class HistoryAnswer(BaseModel):
    memory_id: str
    events: list[HistoryEvent]


@router.get("/memories/{memory_id}", response_model=MemoryRecord, summary="One memory of a user",
            responses={404: NOT_FOUND})
async def get_memory(memory_id: MemoryIdPath, who: Who, fleet: Fleet, request: Request,
                     user_id: Annotated[NamedUserId | None, Query()] = None) -> MemoryRecord:
    with timed(request, "get"):
        return await fleet.get(who.user_for(user_id), memory_id)


@router.patch("/memories/{memory_id}", response_model=WriteAnswer, summary="Change one memory",
              responses={404: NONE_CHANGED, **accepted("whether the change has taken effect")})
async def update_memory(memory_id: MemoryIdPath, body: UpdateBody, who: Who, fleet: Fleet, request: Request,
                        response: Response) -> WriteAnswer:
    clear = "expires_at" in body.model_fields_set and body.expires_at is None
    handle = await fleet.update(who.user_for(body.user_id), memory_id, text=body.text, metadata=body.metadata,
                                timestamp=body.timestamp, expires_at=body.expires_at, clear_expiry=clear)
    return await answer(fleet, handle, body.wait, request, response)


@router.delete("/memories/{memory_id}", response_model=WriteAnswer, summary="Delete one memory, leaving no text",
               responses={404: NOT_FOUND, **accepted("whether the delete has taken effect")})
async def delete_memory(memory_id: MemoryIdPath, who: Who, fleet: Fleet, request: Request, response: Response,
                        user_id: Annotated[NamedUserId | None, Query()] = None,
                        wait: Annotated[bool, Query()] = True) -> WriteAnswer:
    return await answer(fleet, await fleet.delete(who.user_for(user_id), memory_id), wait, request, response)


@router.get("/memories/{memory_id}/history", response_model=HistoryAnswer, summary="A memory's changes",
            responses={404: NOT_FOUND})
async def memory_history(memory_id: MemoryIdPath, who: Who, fleet: Fleet, request: Request,
                         user_id: Annotated[NamedUserId | None, Query()] = None) -> HistoryAnswer:
    with timed(request, "history"):
        events = await fleet.history(who.user_for(user_id), memory_id)
    return HistoryAnswer(memory_id=memory_id.lower(), events=events)


@router.post("/memories/batch-update", response_model=WriteAnswer, summary="Change up to 100 memories at once",
             responses={404: NONE_CHANGED, **accepted("whether the changes have taken effect")})
async def batch_update(body: BatchUpdateBody, who: Who, fleet: Fleet, request: Request,
                       response: Response) -> WriteAnswer:
    handle = await fleet.update_many(who.user_for(body.user_id), body.changes)
    return await answer(fleet, handle, body.wait, request, response)


@router.post("/memories/batch-delete", response_model=WriteAnswer, summary="Delete up to 100 memories at once",
             responses={404: NONE_CHANGED, **accepted("whether the deletes have taken effect")})
async def batch_delete(body: BatchDeleteBody, who: Who, fleet: Fleet, request: Request,
                       response: Response) -> WriteAnswer:
    handle = await fleet.delete_many(who.user_for(body.user_id), body.memory_ids)
    return await answer(fleet, handle, body.wait, request, response)


@router.get("/export", summary="Every memory of a user, with its history, as JSON lines",
            response_class=StreamingResponse,
            responses={200: {"content": {"application/x-ndjson": {}},
                             "description": "one ExportedMemory per line; `memfleet import` restores it"}})
async def export(who: Who, fleet: Fleet, user_id: Annotated[NamedUserId | None, Query()] = None) -> StreamingResponse:
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
             responses=accepted("whether the import has taken effect"))
async def import_memories(body: ImportBody, who: Who, fleet: Fleet, request: Request,
                          response: Response) -> WriteAnswer:
    user = who.user_for(body.user_id)
    handle = await fleet.restore(user, [m.model_copy(update={"user_id": user}) for m in body.memories])
    return await answer(fleet, handle, body.wait, request, response)
