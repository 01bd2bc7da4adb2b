"""One memory's life in memfleet's tables after its add: read one, change it, delete it, let it
expire, export it and restore it. Each change keeps the keyword index whole.

A memory's BM25 text is the lines of the memories before it in its write (its context) and then
its own line (`workers.backends.indexing`). Only its own line is stored, as postings; the memories
after it are credited with those postings at search time through its `context_of`, and their
`keyword_count` (BM25's length) counts its terms. So:
- an **update** of its text replaces its postings, and moves its own `keyword_count` and its
  followers' by the change in its term count;
- a **delete** removes its row and postings, takes its term count out of its followers' lengths,
  takes its id out of its predecessors' `context_of`, and strips its history of every text: what
  remains says that it existed, and when it changed and went, never what it said;
- an **expired** memory is invisible from the moment it expires (`VISIBLE`) and the sweeper
  deletes it as a delete does;
- a **restore** (import) puts memories back with their ids and `context_of`, then counts the
  lengths of what it touched from the postings, whatever order the memories come back in.

Every statement takes the user id and puts it in its WHERE clause. Functions that change rows run
inside a transaction the caller holds, or open one.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from workers import mem0_adapter
from workers.backends.pg_schema import HISTORY, POSTINGS, TABLE, TEXT_SEARCH, visible_sql
from workers.backends.pg_store import NewMemory, Row, insert_rows, iso

# The index-whole removal of memories of one user (see the module docstring), in statement order.
_UNCREDIT_FOLLOWERS = f"""
WITH gone AS (
    SELECT m.id, m.context_of,
           (SELECT coalesce(sum(p.tf), 0) FROM {POSTINGS} p WHERE p.user_id = %(u)s AND p.memory_id = m.id) AS own
    FROM {TABLE} m WHERE m.user_id = %(u)s AND m.id = ANY(%(ids)s::uuid[])
),
credit AS (SELECT follower, sum(own) AS own FROM gone, unnest(gone.context_of) AS follower GROUP BY follower)
UPDATE {TABLE} f SET keyword_count = greatest(f.keyword_count - credit.own, 0)
FROM credit
WHERE f.user_id = %(u)s AND f.id = credit.follower AND NOT f.id = ANY(%(ids)s::uuid[])
"""
_UNLINK_PREDECESSORS = f"""
UPDATE {TABLE} SET context_of = ARRAY(SELECT c FROM unnest(context_of) AS c WHERE NOT c = ANY(%(ids)s::uuid[]))
WHERE user_id = %(u)s AND context_of && %(ids)s::uuid[] AND NOT id = ANY(%(ids)s::uuid[])
"""
_DROP_POSTINGS = f"DELETE FROM {POSTINGS} WHERE user_id = %(u)s AND memory_id = ANY(%(ids)s::uuid[])"
_DROP_ROWS = f"DELETE FROM {TABLE} WHERE user_id = %(u)s AND id = ANY(%(ids)s::uuid[]) RETURNING id"
# A deleted memory's history keeps its events and their times; its texts and speaker go.
_STRIP_HISTORY = f"""
UPDATE {HISTORY} SET old_memory = NULL, new_memory = NULL, actor_id = NULL
WHERE user_id = %(u)s AND memory_id = ANY(%(ids)s::uuid[])
"""
_RECORD_DELETES = f"""
INSERT INTO {HISTORY} (user_id, id, memory_id, event, created_at, updated_at, is_deleted)
SELECT %(u)s, gen_random_uuid(), gone, 'DELETE', %(now)s, %(now)s, true FROM unnest(%(ids)s::uuid[]) AS gone
"""

# BM25 lengths of memories counted afresh from the postings: each memory's own terms and those of
# the memories whose `context_of` holds it.
_RECOUNT = f"""
WITH t AS (SELECT DISTINCT unnest(%(ids)s::uuid[]) AS id),
pred AS (
    SELECT t.id AS target, p.id AS pred FROM {TABLE} p JOIN t ON t.id = ANY(p.context_of) WHERE p.user_id = %(u)s
),
involved AS (SELECT id FROM t UNION SELECT pred FROM pred),
own AS (
    SELECT memory_id AS id, sum(tf) AS n FROM {POSTINGS}
    WHERE user_id = %(u)s AND memory_id IN (SELECT id FROM involved) GROUP BY memory_id
),
length AS (
    SELECT t.id, coalesce((SELECT n FROM own WHERE own.id = t.id), 0)
                 + coalesce((SELECT sum(own.n) FROM pred JOIN own ON own.id = pred.pred WHERE pred.target = t.id), 0)
                 AS n
    FROM t
)
UPDATE {TABLE} m SET keyword_count = length.n FROM length WHERE m.user_id = %(u)s AND m.id = length.id
"""


@dataclass(frozen=True)
class Stored:
    """A visible memory as it is stored, for a caller about to change it."""

    row: Row
    context_of: tuple[str, ...]


@dataclass(frozen=True)
class Change:
    """What an update writes to one memory (the backend computed it from the memory as `Stored`)."""

    memory_id: str
    payload: dict[str, Any]  # the whole new payload
    vector: np.ndarray | None = None  # a new embedding (its text changed)
    keywords: str | None = None  # a new own keyword line (its text or date changed)
    expiry_changed: bool = False
    expires_at: str | None = None  # the new expiry if `expiry_changed` (None: never)


def _now() -> str:
    return datetime.now(UTC).isoformat()


def get(conn: psycopg.Connection[Any], user_id: str, memory_id: str) -> Row | None:
    """The user's memory `memory_id` if it exists and has not expired."""
    row = conn.execute(
        f"SELECT id, payload, expires_at FROM {TABLE} WHERE user_id = %s AND id = %s AND {visible_sql()}",
        (user_id, memory_id),
    ).fetchone()
    return None if row is None else Row(str(row[0]), row[1], expires_at=iso(row[2]))


def visible(conn: psycopg.Connection[Any], user_id: str, memory_ids: Sequence[str], *,
            lock: bool = False) -> dict[str, Stored]:
    """The memories among `memory_ids` that the user has and that have not expired, by id;
    `lock`: hold them (FOR UPDATE) until the transaction ends."""
    rows = conn.execute(
        f"SELECT id, payload, expires_at, context_of FROM {TABLE} "
        f"WHERE user_id = %s AND id = ANY(%s::uuid[]) AND {visible_sql()}" + (" FOR UPDATE" if lock else ""),
        (user_id, list(memory_ids)),
    ).fetchall()
    return {str(r[0]): Stored(Row(str(r[0]), r[1], expires_at=iso(r[2])), tuple(str(c) for c in r[3]))
            for r in rows}


def delete(conn: psycopg.Connection[Any], user_id: str, memory_ids: Sequence[str]) -> builtins.list[str]:
    """Delete the user's memories `memory_ids`, all of them or, if any is not there (unknown,
    another user's, expired), none; return the ids that were not there."""
    with conn.transaction():
        found = visible(conn, user_id, memory_ids, lock=True)
        missing = [m for m in memory_ids if m not in found]
        if not missing:
            remove(conn, user_id, memory_ids)
    return missing


def remove(conn: psycopg.Connection[Any], user_id: str, memory_ids: Sequence[str]) -> int:
    """Remove memories of the user whatever their state, keeping the index whole and stripping
    their history of text (module docstring); call inside a transaction. Returns how many went."""
    params = {"u": user_id, "ids": list(memory_ids), "now": _now()}
    conn.execute(_UNCREDIT_FOLLOWERS, params)
    conn.execute(_UNLINK_PREDECESSORS, params)
    conn.execute(_DROP_POSTINGS, params)
    gone = [str(r[0]) for r in conn.execute(_DROP_ROWS, params).fetchall()]
    conn.execute(_STRIP_HISTORY, params)
    if gone:
        conn.execute(_RECORD_DELETES, {**params, "ids": gone})
    return len(gone)


def update(conn: psycopg.Connection[Any], user_id: str, changes: Sequence[Change], *,
           record_history: bool = True) -> builtins.list[str]:
    """Apply `changes` to the user's memories, all of them or, if any memory is not there, none;
    return the ids that were not there. Each change is recorded as an UPDATE history event with the
    old and the new text, unless the caller records its own (mem0's fact extraction does)."""
    with conn.transaction():
        found = visible(conn, user_id, [c.memory_id for c in changes], lock=True)
        missing = [c.memory_id for c in changes if c.memory_id not in found]
        if missing:
            return missing
        now = _now()
        for change in changes:
            if change.keywords is not None:
                _replace_keywords(conn, user_id, change.memory_id, change.keywords, found[change.memory_id].context_of)
            conn.execute(
                f"""UPDATE {TABLE} SET payload = %(payload)s,
                                       vector = coalesce(%(vector)s::halfvec, vector),
                                       expires_at = CASE WHEN %(expiry_changed)s THEN %(expires_at)s::timestamptz
                                                         ELSE expires_at END
                    WHERE user_id = %(u)s AND id = %(id)s""",
                {"payload": Jsonb(change.payload), "vector": change.vector, "expiry_changed": change.expiry_changed,
                 "expires_at": change.expires_at, "u": user_id, "id": change.memory_id},
            )
            if record_history:
                old, new = (mem0_adapter.read_payload(p) for p in (found[change.memory_id].row.payload, change.payload))
                conn.execute(
                    f"""INSERT INTO {HISTORY} (user_id, id, memory_id, old_memory, new_memory, event, created_at,
                                               updated_at, actor_id, role)
                        VALUES (%s, gen_random_uuid(), %s, %s, %s, 'UPDATE', %s, %s, %s, %s)""",
                    (user_id, change.memory_id, old.data, new.data, now, now, new.name, new.role),
                )
    return []


def _replace_keywords(conn: psycopg.Connection[Any], user_id: str, memory_id: str, keywords: str,
                      followers: Sequence[str]) -> None:
    """Replace a memory's own postings; its length and its followers' move by the change."""
    params = {"u": user_id, "id": memory_id, "keywords": keywords}
    before = conn.execute(f"SELECT coalesce(sum(tf), 0) FROM {POSTINGS} WHERE user_id = %(u)s AND memory_id = %(id)s",
                          params).fetchone()
    conn.execute(f"DELETE FROM {POSTINGS} WHERE user_id = %(u)s AND memory_id = %(id)s", params)
    after = conn.execute(
        f"""WITH terms AS (SELECT lexeme, cardinality(positions) AS tf
                           FROM unnest(to_tsvector('{TEXT_SEARCH}', %(keywords)s))),
                 posted AS (INSERT INTO {POSTINGS} (user_id, term, memory_id, tf)
                            SELECT %(u)s, lexeme, %(id)s, tf FROM terms)
            SELECT coalesce(sum(tf), 0) FROM terms""",
        params,
    ).fetchone()
    delta = int(after[0] if after else 0) - int(before[0] if before else 0)
    if delta:
        conn.execute(f"UPDATE {TABLE} SET keyword_count = greatest(keyword_count + %s, 0) "
                     "WHERE user_id = %s AND id = ANY(%s::uuid[])", (delta, user_id, [memory_id, *followers]))


def restore(conn: psycopg.Connection[Any], user_id: str, memories: Sequence[NewMemory],
            history: Sequence[dict[str, Any]]) -> builtins.list[str]:
    """Put exported memories back with their ids, `context_of` and history; a memory already there
    is left as it is (an import run twice stores each once). Returns the ids stored now."""
    with conn.transaction():
        stored = insert_rows(conn, user_id, memories)
        if stored:
            followers = {f for m in memories if m.id in stored for f in m.context_of}
            conn.execute(_RECOUNT, {"u": user_id, "ids": [*stored, *followers]})
            rows = [h for h in history if str(h["memory_id"]) in stored]
            with conn.cursor() as cur:
                cur.executemany(
                    f"""INSERT INTO {HISTORY} (user_id, id, memory_id, old_memory, new_memory, event, created_at,
                                               updated_at, is_deleted)
                        VALUES (%(u)s, %(id)s, %(memory_id)s, %(old)s, %(new)s, %(event)s, %(at)s, %(at)s, false)
                        ON CONFLICT DO NOTHING""",
                    [{"u": user_id, **h} for h in rows],
                )
    return sorted(stored)


def page(conn: psycopg.Connection[Any], user_id: str, limit: int,
         after: str | None) -> builtins.list[Stored]:
    """A page of the user's visible memories in id order, with their `context_of`, for export."""
    rows = conn.execute(
        f"SELECT id, payload, expires_at, context_of FROM {TABLE} WHERE user_id = %(u)s AND {visible_sql()} "
        + ("AND id > %(after)s::uuid " if after else "") + "ORDER BY id LIMIT %(limit)s",
        {"u": user_id, "after": after, "limit": limit},
    ).fetchall()
    return [Stored(Row(str(r[0]), r[1], expires_at=iso(r[2])), tuple(str(c) for c in r[3])) for r in rows]


def histories(conn: psycopg.Connection[Any], user_id: str,
              memory_ids: Sequence[str]) -> dict[str, builtins.list[dict[str, Any]]]:
    """The history events of each of the user's memories `memory_ids`, oldest first. The texts of
    a memory that is no longer visible (deleted or expired) are never given out."""
    rows = conn.execute(
        f"""SELECT h.id::text, h.memory_id::text, h.event,
                   CASE WHEN m.id IS NULL THEN NULL ELSE h.old_memory END,
                   CASE WHEN m.id IS NULL THEN NULL ELSE h.new_memory END,
                   coalesce(h.updated_at, h.created_at)
            FROM {HISTORY} h
            LEFT JOIN {TABLE} m ON m.user_id = h.user_id AND m.id = h.memory_id AND {visible_sql("m")}
            WHERE h.user_id = %s AND h.memory_id = ANY(%s::uuid[])
            ORDER BY coalesce(h.updated_at, h.created_at), h.id""",
        (user_id, list(memory_ids)),
    ).fetchall()
    found: dict[str, builtins.list[dict[str, Any]]] = {}
    for r in rows:
        found.setdefault(r[1], []).append({"id": r[0], "memory_id": r[1], "event": r[2], "old_text": r[3],
                                           "new_text": r[4], "at": r[5]})
    return found


def owners(conn: psycopg.Connection[Any], memory_ids: Sequence[str]) -> dict[str, builtins.list[str]]:
    """The users holding each of `memory_ids` (visible memories only). Not scoped to a user: only an
    app key's request, which may act for any user, gets here (`producer.contract.OwnersRequest`)."""
    rows = conn.execute(
        f"SELECT id, user_id FROM {TABLE} WHERE id = ANY(%s::uuid[]) AND {visible_sql()} ORDER BY user_id",
        (list(memory_ids),),
    ).fetchall()
    found: dict[str, builtins.list[str]] = {}
    for memory_id, user_id in rows:
        found.setdefault(str(memory_id), []).append(str(user_id))
    return found


def sweep(conn: psycopg.Connection[Any], limit: int) -> int:
    """Delete up to `limit` expired memories, of any users, as `remove` does; return how many.
    Rows another worker is sweeping are skipped, so any number of workers may sweep at once."""
    with conn.transaction():
        rows = conn.execute(
            f"SELECT user_id, id FROM {TABLE} WHERE expires_at <= now() ORDER BY expires_at LIMIT %s "
            "FOR UPDATE SKIP LOCKED", (limit,),
        ).fetchall()
        by_user: dict[str, builtins.list[str]] = {}
        for user_id, memory_id in rows:
            by_user.setdefault(str(user_id), []).append(str(memory_id))
        return sum(remove(conn, user_id, ids) for user_id, ids in by_user.items())
