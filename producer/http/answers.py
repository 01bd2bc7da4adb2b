"""What every refusal of `memfleet serve` looks like: `{"kind": ..., "detail": ...}`.

`kind` is one of `ErrorKind`, for code to branch on; `detail` is a sentence written for the
client: it names the field or rule at fault and what to do, and never carries a value that was
sent, a memory's text, or a database's or library's own message. The OpenAPI schema documents
these answers on every route (`ERROR_RESPONSES`), so a client generated from it knows them.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel
from starlette.types import Send

ErrorKind = Literal[
    "invalid_json",  # 400: the body is not JSON
    "invalid_request",  # 400, 422: a field breaks the contract (the detail names it and the rule)
    "invalid_user_id",  # 422: a user id breaks the user-id rule
    "unauthorized",  # 401: no key, or an unknown, revoked or expired one
    "forbidden",  # 403: the key may not do this (a user key at /api/stats, an app key at /mcp)
    "scope_refused",  # 403: a user key named another user
    "not_found",  # 404
    "method_not_allowed",  # 405
    "body_timeout",  # 408: the body did not arrive in time
    "body_too_large",  # 413
    "rate_limited",  # 429: over the key's rate (Retry-After says when to come back)
    "internal",  # 500: a bug; the server's log has the error's class and where it happened
    "job_failed",  # 502: a worker could not complete the job
    "write_dead_lettered",  # 502: the write is in the dead-letter list (`memfleet dlq list`)
    "redis_unavailable",  # 503
    "no_worker",  # 504: a read was queued but no worker answered in time
    "write_timeout",  # 504: the write was accepted but did not take effect in time (it still will)
]

KIND_OF_STATUS: dict[int, ErrorKind] = {
    400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    408: "body_timeout", 413: "body_too_large", 422: "invalid_request", 429: "rate_limited", 500: "internal",
    502: "job_failed", 503: "redis_unavailable", 504: "no_worker",
}


class ErrorAnswer(BaseModel):
    kind: ErrorKind
    detail: str


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class InvalidAnswer(ErrorAnswer):
    """A 422: the first problem in `detail`, each one in `errors` (by place and rule, never by value)."""

    errors: list[FieldError] = []


def _documented(description: str, model: type[BaseModel] = ErrorAnswer) -> dict[str, Any]:
    return {"model": model, "description": description}


# Every answer a route of ours may give besides its own, for the OpenAPI schema.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _documented("the body is not JSON, or more than one Authorization header was sent"),
    401: _documented("no key, or an unknown, revoked or expired one"),
    403: _documented("the key may not do this"),
    408: _documented("the body did not arrive within MEMFLEET_API_BODY_TIMEOUT"),
    413: _documented("the body is over MEMFLEET_API_MAX_BODY_BYTES"),
    422: _documented("the request breaks the contract; `errors` lists each problem", InvalidAnswer),
    429: _documented("over the key's rate limit; retry after Retry-After seconds"),
    500: _documented("a bug in memfleet; nothing of the request is in the answer"),
    502: _documented("a worker could not complete the job"),
    503: _documented("Redis is unreachable"),
    504: _documented("no worker answered in time"),
}


async def json_answer(send: Send, status: int, detail: str, headers: dict[str, str] | None = None,
                      *, kind: ErrorKind | None = None, jsonrpc: bool = False,
                      closing: dict[str, str] | None = None) -> None:
    """Send a refusal from ASGI middleware: `{"kind", "detail"}`, or for MCP clients a JSON-RPC error
    they can show, with the kind in its `data`. `closing`: headers that end the connection, when
    the request's body is left unread."""
    headers = {**(headers or {}), **(closing or {})}
    kind = kind or KIND_OF_STATUS.get(status, "internal")
    payload: dict[str, Any] = (
        {"jsonrpc": "2.0", "id": None, "error": {"code": -32001, "message": detail, "data": {"kind": kind}}}
        if jsonrpc else {"kind": kind, "detail": detail}
    )
    body = json.dumps(payload).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
