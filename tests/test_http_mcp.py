"""MCP at /mcp through the SDK's own client: tools bound to the key's user, no user id anywhere."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError

from producer.client import Memfleet
from producer.http.apikeys import KeyStore
from tests.http_support import ApiServer, token, user_keys
from tests.support import uid

TOOLS = {"add_memory", "search_memories", "list_memories", "get_memory", "update_memory", "delete_memory", "forget_me"}


@contextlib.asynccontextmanager
async def mcp_session(api_server: ApiServer, key: str) -> AsyncIterator[ClientSession]:
    http = create_mcp_http_client(headers=token(key))
    async with (
        http,
        streamable_http_client(f"{api_server.url}/mcp", http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


async def call(session: ClientSession, tool: str, **arguments: Any) -> Any:
    result = await session.call_tool(tool, arguments)
    assert not result.is_error, result.content
    structured = result.structured_content
    # A list result travels wrapped as {"result": [...]} where the protocol wants an object.
    return structured["result"] if isinstance(structured, dict) and set(structured) == {"result"} else structured


async def test_tools_take_no_user_id_and_see_only_the_keys_user(api_server: ApiServer, fleet: Memfleet) -> None:
    alice, bob = uid("alice"), uid("bob")
    alice_key, bob_key = await user_keys(fleet, alice, bob)

    async with mcp_session(api_server, bob_key) as as_bob:
        await call(as_bob, "add_memory", content="My passport number is X1234567", name="Bob")

    async with mcp_session(api_server, alice_key) as as_alice:
        tools = (await as_alice.list_tools()).tools
        assert {t.name for t in tools} == TOOLS
        for tool in tools:
            assert "user_id" not in str(tool.input_schema), f"{tool.name} takes a user id"

        added = await call(as_alice, "add_memory", content="I keep my passport in the blue drawer",
                           name="Alice", timestamp="2024-02-01T09:30:00")
        assert added["stored"] == 1
        found = await call(as_alice, "search_memories", query="where is my passport number?")
        assert [r["memory"] for r in found] == ["I keep my passport in the blue drawer"]
        listed = await call(as_alice, "list_memories")
        assert [m["memory"] for m in listed["memories"]] == ["I keep my passport in the blue drawer"]
        sneaky = await as_alice.call_tool("search_memories", {"query": "passport", "user_id": bob})
        assert sneaky.is_error or "X1234567" not in str(sneaky.content)
        assert (await call(as_alice, "forget_me"))["deleted"] == 1
        assert (await call(as_alice, "list_memories"))["memories"] == []

    async with mcp_session(api_server, bob_key) as as_bob:
        still = await call(as_bob, "list_memories")
        assert [m["memory"] for m in still["memories"]] == ["My passport number is X1234567"]
        await call(as_bob, "forget_me")


async def test_app_keys_and_unknown_keys_are_refused_at_mcp(api_server: ApiServer, fleet: Memfleet) -> None:
    _, app_key = await KeyStore(fleet.redis).create(uid("mcp-app"))
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
    headers = {"Accept": "application/json, text/event-stream"}
    async with httpx.AsyncClient(base_url=api_server.url, timeout=30) as http:
        as_app = await http.post("/mcp", json=body, headers={**headers, **token(app_key)})
        unknown = await http.post("/mcp", json=body, headers={**headers, **token("mf.x.y")})
    assert as_app.status_code == 403 and "user key" in as_app.json()["error"]["message"]
    assert unknown.status_code == 401
    with pytest.RaisesGroup(pytest.RaisesExc(MCPError, match="needs a user key"), flatten_subgroups=True):
        async with mcp_session(api_server, app_key):
            pass


async def test_a_key_revoked_mid_session_stops_at_once(api_server: ApiServer, fleet: Memfleet) -> None:
    store = KeyStore(fleet.redis)
    name = uid("mcp-rev")
    _, key = await store.create(name, user_id=uid("carol"))
    async with mcp_session(api_server, key) as session:
        await call(session, "list_memories")
        await store.revoke(name)
        with pytest.raises(MCPError, match="unknown, revoked or expired key"):
            await session.call_tool("list_memories", {})
