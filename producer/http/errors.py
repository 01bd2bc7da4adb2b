"""Limits and errors: a body over the limit gets 413, and every refusal is JSON whose `detail`
names the problem (the field, the rule), never the value sent and never a traceback."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from producer.contract import describe
from producer.errors import InvalidRequest, JobFailed, MemoryNotFound, NoWorkerError, RedisUnavailable, WriteTimeout
from producer.http.auth import BadRequest, ScopeRefused, json_answer


class BodyLimit:
    """Refuse a request body over `limit` bytes with 413, before any of it is parsed.

    The body is read here (at most `limit` bytes are held) and handed on whole, so a body sent
    in chunks, without Content-Length, meets the same limit.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client went away; the app will see the disconnect
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._refuse(send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        await json_answer(
            send, 413, f"request body is over the limit of {self.limit} bytes (MEMFLEET_API_MAX_BODY_BYTES)"
        )


def _where(error: Any) -> str:
    return ".".join(str(p) for p in error["loc"]) or "request"


async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if any(e["type"] == "json_invalid" for e in errors):
        return JSONResponse({"detail": "the request body is not valid JSON"}, status_code=400)
    first = errors[0]
    detail = f"invalid {_where(first)}: {first['msg']}"
    # Each problem by place and rule; the values sent are not echoed back.
    listed = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors]
    return JSONResponse({"detail": detail, "errors": listed}, status_code=422)


def _status(code: int) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    """A handler answering `code`, with the exception's own message (ours name the problem)."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=code)

    return handle


async def _contract(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ValidationError)
    return JSONResponse({"detail": describe(exc)}, status_code=422)


async def _scope_refused(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ScopeRefused)
    request.app.state.metrics.scope_refused.labels(key=exc.key.name).inc()
    return JSONResponse({"detail": str(exc)}, status_code=403)


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(ValidationError, _contract)
    app.add_exception_handler(InvalidRequest, _status(422))  # bad ids, fields, cursors; a worker's refusal
    app.add_exception_handler(BadRequest, _status(422))
    app.add_exception_handler(ScopeRefused, _scope_refused)
    app.add_exception_handler(MemoryNotFound, _status(404))  # unknown and another user's ids alike
    app.add_exception_handler(NoWorkerError, _status(504))
    app.add_exception_handler(WriteTimeout, _status(504))
    app.add_exception_handler(RedisUnavailable, _status(503))
    app.add_exception_handler(JobFailed, _status(502))
