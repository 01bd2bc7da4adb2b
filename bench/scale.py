"""3. Per-user search cost as the table grows: memfleet's ranking query at 10k and 1M rows.

The tables are memfleet's (`pg_schema.ensure_schema`), filled by SQL alone with synthetic users of ~10
memories each: vectors come from a pool of 4,096 random ones (the query reads a user's rows whatever their
values), each memory has three keyword terms, and each user's rows are spread over the chunk they were written
in, as a real user's memories are spread over time. The query is `pg_search.search`, word for word.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
from psycopg_pool import ConnectionPool

from bench.common import Row, make_vector_pool, note, percentile, row, say, vacuum_memory_tables
from workers.backends.pg_server import stop_embedded_postgres

PER_USER = 10
CHUNK = 50_000  # rows per INSERT; the time box is checked between chunks
VECTOR_POOL = 4096
WORDS = ["coffee", "hiking", "sister", "painting", "guitar", "marathon", "adoption", "camping",
         "pottery", "dance", "job", "concert", "dog", "garden", "library", "beach"]
FILL = """
WITH filled AS (
    INSERT INTO memfleet_memories (user_id, id, vector, payload, keyword_count)
    SELECT 'user-' || lpad((%(first_user)s + (i - %(start)s) %% %(users)s)::text, 7, '0'), gen_random_uuid(),
           v.vector, jsonb_build_object('data', 'memory ' || i || ' about ' || (%(words)s::text[])[1 + i %% 16],
                                        'role', 'user'), 3
    FROM generate_series(%(start)s, %(stop)s - 1) AS i
    JOIN bench_vectors v ON v.k = (i * 2654435761) %% {pool}
    RETURNING user_id, id, payload->>'data' AS data
)
INSERT INTO memfleet_postings (user_id, term, memory_id, tf)
SELECT user_id, lexeme, id, 1 FROM filled, unnest(to_tsvector('english', data))
"""


def run(directory: Path, *, sizes: tuple[int, int], queries: int, fill_seconds: float) -> list[Row]:
    from workers.backends.pg_pool import register_vector_dumper
    from workers.backends.pg_server import prepare_database, start_embedded_postgres

    url = start_embedded_postgres(directory)
    prepare_database(url)  # the vector type must exist before a connection can be configured for it
    pool = ConnectionPool(url, min_size=1, max_size=2, open=False, configure=register_vector_dumper,
                          kwargs={"options": "-c maintenance_work_mem=512MB", "autocommit": True})
    try:
        pool.open(wait=True, timeout=30)
        _prepare(pool)
        deadline = time.monotonic() + fill_seconds
        rows_in, fill_time = 0, 0.0
        measured: dict[int, list[float]] = {}
        for target in sizes:
            started = time.perf_counter()
            rows_in = _fill(pool, rows_in, target, deadline)
            fill_time += time.perf_counter() - started
            say(f"scale: {rows_in:,} rows ({rows_in / fill_time:,.0f} rows/s overall)")
            measured[rows_in] = _measure(pool, rows_in // PER_USER, queries)
            if rows_in < target:
                break  # out of time: the next size would not be reached either
    finally:
        pool.close()
        stop_embedded_postgres(directory)
    return _rows(measured, sizes, fill_time)


def _prepare(pool: ConnectionPool) -> None:
    with pool.connection() as conn:
        # Unlogged: no WAL while filling; reads (all we measure) are the same as for a logged table.
        conn.execute("ALTER TABLE memfleet_memories SET UNLOGGED")
        conn.execute("ALTER TABLE memfleet_postings SET UNLOGGED")
    make_vector_pool(pool, VECTOR_POOL)


def _fill(pool: ConnectionPool, start: int, target: int, deadline: float) -> int:
    """Insert rows [start, target); return the rows reached."""
    while start < target and time.monotonic() < deadline:
        stop = min(target, start + CHUNK)
        with pool.connection() as conn:
            conn.execute(FILL.format(pool=VECTOR_POOL),
                         {"start": start, "stop": stop, "first_user": start // PER_USER,
                          "users": (stop - start) // PER_USER, "words": WORDS})
        start = stop
    vacuum_memory_tables(pool)
    return start


def _measure(pool: ConnectionPool, users: int, count: int, warmup: int = 3) -> list[float]:
    """Latency (ms) of memfleet's ranking query for random users, each with a random query."""
    from workers.backends import pg_search

    rng = random.Random(count)
    samples: list[float] = []
    for n in range(warmup + count):
        user = f"user-{rng.randrange(users):07d}"
        vector = np.asarray([rng.uniform(-0.5, 0.5) for _ in range(384)], dtype=np.float32)
        query = f"what about the {rng.choice(WORDS)} and the {rng.choice(WORDS)}?"
        with pool.connection() as conn:
            started = time.perf_counter()
            found = pg_search.search(conn, user, query, vector, 10, {})
            elapsed = (time.perf_counter() - started) * 1000
        if len(found) != PER_USER:
            raise RuntimeError(f"search for {user} returned {len(found)} rows, expected its {PER_USER}")
        if n >= warmup:
            samples.append(elapsed)
    return samples


def _rows(measured: dict[int, list[float]], sizes: tuple[int, int], fill_time: float) -> list[Row]:
    rows: list[Row] = []
    for rows_in, samples in measured.items():
        rows += [
            row("scale", f"memfleet search, {rows_in:,} rows: p50", percentile(samples, 50), "ms",
                notes=f"{len(samples)} searches of random users, {PER_USER} memories each, top 10"),
            row("scale", f"memfleet search, {rows_in:,} rows: p99", percentile(samples, 99), "ms"),
        ]
    reached = list(measured)
    if len(reached) < 2 or reached[-1] < sizes[1]:
        return [*rows, note("scale", "p50, large / small", f"the fill reached only {reached[-1]:,} rows "
                            f"of {sizes[1]:,} in the time box ({fill_time:.0f} s)")]
    small, large = (percentile(measured[n], 50) for n in reached)
    return [*rows, row("scale", f"p50, {reached[1]:,} / {reached[0]:,} rows", large / small, "x", at_most=1.5,
                       notes=f"fill took {fill_time:.0f} s")]
