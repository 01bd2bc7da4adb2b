"""The embedded backend: memfleet's memory table in PostgreSQL + pgvector, MiniLM on the CPU.

Writes (`infer=False`) and every read go straight to the table (`workers.backends.pg_store`):
each message is stored as written and indexed in context (`workers.backends.indexing`), with an
id derived from its idempotency key (`workers.backends.memories`), so a retried job stores
nothing twice. With an LLM configured, `infer=True` writes store the facts the LLM extracts, once
per write (`workers.backends.inference`). What an older memfleet left in mem0's own table and
history file is moved into memfleet's at start-up (`workers.backends.migrations`).
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import numpy as np
import psycopg
import structlog
from psycopg_pool import ConnectionPool

from producer.contract import (
    AddRequest,
    ExportedMemory,
    ExportPage,
    HistoryEvent,
    MemoryChange,
    MemoryPage,
    MemoryRecord,
)
from workers.backends import extraction, migrations, pg_lifecycle, pg_search, pg_store
from workers.backends.base import Fence, FencedOut, ForgetIncomplete
from workers.backends.indexing import Said, dense_text, in_context, keyword_line
from workers.backends.inference import Inference
from workers.backends.memories import (
    changed,
    exported,
    memory_id,
    message_payload,
    page_cursor,
    record,
    restored_payload,
    said_of,
)
from workers.backends.pg_pool import open_pool, run_blocking
from workers.backends.pg_server import prepare_database, start_embedded_postgres
from workers.backends.search_cache import SearchCache
from workers.embedder import BatchingEmbedder
from workers.encoders import build_encoders
from workers.llm import ExtractionLLM
from workers.model import load_model
from workers.settings import WorkerConfig
from workers.supervision import supervise

log = structlog.get_logger("memfleet.backend")
T = TypeVar("T")

SWEEP_BATCH = 500  # expired memories deleted per transaction


@dataclass
class EmbeddedBackend:
    pool: ConnectionPool
    embedder: BatchingEmbedder
    can_infer: bool
    name: str = "embedded"
    reindexing: asyncio.Task[None] | None = field(default=None, repr=False)
    inference: Inference | None = field(default=None, repr=False)  # with an LLM configured
    search_cache: SearchCache | None = field(default=None, repr=False)  # large users' indexes in memory
    search_indexing: asyncio.Task[None] | None = field(default=None, repr=False)  # its reader
    # A seam for fault tests: called in the writing thread with the user id, once the connection is
    # taken and before anything of the write is sent (tests/test_fencing.py pauses a write there).
    before_write: Callable[[str], None] | None = field(default=None, repr=False)

    @classmethod
    async def start(cls, config: WorkerConfig) -> EmbeddedBackend:
        pg_url = config.pg_url
        if pg_url is None:
            pg_url = await asyncio.to_thread(start_embedded_postgres, config.data_dir)
        await asyncio.to_thread(prepare_database, pg_url)
        pool = await open_pool(pg_url, config)
        await asyncio.to_thread(migrations.import_history, pool, config.data_dir / "history.db")
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
        # A helper (workers.supervision): if the move fails, it is logged and started again; moved
        # batches are gone from the old table, so it goes on where it stopped.
        backend.reindexing = supervise("reindex", backend.reindex)
        if config.search_index_mb:
            backend.search_cache = SearchCache(pool, min_memories=config.search_index_min_memories,
                                               max_bytes=config.search_index_mb * 2**20, idle=config.search_index_idle)
            backend.search_indexing = supervise("search-index", backend.search_cache.run)
        return backend

    async def close(self) -> None:
        for task in (self.reindexing, self.search_indexing):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
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
        existing = await run_blocking(self._existing_ids, user_id, ids)
        memories = await self._as_said(user_id, request, keys, existing)
        if memories:
            await run_blocking(self._write, fence, user_id, pg_store.insert, memories)
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
        indexed = in_context([said_of(m) for m in request.messages])
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
        deleted = int(await run_blocking(self._write, fence, user_id, _delete_user))
        if self.search_cache is not None:
            self.search_cache.evict(user_id)
        remaining = await run_blocking(self._remaining, user_id)
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
        found = await run_blocking(self._in_store, pg_lifecycle.visible, user_id, ids)
        if missing := [i for i in ids if i not in found]:
            return missing
        now = datetime.now(UTC).isoformat()
        planned = [changed(found[c.memory_id].row.payload, c, now) for c in changes]
        dense = [(i, text) for i, (_, text, _) in enumerate(planned) if text is not None]
        vectors = await self.embedder.embed([text for _, text in dense]) if dense else []
        vector_of = {i: np.asarray(v, dtype=np.float32) for (i, _), v in zip(dense, vectors, strict=True)}
        pg_changes = [
            pg_lifecycle.Change(c.memory_id, payload, vector_of.get(i), keywords,
                                expiry_changed=c.clear_expiry or c.expires_at is not None, expires_at=c.expires_at)
            for i, (c, (payload, _, keywords)) in enumerate(zip(changes, planned, strict=True))
        ]
        # Checked again under lock in the transaction: the rows may have expired meanwhile.
        return list(await run_blocking(self._write, fence, user_id, pg_lifecycle.update, pg_changes))

    async def delete(self, user_id: str, memory_ids: builtins.list[str], *,
                     fence: Fence | None = None) -> builtins.list[str]:
        return list(await run_blocking(self._write, fence, user_id, pg_lifecycle.delete, memory_ids))

    async def get(self, user_id: str, memory_id: str) -> MemoryRecord | None:
        row = await run_blocking(self._in_store, pg_lifecycle.get, user_id, memory_id)
        return None if row is None else record(user_id, row)

    async def history(self, user_id: str, memory_id: str) -> builtins.list[HistoryEvent] | None:
        events = (await run_blocking(self._in_store, pg_lifecycle.histories, user_id, [memory_id])).get(memory_id)
        return None if not events else [HistoryEvent.model_validate(e) for e in events]

    async def export(self, user_id: str, limit: int, cursor: str | None) -> ExportPage:
        rows, histories = await run_blocking(self._export_page, user_id, limit + 1, page_cursor(cursor))
        memories = [exported(user_id, stored, histories.get(stored.row.id, [])) for stored in rows[:limit]]
        return ExportPage(memories=memories, next_cursor=memories[-1].id if len(rows) > limit else None)

    def _export_page(self, user_id: str, limit: int, after: str | None) -> tuple[
            builtins.list[pg_lifecycle.Stored], dict[str, builtins.list[dict[str, Any]]]]:
        with self.pool.connection() as conn:
            rows = pg_lifecycle.page(conn, user_id, limit, after)
            return rows, pg_lifecycle.histories(conn, user_id, [r.row.id for r in rows])

    async def restore(self, user_id: str, memories: builtins.list[ExportedMemory], *,
                      fence: Fence | None = None) -> tuple[builtins.list[str], int]:
        existing = await run_blocking(self._existing_ids, user_id, [m.id for m in memories])
        fresh = [m for m in memories if m.id not in existing]
        if not fresh:
            return [], len(memories)
        said = [Said(m.text, m.name, m.timestamp) for m in fresh]
        vectors = np.asarray(await self.embedder.embed([dense_text(s) for s in said]), dtype=np.float32)
        rows = [pg_store.NewMemory(m.id, vector, restored_payload(user_id, m), keyword_line(s),
                                   context_of=tuple(m.context_for), expires_at=m.expires_at)
                for m, s, vector in zip(fresh, said, vectors, strict=True)]
        history = [{"id": e.id, "memory_id": m.id, "event": e.event, "old": e.old_text, "new": e.new_text,
                    "at": e.at} for m in fresh for e in m.history]
        stored = await run_blocking(self._write, fence, user_id, pg_lifecycle.restore, rows, history)
        return list(stored), len(memories) - len(stored)

    async def owners(self, memory_ids: builtins.list[str]) -> dict[str, builtins.list[str]]:
        return dict(await run_blocking(self._in_store, pg_lifecycle.owners, memory_ids))

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
        return await run_blocking(self._in_store, fn, *args)

    async def _fenced(self, fence: Fence | None, user_id: str, fn: Any, *args: Any) -> Any:
        """`fn(conn, user_id, *args)` as a write under `fence` (`_write`), in a thread."""
        return await run_blocking(self._write, fence, user_id, fn, *args)

    # -- reads ----------------------------------------------------------------------------------------

    async def search(self, user_id: str, query: str, limit: int, filters: dict[str, Any]) -> list[MemoryRecord]:
        cache = self.search_cache
        encoded = self.embedder.embed([query], query=True)
        if cache is None or filters:  # a filtered search ranks in SQL, where the filters are
            (vector,) = await encoded
            if cache is not None:
                cache.use.in_sql += 1
        else:  # whether the user's index is current is asked while the query is encoded
            (vector,), state = await asyncio.gather(encoded, run_blocking(cache.state, user_id, query))
            if (index := cache.current(user_id, state)) is not None:
                rows = await run_blocking(cache.search, user_id, index, state, np.asarray(vector, np.float32), limit)
                return [record(user_id, row) for row in rows]
        rows = await run_blocking(self._search, user_id, query, np.asarray(vector, dtype=np.float32), limit, filters)
        return [record(user_id, row) for row in rows]

    def _search(self, user_id: str, query: str, vector: np.ndarray, limit: int,
                filters: dict[str, Any]) -> builtins.list[pg_store.Row]:
        with self.pool.connection() as conn:
            return pg_search.search(conn, user_id, query, vector, limit, filters)

    async def list(self, user_id: str, limit: int, cursor: str | None) -> MemoryPage:
        rows = await run_blocking(self._page, user_id, limit + 1, page_cursor(cursor))
        records = [record(user_id, r) for r in rows[:limit]]
        return MemoryPage(memories=records, next_cursor=records[-1].id if len(rows) > limit else None)

    def _page(self, user_id: str, limit: int, cursor: str | None) -> builtins.list[pg_store.Row]:
        with self.pool.connection() as conn:
            return pg_store.page(conn, user_id, limit, cursor)

    async def count(self, user_id: str) -> int:
        def _count() -> int:
            with self.pool.connection() as conn:
                return pg_store.count(conn, user_id)

        return int(await run_blocking(_count))

    # -- upgrades -------------------------------------------------------------------------------------

    async def reindex(self) -> int:
        """Move memories from mem0's older table into memfleet's (`migrations.reindex`)."""
        return await migrations.reindex(self.pool, self.embedder)


def _delete_user(conn: psycopg.Connection[Any], user_id: str) -> int:
    """Every table's rows of the user (inside the caller's transaction); return how many memories went."""
    deleted = len(pg_store.ids_of(conn, user_id))
    pg_store.delete_user(conn, user_id)
    return deleted
