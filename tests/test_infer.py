"""Fact extraction (`infer=True`) end to end: the session's workers against a stand-in LLM on the
OpenAI wire, through the Python client, the CLI, the HTTP API and mem0's own SDK.

The stand-in turns each new message into one fact, `User said: ...` (tests/llm_standin.py), so a
test knows which facts a write must store. Facts are first-class memories: found by keywords and by
meaning, listed, exported, updated, deleted and forgotten like any other, with nothing left behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from producer.client import Memfleet
from tests.http_support import ApiServer, create_key, token
from tests.llm_standin import NO_FACTS, LlmStandIn
from tests.support import eventually, pg_dump, uid
from workers.backends.embedded import EmbeddedBackend
from workers.backends.inference import fact_id
from workers.backends.pg_schema import USER_TABLES

CANARY = re.compile(r"canary[0-9a-f]{10}")


def canary() -> str:
    return f"canary{uuid.uuid4().hex[:10]}"


@pytest.fixture
def standin(llm: LlmStandIn) -> Iterator[LlmStandIn]:
    """The session's stand-in LLM, back to its defaults after the test."""
    llm.reset()
    try:
        yield llm
    finally:
        llm.reset()


def _rows_of(backend: EmbeddedBackend, user: str) -> dict[str, int]:
    with backend.pool.connection() as conn:
        return {t: conn.execute(f"SELECT count(*) FROM {t} WHERE user_id = %s", (user,)).fetchone()[0]  # type: ignore[index]
                for t in USER_TABLES}


async def test_the_facts_of_an_inferred_add_are_memories_like_any_other(
    fleet: Memfleet, standin: LlmStandIn, backend: EmbeddedBackend
) -> None:
    user, mark = uid("infer"), canary()
    said_at = "2023-05-18T13:47:00+00:00"
    expires = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)
    handle = await fleet.add(user, [
        {"content": f"I keep three beehives on my roof in Lisbon, code {mark}", "name": "Ana",
         "timestamp": "2023-05-18T13:45:00+00:00", "metadata": {"channel": "chat"}},
        {"role": "assistant", "content": "Your honey harvest should come in late summer", "timestamp": said_at},
    ], metadata={"topic": "garden"}, infer=True, expires_at=expires)
    outcome = await handle.outcome(timeout=60)
    facts = [f"User said: Ana: I keep three beehives on my roof in Lisbon, code {mark}",
             "Assistant said: Your honey harvest should come in late summer"]
    # Ids from the write's op id and each fact's position: a retry lands on the same rows.
    assert outcome.stored == 2 and outcome.memory_ids == [fact_id(user, handle.op_id, i) for i in range(2)]

    (prompt,) = standin.prompts_with(mark)
    assert prompt.model == "standin-extractor" and prompt.response_format == {"type": "json_object"}
    assert "Memory Extractor" in prompt.system  # mem0's own extraction prompt
    assert prompt.section("Observation Date") == "2023-05-18"  # when the messages were said, not today

    memories = {m.id: m for m in (await fleet.list(user)).memories}
    assert sorted(m.text for m in memories.values()) == sorted(facts)
    for memory in memories.values():
        assert memory.user_id == user and memory.metadata == {"topic": "garden", "channel": "chat"}
        assert memory.timestamp == said_at  # the write's last message that says when
        assert memory.expires_at is not None and datetime.fromisoformat(memory.expires_at) == expires

    # Found by a word of its own (BM25) and by meaning alone (no word in common: the dense score).
    assert (await fleet.search(user, "Lisbon", limit=1))[0].text == facts[0]
    assert (await fleet.search(user, "a city in Portugal", limit=1))[0].text == facts[0]
    assert (await fleet.search(user, "when is honey collected", limit=1))[0].text == facts[1]

    # Updated, deleted and exported like any memory.
    bees, honey = outcome.memory_ids
    await (await fleet.update(user, bees, text=f"Ana keeps four beehives, code {mark}")).outcome()
    assert (await fleet.get(user, bees)).text == f"Ana keeps four beehives, code {mark}"
    assert [e.event for e in await fleet.history(user, bees)] == ["ADD", "UPDATE"]
    await (await fleet.delete(user, honey)).outcome()
    exported = [m async for m in fleet.export(user)]
    assert [(m.id, m.text) for m in exported] == [(bees, f"Ana keeps four beehives, code {mark}")]

    # A forget leaves nothing of the user: memories, history, session messages, extractions.
    assert _rows_of(backend, user)["memfleet_messages"] == 2
    await (await fleet.forget(user)).outcome()
    assert set(_rows_of(backend, user).values()) == {0}
    dump = pg_dump(str(backend.pool.conninfo))
    assert user not in dump and mark not in dump and "honey harvest" not in dump


async def test_no_fact_or_an_answer_that_does_not_parse_stores_the_messages_as_said(
    fleet: Memfleet, standin: LlmStandIn
) -> None:
    user = uid("nofact")
    first = await (await fleet.add(user, [f"hello there {NO_FACTS}"], infer=True)).outcome(timeout=60)
    assert first.stored == 1
    standin.garbage_next(1)
    second = await (await fleet.add(user, ["I moved to Porto in 2021"], infer=True)).outcome(timeout=60)
    assert second.stored == 1
    listed = (await fleet.list(user)).memories
    assert sorted(m.text for m in listed) == sorted([f"hello there {NO_FACTS}", "I moved to Porto in 2021"])
    assert {m.role for m in listed} == {"user"}  # stored as infer=False stores a message

    async def unparsed_counted() -> bool:
        return (await fleet.stats()).counters.get("llm_errors_unparsed", 0) >= 1

    await eventually(unparsed_counted, 30, "the unparsed answer to be counted")


async def test_a_known_fact_is_not_stored_twice(fleet: Memfleet, standin: LlmStandIn) -> None:
    user = uid("known")
    await (await fleet.add(user, ["I play the cello"], infer=True)).outcome(timeout=60)
    again = await (await fleet.add(user, ["I play the cello"], infer=True)).outcome(timeout=60)
    assert (again.stored, again.duplicates) == (0, 1)  # the LLM found only what the user's memories hold
    assert [m.text for m in (await fleet.list(user)).memories] == ["User said: I play the cello"]


async def test_every_prompt_holds_one_users_data_only(fleet: Memfleet, standin: LlmStandIn) -> None:
    """50 users write twice at once; each message carries the user's canary. The second write's
    prompt holds the first's fact (nearest memories) and messages (the session): all of one user."""
    from producer.contract import AddRequest, Message

    marks = {uid("iso"): canary() for _ in range(50)}
    requests = [AddRequest(user_id=user, infer=True, messages=[Message(content=f"note {n} of {mark}: {topic}")])
                for n, topic in enumerate(["I grow basil", "my cat is called Miso"])
                for user, mark in marks.items()]
    seen = len(standin.prompts)
    outcomes = await fleet.wait(await fleet.submit(requests), timeout=240)
    assert [o.stored for o in outcomes] == [1] * 100
    prompts = [p for p in standin.prompts[seen:] if CANARY.search(p.user)]
    assert len(prompts) == 100, "one LLM call per write"
    owners = {mark: user for user, mark in marks.items()}
    for prompt in prompts:
        held = set(CANARY.findall(prompt.user))
        assert len(held) == 1 and held <= owners.keys(), f"a prompt holds canaries of {len(held)} users"
    later = [p for p in prompts if "note 1 of" in p.section("New Messages")]
    assert len(later) == 50
    for prompt in later:  # the context was there, and it was the user's own
        (mark,) = set(CANARY.findall(prompt.section("New Messages")))
        assert mark in prompt.section("Existing Memories") and mark in prompt.section("Last k Messages")
    for user in list(marks)[:3]:
        texts = sorted(m.text for m in (await fleet.list(user)).memories)
        assert texts == [f"User said: note 0 of {marks[user]}: I grow basil",
                         f"User said: note 1 of {marks[user]}: my cat is called Miso"]


def test_infer_through_the_cli(worker_env: dict[str, str], fleet: Memfleet, standin: LlmStandIn) -> None:
    user = uid("cli-infer")
    cli = [sys.executable, "-m", "producer.cli"]
    env = {**os.environ, **worker_env}
    added = subprocess.run([*cli, "add", "--user", user, "--infer", "I cycle to work every day"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert added.returncode == 0, added.stderr
    assert "stored 1" in added.stdout
    listed = subprocess.run([*cli, "list", "--user", user, "--json"], env=env, capture_output=True, text=True,
                            timeout=120)
    assert [m["text"] for m in json.loads(listed.stdout)["memories"]] == ["User said: I cycle to work every day"]


async def test_infer_through_the_http_api_and_mem0s_client_with_llm_metrics(
    api_server: ApiServer, fleet: Memfleet, standin: LlmStandIn
) -> None:
    from mem0 import MemoryClient

    key = create_key(api_server.redis_url, uid("infer-app"), "--rate", "100000")
    user, other = uid("http-infer"), uid("mem0-infer")
    async with httpx.AsyncClient(base_url=api_server.url, headers=token(key), timeout=60) as http:
        answer = await http.post("/api/memories", json={"user_id": user, "infer": True,
                                                        "messages": [{"content": "I am allergic to peanuts"}]})
        assert answer.status_code == 200, answer.text
        assert answer.json()["outcome"]["stored"] == 1
        found = await http.post("/api/memories/search", json={"user_id": user, "query": "peanut allergy"})
        assert [r["text"] for r in found.json()["results"]] == ["User said: I am allergic to peanuts"]

    client = MemoryClient(api_key=key, host=api_server.url)
    added = await asyncio.to_thread(client.add, [{"role": "user", "content": "I speak Basque at home"}],
                                    user_id=other, infer=True)
    assert added["status"] == "SUCCEEDED" and len(added["results"]) == 1
    listed = await asyncio.to_thread(client.get_all, filters={"user_id": other})
    assert [m["memory"] for m in listed["results"]] == ["User said: I speak Basque at home"]

    async def llm_metrics() -> dict[str, float]:
        async with httpx.AsyncClient(base_url=api_server.url, headers=token(key), timeout=30) as http:
            text = (await http.get("/metrics")).text
        return {f"{s.name}{s.labels}": s.value for family in text_string_to_metric_families(text)
                for s in family.samples if s.name.startswith("memfleet_llm")}

    async def counted() -> bool:
        return (await llm_metrics()).get("memfleet_llm_calls_total{}", 0) >= 2

    await eventually(counted, 30, "the LLM calls to reach /metrics")
    metrics = await llm_metrics()
    assert metrics["memfleet_llm_tokens_total{'kind': 'prompt'}"] > 0
    assert metrics["memfleet_llm_tokens_total{'kind': 'completion'}"] > 0
    assert metrics["memfleet_llm_latency_seconds_count{}"] == metrics["memfleet_llm_calls_total{}"]
    assert "memfleet_llm_errors_total{'reason': 'rate_limited'}" in metrics
