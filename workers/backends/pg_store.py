"""memfleet's memory rows in PostgreSQL + pgvector: inserting a user's memories with their keyword
postings and ADD history, reading them by id and page, and removing a user's rows everywhere,
mem0's older tables included.

Every statement here takes the user id and puts it in its WHERE clause (`workers.backends.pg_schema`
says why). Functions take a psycopg connection and run synchronously; the backend calls them in
threads. Ranking is `workers.backends.pg_search`; history and session messages are
`workers.backends.pg_history`.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from workers import mem0_adapter
from workers.backends.base import FencedOut
from workers.backends.pg_schema import (
    HISTORY,
    LEGACY_ENTITIES,
    LEGACY_TABLE,
    POSTINGS,
    TABLE,
    TEXT_SEARCH,
    USER_TABLES,
    user_key,
    visible_sql,
)

# A keyword text's stemmed terms and how often each occurs.
_TERMS = (
    f"terms AS (SELECT lexeme, cardinality(positions) AS tf FROM unnest(to_tsvector('{TEXT_SEARCH}', %(keywords)s)))"
)
# BM25's length of a memory, whose text is its context and then its own line: the own line's terms
# (already stemmed for its postings) and the context's.
_LENGTH = (
    "((SELECT coalesce(sum(tf), 0) FROM terms) + (SELECT coalesce(sum(cardinality(positions)), 0) "
    f"FROM unnest(to_tsvector('{TEXT_SEARCH}', %(context_keywords)s))))"
)
# One memory and the postings of its own line; the postings only if the memory is new (ON CONFLICT
# ... RETURNING). The lines of its context are the postings of the memories before it (`context_of`).
# One statement, so one transaction: a memory never exists without its postings and its ADD history
# row, nor they without it. The history row is skipped if the memory already has one (a re-index).
_INSERT = f"""
WITH {_TERMS},
added AS (
    INSERT INTO {TABLE} (user_id, id, vector, payload, keyword_count, context_of, expires_at)
    VALUES (%(user_id)s, %(id)s, %(vector)s::halfvec, %(payload)s, {_LENGTH}, %(context_of)s::uuid[],
            %(expires_at)s::timestamptz)
    ON CONFLICT DO NOTHING RETURNING id
),
posted AS (
    INSERT INTO {POSTINGS} (user_id, term, memory_id, tf) SELECT %(user_id)s, lexeme, added.id, tf FROM terms, added
)
INSERT INTO {HISTORY} (user_id, id, memory_id, old_memory, new_memory, event, created_at, updated_at, actor_id, role)
SELECT %(user_id)s, gen_random_uuid(), added.id, NULL, %(data)s, 'ADD', %(created_at)s, %(updated_at)s,
       %(actor_id)s, %(role)s
FROM added
WHERE NOT EXISTS (
    SELECT 1 FROM {HISTORY} h WHERE h.user_id = %(user_id)s AND h.memory_id = added.id AND h.event = 'ADD'
)
"""


@dataclass(frozen=True)
class NewMemory:
    id: str
    vector: np.ndarray
    payload: dict[str, Any]
    keywords: str  # its own line, stored as postings (`indexing.keyword_line`)
    context_keywords: str = ""  # the lines before it, counted in its length; their postings are theirs
    context_of: tuple[str, ...] = ()  # the memories after it whose context holds its line
    expires_at: str | None = None  # ISO 8601; None: never


@dataclass(frozen=True)
class Row:
    id: str
    payload: dict[str, Any]
    score: float | None = None
    expires_at: str | None = None  # ISO 8601, UTC


def hold_fence(conn: psycopg.Connection[Any], user_id: str, token: int) -> None:
    """Record `token` as the user's lease token for the caller's transaction, which holds the row
    until it ends; raise `FencedOut` if a newer one is recorded already."""
    row = conn.execute(
        """INSERT INTO memfleet_fences (user_key, token) VALUES (%s, %s)
           ON CONFLICT (user_key) DO UPDATE SET token = excluded.token WHERE memfleet_fences.token <= excluded.token
           RETURNING token""",
        (user_key(user_id), token),
    ).fetchone()
    if row is None:
        raise FencedOut("a newer holder of the user's lease has written: this write was not applied")


def existing_ids(conn: psycopg.Connection[Any], user_id: str, ids: Sequence[str]) -> set[str]:
    rows = conn.execute(f"SELECT id FROM {TABLE} WHERE user_id = %s AND id = ANY(%s::uuid[])",
                        (user_id, list(ids))).fetchall()
    return {str(r[0]) for r in rows}


def _insert_params(user_id: str, m: NewMemory) -> dict[str, Any]:
    said = mem0_adapter.read_payload(m.payload)
    return {"user_id": user_id, "id": m.id, "vector": m.vector, "payload": Jsonb(m.payload),
            "keywords": m.keywords, "context_keywords": m.context_keywords,
            "context_of": [c for c in m.context_of if c != m.id],  # a repeated message is not its own context
            "expires_at": m.expires_at, "data": said.data, "created_at": said.created_at,
            "updated_at": said.updated_at, "actor_id": said.name, "role": said.role}


def insert(conn: psycopg.Connection[Any], user_id: str, memories: Sequence[NewMemory]) -> None:
    """Insert memories of one user; ids already there are left as they are (idempotent)."""
    with conn.cursor() as cur:
        cur.executemany(_INSERT, [_insert_params(user_id, m) for m in memories])


# `_INSERT` without its ADD history row: a restored memory brings its own history.
_INSERT_ROW = _INSERT[: _INSERT.index("INSERT INTO " + HISTORY)] + "SELECT id FROM added"


def insert_rows(conn: psycopg.Connection[Any], user_id: str, memories: Sequence[NewMemory]) -> set[str]:
    """Insert memories and their postings, no history; return the ids that were not there before."""
    stored: set[str] = set()
    with conn.cursor() as cur:
        cur.executemany(_INSERT_ROW, [_insert_params(user_id, m) for m in memories], returning=True)
        while True:
            stored.update(str(r[0]) for r in cur.fetchall())
            if not cur.nextset():
                break
    return stored


def payload_of(conn: psycopg.Connection[Any], user_id: str, memory_id: str) -> dict[str, Any] | None:
    row = conn.execute(f"SELECT payload FROM {TABLE} WHERE user_id = %s AND id = %s AND {visible_sql()}",
                       (user_id, memory_id)).fetchone()
    return row[0] if row else None


def page(conn: psycopg.Connection[Any], user_id: str, limit: int, after: str | None) -> builtins.list[Row]:
    """Keyset pagination on the primary key: stable pages, no OFFSET scans."""
    after_clause = "" if after is None else "AND id > %(after)s::uuid"
    rows = conn.execute(f"SELECT id, payload, expires_at FROM {TABLE} WHERE user_id = %(user_id)s AND {visible_sql()} "
                        f"{after_clause} ORDER BY id LIMIT %(limit)s",
                        {"user_id": user_id, "after": after, "limit": limit}).fetchall()
    return [Row(str(r[0]), r[1], expires_at=iso(r[2])) for r in rows]


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


def count(conn: psycopg.Connection[Any], user_id: str) -> int:
    row = conn.execute(f"SELECT count(*) FROM {TABLE} WHERE user_id = %s", (user_id,)).fetchone()
    return int(row[0]) if row else 0


def ids_of(conn: psycopg.Connection[Any], user_id: str) -> builtins.list[str]:
    rows = conn.execute(f"SELECT id FROM {TABLE} WHERE user_id = %s", (user_id,)).fetchall()
    rows += _legacy(conn, "SELECT id FROM {} WHERE payload->>'user_id' = %s", (user_id,), LEGACY_TABLE)
    return [str(r[0]) for r in rows]


def delete_user(conn: psycopg.Connection[Any], user_id: str) -> None:
    """Delete every row of the user, in each of memfleet's tables and in mem0's older ones; call it
    inside a transaction, so that a forget is whole or not at all."""
    for table in USER_TABLES:
        conn.execute(sql.SQL("DELETE FROM {} WHERE user_id = %s").format(sql.Identifier(table)), (user_id,))
    for legacy in (LEGACY_TABLE, LEGACY_ENTITIES):
        _legacy(conn, "DELETE FROM {} WHERE payload->>'user_id' = %s", (user_id,), legacy)


def remaining(conn: psycopg.Connection[Any], user_id: str) -> int:
    """Rows of the user left in any table (0 after a complete forget)."""
    total = 0
    for table in USER_TABLES:
        row = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE user_id = %s").format(sql.Identifier(table)),
                           (user_id,)).fetchone()
        total += int(row[0]) if row else 0
    for legacy in (LEGACY_TABLE, LEGACY_ENTITIES):
        rows = _legacy(conn, "SELECT count(*) FROM {} WHERE payload->>'user_id' = %s", (user_id,), legacy)
        total += int(rows[0][0]) if rows else 0
    return total


def _legacy(conn: psycopg.Connection[Any], query: str, params: tuple[Any, ...], table: str) -> builtins.list[Any]:
    if conn.execute("SELECT to_regclass(%s)", (table,)).fetchone() == (None,):
        return []
    cur = conn.execute(sql.SQL(query).format(sql.Identifier(table)), params)
    return cur.fetchall() if cur.description else []


def legacy_batch(conn: psycopg.Connection[Any], size: int) -> builtins.list[Row]:
    """Lock up to `size` rows of mem0's older table for re-indexing (skipping rows another worker
    holds); call inside a transaction that then inserts them here and `drop_legacy`s them."""
    return [Row(str(r[0]), r[1]) for r in _legacy(
        conn, "SELECT id, payload FROM {} ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED", (size,), LEGACY_TABLE)]


def drop_legacy(conn: psycopg.Connection[Any], ids: Sequence[str]) -> None:
    _legacy(conn, "DELETE FROM {} WHERE id = ANY(%s::uuid[])", (list(ids),), LEGACY_TABLE)


def owner_of(conn: psycopg.Connection[Any], memory_id: str) -> str | None:
    """The user a memory id belongs to, in memfleet's table or mem0's older one (None: no such memory)."""
    row = conn.execute(f"SELECT user_id FROM {TABLE} WHERE id = %s", (memory_id,)).fetchone()
    if row:
        return str(row[0])
    rows = _legacy(conn, "SELECT payload->>'user_id' FROM {} WHERE id = %s", (memory_id,), LEGACY_TABLE)
    return str(rows[0][0]) if rows and rows[0][0] else None
