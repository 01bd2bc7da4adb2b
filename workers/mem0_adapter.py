"""Everything memfleet knows about mem0's insides, in one place, checked against the pinned version.

memfleet writes and ranks `infer=False` memories itself (`workers.backends.pg_store`); mem0 does
fact extraction (`infer=True`) with an LLM. For that, mem0's `AsyncMemory` is built here with:
- `ScopedVectorStore` in place of its pgvector store: mem0's add path searches and inserts through
  it, and it writes memfleet's table, scoped to the user the backend is acting for (`acting_for`);
- `BatchedEmbedder` in place of its embedding model: every text goes through the shared batcher;
- `PostgresHistory` in place of its SQLite history and session-message store, so that a worker
  keeps nothing on local disk and a forget reaches every host's data (mem0 has no other history
  backend: mem0 #3098, #3925).
For the hosted backend, `sdk_error_details` reads what the SDK's exceptions carry.
If mem0 moves, the tests in tests/test_mem0_adapter.py say what broke.
"""

from __future__ import annotations

import builtins
import contextlib
import contextvars
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
from psycopg_pool import ConnectionPool

from producer.contract import check_user_id
from workers.backends import pg_lifecycle, pg_store
from workers.backends.indexing import keyword_text, said_in
from workers.embedder import BatchingEmbedder

MEM0_VERSION = "2.2.1"
if version("mem0ai") != MEM0_VERSION:  # pragma: no cover - a deployment with another mem0
    raise ImportError(f"memfleet adapts mem0ai {MEM0_VERSION}; found {version('mem0ai')}: pin it back or re-check "
                      "workers/mem0_adapter.py against the new version")

from mem0 import AsyncMemory  # noqa: E402
from mem0.configs.base import MemoryConfig  # noqa: E402
from mem0.vector_stores.base import VectorStoreBase  # noqa: E402
from mem0.vector_stores.pgvector import OutputData  # noqa: E402

#: the user whose memories mem0 may touch in the current task (None: none)
acting_for: contextvars.ContextVar[str | None] = contextvars.ContextVar("acting_for", default=None)


class ScopeError(RuntimeError):
    """mem0 asked for another user's memories than the one it is acting for (a bug, never data)."""


@contextlib.contextmanager
def acting(user_id: str) -> Iterator[None]:
    """Let mem0 calls in this block (and the threads they start) touch `user_id`'s memories only."""
    token = acting_for.set(check_user_id(user_id))
    try:
        yield
    finally:
        acting_for.reset(token)


def _scope(claimed: object = None) -> str:
    user = acting_for.get()
    if user is None:
        raise ScopeError("mem0 touched the memory store outside of `acting(user_id)`")
    if claimed is not None and claimed != user:
        raise ScopeError("mem0 named another user than the one it acts for")
    return user


class ScopedVectorStore(VectorStoreBase):  # type: ignore[misc]
    """mem0's vector-store interface over memfleet's table, for the user `acting_for` names."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    def insert(self, vectors: list[Any], payloads: list[dict[str, Any]] | None = None,
               ids: list[str] | None = None) -> None:
        user = _scope()
        memories = []
        for vector, payload, mid in zip(vectors, payloads or [], ids or [], strict=True):
            _scope(payload.get("user_id"))
            memories.append(pg_store.NewMemory(mid, np.asarray(vector, dtype=np.float32), payload,
                                               keyword_text(said_in(payload))))
        with self.pool.connection() as conn:
            pg_store.insert(conn, user, memories)

    def search(self, query: str, vectors: Any, top_k: int = 5,
               filters: dict[str, Any] | None = None) -> builtins.list[Any]:
        filters = dict(filters or {})
        user = _scope(filters.pop("user_id", None))
        if filters:
            raise ScopeError(f"mem0 searched with filters memfleet does not route through mem0: {sorted(filters)}")
        with self.pool.connection() as conn:
            rows = pg_store.search(conn, user, query, np.asarray(vectors, dtype=np.float32), top_k, {})
        return [OutputData(id=r.id, score=r.score, payload=r.payload) for r in rows]

    def keyword_search(self, query: str, top_k: int = 5, filters: dict[str, Any] | None = None) -> None:
        return None  # `search` already ranks by keywords too

    def get(self, vector_id: str) -> Any:
        with self.pool.connection() as conn:
            payload = pg_store.payload_of(conn, _scope(), vector_id)
        return OutputData(id=vector_id, score=None, payload=payload) if payload is not None else None

    def list(
        self, filters: dict[str, Any] | None = None, top_k: int | None = None
    ) -> builtins.list[builtins.list[Any]]:
        user = _scope((filters or {}).get("user_id"))
        with self.pool.connection() as conn:
            rows = pg_store.page(conn, user, top_k or 100, None)
        return [[OutputData(id=r.id, score=None, payload=r.payload) for r in rows]]

    def delete(self, vector_id: str) -> None:
        with self.pool.connection() as conn, conn.transaction():
            pg_lifecycle.remove(conn, _scope(), [vector_id])

    def update(self, vector_id: str, vector: Any = None, payload: dict[str, Any] | None = None) -> None:
        user = _scope((payload or {}).get("user_id"))
        with self.pool.connection() as conn:
            if payload is None:  # mem0 changes a memory's payload with its vector; a vector alone keeps it
                payload = pg_store.payload_of(conn, user, vector_id)
                if payload is None:
                    return
            change = pg_lifecycle.Change(vector_id, payload, None if vector is None else np.asarray(vector, np.float32),
                                         keyword_text(said_in(payload)))
            # mem0 writes the UPDATE history event itself, through `PostgresHistory`.
            pg_lifecycle.update(conn, user, [change], record_history=False)

    # The table is shared by every user and made by `pg_store.ensure_schema`: mem0 never makes,
    # drops or resets it.
    def create_col(self, name: str, vector_size: int, distance: str) -> None:
        return None

    def list_cols(self) -> builtins.list[str]:
        return [pg_store.TABLE]

    def col_info(self) -> dict[str, Any]:
        return {"name": pg_store.TABLE}

    def delete_col(self) -> None:
        raise ScopeError("mem0 may not drop the memory table that every user shares")

    def reset(self) -> None:
        raise ScopeError("mem0 may not reset the memory table that every user shares")


class BatchedEmbedder:
    """Looks like a mem0 embedder (`embed`, `embed_batch`), answers from the shared batcher."""

    def __init__(self, batcher: BatchingEmbedder, original: object) -> None:
        self.batcher = batcher
        self.config = getattr(original, "config", None)  # mem0 reads attributes such as `config`

    def embed(self, text: str, memory_action: str | None = None) -> list[float]:
        return self.batcher.embed_from_thread([text], query=memory_action == "search")[0]

    def embed_batch(self, texts: list[str], memory_action: str | None = None) -> list[list[float]]:
        return self.batcher.embed_from_thread(texts, query=memory_action == "search")


class PostgresHistory:
    """mem0's history and session-message store (its `SQLiteManager` interface) over memfleet's tables,
    for the user `acting_for` names."""

    #: messages mem0 keeps per session scope (SQLiteManager keeps 10)
    KEEP_MESSAGES = 10

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    def add_history(self, memory_id: str, old_memory: str | None, new_memory: str | None, event: str, *,
                    created_at: str | None = None, updated_at: str | None = None, is_deleted: int = 0,
                    actor_id: str | None = None, role: str | None = None) -> None:
        self.batch_add_history([{"memory_id": memory_id, "old_memory": old_memory, "new_memory": new_memory,
                                 "event": event, "created_at": created_at, "updated_at": updated_at,
                                 "is_deleted": is_deleted, "actor_id": actor_id, "role": role}])

    def batch_add_history(self, records: builtins.list[dict[str, Any]]) -> None:
        with self.pool.connection() as conn:
            pg_store.add_history(conn, _scope(), records)

    def get_history(self, memory_id: str) -> builtins.list[dict[str, Any]]:
        with self.pool.connection() as conn:
            return pg_store.history(conn, _scope(), memory_id)

    def save_messages(self, messages: builtins.list[dict[str, Any]], session_scope: str) -> None:
        if messages:
            with self.pool.connection() as conn:
                pg_store.save_messages(conn, _scope(session_user(session_scope)), session_scope, messages,
                                       self.KEEP_MESSAGES, datetime.now(UTC).isoformat())

    def get_last_messages(self, session_scope: str, limit: int = 10) -> builtins.list[dict[str, Any]]:
        with self.pool.connection() as conn:
            return pg_store.last_messages(conn, _scope(session_user(session_scope)), session_scope, limit)

    def reset(self) -> None:
        raise ScopeError("mem0 may not drop the history that every user shares")

    def close(self) -> None:
        return None  # the pool is the backend's


def session_user(session_scope: str) -> str | None:
    """The user of mem0's session scope (`_build_session_scope`: `user_id=<id>` first, `&` between parts)."""
    first = session_scope.split("&", 1)[0]
    return first.removeprefix("user_id=") if first.startswith("user_id=") else None


def build_memory(pool: ConnectionPool, model_dir: Path, dims: int, llm: dict[str, Any]) -> Any:
    """mem0's AsyncMemory on memfleet's tables; its embedder is swapped by `use_batcher`."""
    config = MemoryConfig(
        # mem0 builds its pgvector store from this; `ScopedVectorStore` replaces it before any use.
        vector_store={"provider": "pgvector",
                      "config": {"collection_name": pg_store.TABLE, "embedding_model_dims": dims,
                                 "connection_pool": pool, "hnsw": False, "diskann": False}},
        embedder={"provider": "huggingface",
                  "config": {"model": str(model_dir), "embedding_dims": dims,
                             "model_kwargs": {"device": "cpu", "local_files_only": True}}},
        llm={"provider": "openai", "config": llm},
        history_db_path=":memory:",  # no file: `PostgresHistory` replaces it before any use
    )
    memory = AsyncMemory(config)
    # mem0's PGVector closes the pool it was given when it is garbage-collected: detach it first.
    memory.vector_store.connection_pool = None
    memory.vector_store = ScopedVectorStore(pool)
    memory.db.close()
    memory.db = PostgresHistory(pool)
    return memory


def sentence_model(memory: Any) -> Any:
    """The SentenceTransformer mem0 loaded (its huggingface embedder's `model`)."""
    return memory.embedding_model.model


def use_batcher(memory: Any, batcher: BatchingEmbedder) -> None:
    memory.embedding_model = BatchedEmbedder(batcher, memory.embedding_model)


def sqlite_history(path: Path) -> tuple[builtins.list[dict[str, Any]], builtins.list[dict[str, Any]]]:
    """The history and messages rows of a `history.db` that mem0's SQLiteManager wrote."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(path)) as db:
        db.row_factory = sqlite3.Row
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        history = [dict(r) for r in db.execute("SELECT * FROM history")] if "history" in tables else []
        messages = [dict(r) for r in db.execute("SELECT * FROM messages")] if "messages" in tables else []
    return history, messages


def sdk_error_details(exc: BaseException) -> tuple[BaseException | None, dict[str, Any]]:
    """What caused an error of mem0's platform SDK, and the `debug_info` it attached.

    The SDK's `api_error_handler` raises its own exceptions inside `except httpx...:`, so the
    original httpx error (with the response and its headers) is their implicit `__context__`.
    """
    import httpx

    cause = exc if isinstance(exc, httpx.HTTPError) else exc.__context__
    return cause, dict(getattr(exc, "debug_info", None) or {})
