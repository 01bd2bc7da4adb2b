"""The batched write path stores exactly what mem0's own `add(infer=False)` stores, and the
concurrent search finds exactly what mem0's own search finds."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from producer.ingest import read_messages
from tests.support import add_request, locomo_file, uid
from workers.backends.embedded import EmbeddedBackend, _record

VOLATILE = {"created_at", "updated_at"}


def _history(data_dir: Path, memory_id: str) -> list[dict[str, Any]]:
    with sqlite3.connect(data_dir / "history.db") as db:
        db.row_factory = sqlite3.Row
        rows = db.execute("SELECT * FROM history WHERE memory_id = ?", (memory_id,)).fetchall()
    return [dict(r) for r in rows]


async def test_batched_records_match_mem0s_own(backend: EmbeddedBackend, data_dir: Path) -> None:
    ours, theirs = uid("ours"), uid("mem0")
    text = "I moved to Porto in 2021 and I teach chemistry"
    metadata = {"session": 3, "source": "chat"}
    request = add_request(user_id=ours, messages=[{"content": text, "name": "Ana"}], metadata=metadata)
    (our_id,), _ = await backend.add(ours, request, request.idempotency_keys())
    mem0_result = await backend.memory.add([{"role": "user", "content": text, "name": "Ana"}],
                                           user_id=theirs, metadata=metadata, infer=False)
    (their_id,) = [r["id"] for r in mem0_result["results"]]

    # The stored payloads: same fields, same values but for the scope and the clock.
    our_row = backend.memory.vector_store.get(our_id)
    their_row = backend.memory.vector_store.get(their_id)
    assert set(our_row.payload) == set(their_row.payload)
    for key in set(our_row.payload) - VOLATILE - {"user_id"}:
        assert our_row.payload[key] == their_row.payload[key], key
    assert our_row.payload["user_id"] == ours

    # The history rows, likewise.
    (our_history,) = _history(data_dir, our_id)
    (their_history,) = _history(data_dir, their_id)
    for key in ("old_memory", "new_memory", "event", "is_deleted", "actor_id", "role"):
        assert our_history[key] == their_history[key], key

    # mem0's own reads treat both alike.
    for user, mid in ((ours, our_id), (theirs, their_id)):
        found = await backend.memory.search("where do I live and work?", filters={"user_id": user})
        assert [r["id"] for r in found["results"]] == [mid]
        listed = await backend.memory.get_all(filters={"user_id": user})
        (item,) = listed["results"]
        assert (item["id"], item["memory"], item["actor_id"], item["metadata"]) == (mid, text, "Ana", metadata)

    # ... and mem0's delete_all removes ours as it removes its own.
    for user in (ours, theirs):
        await backend.memory.delete_all(user_id=user)
        assert (await backend.memory.get_all(filters={"user_id": user}))["results"] == []


async def test_search_finds_what_mem0s_search_finds(backend: EmbeddedBackend) -> None:
    """memfleet runs mem0's search steps concurrently (workers.backends.hybrid_search): same hits,
    same order, same scores as `AsyncMemory.search`, with and without filters."""
    user = uid("hybrid")
    conversation = json.loads(locomo_file().read_text(encoding="utf-8"))
    turns = [e.message.content for e in read_messages([locomo_file()], "locomo")][:90]
    for part in range(3):
        request = add_request(user_id=user, metadata={"part": part},
                              messages=[{"content": t} for t in turns[part * 30 : (part + 1) * 30]])
        await backend.add(user, request, request.idempotency_keys())
    questions = [qa["question"] for qa in conversation["qa"][:8]]
    # Words of stored turns, so that mem0's keyword query (all words must match) finds some too.
    echoes = [" ".join(t.split()[:3]) for t in turns[::15]]
    store = backend.memory.vector_store
    assert any(store.keyword_search(query=q, top_k=60, filters={"user_id": user}) for q in echoes)

    compared = 0
    for filters in ({}, {"part": 1}, {"OR": [{"part": 0}, {"part": 2}]}, {"part": {"gte": 1}}):
        for query in questions + echoes:
            ours = await backend.search(user, query, 10, filters)
            found = await backend.memory.search(query, top_k=10, filters={**filters, "user_id": user})
            theirs = [_record(r["id"], {**r, **(r.get("metadata") or {}), "data": r["memory"]}, r["score"])
                      for r in found["results"]]
            assert [r.id for r in ours] == [r.id for r in theirs], (filters, query)
            assert [r.score for r in ours] == pytest.approx([r.score for r in theirs], abs=1e-6)
            assert [r.model_dump(exclude={"score"}) for r in ours] == [r.model_dump(exclude={"score"}) for r in theirs]
            compared += len(ours)
    assert compared > 200  # the searches found things to compare
