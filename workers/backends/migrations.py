"""What an older memfleet left behind, moved into memfleet's tables: memories in mem0's own
pgvector table (`reindex`, in the background at start-up) and the history and session messages
in mem0's SQLite file (`import_history`, before the worker takes jobs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import structlog
from psycopg_pool import ConnectionPool

from producer.contract import check_user_id
from workers import mem0_adapter
from workers.backends import pg_history, pg_schema, pg_store
from workers.backends.indexing import dense_text, keyword_text
from workers.backends.inference import LAST_MESSAGES
from workers.backends.memories import said_in
from workers.backends.pg_pool import run_blocking
from workers.embedder import BatchingEmbedder

log = structlog.get_logger("memfleet.backend")

REINDEX_BATCH = 256


async def reindex(pool: ConnectionPool, embedder: BatchingEmbedder) -> int:
    """Move memories from mem0's older table into memfleet's, indexed in context; return how many.

    Idempotent and safe with many workers at once: each batch is locked, moved and deleted in
    one transaction, and rows another worker holds are skipped. Until a memory is moved, search
    does not find it (it is listed after the move too), so a worker logs its progress.
    """
    moved = 0
    while True:
        batch = await run_blocking(_reindex_batch, pool, embedder)
        if not batch:
            if moved:
                log.info("reindex_done", memories=moved)
            return moved
        moved += batch
        log.info("reindexing", memories=moved)


def _reindex_batch(pool: ConnectionPool, embedder: BatchingEmbedder) -> int:
    with pool.connection() as conn, conn.transaction():
        rows = pg_store.legacy_batch(conn, REINDEX_BATCH)
        if not rows:
            return 0
        said = [said_in(r.payload) for r in rows]
        vectors = np.asarray(embedder.embed_from_thread([dense_text(s) for s in said], query=False))
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
