"""memfleet's own JSON API (OpenAPI at /docs): add, search, list with cursors, forget, op outcomes, the
key's own identity, and the fleet's figures (stats, encoder use) for app keys.

Every body and query may name a `user_id`; with a user key it may be left out (the key's user)
and may name no one else. Writes answer with their op id; `wait` (the default) also waits for
the outcome, otherwise `GET /api/ops/{op_id}` tells whether it has taken effect.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from producer import keys
from producer.client import EncoderUse, FleetStats, Memfleet, WriteHandle
from producer.contract import (
    JSON_INTEGER,
    MAX_MESSAGES_PER_JOB,
    MAX_PAGE_SIZE,
    MAX_SEARCH_LIMIT,
    Cursor,
    Expiry,
    Filters,
    MemoryPage,
    MemoryRecord,
    Message,
    Metadata,
    NamedUserId,
    QueryText,
    WriteOutcome,
)
from producer.errors import MemoryNotFound
from producer.http.answers import ERROR_RESPONSES, ErrorAnswer
from producer.http.deps import Fleet, Who
from producer.http.metrics import timed

router = APIRouter(prefix="/api", tags=["memfleet"], responses=ERROR_RESPONSES)
OP_ID_PATTERN = r"^w-[0-9a-f]{32}$"  # what `producer.contract.new_op_ids` hands out
_OP_ID_RE = re.compile(OP_ID_PATTERN)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AddBody(_Body):
    user_id: NamedUserId | None = Field(default=None, description="default: the user key's own user")
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES_PER_JOB)]
    metadata: Metadata = Field(default_factory=dict)
    infer: StrictBool = False
    expires_at: Expiry | None = None
    wait: StrictBool = Field(default=True, description="answer once the write has taken effect")


class ForgetBody(_Body):
    user_id: NamedUserId | None = None
    wait: StrictBool = True


class SearchBody(_Body):
    user_id: NamedUserId | None = None
    query: QueryText
    limit: Annotated[int, Field(ge=1, le=MAX_SEARCH_LIMIT), JSON_INTEGER] = 10
    filters: Filters = Field(default_factory=dict)


class WriteAnswer(BaseModel):
    op_id: str
    user_id: str
    done: bool
    outcome: WriteOutcome | None = None


class SearchAnswer(BaseModel):
    results: list[MemoryRecord]


class WhoAmI(BaseModel):
    kind: Literal["app", "user"] = Field(description="app: acts for the user_id a request names; user: its own")
    name: str
    user_id: str | None = Field(description="a user key's user; null for an app key")
    expires_at: str | None = Field(description="when the key stops working, ISO 8601 UTC; null: never")


async def answer(
    fleet: Memfleet, handle: WriteHandle, wait: bool, request: Request, response: Response
) -> WriteAnswer:
    """The write's op id, and, if asked to wait, its outcome (a dead-lettered write says why in
    `error`; one that named a memory the user does not have answers 404)."""
    if not wait:
        response.status_code = 202
        return WriteAnswer(op_id=handle.op_id, user_id=handle.user_id, done=False)
    with timed(request, handle.kind):
        (outcome,) = await fleet.wait([handle])
    if outcome.not_found:
        raise MemoryNotFound(outcome.not_found)
    return WriteAnswer(op_id=handle.op_id, user_id=handle.user_id, done=True, outcome=outcome)


def accepted(then: str) -> dict[int | str, dict[str, Any]]:
    """A write's answers: 200 once it took effect, 202 with `wait: false`; both link to its op."""
    op = {"operationId": "get_op", "description": then,
          "parameters": {"op_id": "$response.body#/op_id", "user_id": "$response.body#/user_id"}}
    return {200: {"links": {"op": op}},
            202: {"model": WriteAnswer, "description": "queued (`wait: false`)", "links": {"op": op}}}


@router.post("/memories", response_model=WriteAnswer, summary="Add messages to a user's memory",
             responses=accepted("whether the write has taken effect, and its outcome"))
async def add(body: AddBody, who: Who, fleet: Fleet, request: Request, response: Response) -> WriteAnswer:
    handle = await fleet.add(who.user_for(body.user_id), body.messages, metadata=body.metadata, infer=body.infer,
                             expires_at=body.expires_at)
    return await answer(fleet, handle, body.wait, request, response)


@router.post("/memories/search", response_model=SearchAnswer, summary="Search a user's memories")
async def search(body: SearchBody, who: Who, fleet: Fleet, request: Request) -> SearchAnswer:
    user = who.user_for(body.user_id)
    with timed(request, "search"):
        return SearchAnswer(results=await fleet.search(user, body.query, limit=body.limit, filters=body.filters))


@router.get("/memories", response_model=MemoryPage, summary="List a user's memories, a page at a time")
async def list_memories(
    who: Who, fleet: Fleet, request: Request,
    user_id: Annotated[NamedUserId | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 100,
    cursor: Annotated[Cursor | None, Query()] = None,
) -> MemoryPage:
    user = who.user_for(user_id)
    with timed(request, "list"):
        return await fleet.list(user, limit=limit, cursor=cursor)


@router.post("/forget", response_model=WriteAnswer, summary="Delete everything memfleet keeps for a user",
             responses=accepted("whether the forget has taken effect"))
async def forget(body: ForgetBody, who: Who, fleet: Fleet, request: Request, response: Response) -> WriteAnswer:
    return await answer(fleet, await fleet.forget(who.user_for(body.user_id)), body.wait, request, response)


@router.get("/ops/{op_id}", response_model=WriteAnswer, summary="Whether a write has taken effect",
            operation_id="get_op", responses={404: {"model": ErrorAnswer, "description": "no such write of this user"}})
async def op(
    op_id: Annotated[str, Path(json_schema_extra={"pattern": OP_ID_PATTERN})], who: Who, fleet: Fleet,
    user_id: Annotated[NamedUserId | None, Query()] = None,
) -> WriteAnswer:
    user = who.user_for(user_id)
    # Only the user's own writes: an op id of another user's is answered as unknown.
    if _OP_ID_RE.fullmatch(op_id) is None or await fleet.redis.zscore(keys.user_jobs(user), op_id) is None:
        raise HTTPException(404, "no such write of this user (op ids are kept for a week)")
    raw = await fleet.redis.get(keys.write_outcome(op_id))
    outcome = None if raw is None else WriteOutcome.model_validate_json(raw)
    return WriteAnswer(op_id=op_id, user_id=user, done=outcome is not None, outcome=outcome)


@router.get("/whoami", response_model=WhoAmI, summary="The key's kind, name and user (never the key)")
async def whoami(who: Who) -> WhoAmI:
    key = who.key
    expires = None if key.expires_at is None else dt.datetime.fromtimestamp(key.expires_at, dt.UTC).isoformat()
    return WhoAmI(kind=key.kind, name=key.name, user_id=key.user_id, expires_at=expires)


@router.get("/stats", response_model=FleetStats, summary="Queue depth, jobs, dead letters, live workers")
async def stats(who: Who, fleet: Fleet) -> FleetStats:
    if who.key.kind != "app":
        raise HTTPException(403, "fleet stats need an app key")
    return await fleet.stats()


@router.get("/encoders", response_model=dict[str, EncoderUse],
            summary="Each live worker's encoder counters since it started (busy seconds, texts, batches)")
async def encoders(who: Who, fleet: Fleet) -> dict[str, EncoderUse]:
    if who.key.kind != "app":
        raise HTTPException(403, "fleet figures need an app key")
    return await fleet.encoder_use()
