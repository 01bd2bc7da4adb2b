"""Who is asking: the request's key, checked (and rate-limited) before any route runs.

`KeyGate` is ASGI middleware, so the key is checked before the body is even parsed, for every
path but the OpenAPI docs and the static files of the /ui/ page (exact paths, no prefix): the mem0
and memfleet routes, /mcp and /metrics alike. A route then
asks the request's `Principal` which user it acts for; that is the one place the user-id rule
meets the key's scope.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from producer.contract import check_user_id
from producer.http import ui
from producer.http.apikeys import ApiKey

PUBLIC_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"}) | ui.PATHS
SCHEMES = ("token", "bearer")  # mem0's SDK sends Token; MCP clients and Prometheus default to Bearer


class ScopeRefused(PermissionError):
    """A user key named another user than its own."""

    def __init__(self, key: ApiKey) -> None:
        super().__init__(f"key {key.name!r} acts for its own user only; it cannot name another user_id")
        self.key = key


class BadRequest(ValueError):
    """A request the caller must change; the message says how (answered 422)."""


@dataclass(frozen=True)
class Principal:
    key: ApiKey

    def user_for(self, named: str | None) -> str:
        """The user this request acts for: the one it names (validated), or the user key's own."""
        if named is not None:
            check_user_id(named)
        if self.key.kind == "app":
            if named is None:
                raise BadRequest("name the user: an app key acts for the user_id a request names")
            return named
        assert self.key.user_id is not None
        if named is not None and named != self.key.user_id:
            raise ScopeRefused(self.key)
        return self.key.user_id


def principal(request: Request) -> Principal:
    """FastAPI dependency: the Principal `KeyGate` established for this request."""
    found: Principal = request.state.principal
    return found


class RateLimiter:
    """Requests per second per key, counted in Redis so that every API process shares the budget."""

    def __init__(self, redis: Redis, default: int) -> None:
        self.redis = redis
        self.default = default

    async def retry_after(self, key: ApiKey) -> int | None:
        """None if the request may go ahead, else the seconds to wait."""
        now = time.time()
        window = int(now)
        counter = f"memfleet:rate:{key.id}:{window}"
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.incr(counter)
            pipe.expire(counter, 2)
            count, _ = await pipe.execute()
        if count <= (key.rate_limit or self.default):
            return None
        return 1  # fixed one-second windows: the next one opens within a second


class KeyGate:
    """Answer 401 without a live key and 429 over its rate; otherwise put its `Principal` in the
    request's state. The key store and limiter are the app's (`app.state`), set once Redis is up."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        refuse = functools.partial(json_answer, send, jsonrpc=scope["path"] == "/mcp")
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() not in SCHEMES or not token.strip():
            await refuse(401, "no key: send the header `Authorization: Token <key>` "
                          "(create one with `memfleet keys create NAME`)", {"WWW-Authenticate": "Token"})
            return
        state = scope["app"].state
        try:
            key = await state.keys.authenticate(token.strip())
            wait = None if key is None else await state.limiter.retry_after(key)
        except (RedisConnectionError, OSError):
            await refuse(503, "Redis is unreachable, so keys cannot be checked; retry shortly")
            return
        if key is None:
            await refuse(401, "unknown, revoked or expired key", {"WWW-Authenticate": "Token"})
            return
        if wait is not None:
            await refuse(429, f"rate limit of key {key.name!r} exceeded; retry after {wait}s",
                          {"Retry-After": str(wait)})
            return
        scope.setdefault("state", {})["principal"] = Principal(key)
        await self.app(scope, receive, send)


async def json_answer(send: Send, status: int, detail: str, headers: dict[str, str] | None = None,
                      *, jsonrpc: bool = False) -> None:
    """A JSON refusal: `{"detail": ...}`, or for MCP clients a JSON-RPC error they can show."""
    payload = {"jsonrpc": "2.0", "id": None, "error": {"code": -32001, "message": detail}} if jsonrpc else {
        "detail": detail}
    body = json.dumps(payload).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
