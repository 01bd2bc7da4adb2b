"""The examples run as a user would run them, against the session's Redis and workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from producer.client import Memfleet
from producer.services import free_port
from tests.support import eventually, eventually_sync, stop_process, uid

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def env(worker_env: dict[str, str], fleet: Memfleet) -> dict[str, str]:
    return {**os.environ, "REDIS_URL": worker_env["REDIS_URL"]}


def test_agent_loop_remembers_earlier_turns(env: dict[str, str]) -> None:
    result = subprocess.run([sys.executable, str(EXAMPLES / "agent_loop.py")], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    # Turns search without waiting for earlier adds, so what each one saw depends on timing; once
    # the script has waited for its writes, the first turn is found.
    assert "remembered: Hi! I just moved to Lisbon for a new job." in result.stdout


@pytest.fixture
def app_server(env: dict[str, str]) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--app-dir", str(EXAMPLES), "app_server:app",
                             "--port", str(port), "--log-level", "warning"], env=env)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, "the app server exited"
        try:
            return httpx.get(f"{url}/openapi.json", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        eventually_sync(up, 30, "the app server to answer")
        yield url
    finally:
        code = stop_process(proc)
    # uvicorn shuts down gracefully (the lifespan closes the client), then re-raises the signal.
    assert code in (0, -signal.SIGTERM), "the app server did not shut down cleanly"


async def test_app_server_adds_searches_lists_and_forgets_per_user(app_server: str) -> None:
    alice, bob = {"X-User": uid("app")}, {"X-User": uid("app")}
    async with httpx.AsyncClient(base_url=app_server, timeout=30) as http:
        added = await http.post("/memories", headers=alice, json={"messages": ["I keep bees on my roof"]})
        assert added.status_code == 202 and added.json()["op_id"]

        async def listed() -> bool:
            return len((await http.get("/memories", headers=alice)).json()["memories"]) == 1

        await eventually(listed, 30, "the accepted add to take effect")
        found = (await http.get("/memories/search", params={"q": "insects"}, headers=alice)).json()
        assert [r["text"] for r in found] == ["I keep bees on my roof"]
        assert (await http.get("/memories/search", params={"q": "insects"}, headers=bob)).json() == []

        bad = await http.post("/memories", headers={"X-User": "*"}, json={"messages": ["hi"]})
        assert bad.status_code == 422 and "user_id" in bad.json()["detail"]

        assert (await http.delete("/memories", headers=alice)).status_code == 202

        async def forgotten() -> bool:
            return not (await http.get("/memories", headers=alice)).json()["memories"]

        await eventually(forgotten, 30, "the forget to take effect")
