"""mem0's own SDK (`mem0.MemoryClient`, mem0ai 2.2.1) against a live `memfleet serve` and its workers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

# mem0 reads MEM0_TELEMETRY on import; conftest imports `workers`, which sets it to false, before this module.
from mem0 import AsyncMemoryClient, MemoryClient
from mem0.exceptions import AuthenticationError

from producer.client import Memfleet
from producer.http.apikeys import KeyStore
from tests.http_support import ApiServer, create_key, token
from tests.support import uid

ALICE_SAYS = [
    {"role": "user", "content": "Hi, I'm Alice. I'm a vegetarian and I'm allergic to nuts."},
    {"role": "assistant", "content": "Hello Alice! I've noted that you're a vegetarian and have a nut allergy."},
]
BOB_SAYS = [
    {"role": "user", "content": "I'm Bob. I love grilled steak and I always fly with a window seat."},
]


@pytest.fixture(scope="module")
def app_key(api_server: ApiServer) -> str:
    return create_key(api_server.redis_url, uid("mem0-app"))


def texts(answer: dict[str, Any]) -> list[str]:
    return [m["memory"] for m in answer["results"]]


def test_tutorial_through_mem0_client(api_server: ApiServer, app_key: str) -> None:
    client = MemoryClient(api_key=app_key, host=api_server.url)
    alice, bob = uid("alice"), uid("bob")

    added = client.add(ALICE_SAYS, user_id=alice)
    assert added["status"] == "SUCCEEDED" and len(added["results"]) == 2
    client.add(BOB_SAYS, user_id=bob)

    found = client.search("What can I cook for dinner tonight?", filters={"user_id": alice})
    assert found["results"], "Alice's own memories must be found"
    assert {m["user_id"] for m in found["results"]} == {alice}
    assert set(texts(found)) <= {m["content"] for m in ALICE_SAYS}
    bob_found = client.search("What does Alice eat, and is she allergic?", filters={"user_id": bob})
    assert {m["user_id"] for m in bob_found["results"]} <= {bob}
    assert not set(texts(bob_found)) & {m["content"] for m in ALICE_SAYS}

    everything = client.get_all(filters={"user_id": alice})
    assert sorted(texts(everything)) == sorted(m["content"] for m in ALICE_SAYS)
    paged = client.get_all(filters={"user_id": alice}, page=2, page_size=1)
    assert len(paged["results"]) == 1 and paged["next"] is None and paged["previous"] is not None

    assert "deleted" in client.delete_all(user_id=alice)["message"]
    assert client.get_all(filters={"user_id": alice})["results"] == []
    assert texts(client.get_all(filters={"user_id": bob})) == [BOB_SAYS[0]["content"]]
    client.delete_all(user_id=bob)


async def test_async_client_isolates_users(api_server: ApiServer, app_key: str) -> None:
    client = AsyncMemoryClient(api_key=app_key, host=api_server.url)
    alice, bob = uid("alice"), uid("bob")
    await client.add(ALICE_SAYS, user_id=alice)
    await client.add(BOB_SAYS, user_id=bob)
    found = await client.search("allergic to nuts", filters={"user_id": bob})
    assert {m["user_id"] for m in found["results"]} <= {bob}
    assert not set(texts(found)) & {m["content"] for m in ALICE_SAYS}
    assert sorted(texts(await client.get_all(filters={"user_id": alice}))) == sorted(m["content"] for m in ALICE_SAYS)
    for user in (alice, bob):
        await client.delete_all(user_id=user)
        assert (await client.get_all(filters={"user_id": user}))["results"] == []
    await client.async_client.aclose()


def test_name_and_timestamp_travel_with_an_add(api_server: ApiServer, app_key: str) -> None:
    client = MemoryClient(api_key=app_key, host=api_server.url)
    user = uid("named")
    client.add([{"role": "user", "content": "We moved to Lisbon", "name": "Caroline"}], user_id=user,
               timestamp=1684417620)
    (record,) = client.get_all(filters={"user_id": user})["results"]
    assert record["memory"] == "We moved to Lisbon"
    assert (record["name"], record["timestamp"]) == ("Caroline", "2023-05-18T13:47:00+00:00")
    client.delete_all(user_id=user)


def test_the_sdk_reports_an_unknown_key(api_server: ApiServer) -> None:
    with pytest.raises(ValueError, match="unknown, revoked or expired key"):
        MemoryClient(api_key="mf.0000.nope", host=api_server.url)


async def test_alice_user_key_naming_bob_gets_403_everywhere(
    api_server: ApiServer, fleet: Memfleet, app_key: str
) -> None:
    alice, bob = uid("alice"), uid("bob")
    app = MemoryClient(api_key=app_key, host=api_server.url)
    app.add(BOB_SAYS, user_id=bob)
    key_name = uid("alice-key")
    _, alice_key = await KeyStore(fleet.redis).create(key_name, user_id=alice)
    client = MemoryClient(api_key=alice_key, host=api_server.url)

    auth = token(alice_key)
    with httpx.Client(base_url=api_server.url, headers=auth, timeout=60) as http:
        answers = [
            http.post("/v3/memories/search/", json={"query": "steak", "filters": {"user_id": bob}}),
            http.post("/v3/memories/search/", json={"query": "steak", "filters": {"AND": [{"user_id": bob}]}}),
            http.post("/v3/memories/", json={"filters": {"user_id": bob}}),
            http.post("/v3/memories/add/", json={"messages": [{"role": "user", "content": "x"}], "user_id": bob}),
            http.post("/v3/memories/add/", json={"messages": [{"role": "user", "content": "x"}],
                                                 "filters": {"user_id": bob}}),
            http.delete("/v1/memories/", params={"user_id": bob}),
        ]
        metrics = http.get("/metrics", headers=token(app_key)).text
    assert [a.status_code for a in answers] == [403] * 6
    assert all("steak" not in a.text for a in answers)
    assert f'memfleet_api_scope_refused_total{{key="{key_name}"}} 6.0' in metrics

    # Through the SDK too: it raises, and nothing of Bob's comes back.
    calls: list[Callable[[], object]] = [
        lambda: client.search("steak", filters={"user_id": bob}),
        lambda: client.get_all(filters={"user_id": bob}),
        lambda: client.add("I now own Bob's memories", user_id=bob),
        lambda: client.delete_all(user_id=bob),
    ]
    for call in calls:
        with pytest.raises(AuthenticationError, match="own user"):
            call()

    # Alice's key naming nobody acts for Alice; naming herself is fine too.
    client.add("I grow tomatoes", user_id=alice)
    assert texts(client.get_all(filters={"user_id": alice})) == ["I grow tomatoes"]
    with httpx.Client(base_url=api_server.url, headers=auth, timeout=60) as http:
        own = http.post("/v3/memories/search/", json={"query": "steak tomatoes"}).json()
    assert {m["user_id"] for m in own["results"]} == {alice}
    assert texts(app.get_all(filters={"user_id": bob})) == [BOB_SAYS[0]["content"]], "Bob's memories were touched"
    app.delete_all(user_id=bob)
    client.delete_all()


def test_unsupported_scopes_and_filters_are_refused_by_name(api_server: ApiServer, app_key: str) -> None:
    with httpx.Client(base_url=api_server.url, headers=token(app_key), timeout=60) as http:
        agent = http.post("/v3/memories/search/", json={"query": "q", "filters": {"agent_id": "a1"}})
        wildcard = http.post("/v3/memories/search/", json={"query": "q", "filters": {"user_id": "*"}})
        many = http.post("/v3/memories/search/", json={"query": "q", "filters": {"user_id": {"in": ["a", "b"]}}})
        extra = http.post("/v3/memories/search/", json={"query": "q", "filters": {"user_id": "a"}, "rerank": True})
    assert agent.status_code == 422 and "agent_id" in agent.json()["detail"]
    assert wildcard.status_code == 422 and "user_id" in wildcard.json()["detail"]
    assert many.status_code == 422 and "one user id" in many.json()["detail"]
    assert extra.status_code == 422 and "rerank" in extra.json()["detail"]
