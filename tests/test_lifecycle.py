"""One memory's life through the queue: get, update, delete, history, expiry, export and import.

Writes go through the user's write log like adds; reads through the interactive queue. An id of
another user answers exactly as an unknown one. What is deleted, expired or forgotten leaves no
text in the database (pg_dump), and an export restored after a forget gives back the same memories.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from producer.client import Memfleet
from producer.errors import InvalidRequest, MemoryNotFound
from tests.support import eventually, pg_dump, uid
from workers.backends.embedded import EmbeddedBackend
from workers.backends.pg_schema import POSTINGS, TABLE


def canary(tag: str) -> str:
    """A word nothing else in the database holds, to look for in a dump."""
    return f"{tag}{uuid.uuid4().hex[:10]}"


async def _add(fleet: Memfleet, user: str, texts: list[Any], **kwargs: Any) -> list[str]:
    outcome = await (await fleet.add(user, texts, **kwargs)).outcome()
    assert outcome.stored == len(texts)
    return outcome.memory_ids


def _dump(backend: EmbeddedBackend) -> str:
    return pg_dump(str(backend.pool.conninfo))


def _row(backend: EmbeddedBackend, user: str, memory_id: str) -> tuple[Any, ...] | None:
    with backend.pool.connection() as conn:
        return conn.execute(f"SELECT keyword_count, context_of FROM {TABLE} WHERE user_id = %s AND id = %s",
                            (user, memory_id)).fetchone()


def _terms(backend: EmbeddedBackend, user: str, memory_id: str) -> set[str]:
    with backend.pool.connection() as conn:
        rows = conn.execute(f"SELECT term FROM {POSTINGS} WHERE user_id = %s AND memory_id = %s",
                            (user, memory_id)).fetchall()
    return {r[0] for r in rows}


async def test_get_answers_an_unknown_id_and_another_users_id_alike(fleet: Memfleet) -> None:
    alice, bob = uid("alice"), uid("bob")
    (mine,) = await _add(fleet, alice, ["I keep bees on the roof"], metadata={"topic": "hobby"})
    record = await fleet.get(alice, mine)
    assert (record.id, record.user_id, record.text, record.metadata) == (mine, alice, "I keep bees on the roof",
                                                                           {"topic": "hobby"})
    assert record.created_at and record.updated_at and record.expires_at is None

    answers = []
    for memory_id in (mine, str(uuid.uuid4())):
        with pytest.raises(MemoryNotFound) as caught:
            await fleet.get(bob, memory_id)
        answers.append(str(caught.value).replace(memory_id, "<id>"))
    assert answers[0] == answers[1]  # nothing tells another user's memory from no memory
    with pytest.raises(InvalidRequest, match="memory_id"):
        await fleet.get(alice, "not-an-id")


async def test_update_reindexes_the_text_and_records_history(fleet: Memfleet, backend: EmbeddedBackend) -> None:
    user = uid("upd")
    old, new = canary("oldword"), canary("newword")
    question, answer = await _add(fleet, user, [f"where did you keep the {old}?", "In the blue box by the door."])
    (_, context_of), (answer_length, _) = _row(backend, user, question), _row(backend, user, answer)  # type: ignore[misc]
    assert uuid.UUID(answer) in context_of  # the answer is indexed after the question's line

    outcome = await (await fleet.update(user, question, text=f"where did you keep the {new} and the {new}s?",
                                        metadata={"checked": True})).outcome()
    assert (outcome.kind, outcome.updated, outcome.not_found) == ("update", 1, [])
    record = await fleet.get(user, question)
    assert new in record.text and record.metadata == {"checked": True} and record.updated_at != record.created_at

    # Its old words stop matching, its new ones match, for itself and as its follower's context.
    assert old.lower() not in _terms(backend, user, question)
    assert new.lower() in _terms(backend, user, question)
    found = await fleet.search(user, new, limit=2)
    assert found[0].id == question
    (answer_length_now, _) = _row(backend, user, answer)  # type: ignore[misc]
    assert answer_length_now > answer_length  # the longer line it is indexed after counts in its length

    history = await fleet.history(user, question)
    assert [e.event for e in history] == ["ADD", "UPDATE"]
    assert old in (history[1].old_text or "") and new in (history[1].new_text or "")
    assert all(e.at for e in history)


async def test_delete_leaves_no_text_behind(fleet: Memfleet, backend: EmbeddedBackend) -> None:
    user = uid("del")
    secret = canary("secret")
    first, doomed, last = await _add(fleet, user, ["The plan for Saturday is set.", f"The code word is {secret}.",
                                                   "Remember to bring the map."])
    await (await fleet.update(user, doomed, text=f"The code word is {secret}, still.")).outcome()
    assert secret in _dump(backend)  # the check can see text that is there
    first_row = _row(backend, user, first)
    assert first_row is not None and uuid.UUID(doomed) in first_row[1]
    last_before = _row(backend, user, last)

    outcome = await (await fleet.delete(user, doomed)).outcome()
    assert (outcome.kind, outcome.deleted) == ("delete", 1)
    with pytest.raises(MemoryNotFound):
        await fleet.get(user, doomed)
    assert [r.id for r in (await fleet.list(user)).memories] == sorted([first, last])
    assert doomed not in {r.id for r in await fleet.search(user, f"code word {secret}")}

    # Its postings, its place in its neighbours' index, and every text of its history are gone.
    assert _terms(backend, user, doomed) == set()
    first_after, last_after = _row(backend, user, first), _row(backend, user, last)
    assert first_after is not None and uuid.UUID(doomed) not in first_after[1]
    assert last_before is not None and last_after is not None and last_after[0] < last_before[0]
    events = await fleet.history(user, doomed)
    assert [e.event for e in events] == ["ADD", "UPDATE", "DELETE"]
    assert all(e.old_text is None and e.new_text is None for e in events)
    assert secret not in _dump(backend)

    with pytest.raises(MemoryNotFound):  # deleted twice: the second finds nothing
        await (await fleet.delete(user, doomed)).outcome()


async def test_batches_apply_all_or_nothing_and_another_users_id_is_not_found(fleet: Memfleet) -> None:
    alice, bob = uid("alice"), uid("bob")
    a1, a2 = await _add(fleet, alice, ["alpha note", "beta note"])
    (b1,) = await _add(fleet, bob, ["bob's own note"])

    for handle in (await fleet.delete_many(alice, [a1, b1]),
                   await fleet.update_many(alice, [{"memory_id": a1, "text": "changed"},
                                                   {"memory_id": b1, "text": "stolen"}])):
        with pytest.raises(MemoryNotFound) as caught:
            await handle.outcome()
        assert caught.value.memory_ids == [b1]
    assert sorted(r.text for r in (await fleet.list(alice)).memories) == ["alpha note", "beta note"]
    assert [r.text for r in (await fleet.list(bob)).memories] == ["bob's own note"]

    await (await fleet.update_many(alice, [{"memory_id": a1, "text": "alpha changed"},
                                           {"memory_id": a2, "metadata": {"n": 2}}])).outcome()
    assert {r.text: r.metadata for r in (await fleet.list(alice)).memories} == {"alpha changed": {},
                                                                                  "beta note": {"n": 2}}
    assert (await (await fleet.delete_many(alice, [a1, a2])).outcome()).deleted == 2
    assert (await fleet.list(alice)).memories == []
    with pytest.raises(InvalidRequest, match="more than once"):
        await fleet.delete_many(alice, [b1, b1])
    with pytest.raises(InvalidRequest, match="at least one"):
        await fleet.update(alice, b1)


async def test_writes_of_a_user_apply_in_order(fleet: Memfleet) -> None:
    """Update and delete are writes in the user's log: queued after an add, they find its memory."""
    user = uid("order")
    add = await fleet.add(user, [{"content": "first version", "id": "m-1"}])
    (outcome,) = await fleet.wait([add])
    memory_id = outcome.memory_ids[0]
    handles = [await fleet.update(user, memory_id, text=f"version {n}") for n in range(2, 6)]
    handles.append(await fleet.delete(user, memory_id))
    outcomes = await fleet.wait(handles)
    assert [o.kind for o in outcomes] == ["update"] * 4 + ["delete"]
    assert [e.event for e in await fleet.history(user, memory_id)] == ["ADD", *["UPDATE"] * 4, "DELETE"]


async def test_expired_memories_vanish_then_are_swept(fleet: Memfleet, backend: EmbeddedBackend) -> None:
    user = uid("exp")
    secret = canary("fleeting")
    soon = datetime.now(UTC) + timedelta(seconds=3)
    (brief,) = await _add(fleet, user, [f"the door code is {secret}"], expires_at=soon)
    (lasting,) = await _add(fleet, user, ["the wifi name is lasting"])
    record = await fleet.get(user, brief)
    assert record.expires_at is not None and datetime.fromisoformat(record.expires_at) == soon

    async def gone_from_reads() -> bool:
        listed = [r.id for r in (await fleet.list(user)).memories]
        return listed == [lasting]

    await eventually(gone_from_reads, 30, "the expired memory to leave list")
    with pytest.raises(MemoryNotFound):
        await fleet.get(user, brief)
    assert brief not in {r.id for r in await fleet.search(user, f"door code {secret}")}
    assert [m.id async for m in fleet.export(user)] == [lasting]
    await eventually(lambda: _row(backend, user, brief) is None, 60, "the sweeper to delete the expired memory")
    assert secret not in _dump(backend)

    with pytest.raises(InvalidRequest, match="already in the past"):
        await fleet.add(user, ["too late"], expires_at=datetime.now(UTC) - timedelta(minutes=1))


async def test_an_expiry_is_set_changed_and_cleared_by_update(fleet: Memfleet) -> None:
    user = uid("exp")
    (memory_id,) = await _add(fleet, user, ["a note to keep a while"])
    later = (datetime.now(UTC) + timedelta(days=2)).replace(microsecond=0)
    await (await fleet.update(user, memory_id, expires_at=later.isoformat())).outcome()
    assert (await fleet.get(user, memory_id)).expires_at == later.isoformat()
    await (await fleet.update(user, memory_id, clear_expiry=True)).outcome()
    assert (await fleet.get(user, memory_id)).expires_at is None
    with pytest.raises(InvalidRequest, match="already in the past"):
        await fleet.update(user, memory_id, expires_at="2001-01-01T00:00:00")
    with pytest.raises(InvalidRequest, match="not both"):
        await fleet.update(user, memory_id, expires_at=later, clear_expiry=True)


async def test_export_forget_import_gives_back_the_same_memories(fleet: Memfleet, backend: EmbeddedBackend) -> None:
    user = uid("port")
    said = [
        {"content": "What instrument did you pick up this spring?", "name": "Mia", "timestamp": "2023-05-01T10:00:00"},
        {"content": "The cello, and I practise every evening.", "name": "Noor", "timestamp": "2023-05-01T10:01:00"},
        {"content": "Which city are you moving to?", "name": "Mia", "timestamp": "2023-05-02T09:00:00"},
        {"content": "Lisbon, in August, for the new job.", "name": "Noor", "timestamp": "2023-05-02T09:01:00"},
    ]
    ids = await _add(fleet, user, said, metadata={"session": 1})
    await (await fleet.update(user, ids[1], text="The cello, and I practise every single evening.")).outcome()
    await (await fleet.add(user, ["a short-lived reminder"],
                           expires_at=datetime.now(UTC) + timedelta(days=1))).outcome()
    questions = ["what instrument does Noor play", "where is Noor moving", "reminder"]
    before = {q: [(r.id, r.text) for r in await fleet.search(user, q, limit=3)] for q in questions}
    lengths_before = {i: _row(backend, user, i) for i in ids}
    exported = [m async for m in fleet.export(user, page_size=2)]  # pages of two: the cursor is followed
    assert len(exported) == 5 and {m.user_id for m in exported} == {user}
    assert [e.event for m in exported if m.id == ids[1] for e in m.history] == ["ADD", "UPDATE"]

    await (await fleet.forget(user)).outcome()
    assert (await fleet.list(user)).memories == []

    outcomes = await fleet.wait([await fleet.restore(user, exported[:3]), await fleet.restore(user, exported[3:])])
    assert sum(o.stored for o in outcomes) == 5
    again = await (await fleet.restore(user, exported)).outcome()  # imported twice: stored once
    assert (again.stored, again.duplicates) == (0, 5)

    assert [m async for m in fleet.export(user, page_size=2)] == exported
    after = {q: [(r.id, r.text) for r in await fleet.search(user, q, limit=3)] for q in questions}
    assert after == before
    assert {i: _row(backend, user, i) for i in ids} == lengths_before  # ranked by the same index


async def test_a_restore_names_its_user_on_every_memory(fleet: Memfleet) -> None:
    alice, bob = uid("alice"), uid("bob")
    await _add(fleet, alice, ["alice's diary entry"])
    exported = [m async for m in fleet.export(alice)]
    with pytest.raises(InvalidRequest, match="of the user the import is for"):
        await fleet.restore(bob, exported)
    assert (await fleet.list(bob)).memories == []
