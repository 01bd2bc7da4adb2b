"""The contract between memfleet and mem0's insides (`workers.mem0_adapter`): mem0's own code paths,
run against memfleet's tables, and the scope they may touch."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import psycopg
import pytest

from producer.contract import Message
from tests.support import uid
from tests.test_isolation import _tables_containing
from workers import mem0_adapter
from workers.backends import pg_store
from workers.backends.embedded import EmbeddedBackend, import_history, memory_id
from workers.scoped import AsyncScopedMemory


def test_the_adapter_is_for_the_installed_mem0() -> None:
    assert version("mem0ai") == mem0_adapter.MEM0_VERSION


def test_mem0_runs_on_memfleets_store_history_and_embedder(backend: EmbeddedBackend) -> None:
    memory = backend.memory
    assert isinstance(memory.vector_store, mem0_adapter.ScopedVectorStore)
    assert isinstance(memory.db, mem0_adapter.PostgresHistory)
    assert isinstance(memory.embedding_model, mem0_adapter.BatchedEmbedder)


async def test_mem0s_own_add_get_all_history_and_search_go_through_memfleets_tables(backend: EmbeddedBackend) -> None:
    user = uid("mem0")
    memory = backend.memory
    with mem0_adapter.acting(user):
        added = await memory.add([{"role": "user", "content": "I keep two hives of bees", "name": "Ola"}],
                                 user_id=user, infer=False)
        (result,) = added["results"]
        listed = await memory.get_all(filters={"user_id": user})
        history = await memory.history(result["id"])
        found = await memory.search("How many beehives does Ola keep?", filters={"user_id": user})
    assert [m["id"] for m in listed["results"]] == [result["id"]]
    # The ADD row is written with the memory, in one statement; mem0's own write of it is skipped.
    assert [(h["event"], h["new_memory"]) for h in history] == [("ADD", "I keep two hives of bees")]
    assert found["results"][0]["id"] == result["id"]
    with psycopg.connect(str(backend.pool.conninfo)) as conn:
        assert pg_store.count(conn, user) == 1
        postings = conn.execute(f"SELECT count(*) FROM {pg_store.POSTINGS} WHERE user_id = %s", (user,)).fetchone()
        assert postings is not None and postings[0] > 0


async def test_mem0s_update_and_delete_keep_a_memorys_keywords_with_it(backend: EmbeddedBackend) -> None:
    user = uid("mem0-edit")
    memory = backend.memory
    with mem0_adapter.acting(user):
        (added,) = (await memory.add([{"role": "user", "content": "I keep two hives of bees"}], user_id=user,
                                     infer=False))["results"]
        await memory.update(added["id"], "I sold my beehives and bought a kayak")
        found = await memory.search("Who has a kayak?", filters={"user_id": user})
    with psycopg.connect(str(backend.pool.conninfo)) as conn:
        terms = {r[0] for r in conn.execute(f"SELECT term FROM {pg_store.POSTINGS} WHERE user_id = %s", (user,))}
        assert "kayak" in terms and "hive" not in terms  # the old text's terms went with it
        assert found["results"][0]["id"] == added["id"]
        with mem0_adapter.acting(user):
            await memory.delete(added["id"])
        assert pg_store.count(conn, user) == 0
        postings = conn.execute(f"SELECT count(*) FROM {pg_store.POSTINGS} WHERE user_id = %s", (user,)).fetchone()
        assert postings == (0,)


def test_the_store_refuses_any_call_outside_a_scope_or_for_another_user(backend: EmbeddedBackend) -> None:
    store = backend.memory.vector_store
    vector = [0.0] * 384
    with pytest.raises(mem0_adapter.ScopeError):
        store.search("q", vector, filters={"user_id": "alice"})  # no acting(...) around it
    with mem0_adapter.acting("alice"):
        with pytest.raises(mem0_adapter.ScopeError):
            store.search("q", vector, filters={"user_id": "bob"})
        with pytest.raises(mem0_adapter.ScopeError):
            store.insert([vector], [{"user_id": "bob", "data": "x"}], ["00000000-0000-0000-0000-000000000001"])
        with pytest.raises(mem0_adapter.ScopeError):
            store.delete_col()
        with pytest.raises(mem0_adapter.ScopeError):
            backend.memory.db.reset()


def test_session_messages_keep_the_last_ten_per_user(backend: EmbeddedBackend) -> None:
    user, other = uid("talk"), uid("talk")
    history = backend.memory.db
    with mem0_adapter.acting(user):
        for i in range(12):
            history.save_messages([{"role": "user", "content": f"message {i}"}], f"user_id={user}")
        last = history.get_last_messages(f"user_id={user}", limit=10)
    assert [m["content"] for m in last] == [f"message {i}" for i in range(2, 12)]
    with mem0_adapter.acting(other), pytest.raises(mem0_adapter.ScopeError):
        history.get_last_messages(f"user_id={user}")


async def test_an_old_history_db_is_imported_once_without_orphans_and_then_removed(
    backend: EmbeddedBackend, tmp_path: Path
) -> None:
    from mem0.memory.storage import SQLiteManager

    user = uid("upgrade")
    kept, gone = memory_id(user, "id:kept"), memory_id(user, "id:gone")  # ids from idempotency keys
    await AsyncScopedMemory(user, backend).add([Message(content="I moved to Porto", id="kept")])
    path = tmp_path / "history.db"
    old = SQLiteManager(str(path))  # what an older memfleet's workers wrote, through mem0
    old.add_history(kept, None, "I moved to Porto", "ADD")
    old.add_history(kept, "I moved to Porto", "I moved to Porto in 2021", "UPDATE")
    old.add_history(gone, None, "a memory deleted long ago", "ADD")  # its memory no longer exists
    old.save_messages([{"role": "user", "content": "where do I live?"}], f"user_id={user}")
    old.close()

    assert import_history(backend.pool, path) == 2 + 1  # both rows of the kept memory, one message
    assert not path.exists()
    assert import_history(backend.pool, path) == 0
    with mem0_adapter.acting(user):
        events = [(h["event"], h["new_memory"]) for h in backend.memory.db.get_history(kept)]
        messages = backend.memory.db.get_last_messages(f"user_id={user}")
    # The ADD row memfleet wrote with the memory stands; the old file's ADD duplicate is skipped.
    assert events == [("ADD", "I moved to Porto"), ("UPDATE", "I moved to Porto in 2021")]
    assert [m["content"] for m in messages] == ["where do I live?"]
    with psycopg.connect(str(backend.pool.conninfo)) as conn:
        assert _tables_containing(conn, ["a memory deleted long ago"]) == []
