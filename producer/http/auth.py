"""Who is asking: the request's key, checked (and rate-limited) before any route runs.

`KeyGate` is the outermost ASGI middleware of ours, so the key is checked before a byte of the
body is read, for every path but the OpenAPI docs and the static files of the /ui/ page (exact
paths, no prefix): the mem0 and memfleet routes, /mcp and /metrics alike. A request carries
exactly one key: with two `Authorization` headers, which one counts would depend on who reads
them. A route (or an MCP tool) then asks the request's `Principal`, which the gate put in the
request's state, which user it acts for; that is the one place the user-id rule meets the key's
scope, and nothing reads the header again.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from producer import keys
from producer.contract import check_user_id
from producer.errors import InvalidRequest, MemfleetError
from producer.http import ui
from producer.http.answers import json_answer
from producer.http.apikeys import ApiKey

PUBLIC_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"}) | ui.PATHS
SCHEMES = ("token", "bearer")  # mem0's SDK sends Token; MCP clients and Prometheus default to Bearer


class ScopeRefused(MemfleetError, PermissionError):
    """A user key named another user than its own."""

    def __init__(self, key: ApiKey) -> None:
        super().__init__(f"key {key.name!r} acts for its own user only; it cannot name another user_id")
        self.key = key


class BadRequest(InvalidRequest):
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
        counter = keys.rate_counter(key.id, window)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.incr(counter)
            pipe.expire(counter, keys.RATE_COUNTER_TTL)
            count, _ = await pipe.execute()
        if count <= (key.rate_limit or self.default):
            return None
        return 1  # fixed one-second windows: the next one opens within a second


def _has_body(scope: Scope) -> bool:
    headers = dict(scope["headers"])
    return headers.get(b"content-length", b"0") not in (b"0", b"") or b"transfer-encoding" in headers


class KeyGate:
    """Answer 401 without a live key and 429 over its rate; otherwise put its `Principal` in the
    request's state. The key store and limiter are the app's (`app.state`), set once Redis is up."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        # A body that will not be read ends the connection: the client may still be sending it.
        closing = {"Connection": "close"} if _has_body(scope) else {}
        refuse = functools.partial(json_answer, send, jsonrpc=scope["path"] == "/mcp", closing=closing)
        presented = [value for name, value in scope["headers"] if name.lower() == b"authorization"]
        if len(presented) > 1:
            await refuse(400, f"send one Authorization header, not {len(presented)}")
            return
        header = presented[0].decode("latin-1") if presented else ""
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
