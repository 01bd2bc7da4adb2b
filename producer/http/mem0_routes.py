"""The subset of the mem0 platform API that `mem0.MemoryClient` (mem0ai 2.2.1) calls for ping,
add, search, get_all, delete_all, and one memory at a time (get, update, delete, history,
batch_update, batch_delete), so that code written against mem0 runs against memfleet.

Scope is by user only. A request names its user where mem0's SDK puts it (`user_id` on add and
delete_all, `filters={"user_id": ...}` on search and get_all, alone or in a top-level AND);
agent, run and app ids are refused rather than ignored. Other filter conditions are memfleet
metadata filters on search, and refused on add and get_all (which would ignore them). The SDK
names one memory by its id alone: a user key's request acts for the key's user (another user's id
answers 404, as an unknown one does); an app key's request acts for the user who holds the id
(`Memfleet.owners`). Writes are waited for, so a read right after one sees it.

A get_all page costs what its own parameters say: page N of size S reads (N - 1) x S memories to
find where it starts, at most `MAX_SKIPPED` of them, in list jobs of up to `MAX_PAGE_SIZE`.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, WithJsonSchema
from pydantic.json_schema import SkipJsonSchema

from producer.client import Memfleet, WriteHandle
from producer.contract import (
    JSON_INTEGER,
    MAX_IDS_PER_WRITE,
    MAX_MESSAGES_PER_JOB,
    MAX_PAGE_SIZE,
    MAX_SEARCH_LIMIT,
    MEMORY_ID_PATTERN,
    MEMORY_ID_RULE,
    USER_ID_SCHEMA,
    Content,
    MemoryId,
    MemoryRecord,
    Message,
    Metadata,
    Name,
    NamedUserId,
    QueryText,
    Timestamp,
    at_least_one_of,
    check_memory_id,
    filters_json_schema,
)
from producer.errors import MemoryNotFound
from producer.http.answers import ERROR_RESPONSES, ErrorAnswer
from producer.http.auth import BadRequest, Principal
from producer.http.deps import Fleet, Who
from producer.http.metrics import timed

router = APIRouter(tags=["mem0-compatible"], responses=ERROR_RESPONSES)
MemoryIdPath = Annotated[str, Path(pattern=MEMORY_ID_PATTERN, description=MEMORY_ID_RULE)]
NOT_FOUND = {"model": ErrorAnswer, "description": "no such memory of the key's user (or, for an app key, of anyone)"}
UNSUPPORTED_SCOPES = ("agent_id", "run_id", "app_id")
LOGICAL = ("AND", "OR", "NOT")
MAX_SKIPPED = 10_000  # memories a get_all page may lie behind: (page - 1) x page_size
# mem0's filters: the user (by user_id) and memfleet metadata conditions. The contract checks the
# conditions (`check_filters`) once `split_filters` has taken the user out. The schema says what the
# SDK sends; the server also takes the user as a condition of a top-level AND instead.
_FILTERS_SCHEMA = filters_json_schema(user_id=True) | {"required": ["user_id"]}
_WITH_A_USER_KEY = " With a user key, the user may be left out (it is the key's own)."
Mem0Filters = Annotated[dict[str, Any] | None, WithJsonSchema(
    _FILTERS_SCHEMA | {"description": f"{_FILTERS_SCHEMA['description']}.{_WITH_A_USER_KEY}"})]
# Where only the user may be named.
_USER_FILTER = {"type": "object", "properties": {"user_id": USER_ID_SCHEMA}, "additionalProperties": False,
                "description": "the user, and nothing else"}
UserFilter = Annotated[dict[str, Any] | None, WithJsonSchema(_USER_FILTER)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Mem0Message(_Body):
    role: Literal["user", "assistant"] = "user"
    content: Content
    name: Name | None = None
    timestamp: Timestamp | None = None


class AddBody(_Body):
    messages: Annotated[list[Mem0Message], Field(min_length=1, max_length=MAX_MESSAGES_PER_JOB)]
    user_id: NamedUserId | None = None
    filters: UserFilter = None
    metadata: Metadata | None = None
    infer: StrictBool = False
    expiration_date: dt.date | None = Field(default=None, description="the memories expire at the end of this "
                                            "day, UTC")
    # Bounded to years 1970-9999, which datetime can represent.
    timestamp: Annotated[StrictFloat, Field(ge=0, le=253_402_300_799, allow_inf_nan=False)] | None = Field(
        default=None, description="Unix time the messages were said"
    )


class SearchBody(_Body):
    # Required with an app key (filters.user_id names the user), as mem0's SDK always sends it.
    model_config = ConfigDict(json_schema_extra={"required": ["query", "filters"]})

    query: QueryText
    filters: Mem0Filters = None
    top_k: Annotated[int, Field(ge=1, le=MAX_SEARCH_LIMIT), JSON_INTEGER] = 10
    threshold: Annotated[StrictFloat, Field(ge=0, le=1, allow_inf_nan=False)] | None = None


class GetAllBody(_Body):
    model_config = ConfigDict(json_schema_extra={"required": ["filters"]})

    filters: Annotated[dict[str, Any] | None, WithJsonSchema(
        _USER_FILTER | {"required": ["user_id"], "description": f"the user, and nothing else.{_WITH_A_USER_KEY}"}
    )] = None


def split_filters(filters: dict[str, Any] | None) -> tuple[str | None, dict[str, Any]]:
    """mem0 filters -> (the user they name, the metadata conditions left over).

    Only the shape this needs is checked here (logical operators over lists of conditions); the
    conditions left over are the contract's to judge (`check_filters`).
    """
    rest = dict(filters or {})
    for op in LOGICAL:
        if op in rest and (not isinstance(rest[op], list) or not all(isinstance(t, dict) for t in rest[op])):
            raise BadRequest(f"filters.{op} takes a list of conditions (objects)")
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
    named, conditions = split_filters(body.filters)
    if conditions:
        raise BadRequest("add takes only filters.user_id; other conditions would be ignored, so they are refused")
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
    page: Annotated[int, Query(ge=1, le=MAX_SKIPPED + 1,
                               description=f"(page - 1) x page_size is at most {MAX_SKIPPED}")] = 1,
    page_size: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 100,
) -> dict[str, Any]:
    """mem0 pages by number, memfleet by cursor: page N first walks past the (N - 1) x page_size
    memories before it, in as few list jobs as the largest page allows."""
    skip = (page - 1) * page_size
    if skip > MAX_SKIPPED:
        raise BadRequest(f"page {page} of size {page_size} starts {skip} memories in, over the limit of "
                         f"{MAX_SKIPPED}: page through everything with /api/memories and its cursors")
    named, filters = split_filters(body.filters)
    if filters:
        raise BadRequest("get_all takes only filters.user_id here; search filters by metadata")
    user = who.user_for(named)
    results: list[MemoryRecord] = []
    cursor: str | None = None
    with timed(request, "list"):
        while skip:
            passed = await fleet.list(user, limit=min(skip, MAX_PAGE_SIZE), cursor=cursor)
            skip -= len(passed.memories)
            cursor = passed.next_cursor
            if cursor is None or not passed.memories:
                break  # there are no memories past these: the page is empty
        else:
            listed = await fleet.list(user, limit=page_size, cursor=cursor)
            results, cursor = listed.memories, listed.next_cursor
    # Relative links: the Host header is the client's to say, and is not repeated back.
    path = request.url.path
    return {
        "count": len(results),
        "next": f"{path}?page={page + 1}&page_size={page_size}" if cursor is not None else None,
        "previous": f"{path}?page={page - 1}&page_size={page_size}" if page > 1 else None,
        "results": [mem0_record(r) for r in results],
    }


@router.delete("/v1/memories/")
async def delete_all(
    who: Who, fleet: Fleet, request: Request, user_id: Annotated[NamedUserId | None, Query()] = None
) -> dict[str, Any]:
    user = who.user_for(user_id)
    with timed(request, "forget"):
        await (await fleet.forget(user)).outcome()
    return {"message": "Memories deleted successfully!"}


# -- one memory at a time -------------------------------------------------------------------------


class UpdateBody(_Body):
    model_config = ConfigDict(json_schema_extra=at_least_one_of("text", "metadata", "timestamp", "expiration_date"))

    text: Content | SkipJsonSchema[None] = None
    metadata: Metadata | SkipJsonSchema[None] = None
    timestamp: Annotated[StrictFloat, Field(ge=0, le=253_402_300_799, allow_inf_nan=False)] | Timestamp | \
        SkipJsonSchema[None] = Field(default=None, description="when it was said: Unix time or ISO 8601")
    expiration_date: dt.date | None = Field(default=None, description="end of this day, UTC; null: never")


class BatchUpdateItem(_Body):
    model_config = ConfigDict(json_schema_extra=at_least_one_of("text", "metadata"))

    memory_id: MemoryId
    text: Content | SkipJsonSchema[None] = None
    metadata: Metadata | SkipJsonSchema[None] = None


class BatchUpdateBody(_Body):
    memories: Annotated[list[BatchUpdateItem], Field(min_length=1, max_length=MAX_IDS_PER_WRITE,
                                                     json_schema_extra={"uniqueItems": True})]


class BatchDeleteItem(_Body):
    memory_id: MemoryId


class BatchDeleteBody(_Body):
    memories: Annotated[list[BatchDeleteItem], Field(min_length=1, max_length=MAX_IDS_PER_WRITE,
                                                     json_schema_extra={"uniqueItems": True})]


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


@router.get("/v1/memories/{memory_id}/", responses={404: NOT_FOUND})
async def get_memory(memory_id: MemoryIdPath, who: Who, fleet: Fleet, request: Request) -> dict[str, Any]:
    user = await holder(who, fleet, [memory_id])
    with timed(request, "get"):
        return mem0_record(await fleet.get(user, memory_id))


@router.put("/v1/memories/{memory_id}/", responses={404: NOT_FOUND})
async def update_memory(
    memory_id: MemoryIdPath, body: UpdateBody, who: Who, fleet: Fleet, request: Request
) -> dict[str, Any]:
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


@router.delete("/v1/memories/{memory_id}/", responses={404: NOT_FOUND})
async def delete_memory(memory_id: MemoryIdPath, who: Who, fleet: Fleet, request: Request) -> dict[str, Any]:
    user = await holder(who, fleet, [memory_id])
    await _done(fleet, await fleet.delete(user, memory_id), request)
    return {"message": "Memory deleted successfully!"}


@router.get("/v1/memories/{memory_id}/history/", responses={404: NOT_FOUND})
async def memory_history(memory_id: MemoryIdPath, who: Who, fleet: Fleet, request: Request) -> list[dict[str, Any]]:
    """mem0's history entries: `old_memory`/`new_memory` per event (none for a deleted memory)."""
    user = await holder(who, fleet, [memory_id])  # a deleted memory has no holder: an app key gets 404
    with timed(request, "history"):
        events = await fleet.history(user, memory_id)
    return [{"id": e.id, "memory_id": e.memory_id, "user_id": user, "event": e.event, "old_memory": e.old_text,
             "new_memory": e.new_text, "input": None, "metadata": None, "created_at": e.at, "updated_at": e.at}
            for e in events]


@router.put("/v1/batch/", responses={404: NOT_FOUND})
async def batch_update(body: BatchUpdateBody, who: Who, fleet: Fleet, request: Request) -> dict[str, Any]:
    user = await holder(who, fleet, [m.memory_id for m in body.memories])
    changes = [m.model_dump(exclude_none=True) for m in body.memories]
    await _done(fleet, await fleet.update_many(user, changes), request)
    return {"message": f"Successfully updated {len(changes)} memories"}


@router.delete("/v1/batch/", responses={404: NOT_FOUND})
async def batch_delete(body: BatchDeleteBody, who: Who, fleet: Fleet, request: Request) -> dict[str, Any]:
    user = await holder(who, fleet, [m.memory_id for m in body.memories])
    await _done(fleet, await fleet.delete_many(user, [m.memory_id for m in body.memories]), request)
    return {"message": f"Successfully deleted {len(body.memories)} memories"}
