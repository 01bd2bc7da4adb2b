"""One memory at a time over every front door: mem0's SDK, memfleet's /api, MCP and the CLI.

Each is driven by its real client against a live `memfleet serve` (or, for the CLI, the command
run as a user runs it). Another user's key, or another user named, gets exactly what an unknown id
gets: 404, `MemoryNotFoundError`, a tool error, exit 1.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from mem0 import MemoryClient
from mem0.exceptions import MemoryNotFoundError

from producer.client import Memfleet
from tests.http_support import ApiServer, create_key, token, user_keys
from tests.support import uid
from tests.test_cli import memfleet
from tests.test_http_mcp import call, mcp_session


@pytest.fixture(scope="module")
def app_key(api_server: ApiServer) -> str:
    return create_key(api_server.redis_url, uid("life-app"))


def user_key(api_server: ApiServer, user: str) -> str:
    return create_key(api_server.redis_url, uid("life-user"), "--user", user)


def test_mem0_sdk_get_update_delete_history_and_batches(api_server: ApiServer) -> None:
    alice, bob = uid("alice"), uid("bob")
    as_alice = MemoryClient(api_key=user_key(api_server, alice), host=api_server.url)
    as_bob = MemoryClient(api_key=user_key(api_server, bob), host=api_server.url)
    added = as_alice.add([{"role": "user", "content": "I moved to Porto in March."},
                          {"role": "user", "content": "My sister lives in Braga."},
                          {"role": "user", "content": "I run on Sundays."}], user_id=alice)
    first, second, third = (r["id"] for r in added["results"])

    got = as_alice.get(first)
    assert (got["id"], got["memory"], got["user_id"]) == (first, "I moved to Porto in March.", alice)
    updated = as_alice.update(first, text="I moved to Lisbon in March.", expiration_date="2099-12-31")
    assert updated["memory"] == "I moved to Lisbon in March." and updated["expiration_date"] == "2099-12-31"
    assert as_alice.update(first, expiration_date=None)["expiration_date"] is None
    history = as_alice.history(first)
    assert [(h["event"], h["old_memory"], h["new_memory"]) for h in history] == [
        ("ADD", None, "I moved to Porto in March."),
        ("UPDATE", "I moved to Porto in March.", "I moved to Lisbon in March."),
        ("UPDATE", "I moved to Lisbon in March.", "I moved to Lisbon in March."),
    ]
    as_alice.batch_update([{"memory_id": second, "text": "My sister lives in Faro."},
                           {"memory_id": third, "metadata": {"sport": "running"}}])
    assert as_alice.get(second)["memory"] == "My sister lives in Faro."
    assert as_alice.get(third)["metadata"] == {"sport": "running"}

    # Bob's key: every call on Alice's memories is a 404, as for an id that never existed.
    never = str(uuid.uuid4())
    for memory_id in (first, never):
        attempts: list[Callable[[str], Any]] = [
            lambda m: as_bob.get(m), lambda m: as_bob.update(m, text="mine now"), lambda m: as_bob.delete(m),
            lambda m: as_bob.history(m), lambda m: as_bob.batch_update([{"memory_id": m, "text": "mine"}]),
            lambda m: as_bob.batch_delete([{"memory_id": m}]),
        ]
        for attempt in attempts:
            with pytest.raises(MemoryNotFoundError):
                attempt(memory_id)
    assert as_alice.get(first)["memory"] == "I moved to Lisbon in March."

    assert "deleted" in as_alice.delete(first)["message"]
    with pytest.raises(MemoryNotFoundError):
        as_alice.get(first)
    assert [h["event"] for h in as_alice.history(first)] == ["ADD", "UPDATE", "UPDATE", "DELETE"]
    assert all(h["old_memory"] is None and h["new_memory"] is None for h in as_alice.history(first))
    as_alice.batch_delete([{"memory_id": second}, {"memory_id": third}])
    assert as_alice.get_all(filters={"user_id": alice})["results"] == []


def test_mem0_sdk_with_an_app_key_acts_for_the_memorys_holder(api_server: ApiServer, app_key: str) -> None:
    client = MemoryClient(api_key=app_key, host=api_server.url)
    carol = uid("carol")
    added = client.add([{"role": "user", "content": "Carol prefers tea."}], user_id=carol,
                       expiration_date=date(2099, 1, 1).isoformat())
    (memory_id,) = (r["id"] for r in added["results"])
    assert client.get(memory_id)["user_id"] == carol
    assert client.get(memory_id)["expiration_date"] == "2099-01-01"
    client.update(memory_id, text="Carol prefers green tea.")
    assert client.get(memory_id)["memory"] == "Carol prefers green tea."
    client.delete(memory_id)
    with pytest.raises(MemoryNotFoundError):
        client.get(memory_id)


async def test_api_routes_for_one_memory_and_export_import(api_server: ApiServer, fleet: Memfleet) -> None:
    dave, erin = uid("dave"), uid("erin")
    dave_key, erin_key = await user_keys(fleet, dave, erin)
    async with httpx.AsyncClient(base_url=api_server.url, timeout=60) as http:
        added = await http.post("/api/memories", headers=token(dave_key), json={
            "messages": [{"content": "My bike is the red one."}, {"content": "The lock code is 4711."}]})
        first, second = added.json()["outcome"]["memory_ids"]
        got = await http.get(f"/api/memories/{first}", headers=token(dave_key))
        assert got.status_code == 200 and got.json()["text"] == "My bike is the red one."

        soon = (datetime.now(UTC) + timedelta(days=3)).replace(microsecond=0).isoformat()
        patched = await http.patch(f"/api/memories/{first}", headers=token(dave_key),
                                   json={"text": "My bike is the blue one.", "expires_at": soon})
        assert patched.status_code == 200 and patched.json()["outcome"]["updated"] == 1
        assert (await http.get(f"/api/memories/{first}", headers=token(dave_key))).json()["expires_at"] == soon
        cleared = await http.patch(f"/api/memories/{first}", headers=token(dave_key), json={"expires_at": None})
        assert cleared.status_code == 200
        assert (await http.get(f"/api/memories/{first}", headers=token(dave_key))).json()["expires_at"] is None
        history = (await http.get(f"/api/memories/{first}/history", headers=token(dave_key))).json()
        assert [e["event"] for e in history["events"]] == ["ADD", "UPDATE", "UPDATE"]

        # Erin's key, naming no user or naming Dave: 404 for Dave's id and for an unknown one alike.
        for memory_id in (first, str(uuid.uuid4())):
            for method, path, body in (("GET", f"/api/memories/{memory_id}", None),
                                       ("PATCH", f"/api/memories/{memory_id}", {"text": "mine"}),
                                       ("DELETE", f"/api/memories/{memory_id}", None),
                                       ("GET", f"/api/memories/{memory_id}/history", None),
                                       ("POST", "/api/memories/batch-delete", {"memory_ids": [memory_id]})):
                refused = await http.request(method, path, headers=token(erin_key), json=body)
                assert refused.status_code == 404, (method, path, refused.text)
                assert "My bike" not in refused.text
            named_dave = await http.get(f"/api/memories/{memory_id}", headers=token(erin_key),
                                        params={"user_id": dave})
            assert named_dave.status_code == 403
        assert (await http.get("/api/memories/not-a-uuid", headers=token(dave_key))).status_code == 422
        # Times Python cannot hold (year 0, or year 0 once in UTC) are the caller's mistake, named.
        for change in ({"timestamp": "0000-01-01"}, {"expires_at": "0001-01-01T00:00:00+05:00"}):
            odd = await http.patch(f"/api/memories/{first}", headers=token(dave_key), json=change)
            assert odd.status_code == 422 and next(iter(change)) in odd.json()["detail"], odd.text

        exported = await http.get("/api/export", headers=token(dave_key))
        assert exported.status_code == 200 and exported.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in exported.text.splitlines()]
        assert sorted(m["id"] for m in lines) == sorted([first, second])
        assert (await http.get("/api/export", headers=token(erin_key))).text == ""

        deleted = await http.request("POST", "/api/memories/batch-delete", headers=token(dave_key),
                                     json={"memory_ids": [first, second]})
        assert deleted.json()["outcome"]["deleted"] == 2
        restored = await http.post("/api/import", headers=token(dave_key), json={"memories": lines})
        assert restored.status_code == 200 and restored.json()["outcome"]["stored"] == 2
        assert (await http.get(f"/api/memories/{first}", headers=token(dave_key))).json()["text"] == \
            "My bike is the blue one."


async def test_mcp_tools_for_one_memory(api_server: ApiServer, fleet: Memfleet) -> None:
    frank, gina = uid("frank"), uid("gina")
    frank_key, gina_key = await user_keys(fleet, frank, gina)
    async with mcp_session(api_server, frank_key) as as_frank:
        (memory_id,) = (await call(as_frank, "add_memory", content="My dentist is Dr. Ortiz"))["memory_ids"]
        assert (await call(as_frank, "get_memory", memory_id=memory_id))["memory"] == "My dentist is Dr. Ortiz"
        changed = await call(as_frank, "update_memory", memory_id=memory_id, text="My dentist is Dr. Ruiz")
        assert changed["memory"] == "My dentist is Dr. Ruiz"
    async with mcp_session(api_server, gina_key) as as_gina:
        for tool, extra in (("get_memory", {}), ("update_memory", {"text": "mine"}), ("delete_memory", {})):
            refused = await as_gina.call_tool(tool, {"memory_id": memory_id, **extra})
            assert refused.is_error and "no such memory" in str(refused.content)
            assert "Ruiz" not in str(refused.content)
    async with mcp_session(api_server, frank_key) as as_frank:
        assert (await call(as_frank, "delete_memory", memory_id=memory_id))["deleted"] == 1
        gone = await as_frank.call_tool("get_memory", {"memory_id": memory_id})
        assert gone.is_error and "no such memory" in str(gone.content)


def test_cli_get_update_delete_history_export_import(worker_env: dict[str, str], fleet: Memfleet,
                                                      tmp_path: Path) -> None:
    env, user, other = worker_env, uid("clilife"), uid("clilife")
    added = memfleet("add", "-u", user, "The spare key is under the pot", "--expires-at", "2099-01-01T00:00:00Z",
                     env=env)
    assert added.returncode == 0, added.stderr
    (listed,) = json.loads(memfleet("list", "-u", user, "--json", env=env).stdout)["memories"]
    memory_id = listed["id"]
    assert listed["expires_at"] == "2099-01-01T00:00:00+00:00"

    got = memfleet("get", "-u", user, memory_id, "--json", env=env)
    assert got.returncode == 0 and json.loads(got.stdout)["text"] == "The spare key is under the pot"
    changed = memfleet("update", "-u", user, memory_id, "--text", "The spare key is in the shed", "--no-expiry",
                       "--metadata", '{"place": "shed"}', env=env)
    assert changed.returncode == 0, changed.stderr
    record = json.loads(memfleet("get", "-u", user, memory_id, "--json", env=env).stdout)
    assert (record["text"], record["metadata"], record["expires_at"]) == ("The spare key is in the shed",
                                                                          {"place": "shed"}, None)
    events = json.loads(memfleet("history", "-u", user, memory_id, "--json", env=env).stdout)
    assert [e["event"] for e in events] == ["ADD", "UPDATE"]

    # Another user, and an unknown id: exit 1 with the same one line; a malformed id is exit 2.
    for who, memory in ((other, memory_id), (user, str(uuid.uuid4()))):
        for command in (["get"], ["history"], ["delete"], ["update", "--text", "x"]):
            refused = memfleet(command[0], "-u", who, memory, *command[1:], env=env)
            assert refused.returncode == 1, (command, refused.stderr)
            assert refused.stderr.strip().startswith("error: no such memory") and len(refused.stderr.splitlines()) == 1
    bad = memfleet("get", "-u", user, "nope", env=env)
    assert bad.returncode == 2 and "memory_id" in bad.stderr and "Traceback" not in bad.stderr
    past = memfleet("update", "-u", user, memory_id, "--expires-at", "2001-01-01", env=env)
    assert past.returncode == 2 and "already in the past" in past.stderr

    exported = tmp_path / "export.jsonl"
    done = memfleet("export", "-u", user, "-o", str(exported), env=env)
    assert done.returncode == 0 and "exported 1 memories" in done.stderr
    assert memfleet("delete", "-u", user, memory_id, env=env).returncode == 0
    assert memfleet("get", "-u", user, memory_id, env=env).returncode == 1
    imported = memfleet("import", str(exported), env=env)
    assert imported.returncode == 0 and "imported 1 memories, 0 already there" in imported.stdout
    again = memfleet("import", str(exported), env=env)
    assert "imported 0 memories, 1 already there" in again.stdout
    assert json.loads(memfleet("get", "-u", user, memory_id, "--json", env=env).stdout)["text"] == \
        "The spare key is in the shed"

    broken = tmp_path / "broken.jsonl"
    broken.write_text(exported.read_text() + '{"id": "x"}\n')
    refused = memfleet("import", str(broken), "-u", other, env=env)
    assert refused.returncode == 2 and f"{broken}:2:" in refused.stderr and "nothing was imported" in refused.stderr
    assert json.loads(memfleet("list", "-u", other, "--json", env=env).stdout)["memories"] == []
