"""11. One user with many short memories over a small vocabulary: the table's part of a search.

A support or sales agent's memory (issue 24): every word of a question is in thousands of the
user's memories. Filled by SQL alone, laid out as memfleet's write path lays it out
(`pg_schema`): each memory one line of eight words drawn from 40 topic words, written in
conversations of ten messages, each line the keyword context of the two after it (`context_of`,
and their BM25 lengths count it); vectors from a pool of random ones (a search reads every
vector of the user whatever its value). The query is `pg_search.search` word for word, in
process: no queue and no query encode, which the search section measures. Beside it, the dense
half alone (the user's cosines, top 10), so that the keyword half's share can be read off.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np
from psycopg_pool import ConnectionPool

from bench.common import Row, make_vector_pool, percentile, row, say, vacuum_memory_tables
from workers.backends.pg_server import stop_embedded_postgres

USER = "heavy-user"
WORDS = ["refund", "invoice", "delivery", "account", "password", "upgrade", "discount", "warranty",
         "shipping", "order", "return", "payment", "subscription", "login", "email", "address",
         "contract", "renewal", "license", "support", "ticket", "outage", "billing", "credit",
         "trial", "plan", "seat", "export", "import", "report", "dashboard", "integration",
         "webhook", "api", "token", "quota", "storage", "backup", "restore", "migration"]
PER_LINE = 8
CONVERSATION = 10
VECTOR_POOL = 4096
CHUNK = 20_000
# Goals of issue 24, for the table's part alone (the queue and the encode add a few ms).
GOALS = {20_000: (40.0, 100.0), 100_000: (60.0, 150.0)}

FILL = """
WITH lines AS (
    SELECT i, i %% {conversation} AS p,
           (SELECT string_agg((%(words)s::text[])[1 + ((i * 7919 + k * 104729 + k * k * 31) %% {vocabulary})], ' ')
            FROM generate_series(1, {per_line}) AS k) AS line
    FROM generate_series(%(start)s, %(stop)s - 1) AS i
),
filled AS (
    INSERT INTO memfleet_memories (user_id, id, vector, payload, keyword_count, context_of)
    SELECT %(user)s, md5(%(user)s || i)::uuid, v.vector, jsonb_build_object('data', line, 'role', 'user'),
           {per_line} * (1 + least(p, 2)),
           ARRAY(SELECT md5(%(user)s || (i + d))::uuid FROM generate_series(1, 2) AS d
                 WHERE p + d < {conversation})
    FROM lines JOIN bench_vectors v ON v.k = (i * 2654435761) %% {pool}
    RETURNING id, payload->>'data' AS data
)
INSERT INTO memfleet_postings (user_id, term, memory_id, tf)
SELECT %(user)s, lexeme, id, coalesce(array_length(positions, 1), 1) FROM filled, unnest(to_tsvector('english', data))
"""

DENSE = """
SELECT id, 1 - (vector <=> %(vector)s::halfvec) AS cosine FROM memfleet_memories
WHERE user_id = %(user_id)s ORDER BY cosine DESC LIMIT 10
"""


def run(directory: Path, *, sizes: tuple[int, ...], queries: int) -> list[Row]:
    from workers.backends.pg_pool import register_vector_dumper
    from workers.backends.pg_server import prepare_database, start_embedded_postgres

    url = start_embedded_postgres(directory)
    prepare_database(url)  # the vector type must exist before a connection can be configured for it
    pool = ConnectionPool(url, min_size=1, max_size=2, open=False, configure=register_vector_dumper,
                          kwargs={"autocommit": True})  # VACUUM runs outside a transaction
    rows: list[Row] = []
    try:
        pool.open(wait=True, timeout=30)
        _prepare(pool)
        filled = 0
        for size in sizes:
            started = time.perf_counter()
            filled = _fill(pool, filled, size)
            say(f"heavy: one user with {filled:,} memories (filled in {time.perf_counter() - started:.0f} s)")
            rows += _measure(pool, filled, queries)
    finally:
        pool.close()
        stop_embedded_postgres(directory)
    return rows


def _prepare(pool: ConnectionPool) -> None:
    from workers.model import EMBEDDING_DIMS

    make_vector_pool(pool, VECTOR_POOL, EMBEDDING_DIMS)


def _fill(pool: ConnectionPool, start: int, target: int) -> int:
    statement = FILL.format(conversation=CONVERSATION, vocabulary=len(WORDS), per_line=PER_LINE, pool=VECTOR_POOL)
    while start < target:
        stop = min(target, start + CHUNK)
        with pool.connection() as conn:
            conn.execute(statement, {"start": start, "stop": stop, "user": USER, "words": WORDS})
        start = stop
    vacuum_memory_tables(pool)
    return start


def _measure(pool: ConnectionPool, memories: int, count: int, warmup: int = 3) -> list[Row]:
    from workers.backends import pg_search

    rng = random.Random(memories)
    full: list[float] = []
    dense: list[float] = []
    for n in range(warmup + count):
        vector = np.asarray([rng.uniform(-0.5, 0.5) for _ in range(384)], dtype=np.float32)
        query = f"what about the {rng.choice(WORDS)} and the {rng.choice(WORDS)} of my {rng.choice(WORDS)}?"
        with pool.connection() as conn:
            started = time.perf_counter()
            found = pg_search.search(conn, USER, query, vector, 10, {})
            searched = time.perf_counter()
            params: dict[str, Any] = {"vector": vector, "user_id": USER}
            conn.execute(DENSE, params, prepare=False).fetchall()
            ended = time.perf_counter()
        if len(found) != 10:
            raise RuntimeError(f"search returned {len(found)} memories, expected 10")
        if n >= warmup:
            full.append((searched - started) * 1000)
            dense.append((ended - searched) * 1000)
    p50_goal, p99_goal = GOALS.get(memories, (None, None))
    what = f"{count} searches of one user with {memories:,} memories, 3 topic words each, top 10"
    return [
        row("heavy", f"search (table part), {memories:,} memories: p50", percentile(full, 50), "ms",
            at_most=p50_goal, notes=what),
        row("heavy", f"search (table part), {memories:,} memories: p99", percentile(full, 99), "ms", at_most=p99_goal),
        row("heavy", f"dense half alone, {memories:,} memories: p50", percentile(dense, 50), "ms",
            notes="the user's cosines and their top 10; the rest of a search is the keyword half and the fusion"),
        row("heavy", f"dense half / whole search, {memories:,} memories (p50)",
            percentile(dense, 50) / percentile(full, 50), "x"),
    ]
