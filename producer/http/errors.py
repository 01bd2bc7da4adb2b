"""Limits and errors: a body over the limit gets 413, a body that does not arrive in time 408, and
every refusal is `{"kind", "detail"}` (`producer.http.answers`), whose detail names the problem
(the field, the rule), never the value sent and never a traceback. An error that is a bug of ours
answers 500 and is logged by class and place only: its message may quote what it was given.
"""

from __future__ import annotations

import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from producer.contract import describe, shown_name
from producer.errors import (
    InvalidRequest,
    InvalidUserId,
    JobFailed,
    MemoryNotFound,
    NoWorkerError,
    RedisUnavailable,
    WriteDeadLettered,
    WriteTimeout,
)
from producer.http.answers import KIND_OF_STATUS, ErrorKind, json_answer
from producer.http.auth import ScopeRefused

log = structlog.get_logger("memfleet.api")


class BodyLimit:
    """Refuse a request body over `limit` bytes with 413, and one that takes longer than `timeout`
    seconds to arrive with 408, before any of it is parsed.

    The body is read here (at most `limit` bytes are held) and handed on whole, so a body sent
    in chunks, without Content-Length, meets the same limit. It runs after the key gate: an
    unauthenticated request is answered before its body is read at all.
    """

    def __init__(self, app: ASGIApp, limit: int, timeout: float) -> None:
        self.app = app
        self.limit = limit
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._too_large(send)
            return
        chunks: list[bytes] = []
        size = 0
        with anyio.move_on_after(self.timeout) as deadline:
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    break  # the client went away; the app will see the disconnect
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if size > self.limit:
                    await self._too_large(send)
                    return
                if not message.get("more_body", False):
                    break
        if deadline.cancelled_caught:
            await json_answer(send, 408, f"the request body did not arrive within {self.timeout:g}s "
                                         "(MEMFLEET_API_BODY_TIMEOUT)", {"Connection": "close"})
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send) -> None:
        await json_answer(send, 413, f"request body is over the limit of {self.limit} bytes "
                                     "(MEMFLEET_API_MAX_BODY_BYTES)", {"Connection": "close"})


class ErrorFence:
    """The last resort, outside everything of ours: an exception nobody handled answers 500 with
    no word of it, and is logged by class and the line it came from, not by its message (which
    may quote a request, or a memory). Nothing reaches uvicorn's own traceback logging."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as exc:
            frames = traceback.extract_tb(exc.__traceback__)
            where = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else "?"
            log.error("unhandled_error", error=exc.__class__.__name__, where=where, path=scope.get("path"))
            if not started:
                await json_answer(send, 500, "memfleet failed on this request; the server's log has the "
                                             "error's class and where it happened")


def _where(error: Any) -> str:
    return ".".join(shown_name(p) for p in error["loc"]) or "request"


async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if any(e["type"] == "json_invalid" for e in errors):
        return _answer(400, "the request body is not valid JSON", "invalid_json")
    first = errors[0]
    kind: ErrorKind = "invalid_user_id" if "user_id" in first["loc"] else "invalid_request"
    # Each problem by place and rule; the values sent are not echoed back, nor are names that
    # could be text (a field name is the client's own, and may be anything).
    listed = [{"loc": [shown_name(p) for p in e["loc"]], "msg": e["msg"], "type": e["type"]} for e in errors]
    return _answer(422, f"invalid {_where(first)}: {first['msg']}", kind, errors=listed)


def _answer(status: int, detail: str, kind: ErrorKind | None = None, headers: dict[str, str] | None = None,
            **extra: Any) -> JSONResponse:
    return JSONResponse({"kind": kind or KIND_OF_STATUS.get(status, "internal"), "detail": detail, **extra},
                        status_code=status, headers=headers)


def _status(code: int, kind: ErrorKind | None = None) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    """A handler answering `code`, with the exception's own message (ours are written for clients)."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        return _answer(code, str(exc), "invalid_user_id" if isinstance(exc, InvalidUserId) else kind)

    return handle


async def _contract(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ValidationError)
    return _answer(422, describe(exc))


async def _scope_refused(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ScopeRefused)
    request.app.state.metrics.scope_refused.labels(key=exc.key.name).inc()
    return _answer(403, str(exc), "scope_refused")


async def _http(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's and FastAPI's own refusals (404, 405, a body that could not be read) as ours."""
    assert isinstance(exc, HTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else "the request was refused"
    headers = dict(exc.headers or {})
    if exc.status_code == 400:
        detail = "the request body could not be read as JSON"  # FastAPI's text would be less plain
    if exc.status_code == 405:
        # Starlette names the methods of the first route of the path only; a path may have several.
        methods = {m for r in request.app.router.routes if r.matches(request.scope)[0] != Match.NONE
                   for m in getattr(r, "methods", None) or ()}
        headers["Allow"] = ", ".join(sorted(methods))
        detail = f"{request.method} is not allowed here; {headers['Allow']} is"
    return _answer(exc.status_code, detail, headers=headers)


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(ValidationError, _contract)
    app.add_exception_handler(HTTPException, _http)
    app.add_exception_handler(InvalidRequest, _status(422))  # bad ids, fields, cursors, filters; a worker's refusal
    app.add_exception_handler(ScopeRefused, _scope_refused)
    app.add_exception_handler(MemoryNotFound, _status(404, "not_found"))  # unknown and another user's ids alike
    app.add_exception_handler(NoWorkerError, _status(504, "no_worker"))
    app.add_exception_handler(WriteTimeout, _status(504, "write_timeout"))
    app.add_exception_handler(RedisUnavailable, _status(503, "redis_unavailable"))
    app.add_exception_handler(WriteDeadLettered, _status(502, "write_dead_lettered"))
    app.add_exception_handler(JobFailed, _status(502, "job_failed"))
