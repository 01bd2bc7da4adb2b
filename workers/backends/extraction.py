"""What the LLM extracted from each `infer=True` write, in PostgreSQL, keyed by (user, op id).

A write's extraction is recorded (`record`) before anything of it is stored; `apply` then stores
its memories, keeps its messages as the session's context and marks it applied, in one
transaction, under a lock on the extraction's row. So a retry of the write, whatever killed the
one before (a worker, PostgreSQL, a timeout), finds what the LLM said the first time and stores
it at most once. Once applied, the row keeps the ids it stored and no text: a fact deleted later
leaves its words nowhere. Rows are pruned `KEEP` after they were recorded (a write's outcome
lives a day in Redis; after that nothing retries it) and go with the user at a forget.
Like `pg_store`, every statement names the user; functions run synchronously, in threads.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from workers.backends import pg_history, pg_search, pg_store
from workers.backends.pg_schema import EXTRACTIONS
from workers.backends.pg_store import NewMemory, Row

KEEP = timedelta(days=7)


@dataclass(frozen=True)
class Extraction:
    facts: list[dict[str, Any]]  # {"text", "attributed_to"}; a fact's position is its index
    as_said: bool  # the LLM found no fact: the write's messages are stored as they were said
    applied: bool
    memory_ids: list[str]  # what applying it stored (once applied)


@dataclass(frozen=True)
class Context:
    """What a write's extraction starts from: its extraction if one was recorded (a retry), else
    what goes into the prompt, all of it the user's own."""

    recorded: Extraction | None
    nearest: list[Row]
    last_messages: list[dict[str, Any]]


def _read(conn: psycopg.Connection[Any], user_id: str, op_id: str, lock: bool = False) -> Extraction | None:
    row = conn.execute(
        f"SELECT facts, as_said, applied_at IS NOT NULL, memory_ids FROM {EXTRACTIONS} "
        f"WHERE user_id = %s AND op_id = %s{' FOR UPDATE' if lock else ''}", (user_id, op_id)).fetchone()
    if row is None:
        return None
    return Extraction(list(row[0] or []), bool(row[1]), bool(row[2]), [str(i) for i in row[3]])


def context(conn: psycopg.Connection[Any], user_id: str, op_id: str, query: str, vector: np.ndarray,
            session_scope: str, nearest: int, last: int) -> Context:
    """The write's recorded extraction, or the user's `nearest` memories for `query` (ranked as a
    search ranks them) and the session's `last` messages."""
    recorded = _read(conn, user_id, op_id)
    if recorded is not None:
        return Context(recorded, [], [])
    return Context(None, pg_search.search(conn, user_id, query, vector, nearest, {}),
                   pg_history.last_messages(conn, user_id, session_scope, last))


def record(conn: psycopg.Connection[Any], user_id: str, op_id: str, facts: Sequence[dict[str, Any]],
           as_said: bool) -> Extraction:
    """Record the write's extraction, unless one is recorded already; return the one recorded (the
    first: a worker that lost its lease while it asked the LLM does not replace it)."""
    with conn.transaction():
        conn.execute(f"INSERT INTO {EXTRACTIONS} (user_id, op_id, facts, as_said) VALUES (%s, %s, %s, %s) "
                     "ON CONFLICT DO NOTHING", (user_id, op_id, Jsonb(list(facts)), as_said))
        recorded = _read(conn, user_id, op_id)
    assert recorded is not None  # inserted or already there, in this transaction
    return recorded


def apply(conn: psycopg.Connection[Any], user_id: str, op_id: str, memories: Sequence[NewMemory],
          messages: Sequence[dict[str, Any]], session_scope: str, keep: int, now: str) -> builtins.list[str] | None:
    """Store the extraction's memories and the write's messages (with their own ids), and mark it
    applied; return the ids stored now, or None if it was applied before (nothing is done)."""
    with conn.transaction():
        recorded = _read(conn, user_id, op_id, lock=True)
        if recorded is None:
            raise LookupError("the write's extraction is not recorded")
        if recorded.applied:
            return None
        ids = [m.id for m in memories]
        existing = pg_store.existing_ids(conn, user_id, ids)
        pg_store.insert(conn, user_id, memories)
        pg_history.save_messages(conn, user_id, session_scope, messages, keep, now)
        conn.execute(f"UPDATE {EXTRACTIONS} SET facts = NULL, memory_ids = %s::uuid[], applied_at = now() "
                     "WHERE user_id = %s AND op_id = %s", (ids, user_id, op_id))
    return [i for i in ids if i not in existing]


def prune(conn: psycopg.Connection[Any], older_than: timedelta = KEEP) -> int:
    """Delete extractions recorded more than `older_than` ago, of any user; return how many."""
    cur = conn.execute(f"DELETE FROM {EXTRACTIONS} WHERE created_at < now() - %s", (older_than,))
    return cur.rowcount
