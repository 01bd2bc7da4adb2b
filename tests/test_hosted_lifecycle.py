"""HostedBackend, one memory at a time, against the stand-in of the mem0 platform: get, update,
delete, history, expiry, export, restore and owners."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from producer.contract import AddRequest, ExportedMemory, MemoryChange, Message
from tests.hosted_standin import HostedStandIn
from tests.hosted_support import ALICE, BOB, add_request, api_fixture, backend_fixture, loopback_only_fixture  # noqa: F401 (the *_fixture functions are for pytest)
from workers.backends.base import BackendRejected, BackendUnavailable
from workers.backends.hosted import HostedBackend
from workers.backends.platform_records import ORIGIN_KEY

# -- one memory at a time -------------------------------------------------------------------------------


def day(offset: int) -> datetime:
    """Midnight UTC `offset` days from today."""
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today + timedelta(days=offset)


def writes(api: HostedStandIn, since: int) -> list[tuple[str, str]]:
    """The changing requests (method, path) sent since request number `since`."""
    return [(r.method, r.path) for r in api.requests[since:] if r.method in ("PUT", "DELETE")]


def stored(api: HostedStandIn, user_id: str) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in api.user_memories(user_id)}


async def test_get_returns_the_users_memory_with_its_times(api: HostedStandIn, backend: HostedBackend) -> None:
    [mid], _ = await backend.add(ALICE, add_request(ALICE, "I like green tea", topic="drinks"), [], "op")

    record = await backend.get(ALICE, mid)

    assert record is not None
    assert (record.id, record.user_id, record.text, record.metadata) == (mid, ALICE, "I like green tea",
                                                                        {"topic": "drinks"})
    assert record.created_at and record.updated_at and record.expires_at is None
    assert [(r.method, r.path) for r in api.requests[-1:]] == [("GET", f"/v1/memories/{mid}/")]
    assert await backend.get(ALICE, str(uuid.uuid4())) is None  # the platform's 404 is "not found"


async def test_another_users_memory_answers_as_an_unknown_id_everywhere(
    api: HostedStandIn, backend: HostedBackend
) -> None:
    [mine], _ = await backend.add(ALICE, add_request(ALICE, "alice's own"), [], "op")
    [bobs], _ = await backend.add(BOB, add_request(BOB, "bob's secret"), [], "op")
    before = stored(api, BOB)
    unknown = str(uuid.uuid4())
    mark = len(api.requests)

    for other in (bobs, unknown):
        assert await backend.get(ALICE, other) is None
        assert await backend.history(ALICE, other) is None
        assert await backend.update(ALICE, [MemoryChange(memory_id=other, text="mine now")]) == [other]
        assert await backend.delete(ALICE, [other]) == [other]
        # In a batch with one of the user's own, it still changes nothing at all.
        assert await backend.update(ALICE, [MemoryChange(memory_id=mine, text="x"),
                                            MemoryChange(memory_id=other, text="y")]) == [other]
        assert await backend.delete(ALICE, [mine, other]) == [other]

    assert writes(api, mark) == [], "nothing was sent to change any memory"
    assert stored(api, BOB) == before
    assert (await backend.get(ALICE, mine)).text == "alice's own"  # type: ignore[union-attr]


async def test_update_changes_text_and_metadata_and_history_has_both_texts(
    api: HostedStandIn, backend: HostedBackend
) -> None:
    [mid], _ = await backend.add(ALICE, add_request(ALICE, "I live in Oslo", topic="home"), [], "op")
    mark = len(api.requests)

    assert await backend.update(ALICE, [MemoryChange(memory_id=mid, text="I live in Porto", metadata={"v": 2})]) == []

    [put] = [r for r in api.requests[mark:] if r.method == "PUT"]
    assert put.path == f"/v1/memories/{mid}/" and put.body == {"text": "I live in Porto", "metadata": {"v": 2}}
    record = await backend.get(ALICE, mid)
    assert record is not None and (record.text, record.metadata) == ("I live in Porto", {"v": 2})
    events = await backend.history(ALICE, mid)
    assert events is not None
    assert [(e.event, e.old_text, e.new_text) for e in events] == [
        ("ADD", None, "I live in Oslo"), ("UPDATE", "I live in Oslo", "I live in Porto")]
    assert all(e.memory_id == mid and e.at for e in events)
    assert events[0].at <= events[1].at  # type: ignore[operator]


async def test_several_updates_of_text_go_in_one_batch(api: HostedStandIn, backend: HostedBackend) -> None:
    ids, _ = await backend.add(ALICE, add_request(ALICE, "one", "two", "three"), [], "op")
    mark = len(api.requests)

    changes = [MemoryChange(memory_id=ids[0], text="uno"), MemoryChange(memory_id=ids[1], metadata={"n": 2})]
    assert await backend.update(ALICE, changes) == []

    assert writes(api, mark) == [("PUT", "/v1/batch/")]
    [batch] = api.requests_to("/v1/batch/")
    assert batch.body == {"memories": [{"memory_id": ids[0], "text": "uno"},
                                       {"memory_id": ids[1], "metadata": {"n": 2}}]}
    now = stored(api, ALICE)
    assert [now[i]["memory"] for i in ids] == ["uno", "two", "three"]
    assert [now[i]["metadata"] for i in ids] == [{}, {"n": 2}, {}]


async def test_expiry_goes_as_a_date_coarsened_to_the_end_of_its_day(
    api: HostedStandIn, backend: HostedBackend
) -> None:
    at_ten = (day(3) + timedelta(hours=10)).isoformat()
    request = AddRequest(user_id=ALICE, messages=[Message(content="a passing thought")], expires_at=at_ten)
    [mid], _ = await backend.add(ALICE, request, [], "op")

    [add] = api.requests_to("/v3/memories/add/")
    assert add.body["expiration_date"] == day(3).date().isoformat()
    record = await backend.get(ALICE, mid)
    assert record is not None and record.expires_at == day(4).isoformat(), "at the end of that day, UTC"

    # At midnight exactly, the day before's end is the very same instant.
    mark = len(api.requests)
    assert await backend.update(ALICE, [MemoryChange(memory_id=mid, expires_at=day(5).isoformat())]) == []
    [put] = [r for r in api.requests[mark:] if r.method == "PUT"]
    assert put.path == f"/v1/memories/{mid}/" and put.body == {"expiration_date": day(4).date().isoformat()}
    assert (await backend.get(ALICE, mid)).expires_at == day(5).isoformat()  # type: ignore[union-attr]

    mark = len(api.requests)
    assert await backend.update(ALICE, [MemoryChange(memory_id=mid, clear_expiry=True)]) == []
    [put] = [r for r in api.requests[mark:] if r.method == "PUT"]
    assert put.body == {"expiration_date": None}
    assert stored(api, ALICE)[mid]["expiration_date"] is None
    assert (await backend.get(ALICE, mid)).expires_at is None  # type: ignore[union-attr]


async def test_expiry_and_timestamp_changes_go_one_memory_at_a_time(api: HostedStandIn, backend: HostedBackend) -> None:
    ids, _ = await backend.add(ALICE, add_request(ALICE, "one", "two"), [], "op")
    mark = len(api.requests)

    changes = [MemoryChange(memory_id=ids[0], text="uno", timestamp="2023-05-18T13:47:00"),
               MemoryChange(memory_id=ids[1], expires_at=day(2).isoformat())]
    assert await backend.update(ALICE, changes) == []

    assert sorted(writes(api, mark)) == sorted(("PUT", f"/v1/memories/{i}/") for i in ids)
    bodies = {r.path: r.body for r in api.requests[mark:] if r.method == "PUT"}
    assert bodies[f"/v1/memories/{ids[0]}/"] == {"text": "uno", "timestamp": 1684417620}
    assert bodies[f"/v1/memories/{ids[1]}/"] == {"expiration_date": day(1).date().isoformat()}
    assert stored(api, ALICE)[ids[0]]["created_at"].startswith("2023-05-18T13:47:00")


async def test_an_expired_memory_is_absent_from_every_read(api: HostedStandIn, backend: HostedBackend) -> None:
    [gone, kept], _ = await backend.add(ALICE, add_request(ALICE, "green tea once", "green tea always"), [], "op")
    assert await backend.update(ALICE, [MemoryChange(memory_id=gone, text="green tea, briefly")]) == []
    api.set_expiration_date(gone, day(-1).date().isoformat())  # its day is over

    assert await backend.get(ALICE, gone) is None
    assert [r.id for r in (await backend.list(ALICE, 10, None)).memories] == [kept]
    assert [r.id for r in await backend.search(ALICE, "green tea", 10, {})] == [kept]
    assert [m.id for m in (await backend.export(ALICE, 10, None)).memories] == [kept]
    assert await backend.owners([gone, kept]) == {kept: [ALICE]}
    assert await backend.update(ALICE, [MemoryChange(memory_id=gone, text="back")]) == [gone]
    assert await backend.delete(ALICE, [gone]) == [gone]
    events = await backend.history(ALICE, gone)
    assert events is not None and [e.event for e in events] == ["ADD", "UPDATE"]
    assert all(e.old_text is None and e.new_text is None for e in events), "an expired memory's texts stay hidden"
    assert await backend.sweep_expired() == 0  # the platform expires memories itself

    api.set_expiration_date(gone, day(0).date().isoformat())  # expires at the end of today: still here
    assert (await backend.get(ALICE, gone)) is not None


async def test_delete_one_then_a_batch_and_history_keeps_no_text(api: HostedStandIn, backend: HostedBackend) -> None:
    ids, _ = await backend.add(ALICE, add_request(ALICE, "my old address", "two", "three", "four"), [], "op")
    mark = len(api.requests)

    assert await backend.delete(ALICE, [ids[0]]) == []
    assert writes(api, mark) == [("DELETE", f"/v1/memories/{ids[0]}/")]
    mark = len(api.requests)
    assert await backend.delete(ALICE, [ids[1], ids[2]]) == []
    assert writes(api, mark) == [("DELETE", "/v1/batch/")]
    [batch] = api.requests_to("/v1/batch/")
    assert batch.body == {"memories": [{"memory_id": ids[1]}, {"memory_id": ids[2]}]}

    assert list(stored(api, ALICE)) == [ids[3]]
    assert await backend.get(ALICE, ids[0]) is None
    # The platform keeps the text in its history, as mem0 does; memfleet never gives it out.
    assert any(e["old_memory"] == "my old address" for e in api.history[ids[0]])
    events = await backend.history(ALICE, ids[0])
    assert events is not None and [e.event for e in events] == ["ADD", "DELETE"]
    assert all(e.old_text is None and e.new_text is None for e in events)
    assert "my old address" not in repr(events)
    assert await backend.delete(ALICE, [ids[0]]) == [ids[0]], "already deleted: not found"


async def test_a_memory_that_goes_between_check_and_delete_is_reported(
    api: HostedStandIn, backend: HostedBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids, _ = await backend.add(ALICE, add_request(ALICE, "one", "two"), [], "op")
    batch_delete = backend.client.batch_delete

    async def midnight_first(memories: list[dict[str, Any]]) -> Any:
        api.set_expiration_date(ids[1], day(-1).date().isoformat())  # it expires after the check
        return await batch_delete(memories)

    monkeypatch.setattr(backend.client, "batch_delete", midnight_first)
    assert await backend.delete(ALICE, ids) == [ids[1]]
    assert ids[0] in stored(api, ALICE), "the platform's batch changed nothing"


async def test_a_memory_that_goes_between_check_and_batch_update_stops_the_update(
    api: HostedStandIn, backend: HostedBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids, _ = await backend.add(ALICE, add_request(ALICE, "one", "two", "three"), [], "op")
    batch_update = backend.client.batch_update

    async def midnight_first(memories: list[dict[str, Any]]) -> Any:
        api.set_expiration_date(ids[1], day(-1).date().isoformat())
        return await batch_update(memories)

    monkeypatch.setattr(backend.client, "batch_update", midnight_first)
    mark = len(api.requests)
    changes = [MemoryChange(memory_id=ids[0], text="uno"), MemoryChange(memory_id=ids[1], text="dos"),
               MemoryChange(memory_id=ids[2], expires_at=day(3).isoformat())]
    assert await backend.update(ALICE, changes) == [ids[1]]
    assert writes(api, mark) == [("PUT", "/v1/batch/")], "the single change after the batch was not sent"
    now = stored(api, ALICE)
    assert [now[i]["memory"] for i in ids] == ["one", "two", "three"] and now[ids[2]]["expiration_date"] is None


async def test_lifecycle_errors_map_like_the_others_and_quote_nothing(
    api: HostedStandIn, backend: HostedBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    [mid], _ = await backend.add(ALICE, add_request(ALICE, "hello"), [], "op")
    api.fail_next(1, 503)
    with pytest.raises(BackendUnavailable, match="503"):
        await backend.get(ALICE, mid)
    api.fail_next(1, 429, retry_after=4)
    with pytest.raises(BackendUnavailable) as unavailable:
        await backend.history(ALICE, mid)
    assert unavailable.value.retry_after == 4.0

    # The check passes, then the change itself is refused; the refusal's body quotes the new text.
    update = backend.client.update

    async def refused(memory_id: str, **fields: Any) -> Any:
        api.fail_next(1, 400)
        return await update(memory_id, **fields)

    monkeypatch.setattr(backend.client, "update", refused)
    with pytest.raises(BackendRejected) as rejected:
        await backend.update(ALICE, [MemoryChange(memory_id=mid, text="my secret diary entry")])
    assert rejected.value.status == 400 and "secret" not in str(rejected.value)
    assert stored(api, ALICE)[mid]["memory"] == "hello"


async def test_export_pages_through_the_users_memories_with_history(api: HostedStandIn, backend: HostedBackend) -> None:
    said = [Message(content="one", name="Al"), Message(role="assistant", content="two"), Message(content="three")]
    request = AddRequest(user_id=ALICE, messages=said, metadata={"topic": "t"},
                         expires_at=(day(9) + timedelta(hours=1)).isoformat())
    ids, _ = await backend.add(ALICE, request, [], "op")
    await backend.add(BOB, add_request(BOB, "bob's"), [], "op")
    assert await backend.update(ALICE, [MemoryChange(memory_id=ids[0], text="uno")]) == []

    pages, cursor = [], None
    while True:
        page = await backend.export(ALICE, 2, cursor)
        pages.append(page.memories)
        if (cursor := page.next_cursor) is None:
            break
        assert cursor == "2"

    exported = [m for page in pages for m in page]
    assert [len(p) for p in pages] == [2, 1]
    assert [(m.id, m.user_id, m.text, m.role, m.name) for m in exported] == [
        (ids[0], ALICE, "uno", "user", "Al"), (ids[1], ALICE, "two", "assistant", None),
        (ids[2], ALICE, "three", "user", None)]
    assert all(m.metadata == {"topic": "t"} and m.expires_at == day(10).isoformat() and m.created_at for m in exported)
    assert [(e.event, e.old_text, e.new_text) for e in exported[0].history] == [
        ("ADD", None, "one"), ("UPDATE", "one", "uno")]
    assert [e.event for e in exported[1].history] == ["ADD"]
    history_paths = {r.path for r in api.requests if r.path.endswith("/history/")}
    assert history_paths == {f"/v1/memories/{i}/history/" for i in ids}, "no history asked for of another user"
    pages_asked = [r.query for r in api.requests_to("/v3/memories/")]
    assert pages_asked == [{"page": [p], "page_size": ["2"]} for p in ("1", "2")]


async def test_export_leaves_out_a_foreign_record_and_asks_nothing_about_it(
    api: HostedStandIn, backend: HostedBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    [mine], _ = await backend.add(ALICE, add_request(ALICE, "mine"), [], "op")
    [bobs], _ = await backend.add(BOB, add_request(BOB, "bob's"), [], "op")
    get_all = backend.client.get_all

    async def leaky_get_all(**kwargs: Any) -> Any:
        answer = await get_all(**kwargs)
        answer["results"] += [dict(m) for m in api.user_memories(BOB)]  # the platform's mistake
        return answer

    monkeypatch.setattr(backend.client, "get_all", leaky_get_all)
    page = await backend.export(ALICE, 10, None)
    assert [m.id for m in page.memories] == [mine]
    assert api.requests_to(f"/v1/memories/{bobs}/history/") == []


async def test_restore_gives_new_ids_and_stores_each_memory_once(api: HostedStandIn, backend: HostedBackend) -> None:
    request = AddRequest(user_id=ALICE, messages=[Message(content="I moved to Porto", name="Ana",
                                                          timestamp="2023-05-19T09:00:00+00:00"),
                                                  Message(role="assistant", content="Nice!")],
                         metadata={"topic": "home"}, expires_at=day(30).isoformat())
    await backend.add(ALICE, request, [], "op")
    exported = (await backend.export(ALICE, 10, None)).memories
    await backend.forget(ALICE)

    ids, already = await backend.restore(ALICE, exported)

    assert already == 0 and len(ids) == 2 and not set(ids) & {m.id for m in exported}, "the platform gives new ids"
    restored = sorted((await backend.list(ALICE, 10, None)).memories, key=lambda r: r.text)
    originals = sorted(exported, key=lambda m: m.text)
    assert [(r.text, r.role, r.name, r.metadata, r.expires_at) for r in restored] == [
        (m.text, m.role, m.name, m.metadata, m.expires_at) for m in originals]
    assert all(ORIGIN_KEY not in r.metadata for r in restored)
    # The platform stores where each came from (its exported id) and its original creation time.
    raw = sorted(api.user_memories(ALICE), key=lambda m: m["memory"])
    assert [m["metadata"][ORIGIN_KEY] for m in raw] == [m.id for m in originals]
    assert raw[0]["created_at"].startswith("2023-05-19T09:00:00")

    # Run twice (a retried import, or the same file again): nothing is stored again, even after an
    # update that replaced a restored memory's metadata.
    assert await backend.update(ALICE, [MemoryChange(memory_id=ids[0], metadata={"edited": True})]) == []
    assert await backend.restore(ALICE, exported) == ([], 2)
    assert len(api.user_memories(ALICE)) == 2
    # Bob importing the same file gets memories of his own: the check is per user.
    bobs = [ExportedMemory.model_validate({**m.model_dump(), "user_id": BOB}) for m in exported]
    assert len((await backend.restore(BOB, bobs))[0]) == 2


async def test_restore_skips_a_memory_whose_expiry_has_passed(api: HostedStandIn, backend: HostedBackend) -> None:
    exported = [ExportedMemory(user_id=ALICE, id=str(uuid.uuid4()), text="old news", expires_at=day(-1).isoformat()),
                ExportedMemory(user_id=ALICE, id=str(uuid.uuid4()), text="still news", expires_at=day(1).isoformat())]
    ids, already = await backend.restore(ALICE, exported)
    assert (len(ids), already) == (1, 0)
    assert [m["memory"] for m in api.user_memories(ALICE)] == ["still news"]
    [add] = api.requests_to("/v3/memories/add/")
    assert "timestamp" not in add.body and add.body["expiration_date"] == day(0).date().isoformat()


async def test_owners_reports_the_user_of_each_id(backend: HostedBackend) -> None:
    [a], _ = await backend.add(ALICE, add_request(ALICE, "a"), [], "op")
    [b], _ = await backend.add(BOB, add_request(BOB, "b"), [], "op")
    unknown = str(uuid.uuid4())
    assert await backend.owners([a, b, unknown]) == {a: [ALICE], b: [BOB]}
