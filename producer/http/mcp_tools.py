"""MCP at /mcp (Streamable HTTP, the official `mcp` SDK): memory tools bound to the key's user.

No tool takes a user id: the user key's user is the scope, as `AsyncScopedMemory`'s constructor
is in the worker. `McpGate` refuses any other key before the SDK sees the request. The server is
stateless, so every tool call is an HTTP request of its own through `KeyGate`: a key revoked
mid-session stops working at once, and a tool acts for the `Principal` the gate established for
its request, never for a header it reads again.
"""

from __future__ import annotations

from typing import Annotated, Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field, ValidationError
from starlette.datastructures import State
from starlette.types import ASGIApp, Receive, Scope, Send

from producer.contract import (
    MAX_PAGE_SIZE,
    MAX_SEARCH_LIMIT,
    Content,
    Cursor,
    MemoryRecord,
    Name,
    QueryText,
    Timestamp,
    describe,
)
from producer.errors import MemfleetError
from producer.http.answers import json_answer
from producer.http.auth import Principal

INSTRUCTIONS = (
    "Long-term memory of the user this connection's key belongs to. add_memory stores what the user "
    "said, search_memories finds what is relevant to a question, list_memories pages through "
    "everything; get_memory, update_memory and delete_memory act on one memory by its id; forget_me "
    "deletes it all."
)


class McpGate:
    """Only a user key opens /mcp (the key is already authenticated by `KeyGate`)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        who: Principal = scope["state"]["principal"]
        if who.key.kind != "user":
            await json_answer(send, 403, "MCP needs a user key (`memfleet keys create NAME --user U`): "
                              "its tools act for the key's user and take no user id", jsonrpc=True)
            return
        await self.app(scope, receive, send)


def _record(record: MemoryRecord) -> dict[str, Any]:
    shown = {"id": record.id, "memory": record.text, "name": record.name, "timestamp": record.timestamp,
             "score": record.score, "metadata": record.metadata or None, "expires_at": record.expires_at}
    return {k: v for k, v in shown.items() if v is not None}


def build_mcp(state: State) -> MCPServer:
    """The MCP server; `state` is the app's, whose `fleet` and `keys` exist once it has started."""
    server = MCPServer(name="memfleet", instructions=INSTRUCTIONS)

    async def user_of(ctx: Context) -> str:
        """The user of the key `KeyGate` checked for this very request (and `McpGate` found a user key)."""
        request_state = getattr(ctx.request_context.request, "scope", {}).get("state", {})
        who = request_state.get("principal")
        if not isinstance(who, Principal) or who.key.user_id is None:
            raise ToolError("this request carries no user key")
        return who.key.user_id

    async def run(call: Any) -> Any:
        try:
            return await call
        except ValidationError as exc:
            raise ToolError(describe(exc)) from None
        except (MemfleetError, ValueError) as exc:
            raise ToolError(str(exc)) from None  # ours are written for the client
        except Exception as exc:
            raise ToolError(f"the call failed ({exc.__class__.__name__}); retry, or see the server's log") from None

    @server.tool()
    async def add_memory(
        content: Annotated[Content, Field(description="what to remember, as the user said it")],
        ctx: Context,
        name: Annotated[Name | None, Field(description="who said it")] = None,
        timestamp: Annotated[Timestamp | None, Field(description="when it was said, ISO 8601")] = None,
    ) -> dict[str, Any]:
        """Remember a message for this user. Returns once it is stored."""
        user = await user_of(ctx)
        handle = await run(state.fleet.add(user, [{"content": content, "name": name, "timestamp": timestamp}]))
        (outcome,) = await run(state.fleet.wait([handle]))
        if outcome.error:
            raise ToolError(f"the memory could not be stored: {outcome.error.split(':', 1)[0]}")
        return {"stored": outcome.stored, "already_stored": outcome.duplicates, "memory_ids": outcome.memory_ids}

    @server.tool()
    async def search_memories(
        query: Annotated[QueryText, Field(description="what to look for")],
        ctx: Context,
        limit: Annotated[int, Field(ge=1, le=MAX_SEARCH_LIMIT)] = 10,
    ) -> list[dict[str, Any]]:
        """Find this user's memories most relevant to the query, best first."""
        return [_record(r) for r in await run(state.fleet.search(await user_of(ctx), query, limit=limit))]

    @server.tool()
    async def list_memories(
        ctx: Context,
        limit: Annotated[int, Field(ge=1, le=MAX_PAGE_SIZE)] = 100,
        cursor: Annotated[Cursor | None, Field(description="next_cursor of the previous page")] = None,
    ) -> dict[str, Any]:
        """List this user's memories, a page at a time."""
        page = await run(state.fleet.list(await user_of(ctx), limit=limit, cursor=cursor))
        return {"memories": [_record(r) for r in page.memories], "next_cursor": page.next_cursor}

    @server.tool()
    async def get_memory(
        memory_id: Annotated[str, Field(description="the memory's id, as search or list gave it")], ctx: Context
    ) -> dict[str, Any]:
        """One of this user's memories by its id."""
        return _record(await run(state.fleet.get(await user_of(ctx), memory_id)))

    @server.tool()
    async def update_memory(
        memory_id: Annotated[str, Field(description="the memory's id")],
        ctx: Context,
        text: Annotated[str | None, Field(description="the corrected text")] = None,
        expires_at: Annotated[str | None, Field(description="when it expires, ISO 8601")] = None,
        never_expires: Annotated[bool, Field(description="remove its expiry")] = False,
    ) -> dict[str, Any]:
        """Correct one of this user's memories, or set when it expires. Returns it as it now is."""
        user = await user_of(ctx)
        handle = await run(state.fleet.update(user, memory_id, text=text, expires_at=expires_at,
                                              clear_expiry=never_expires))
        await run(handle.outcome())
        return _record(await run(state.fleet.get(user, memory_id)))

    @server.tool()
    async def delete_memory(
        memory_id: Annotated[str, Field(description="the memory's id")], ctx: Context
    ) -> dict[str, Any]:
        """Delete one of this user's memories for good; nothing of its text is kept."""
        handle = await run(state.fleet.delete(await user_of(ctx), memory_id))
        outcome = await run(handle.outcome())
        return {"deleted": outcome.deleted}

    @server.tool()
    async def forget_me(ctx: Context) -> dict[str, Any]:
        """Delete everything remembered about this user, for good."""
        handle = await run(state.fleet.forget(await user_of(ctx)))
        (outcome,) = await run(state.fleet.wait([handle]))
        return {"deleted": outcome.deleted}

    return server
