"""The subset of the mem0 platform API that `mem0.MemoryClient` (mem0ai 2.2.1) calls for ping,
add, search, get_all, delete_all, and one memory at a time (get, update, delete, history,
batch_update, batch_delete), so that code written against mem0 runs against memfleet.

Scope is by user only. A request names its user where mem0's SDK puts it (`user_id` on add and
delete_all, `filters={"user_id": ...}` on search and get_all, alone or in a top-level AND);
agent, run and app ids are refused rather than ignored. Other filter conditions are memfleet
metadata filters. The SDK names one memory by its id alone: a user key's request acts for the
key's user (another user's id answers 404, as an unknown one does); an app key's request acts
for the user who holds the id (`Memfleet.owners`). Writes are waited for, so a read right after
one sees it.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from producer.client import Memfleet, WriteHandle
from producer.contract import (
    MAX_CONTENT_CHARS,
    MAX_IDS_PER_WRITE,
    MAX_PAGE_SIZE,
    MAX_SEARCH_LIMIT,
    MemoryRecord,
    Message,
    check_memory_id,
)
from producer.errors import MemoryNotFound
from producer.http.auth import BadRequest, Principal
from producer.http.deps import Fleet, Who
from producer.http.metrics import timed

router = APIRouter(tags=["mem0-compatible"])
UNSUPPORTED_SCOPES = ("agent_id", "run_id", "app_id")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Mem0Message(_Body):
    role: Literal["user", "assistant"] = "user"
    content: StrictStr
    name: StrictStr | None = None
    timestamp: StrictStr | None = None


class AddBody(_Body):
    messages: list[Mem0Message]
    user_id: StrictStr | None = None
    filters: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    infer: bool = False
    expiration_date: dt.date | None = Field(default=None, description="the memories expire at the end of this "
                                            "day, UTC")
    # Bounded to years 1970-9999, which datetime can represent.
    timestamp: Annotated[float, Field(ge=0, le=253_402_300_799)] | None = Field(
        default=None, description="Unix time the messages were said"
    )


class SearchBody(_Body):
    query: StrictStr
    filters: dict[str, Any] | None = None
    top_k: Annotated[int, Field(ge=1, le=MAX_SEARCH_LIMIT)] = 10
    threshold: float | None = None


class GetAllBody(_Body):
    filters: dict[str, Any] | None = None


def split_filters(filters: dict[str, Any] | None) -> tuple[str | None, dict[str, Any]]:
    """mem0 filters -> (the user they name, the metadata conditions left over)."""
    rest = dict(filters or {})
    for scope in UNSUPPORTED_SCOPES:
        if scope in rest or any(isinstance(t, dict) and scope in t for t in rest.get("AND", [])):
            raise BadRequest(f"filter on {scope} is not supported: memfleet scopes memories by user_id only")
    user = rest.pop("user_id", None)
    terms = rest.get("AND")
    if user is None and isinstance(terms, list):
        named = [t for t in terms if isinstance(t, dict) and "user_id" in t]
        if len(named) > 1:
            raise BadRequest("filters name user_id more than once")
        if named:
            user = named[0]["user_id"]
            left = [t for t in terms if t is not named[0]]
            extra = {k: v for k, v in named[0].items() if k != "user_id"}
            left += [extra] if extra else []
            if left:
                rest["AND"] = left
            else:
                del rest["AND"]
    if user is not None and not isinstance(user, str):
        raise BadRequest("filters.user_id must be one user id (a string): memfleet reads one user at a time")
    return user, rest


def mem0_record(record: MemoryRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "memory": record.text,
        "user_id": record.user_id,
        "metadata": record.metadata,
        "score": record.score,
        "created_at": record.created_at,
        "updated_at": record.updated_at or record.created_at,
        "expiration_date": _expiration_date(record.expires_at),
        "name": record.name,
        "timestamp": record.timestamp,
    }


def end_of_day(date: dt.date) -> str:
    """mem0's `expiration_date` (a day) as memfleet's `expires_at`: the end of that day, UTC."""
    return dt.datetime.combine(date + dt.timedelta(days=1), dt.time(), dt.UTC).isoformat()


def _expiration_date(expires_at: str | None) -> str | None:
    """The day a memory expires at the end of (the inverse of `end_of_day`)."""
    if expires_at is None:
        return None
    return (dt.datetime.fromisoformat(expires_at) - dt.timedelta(microseconds=1)).date().isoformat()


@router.get("/v1/ping/")
async def ping(who: Who) -> dict[str, Any]:
    return {"status": "ok", "org_id": "memfleet", "project_id": "memfleet", "user_email": None}


@router.post("/v3/memories/add/")
async def add(body: AddBody, who: Who, fleet: Fleet, request: Request) -> dict[str, Any]:
    named, _ = split_filters(body.filters)
    if body.user_id is not None and named is not None and body.user_id != named:
        raise BadRequest("user_id and filters.user_id name different users")
    user = who.user_for(body.user_id if body.user_id is not None else named)
    said = (dt.datetime.fromtimestamp(body.timestamp, dt.UTC).isoformat() if body.timestamp is not None else None)
    messages = [Message(role=m.role, content=m.content, name=m.name, timestamp=m.timestamp or said)
                for m in body.messages]
    expires_at = end_of_day(body.expiration_date) if body.expiration_date is not None else None
    with timed(request, "add"):
        handle = await fleet.add(user, messages, metadata=body.metadata or {}, infer=body.infer,
                                 expires_at=expires_at)
        outcome = await handle.outcome()
    return {
        "results": [{"id": memory_id, "event": "ADD"} for memory_id in outcome.memory_ids],
        "message": f"{outcome.stored} stored, {outcome.duplicates} already stored",
        "status": "SUCCEEDED",
        "event_id": handle.op_id,
    }


@router.post("/v3/memories/search/")
async def search(body: SearchBody, who: Who, fleet: Fleet, request: Request) -> dict[str, Any]:
    named, filters = split_filters(body.filters)
    user = who.user_for(named)
    with timed(request, "search"):
        records = await fleet.search(user, body.query, limit=body.top_k, filters=filters)
    if body.threshold is not None:
        records = [r for r in records if r.score is not None and r.score >= body.threshold]
    return {"results": [mem0_record(r) for r in records]}


@router.post("/v3/memories/")
async def get_all(
    body: GetAllBody, who: Who, fleet: Fleet, request: Request,
    page: Annotated[int, Query(ge=1)] = 1,
    page_size: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 100,
) -> dict[str, Any]:
    """mem0 pages by number, memfleet by cursor: page N follows N-1 cursors first."""
    named, filters = split_filters(body.filters)
    if filters:
        raise BadRequest("get_all takes only filters.user_id here; search filters by metadata")
    user = who.user_for(named)
    results: list[MemoryRecord] = []
    cursor: str | None = None
    with timed(request, "list"):
        for number in range(1, page + 1):
            listed = await fleet.list(user, limit=page_size, cursor=cursor)
            cursor = listed.next_cursor
            if number == page:
                results = listed.memories
            elif cursor is None:
                break  # there are fewer pages than that
    base = str(request.url.remove_query_params(["page", "page_size"]))
    return {
        "count": len(results),
        "next": f"{base}?page={page + 1}&page_size={page_size}" if cursor is not None else None,
        "previous": f"{base}?page={page - 1}&page_size={page_size}" if page > 1 else None,
        "results": [mem0_record(r) for r in results],
    }


@router.delete("/v1/memories/")
async def delete_all(
    who: Who, fleet: Fleet, request: Request, user_id: Annotated[str | None, Query()] = None
) -> dict[str, Any]:
    user = who.user_for(user_id)
    with timed(request, "forget"):
        await (await fleet.forget(user)).outcome()
    return {"message": "Memories deleted successfully!"}


# -- one memory at a time -------------------------------------------------------------------------


class UpdateBody(_Body):
    text: Annotated[StrictStr, Field(min_length=1, max_length=MAX_CONTENT_CHARS)] | None = None
    metadata: dict[str, Any] | None = None
    timestamp: Annotated[float, Field(ge=0, le=253_402_300_799)] | StrictStr | None = Field(
        default=None, description="when it was said: Unix time or ISO 8601")
    expiration_date: dt.date | None = Field(default=None, description="end of this day, UTC; null: never")


class BatchUpdateItem(_Body):
    memory_id: StrictStr
    text: Annotated[StrictStr, Field(min_length=1, max_length=MAX_CONTENT_CHARS)] | None = None
    metadata: dict[str, Any] | None = None


class BatchUpdateBody(_Body):
    memories: Annotated[list[BatchUpdateItem], Field(min_length=1, max_length=MAX_IDS_PER_WRITE)]


class BatchDeleteItem(_Body):
    memory_id: StrictStr


class BatchDeleteBody(_Body):
    memories: Annotated[list[BatchDeleteItem], Field(min_length=1, max_length=MAX_IDS_PER_WRITE)]


async def holder(who: Principal, fleet: Fleet, memory_ids: list[str]) -> str:
    """The user these memories belong to: a user key's own, or, for an app key, whoever holds them
    (all of them must be one user's, as mem0's batches are)."""
    ids = [check_memory_id(m) for m in memory_ids]
    if who.key.kind == "user":
        return who.user_for(None)
    owners = await fleet.owners(ids)
    if missing := [m for m in ids if not owners.get(m)]:
        raise MemoryNotFound(missing)
    users = {u for m in ids for u in owners[m]}
    if len(users) > 1:
        raise BadRequest("these memory ids are held by more than one user: use a user key, "
                         "or memfleet's /api routes, which name the user")
    return users.pop()


async def _done(fleet: Memfleet, handle: WriteHandle, request: Request) -> None:
    with timed(request, handle.kind):
        await handle.outcome()


@router.get("/v1/memories/{memory_id}/")
async def get_memory(memory_id: str, who: Who, fleet: Fleet, request: Request) -> dict[str, Any]:
    user = await holder(who, fleet, [memory_id])
    with timed(request, "get"):
        return mem0_record(await fleet.get(user, memory_id))


@router.put("/v1/memories/{memory_id}/")
async def update_memory(memory_id: str, body: UpdateBody, who: Who, fleet: Fleet, request: Request) -> dict[str, Any]:
    user = await holder(who, fleet, [memory_id])
    expiry_given = "expiration_date" in body.model_fields_set
    timestamp = body.timestamp
    if isinstance(timestamp, float):
        timestamp = dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat()
    handle = await fleet.update(
        user, memory_id, text=body.text, metadata=body.metadata, timestamp=timestamp,
        expires_at=end_of_day(body.expiration_date) if body.expiration_date is not None else None,
        clear_expiry=expiry_given and body.expiration_date is None,
    )
    await _done(fleet, handle, request)
    return {"message": "Memory updated successfully!", **mem0_record(await fleet.get(user, memory_id))}


@router.delete("/v1/memories/{memory_id}/")
async def delete_memory(memory_id: str, who: Who, fleet: Fleet, request: Request) -> dict[str, Any]:
    user = await holder(who, fleet, [memory_id])
    await _done(fleet, await fleet.delete(user, memory_id), request)
    return {"message": "Memory deleted successfully!"}


@router.get("/v1/memories/{memory_id}/history/")
async def memory_history(memory_id: str, who: Who, fleet: Fleet, request: Request) -> list[dict[str, Any]]:
    """mem0's history entries: `old_memory`/`new_memory` per event (none for a deleted memory)."""
    user = await holder(who, fleet, [memory_id])  # a deleted memory has no holder: an app key gets 404
    with timed(request, "history"):
        events = await fleet.history(user, memory_id)
    return [{"id": e.id, "memory_id": e.memory_id, "user_id": user, "event": e.event, "old_memory": e.old_text,
             "new_memory": e.new_text, "input": None, "metadata": None, "created_at": e.at, "updated_at": e.at}
            for e in events]


@router.put("/v1/batch/")
async def batch_update(body: BatchUpdateBody, who: Who, fleet: Fleet, request: Request) -> dict[str, Any]:
    user = await holder(who, fleet, [m.memory_id for m in body.memories])
    changes = [m.model_dump(exclude_none=True) for m in body.memories]
    await _done(fleet, await fleet.update_many(user, changes), request)
    return {"message": f"Successfully updated {len(changes)} memories"}


@router.delete("/v1/batch/")
async def batch_delete(body: BatchDeleteBody, who: Who, fleet: Fleet, request: Request) -> dict[str, Any]:
    user = await holder(who, fleet, [m.memory_id for m in body.memories])
    await _done(fleet, await fleet.delete_many(user, [m.memory_id for m in body.memories]), request)
    return {"message": f"Successfully deleted {len(body.memories)} memories"}
