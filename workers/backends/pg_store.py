"""memfleet's memory table in PostgreSQL + pgvector, and the one query that ranks a user's memories.

Every statement here takes the user id and puts it in its WHERE clause: the table's primary key
is (user_id, id), so each user's rows are one index range, and on Citus `user_id` is the
distribution column. Functions take a psycopg connection and run synchronously; the backend
calls them in threads.

Ranking (`search`, one statement) fuses two signals, each computed over the user's own memories only:
- dense: cosine similarity of the query's embedding to each memory's (its text in context,
  `workers.backends.indexing`; vectors kept in half precision), min-max normalized over the user's
  memories;
- keywords: Okapi BM25 (Lucene's idf, k1 = 1.5, b = 0.75) over each memory's keyword text,
  stemmed by PostgreSQL's `english` text-search configuration, with document frequencies and the
  average length counted over the user's memories, so that no other user's data can move a score;
  divided by the best BM25 score of the query.
The score is the mean of the two (a convex combination with equal weights, the fusion that
Bruch et al., "An Analysis of Fusion Functions for Hybrid Retrieval", 2023, found more robust than
reciprocal rank). Any word of the question can match (OR semantics), unlike `plainto_tsquery`.
"""

from __future__ import annotations

import builtins
import hashlib
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
from workers.backends.filters_sql import filter_sql

TABLE = "memfleet_memories"
POSTINGS = "memfleet_postings"
#: every change to a memory (mem0's history: texts, also of deleted memories, until a forget)
HISTORY = "memfleet_history"
#: the last messages of each session scope, the context of mem0's `infer=True` extraction
MESSAGES = "memfleet_messages"
#: what the LLM extracted from each `infer=True` write, keyed by its op id (workers.backends.extraction)
EXTRACTIONS = "memfleet_extractions"
#: every table that holds a user's data: forget empties each of them for the user
USER_TABLES = (POSTINGS, HISTORY, MESSAGES, EXTRACTIONS, TABLE)
#: mem0's pgvector collection, where memfleet kept memories before it had its own table
LEGACY_TABLE = "memories"
#: mem0's entity collection beside it (filled only by mem0's entity linking, which needs spaCy)
LEGACY_ENTITIES = "memories_entities"
TEXT_SEARCH = "english"
BM25_K1 = 1.5
BM25_B = 0.75
DENSE_WEIGHT = 0.5
SCHEMA_LOCK = 0x6D656D66  # pg_advisory_xact_lock key: "memf"


def visible_sql(alias: str = "") -> str:
    """The condition a memory row meets until it expires: every read of memories applies it."""
    column = f"{alias}.expires_at" if alias else "expires_at"
    return f"({column} IS NULL OR {column} > now())"


_SCHEMA = [
    "CREATE EXTENSION IF NOT EXISTS vector",
    """CREATE TABLE IF NOT EXISTS memfleet_memories (
           user_id text NOT NULL,
           id uuid NOT NULL,
           vector halfvec({dims}) NOT NULL,  -- half precision: a search reads every vector of the user
           payload jsonb NOT NULL,
           keyword_count integer NOT NULL,  -- BM25's document length, in stemmed terms
           context_of uuid[] NOT NULL DEFAULT '{{}}',  -- memories whose keyword context holds this one
           PRIMARY KEY (user_id, id)
       ) WITH (toast_tuple_target = 128)""",  # payloads out of line: a scan of vectors reads fewer pages
    # Tables made before vectors were halved: rewritten once, under the schema lock.
    """DO $$ BEGIN
           IF (SELECT atttypid::regtype::text FROM pg_attribute
               WHERE attrelid = 'memfleet_memories'::regclass AND attname = 'vector') = 'vector' THEN
               -- PLAIN in the same command: the rewrite would otherwise move every vector out of line
               ALTER TABLE memfleet_memories ALTER COLUMN vector TYPE halfvec({dims}) USING vector::halfvec({dims}),
                                             ALTER COLUMN vector SET STORAGE PLAIN;
           END IF;
       END $$""",
    "ALTER TABLE memfleet_memories ADD COLUMN IF NOT EXISTS context_of uuid[] NOT NULL DEFAULT '{{}}'",
    # When the memory stops being visible (`visible_sql`) and the sweeper deletes it; NULL: never.
    "ALTER TABLE memfleet_memories ADD COLUMN IF NOT EXISTS expires_at timestamptz",
    "CREATE INDEX IF NOT EXISTS memfleet_memories_expiry ON memfleet_memories (expires_at) "
    "WHERE expires_at IS NOT NULL",
    # A memory by its id alone: the owner lookup of an app key's request on mem0's routes.
    "CREATE INDEX IF NOT EXISTS memfleet_memories_id ON memfleet_memories (id)",
    # Kept in the row rather than TOASTed: a search reads every vector of the user, and fetching
    # each from the TOAST table took 3 us a row (12,700 rows: 46 ms instead of 24).
    "ALTER TABLE memfleet_memories ALTER COLUMN vector SET STORAGE PLAIN",
    # Each user's inverted index: a search reads the postings of its terms, in one index range per
    # term, however many memories the user (or anyone else) has.
    """CREATE TABLE IF NOT EXISTS memfleet_postings (
           user_id text NOT NULL,
           term text NOT NULL,
           memory_id uuid NOT NULL,
           tf integer NOT NULL,
           PRIMARY KEY (user_id, term, memory_id) INCLUDE (tf)  -- read from the index alone
       )""",
    """CREATE TABLE IF NOT EXISTS memfleet_history (
           user_id text NOT NULL,
           id uuid NOT NULL,
           memory_id uuid NOT NULL,
           old_memory text,
           new_memory text,
           event text NOT NULL,
           created_at text,
           updated_at text,
           is_deleted boolean NOT NULL DEFAULT false,
           actor_id text,
           role text,
           PRIMARY KEY (user_id, id)
       )""",
    "CREATE INDEX IF NOT EXISTS memfleet_history_memory ON memfleet_history (user_id, memory_id)",
    # The last lease token under which each user's writes were applied (design invariant 10). Keyed
    # by a hash of the user id, and kept after a forget: a stale holder must stay refused then too,
    # and the table should not name anyone who was forgotten.
    """CREATE TABLE IF NOT EXISTS memfleet_fences (
           user_key text PRIMARY KEY,  -- sha256 of the user id, hex
           token bigint NOT NULL
       )""",
    """CREATE TABLE IF NOT EXISTS memfleet_messages (
           user_id text NOT NULL,
           id uuid NOT NULL,
           session_scope text NOT NULL,
           role text,
           content text,
           name text,
           created_at text NOT NULL,
           PRIMARY KEY (user_id, id)
       )""",
    # The facts are recorded here before any is stored, so a retried write never asks the LLM again;
    # once applied, only the ids of what was stored stay (the memories hold the texts).
    """CREATE TABLE IF NOT EXISTS memfleet_extractions (
           user_id text NOT NULL,
           op_id text NOT NULL,
           facts jsonb,  -- the readable facts (text, attributed_to, known) in the LLM's order; NULL once applied
           as_said boolean NOT NULL,  -- the LLM found no fact: the messages themselves are stored
           memory_ids uuid[] NOT NULL DEFAULT '{{}}',
           created_at timestamptz NOT NULL DEFAULT now(),
           applied_at timestamptz,
           PRIMARY KEY (user_id, op_id)
       )""",
    "CREATE INDEX IF NOT EXISTS memfleet_extractions_age ON memfleet_extractions (created_at)",
]

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


def ensure_schema(conn: psycopg.Connection[Any], dims: int) -> None:
    """Create the table idempotently; concurrent starters wait on an advisory lock."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        for statement in _SCHEMA:
            conn.execute(sql.SQL(statement).format(dims=sql.Literal(dims), config=sql.SQL(TEXT_SEARCH)))


def hold_fence(conn: psycopg.Connection[Any], user_id: str, token: int) -> None:
    """Record `token` as the user's lease token for the caller's transaction, which holds the row
    until it ends; raise `FencedOut` if a newer one is recorded already."""
    row = conn.execute(
        """INSERT INTO memfleet_fences (user_key, token) VALUES (%s, %s)
           ON CONFLICT (user_key) DO UPDATE SET token = excluded.token WHERE memfleet_fences.token <= excluded.token
           RETURNING token""",
        (hashlib.sha256(user_id.encode()).hexdigest(), token),
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


# The user's memories ranked for a query: BM25 and cosine over the user's rows, fused. One statement,
# and one pass over the user's rows (BM25's lengths and statistics come from the same scan as the
# cosines). BM25 scores were once computed apart, while the query was encoded, and sent back with
# the vector: for a user with 13,000 memories that match some word, the round trip of their scores
# cost 40 ms, more than the overlap saved anyone.
_SEARCH = """
WITH terms AS (
    SELECT ARRAY(SELECT DISTINCT lexeme FROM unnest(to_tsvector('{config}', %(query)s))) AS lexemes
),
mine AS MATERIALIZED (
    SELECT id, keyword_count, context_of, 1 - (vector <=> %(vector)s::halfvec) AS cosine
    FROM {table} WHERE user_id = %(user_id)s AND {visible} AND ({filters})
),
corpus AS MATERIALIZED (  -- one row, computed once: a generic plan once re-ran it per posting
    SELECT count(*)::float8 AS n, greatest(avg(keyword_count), 1)::float8 AS avgdl,
           min(cosine) AS low, max(cosine) AS high
    FROM mine
),
own AS (
    SELECT p.memory_id AS id, p.term AS lexeme, p.tf, m.context_of
    FROM {postings} p JOIN mine m ON m.id = p.memory_id, terms
    WHERE p.user_id = %(user_id)s AND p.term = ANY(terms.lexemes)
),
credited AS (  -- a line counts for its own memory and for those whose context holds it
    SELECT id, lexeme, tf FROM own
    UNION ALL
    SELECT later.id, own.lexeme, own.tf FROM own CROSS JOIN LATERAL unnest(own.context_of) AS later(id)
),
term_counts AS (
    SELECT c.id, m.keyword_count, c.lexeme, sum(c.tf)::float8 AS tf
    FROM credited c JOIN mine m USING (id)
    GROUP BY c.id, m.keyword_count, c.lexeme
),
document_frequency AS (
    SELECT lexeme, count(*)::float8 AS df FROM term_counts GROUP BY lexeme
),
bm25 AS MATERIALIZED (
    SELECT t.id, sum(
        ln(1 + ((SELECT n FROM corpus) - d.df + 0.5) / (d.df + 0.5))
        * t.tf * ({k1} + 1) / (t.tf + {k1} * (1 - {b} + {b} * t.keyword_count / (SELECT avgdl FROM corpus)))
    ) AS score
    FROM term_counts t JOIN document_frequency d USING (lexeme)
    GROUP BY t.id
),
fused AS (
    SELECT m.id,
           {dense} * coalesce((m.cosine - (SELECT low FROM corpus))
                              / nullif((SELECT high - low FROM corpus), 0), 1)
           + (1 - {dense}) * coalesce(k.score / nullif((SELECT max(score) FROM bm25), 0), 0) AS score
    FROM mine m LEFT JOIN bm25 k USING (id)
    ORDER BY score DESC, id
    LIMIT %(limit)s
)
SELECT f.id, t.payload, f.score, t.expires_at
FROM fused f JOIN {table} t ON t.user_id = %(user_id)s AND t.id = f.id
ORDER BY f.score DESC, f.id
"""


def search(conn: psycopg.Connection[Any], user_id: str, query: str, vector: np.ndarray, limit: int,
           filters: dict[str, Any]) -> builtins.list[Row]:
    """The user's `limit` best memories for `query` (whose embedding is `vector`), best first."""
    rows = _run(conn, _SEARCH, filters, {"query": query, "vector": vector, "user_id": user_id, "limit": limit})
    return [Row(str(r[0]), r[1], float(r[2]), iso(r[3])) for r in rows]


def _run(conn: psycopg.Connection[Any], query: str, filters: dict[str, Any],
         params: dict[str, Any]) -> builtins.list[tuple[Any, ...]]:
    condition, filter_params = filter_sql(filters)
    statement = sql.SQL(query).format(
        config=sql.SQL(TEXT_SEARCH), table=sql.Identifier(TABLE), postings=sql.Identifier(POSTINGS),
        filters=condition, k1=sql.Literal(BM25_K1), b=sql.Literal(BM25_B), dense=sql.Literal(DENSE_WEIGHT),
        visible=sql.SQL(visible_sql()),
    )
    with conn.transaction():
        # The planner estimates a user's rows from the average user, and a user with 10,000
        # memories then got nested loops over them: seconds instead of milliseconds. Every join
        # here is between whole per-user sets, which hash joins serve whatever their sizes.
        conn.execute("SET LOCAL enable_nestloop = off")
        # Never prepared: psycopg prepares a statement on its fifth run, and PostgreSQL then may
        # switch to a generic plan, which cannot see how many memories the user has or how common
        # the query's terms are; one such plan took 330 ms where the custom one takes 20.
        return conn.execute(statement, {**params, **filter_params}, prepare=False).fetchall()


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


# -- history and session messages ------------------------------------------------------------------


def add_history(conn: psycopg.Connection[Any], user_id: str, rows: Sequence[dict[str, Any]]) -> None:
    """History rows of one user's memories, as mem0's `batch_add_history` takes them. An ADD row for a
    memory that has one already is skipped: `insert` wrote it, in the memory's own statement. A
    DELETE row carries no text, and strips the memory's earlier rows of theirs (mem0 would keep them)."""
    rows = [{**r, "old_memory": None, "new_memory": None, "actor_id": None} if r["event"] == "DELETE" else r
            for r in rows]
    deleted = [r["memory_id"] for r in rows if r["event"] == "DELETE"]
    if deleted:
        conn.execute(f"UPDATE {HISTORY} SET old_memory = NULL, new_memory = NULL, actor_id = NULL "
                     "WHERE user_id = %s AND memory_id = ANY(%s::uuid[])", (user_id, deleted))
    with conn.cursor() as cur:
        cur.executemany(
            f"""INSERT INTO {HISTORY} (user_id, id, memory_id, old_memory, new_memory, event, created_at, updated_at,
                                       is_deleted, actor_id, role)
                SELECT %(user_id)s, coalesce(%(id)s::uuid, gen_random_uuid()), %(memory_id)s, %(old_memory)s,
                       %(new_memory)s, %(event)s, %(created_at)s, %(updated_at)s, %(is_deleted)s, %(actor_id)s,
                       %(role)s
                WHERE %(event)s <> 'ADD' OR NOT EXISTS (SELECT 1 FROM {HISTORY} h WHERE h.user_id = %(user_id)s
                                                         AND h.memory_id = %(memory_id)s AND h.event = 'ADD')
                ON CONFLICT DO NOTHING""",
            [{"user_id": user_id, "id": r.get("id"), "memory_id": r["memory_id"], "old_memory": r.get("old_memory"),
              "new_memory": r.get("new_memory"), "event": r["event"], "created_at": r.get("created_at"),
              "updated_at": r.get("updated_at"), "is_deleted": bool(r.get("is_deleted")),
              "actor_id": r.get("actor_id"), "role": r.get("role")} for r in rows],
        )


def history(conn: psycopg.Connection[Any], user_id: str, memory_id: str) -> builtins.list[dict[str, Any]]:
    cur = conn.execute(
        f"""SELECT id::text, memory_id::text, old_memory, new_memory, event, created_at, updated_at, is_deleted,
                   actor_id, role
            FROM {HISTORY} WHERE user_id = %s AND memory_id = %s ORDER BY created_at, updated_at""",
        (user_id, memory_id),
    )
    names = [c.name for c in cur.description or []]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def save_messages(conn: psycopg.Connection[Any], user_id: str, session_scope: str,
                  messages: Sequence[dict[str, Any]], keep: int, now: str) -> None:
    """Append a session's messages and keep only its last `keep` (mem0's `save_messages`). A message
    with an `id` that is there already is not added again; `created_at` defaults to `now`."""
    with conn.cursor() as cur:
        cur.executemany(
            f"INSERT INTO {MESSAGES} (user_id, id, session_scope, role, content, name, created_at) "
            "VALUES (%s, coalesce(%s::uuid, gen_random_uuid()), %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            [(user_id, m.get("id"), session_scope, m.get("role"), m.get("content"), m.get("name"),
              m.get("created_at") or now) for m in messages],
        )
    conn.execute(
        f"""DELETE FROM {MESSAGES} WHERE user_id = %(u)s AND session_scope = %(s)s AND id NOT IN (
                SELECT id FROM {MESSAGES} WHERE user_id = %(u)s AND session_scope = %(s)s
                ORDER BY created_at DESC LIMIT %(keep)s)""",
        {"u": user_id, "s": session_scope, "keep": keep},
    )


def last_messages(conn: psycopg.Connection[Any], user_id: str, session_scope: str,
                  limit: int) -> builtins.list[dict[str, Any]]:
    rows = conn.execute(
        f"""SELECT role, content, name, created_at FROM (
                SELECT role, content, name, created_at FROM {MESSAGES}
                WHERE user_id = %s AND session_scope = %s ORDER BY created_at DESC LIMIT %s
            ) AS last ORDER BY created_at""",
        (user_id, session_scope, limit),
    ).fetchall()
    return [{"role": r[0], "content": r[1], "name": r[2], "created_at": r[3]} for r in rows]


def owner_of(conn: psycopg.Connection[Any], memory_id: str) -> str | None:
    """The user a memory id belongs to, in memfleet's table or mem0's older one (None: no such memory)."""
    row = conn.execute(f"SELECT user_id FROM {TABLE} WHERE id = %s", (memory_id,)).fetchone()
    if row:
        return str(row[0])
    rows = _legacy(conn, "SELECT payload->>'user_id' FROM {} WHERE id = %s", (memory_id,), LEGACY_TABLE)
    return str(rows[0][0]) if rows and rows[0][0] else None
