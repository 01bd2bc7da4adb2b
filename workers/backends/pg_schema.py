"""memfleet's tables in PostgreSQL (+ pgvector): their names, and the schema that start-up makes
idempotently, upgrading an older one in place.

Every table that holds a user's data has `user_id` first in its primary key, so each user's rows
are one index range, and on Citus `user_id` is the distribution column.
"""

from __future__ import annotations

import hashlib
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
#: each user's search version (`search_version_sql`), keyed by `user_key`
SEARCH_VERSIONS = "memfleet_search_versions"
#: every table that holds a user's data: forget empties each of them for the user
USER_TABLES = (POSTINGS, HISTORY, MESSAGES, EXTRACTIONS, TABLE)
#: mem0's pgvector collection, where memfleet kept memories before it had its own table
LEGACY_TABLE = "memories"
#: mem0's entity collection beside it (filled only by mem0's entity linking, which needs spaCy)
LEGACY_ENTITIES = "memories_entities"
TEXT_SEARCH = "english"
SCHEMA_LOCK = 0x6D656D66  # pg_advisory_xact_lock key: "memf"


ALL_USERS = "*"  # the search-version row that a TRUNCATE moves: every user's index is stale then


def user_key(user_id: str) -> str:
    """How the tables that outlive a forget (fences, search versions) name a user: sha256, hex.
    The same as the triggers' `encode(sha256(convert_to(user_id, 'UTF8')), 'hex')`."""
    return hashlib.sha256(user_id.encode()).hexdigest()


def search_version_sql(key: str) -> str:
    """The user's search version (`key`: a placeholder for their `user_key`): it moves, never back,
    in the transaction of every change to the user's memories or postings, and at any TRUNCATE of
    them (`ALL_USERS`)."""
    return (f"greatest(coalesce((SELECT version FROM {SEARCH_VERSIONS} WHERE user_key = {key}), 0), "
            f"coalesce((SELECT version FROM {SEARCH_VERSIONS} WHERE user_key = '{ALL_USERS}'), 0))")


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
    # Search versions (`search_version_sql`). A worker keeps a large user's search index in memory
    # (workers.backends.search_index) and uses it only while the version it was read at is current.
    # The versions come from one sequence, so a version never returns to an earlier value, and the
    # rows are keyed by a hash of the user id and kept after a forget, as the fences are.
    "CREATE SEQUENCE IF NOT EXISTS memfleet_search_version_seq",
    """CREATE TABLE IF NOT EXISTS memfleet_search_versions (
           user_key text PRIMARY KEY,  -- sha256 of the user id, hex; '*' for all users
           version bigint NOT NULL
       )""",
    # Statement triggers with a transition table: one row per user a statement touched, whatever
    # the number of rows (a bulk insert moves its user's version once). Users in id order, so that
    # two statements that touch the same users lock their rows in the same order.
    """CREATE OR REPLACE FUNCTION memfleet_search_version_moved() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN
           IF TG_OP = 'TRUNCATE' THEN
               INSERT INTO memfleet_search_versions VALUES ('*', nextval('memfleet_search_version_seq'))
               ON CONFLICT (user_key) DO UPDATE SET version = excluded.version;
           ELSE
               INSERT INTO memfleet_search_versions (user_key, version)
               SELECT encode(sha256(convert_to(user_id, 'UTF8')), 'hex'), nextval('memfleet_search_version_seq')
               FROM (SELECT DISTINCT user_id FROM changed ORDER BY user_id) AS users
               ON CONFLICT (user_key) DO UPDATE SET version = excluded.version;
           END IF;
           RETURN NULL;
       END $$""",
    *[f"""DO $$ BEGIN
            IF NOT EXISTS (SELECT FROM pg_trigger WHERE tgname = 'memfleet_search_{table}_{event}') THEN
                CREATE TRIGGER memfleet_search_{table}_{event} AFTER {event.upper()} ON memfleet_{table}
                {f"REFERENCING {rows} TABLE AS changed " if rows else ""}FOR EACH STATEMENT
                EXECUTE FUNCTION memfleet_search_version_moved();
            END IF;
        END $$"""
      for table in ("memories", "postings")
      for event, rows in (("insert", "NEW"), ("update", "NEW"), ("delete", "OLD"), ("truncate", ""))],
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
