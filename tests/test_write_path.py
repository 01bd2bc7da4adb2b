"""The batched write path stores exactly what mem0's own `add(infer=False)` stores."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from tests.support import add_request, uid
from workers.backends.embedded import EmbeddedBackend

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
