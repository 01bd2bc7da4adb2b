"""A FastAPI app server that keeps one `Memfleet` client for its whole life.

The client holds a Redis connection pool: open it once at start-up (the lifespan), share it
between requests, close it at shutdown. Bad input comes back as 422 naming the problem; a
missing worker or Redis as 503.

    REDIS_URL=redis://127.0.0.1:6379/0 memfleet worker
    REDIS_URL=redis://127.0.0.1:6379/0 uvicorn --app-dir examples app_server:app

    curl -X POST localhost:8000/memories -H 'X-User: alice' -H 'content-type: application/json' \\
         -d '{"messages": ["I am vegetarian"]}'
    curl 'localhost:8000/memories/search?q=food' -H 'X-User: alice'
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from producer.client import Memfleet
from producer.contract import MemoryPage, MemoryRecord
from producer.errors import InvalidRequest, NoWorkerError, RedisUnavailable


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with await Memfleet.connect() as fleet:
        app.state.fleet = fleet
        yield


app = FastAPI(title="memfleet example app server", lifespan=lifespan)


def fleet(request: Request) -> Memfleet:
    client: Memfleet = request.app.state.fleet
    return client


def current_user(x_user: Annotated[str, Header()]) -> str:
    """Stands in for your authentication: the user id comes from the session, never the body."""
    return x_user


Fleet = Annotated[Memfleet, Depends(fleet)]
User = Annotated[str, Depends(current_user)]


class AddBody(BaseModel):
    messages: list[str | dict[str, Any]]
    metadata: dict[str, Any] = {}


@app.exception_handler(InvalidRequest)
async def invalid(request: Request, exc: InvalidRequest) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=422)


@app.exception_handler(NoWorkerError)
@app.exception_handler(RedisUnavailable)
async def unavailable(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=503)


@app.post("/memories", status_code=202)
async def add(body: AddBody, user: User, fleet: Fleet) -> dict[str, str]:
    handle = await fleet.add(user, body.messages, metadata=body.metadata)
    return {"op_id": handle.op_id}  # accepted: it takes effect in this user's order, shortly


@app.get("/memories/search")
async def search(q: str, user: User, fleet: Fleet, limit: int = 10) -> list[MemoryRecord]:
    return await fleet.search(user, q, limit=limit)


@app.get("/memories")
async def list_memories(user: User, fleet: Fleet, cursor: str | None = None) -> MemoryPage:
    return await fleet.list(user, cursor=cursor)


@app.delete("/memories", status_code=202)
async def forget(user: User, fleet: Fleet) -> dict[str, str]:
    return {"op_id": (await fleet.forget(user)).op_id}
