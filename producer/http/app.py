"""The ASGI app of `memfleet serve`: a producer with an HTTP face.

Middleware, outermost first: `ErrorFence` (500, logged by class only), `KeyGate` (401, 429, and
400 for two keys), `BodyLimit` (413, 408). Then the mem0-compatible routes, memfleet's own API,
/mcp (a user key only), /metrics (an app key only) and the "your data" page at /ui/ (static
files, no key; the page itself sends one to /api).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp
from starlette.routing import Route

from producer.client import Memfleet
from producer.http import api_routes, errors, mem0_routes, memory_routes, metrics, schema, ui
from producer.http.apikeys import KeyStore
from producer.http.auth import KeyGate, RateLimiter
from producer.http.mcp_tools import McpGate, build_mcp
from producer.http.settings import ApiSettings

DESCRIPTION = """Per-user memory through memfleet's queue. Every request carries `Authorization: Token <key>`:
an app key acts for the `user_id` a request names, a user key for its own user only.
The mem0 platform routes (`/v1/ping/`, `/v3/memories/add/`, ...) serve `mem0.MemoryClient`;
`/api/...` is memfleet's own API; `/mcp` is MCP over Streamable HTTP (user keys only);
`/ui/` is a "your data" page for a person holding a key."""


def create_app(settings: ApiSettings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        fleet = await Memfleet.connect(settings)
        app.state.fleet = fleet
        app.state.keys = KeyStore(fleet.redis)
        app.state.limiter = RateLimiter(fleet.redis, settings.api_rate_limit)
        try:
            async with mcp.session_manager.run():
                yield
        finally:
            await fleet.close()

    app = FastAPI(title="memfleet", description=DESCRIPTION, version="0.1.0", lifespan=lifespan)
    app.state.metrics = metrics.Metrics()
    errors.install(app)
    schema.install(app)
    app.include_router(mem0_routes.router)
    app.include_router(api_routes.router)
    app.include_router(memory_routes.router)
    app.include_router(metrics.router)
    app.router.routes.extend(ui.routes())

    mcp = build_mcp(app.state)
    # Stateless: any API process can answer any MCP request, so several run behind a plain balancer.
    mcp.streamable_http_app(stateless_http=True, json_response=True, host=settings.api_host,
                            max_request_body_size=settings.api_max_body_bytes)
    # POST only: stateless, the server has nothing to stream on a GET (the MCP spec lets it answer
    # 405) and no session to end on a DELETE.
    app.router.routes.append(Route("/mcp", endpoint=McpGate(StreamableHTTPASGIApp(mcp.session_manager)),
                                   methods=["POST"]))
    # Added innermost first: ErrorFence runs first, then the key gate, and only then is a body read.
    app.add_middleware(errors.BodyLimit, limit=settings.api_max_body_bytes, timeout=settings.api_body_timeout)
    app.add_middleware(KeyGate)
    app.add_middleware(errors.ErrorFence)
    return app
