"""HostedBackend against a local stand-in of the mem0 platform API: start-up, scoping, isolation and
error mapping (one memory at a time: test_hosted_lifecycle.py)."""

from __future__ import annotations

import email.utils
import socket
import time
from typing import Any

import pytest

from producer.contract import AddRequest, Message
from tests.hosted_standin import HostedStandIn
from tests.hosted_support import (  # noqa: F401 (the *_fixture functions are for pytest)
    ALICE,
    BOB,
    TIMEOUT,
    add_request,
    api_fixture,
    backend_fixture,
    loopback_only_fixture,
    memory_requests,
    scopes_of,
)
from workers.backends.base import BackendRejected, BackendUnavailable, ForgetIncomplete
from workers.backends.hosted import HostedBackend
from workers.backends.platform_calls import retry_after_seconds
from workers.settings import WorkerConfig

# -- start-up -------------------------------------------------------------------------------------------


async def test_start_pings_once_with_the_key(api: HostedStandIn, backend: HostedBackend) -> None:
    assert backend.name == "hosted" and backend.can_infer
    [ping] = api.requests
    assert (ping.method, ping.path) == ("GET", "/v1/ping/")
    assert ping.headers["authorization"] == "Token test-key"


def test_telemetry_is_off() -> None:
    from mem0.memory.telemetry import client_telemetry

    assert client_telemetry.posthog is None


async def test_client_timeout_is_ours_not_the_sdks(backend: HostedBackend) -> None:
    assert backend.client.async_client.timeout.read == TIMEOUT


async def test_start_without_a_key_is_refused(api: HostedStandIn) -> None:
    with pytest.raises(ValueError, match="MEM0_API_KEY"):
        await HostedBackend.start(WorkerConfig(mem0_api_key=None, mem0_host=api.url), timeout=TIMEOUT)


# -- scope on the wire ----------------------------------------------------------------------------------


async def test_every_request_names_its_user_and_no_other(api: HostedStandIn, backend: HostedBackend) -> None:
    for user_id in (ALICE, BOB):
        operations = [
            backend.add(user_id, add_request(user_id, f"{user_id} likes tea"), ["k"], "op"),
            backend.search(user_id, "tea", 5, {}),
            backend.search(user_id, "tea", 5, {"OR": [{"topic": "a"}, {"NOT": [{"topic": "b"}]}]}),
            backend.list(user_id, 10, None),
            backend.count(user_id),
            backend.forget(user_id),
        ]
        for operation in operations:
            mark = len(api.requests)
            await operation
            sent = memory_requests(api, mark)
            assert sent, "every operation reaches the platform"
            for request in sent:
                assert scopes_of(request) == [user_id], (request.method, request.path)


async def test_add_sends_messages_metadata_and_infer(api: HostedStandIn, backend: HostedBackend) -> None:
    request = AddRequest(
        user_id=ALICE,
        messages=[Message(content="hello", name="Al", metadata={"turn": 1}), Message(role="assistant", content="hi")],
        metadata={"topic": "greeting"},
        infer=True,
    )
    ids, duplicates = await backend.add(ALICE, request, request.idempotency_keys(), "op")
    [sent] = api.requests_to("/v3/memories/add/")
    assert sent.body == {
        "messages": [{"role": "user", "content": "hello", "name": "Al"}, {"role": "assistant", "content": "hi"}],
        "user_id": ALICE,
        "metadata": {"topic": "greeting", "turn": 1},
        "infer": True,
    }
    assert duplicates == 0
    assert ids == [m["id"] for m in api.user_memories(ALICE)]


async def test_add_sends_who_and_when_in_the_platforms_own_fields(api: HostedStandIn, backend: HostedBackend) -> None:
    said = [Message(content="I moved", name="Ana", timestamp="2023-05-18T13:47:00"),
            Message(content="Where to?", name="Bo", timestamp="2023-05-18T13:47:00"),
            Message(content="Porto", name="Ana", timestamp="2023-05-19T09:00:00+02:00")]
    user = "who-and-when"
    request = AddRequest(user_id=user, messages=said)
    ids, _ = await backend.add(user, request, request.idempotency_keys(), "op")
    first, second = api.requests_to("/v3/memories/add/")
    assert [m["name"] for m in first.body["messages"]] == ["Ana", "Bo"]
    assert first.body["timestamp"] == 1684417620  # 2023-05-18 13:47 UTC: a time without a zone is UTC
    assert [m["content"] for m in second.body["messages"]] == ["Porto"]
    assert second.body["timestamp"] == 1684479600  # 2023-05-19 07:00 UTC
    assert len(ids) == 3
    listed = (await backend.list(user, 10, None)).memories
    assert sorted((r.text, r.name) for r in listed) == [("I moved", "Ana"), ("Porto", "Ana"), ("Where to?", "Bo")]


async def test_search_puts_caller_filters_under_the_scope(api: HostedStandIn, backend: HostedBackend) -> None:
    await backend.add(ALICE, add_request(ALICE, "green tea", topic="drinks"), ["a"], "op")
    await backend.add(ALICE, add_request(ALICE, "tea ceremony", topic="culture"), ["b"], "op")
    caller = {"OR": [{"topic": "drinks"}, {"topic": {"in": ["sports"]}}]}

    found = await backend.search(ALICE, "tea", 10, caller)

    [sent] = api.requests_to("/v3/memories/search/")
    assert sent.body["filters"] == {"AND": [{"user_id": ALICE}, caller]}
    assert sent.body["top_k"] == 10
    assert [r.text for r in found] == ["green tea"]
    assert found[0].metadata == {"topic": "drinks"} and found[0].score is not None


# -- isolation ------------------------------------------------------------------------------------------


async def test_users_do_not_mix(backend: HostedBackend) -> None:
    alice_ids, _ = await backend.add(ALICE, add_request(ALICE, "I like green tea", "I live in Oslo"), [], "op")
    bob_ids, _ = await backend.add(BOB, add_request(BOB, "I like black coffee", "I like green tea too"), [], "op")

    for user_id, own in ((ALICE, alice_ids), (BOB, bob_ids)):
        found = await backend.search(user_id, "I like green tea", 10, {})
        assert found and {r.id for r in found} <= set(own)
        assert {r.user_id for r in found} == {user_id}
        page = await backend.list(user_id, 10, None)
        assert {r.id for r in page.memories} == set(own)
        assert {r.user_id for r in page.memories} == {user_id}
        assert await backend.count(user_id) == 2


async def test_list_pages_through_with_a_page_number_cursor(api: HostedStandIn, backend: HostedBackend) -> None:
    ids, _ = await backend.add(ALICE, add_request(ALICE, *(f"fact {i}" for i in range(5))), [], "op")
    await backend.add(BOB, add_request(BOB, "not alice's"), [], "op")

    seen, cursor, cursors = [], None, []
    while True:
        page = await backend.list(ALICE, 2, cursor)
        seen += [r.id for r in page.memories]
        cursor = page.next_cursor
        cursors.append(cursor)
        if cursor is None:
            break
    assert seen == ids
    assert cursors == ["2", "3", None]
    queries = [r.query for r in api.requests_to("/v3/memories/")][-3:]
    assert queries == [{"page": [str(p)], "page_size": ["2"]} for p in (1, 2, 3)]


async def test_list_refuses_a_foreign_cursor(backend: HostedBackend) -> None:
    with pytest.raises(ValueError, match="cursor"):
        await backend.list(ALICE, 2, "3f2c-uuid")


async def test_records_keep_the_platforms_user_id(backend: HostedBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A foreign record is reported as foreign, for the scoped caller to drop, never relabelled."""

    async def leaky_search(query: str, **kwargs: Any) -> dict[str, Any]:
        return {"results": [{"id": "m1", "memory": "x", "user_id": "mallory"}, {"id": "m2", "memory": "y"}]}

    monkeypatch.setattr(backend.client, "search", leaky_search)
    records = await backend.search(ALICE, "x", 5, {})
    assert [r.user_id for r in records] == ["mallory", ""]


async def test_forget_removes_only_that_user(api: HostedStandIn, backend: HostedBackend) -> None:
    await backend.add(ALICE, add_request(ALICE, "a1", "a2", "a3"), [], "op")
    bob_ids, _ = await backend.add(BOB, add_request(BOB, "b1"), [], "op")

    assert await backend.forget(ALICE) == 3

    assert await backend.count(ALICE) == 0 and api.user_memories(ALICE) == []
    assert [m["id"] for m in api.user_memories(BOB)] == bob_ids
    [delete] = api.requests_to("/v1/memories/")
    assert delete.method == "DELETE" and delete.query == {"user_id": [ALICE]}


async def test_forget_that_leaves_memories_asks_for_a_retry(
    backend: HostedBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    await backend.add(ALICE, add_request(ALICE, "a1"), [], "op")

    async def lazy_delete_all(**kwargs: Any) -> dict[str, Any]:
        return {"message": "Memories deleted successfully!"}  # ...but nothing went

    monkeypatch.setattr(backend.client, "delete_all", lazy_delete_all)
    with pytest.raises(ForgetIncomplete):
        await backend.forget(ALICE)


# -- failures -------------------------------------------------------------------------------------------


async def test_rate_limit_is_retryable_with_its_delay(api: HostedStandIn, backend: HostedBackend) -> None:
    api.fail_next(1, 429, retry_after=7)
    with pytest.raises(BackendUnavailable) as caught:
        await backend.search(ALICE, "tea", 5, {})
    assert caught.value.retry_after == 7.0
    assert "429" in str(caught.value)

    api.fail_next(1, 429, retry_after=3)
    with pytest.raises(BackendUnavailable) as caught:
        await backend.add(ALICE, add_request(ALICE, "tea"), [], "op")
    assert caught.value.retry_after == 3.0


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_server_errors_are_retryable(api: HostedStandIn, backend: HostedBackend, status: int) -> None:
    api.fail_next(1, status)
    with pytest.raises(BackendUnavailable) as caught:
        await backend.list(ALICE, 10, None)
    assert caught.value.retry_after is None and str(status) in str(caught.value)


async def test_retry_after_on_503_is_kept(api: HostedStandIn, backend: HostedBackend) -> None:
    api.fail_next(1, 503, retry_after=2.5)  # the SDK itself reads Retry-After only on a 429
    with pytest.raises(BackendUnavailable) as caught:
        await backend.count(ALICE)
    assert caught.value.retry_after == 2.5


async def test_a_timeout_is_retryable(api: HostedStandIn, backend: HostedBackend) -> None:
    # The stand-in answers after 3 s: a ReadTimeout is our 1 s timeout at work (the SDK's own
    # would have waited for the answer).
    api.delay_next(1, TIMEOUT * 3)
    with pytest.raises(BackendUnavailable, match="ReadTimeout"):
        await backend.search(ALICE, "tea", 5, {})


async def test_a_refused_connection_is_retryable(backend: HostedBackend) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend.client.async_client.base_url = f"http://127.0.0.1:{port}"
    with pytest.raises(BackendUnavailable, match="ConnectError"):
        await backend.forget(ALICE)


async def test_a_bad_request_is_not_retried(api: HostedStandIn, backend: HostedBackend) -> None:
    api.fail_next(1, 400)
    with pytest.raises(BackendRejected) as caught:
        await backend.add(ALICE, add_request(ALICE, "my secret diary entry"), [], "op")
    assert not isinstance(caught.value, BackendUnavailable)
    assert caught.value.status == 400
    # The stand-in's error body quotes the request; none of it may travel on (logs, Redis).
    assert "secret" not in str(caught.value)
    assert caught.value.__suppress_context__


async def test_a_bad_key_is_not_retried(api: HostedStandIn, backend: HostedBackend) -> None:
    api.fail_next(1, 401)
    with pytest.raises(BackendRejected, match="401"):
        await backend.count(ALICE)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("7", 7.0), ("0.5", 0.5), (None, None), ("", None), ("soon", None), ("inf", None),
     ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0)],
)
def test_retry_after_header(header: str | None, seconds: float | None) -> None:
    assert retry_after_seconds(header) == seconds


def test_retry_after_as_a_date() -> None:
    in_a_minute = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 55 <= (retry_after_seconds(in_a_minute) or 0) <= 60
