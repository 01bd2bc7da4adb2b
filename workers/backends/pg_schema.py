"""memfleet's tables in PostgreSQL (+ pgvector): their names, and the schema that start-up makes
idempotently, upgrading an older one in place.

Every table that holds a user's data has `user_id` first in its primary key, so each user's rows
are one index range, and on Citus `user_id` is the distribution column.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

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


def ensure_schema(conn: psycopg.Connection[Any], dims: int) -> None:
    """Create the table idempotently; concurrent starters wait on an advisory lock."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        for statement in _SCHEMA:
            conn.execute(sql.SQL(statement).format(dims=sql.Literal(dims), config=sql.SQL(TEXT_SEARCH)))
