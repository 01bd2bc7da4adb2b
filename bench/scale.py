"""3. Per-user search cost as the table grows: mem0's own vector query, with and without our user_id index.

The table is memfleet's (`ensure_schema`), filled with synthetic users of ~10 memories each, by SQL alone:
vectors come from a pool of 4,096 random ones (the query reads a user's rows whatever their values), and each
user's rows are spread over the chunk they were written in, as a real user's memories are spread over time.
The query is run through mem0's `PGVector.search`, so it is mem0's exact SQL and parameters.
"""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from psycopg_pool import ConnectionPool

from bench.common import Row, note, percentile, row, say, stop_embedded_postgres

PER_USER = 10
CHUNK = 50_000  # rows per INSERT; the time box is checked between chunks
TOP_K = 60  # what mem0's search asks its vector store for when the caller wants 10: max(4 * 10, 60)
VECTOR_POOL = 4096
WORDS = ["coffee", "hiking", "sister", "painting", "guitar", "marathon", "adoption", "camping",
         "pottery", "dance", "job", "concert", "dog", "garden", "library", "beach"]
FILL = """
INSERT INTO {table} (id, vector, payload)
SELECT gen_random_uuid(), v.vector, jsonb_build_object(
    'user_id', 'user-' || lpad((%(first_user)s + (i - %(start)s) %% %(users)s)::text, 7, '0'),
    'data', 'memory ' || i || ' about ' || (%(words)s::text[])[1 + i %% 16],
    'hash', md5(i::text),
    'role', 'user',
    'created_at', %(now)s::text,
    'updated_at', %(now)s::text,
    'text_lemmatized', 'memory ' || (%(words)s::text[])[1 + i %% 16] || ' ' || (%(words)s::text[])[1 + (i / 16) %% 16])
FROM generate_series(%(start)s, %(stop)s - 1) AS i
JOIN bench_vectors v ON v.k = (i * 2654435761) %% {pool}
"""


def run(directory: Path, *, sizes: tuple[int, int], queries: int, stock_queries_large: int,
        fill_seconds: float) -> list[Row]:
    from workers.backends.embedded import start_embedded_postgres

    pool = ConnectionPool(start_embedded_postgres(directory), min_size=1, max_size=2, open=False,
                          kwargs={"options": "-c maintenance_work_mem=512MB"})
    try:
        pool.open(wait=True, timeout=30)
        _prepare(pool)
        store = _mem0_store(pool)
        deadline = time.monotonic() + fill_seconds
        rows_in, fill_time = 0, 0.0
        measured: dict[int, dict[str, list[float]]] = {}
        for target in sizes:
            started = time.perf_counter()
            rows_in = _fill(pool, rows_in, target, deadline)
            fill_time += time.perf_counter() - started
            say(f"scale: {rows_in:,} rows ({rows_in / fill_time:,.0f} rows/s overall, with index builds)")
            users = rows_in // PER_USER
            small = target == sizes[0]
            indexed = _measure(store, users, queries)
            _drop_user_index(pool)  # mem0's stock table: the same one without memfleet's user_id index
            stock = _measure(store, users, queries if small else stock_queries_large)
            measured[rows_in] = {"indexed": indexed, "stock": stock}
            if rows_in < target:
                break  # out of time: the next size would not be reached either
    finally:
        pool.close()
        stop_embedded_postgres(directory)
    return _rows(measured, sizes, fill_time)


def _prepare(pool: ConnectionPool) -> None:
    from workers.backends.embedded import COLLECTION, ensure_schema

    with pool.connection() as conn:
        ensure_schema(conn)
    with pool.connection() as conn:
        # Unlogged: no WAL while filling; reads (all we measure) are the same as for a logged table.
        conn.execute(f"ALTER TABLE {COLLECTION} SET UNLOGGED")
        conn.execute(f"""CREATE TABLE bench_vectors AS SELECT k, (SELECT array_agg(random() - 0.5)
                         FROM generate_series(1, 384) WHERE k >= 0)::vector(384) AS vector
                         FROM generate_series(0, {VECTOR_POOL - 1}) AS k""")
        conn.execute("ALTER TABLE bench_vectors ADD PRIMARY KEY (k)")


def _fill(pool: ConnectionPool, start: int, target: int, deadline: float) -> int:
    """Insert rows [start, target) with the indexes dropped, then rebuild them; return the rows reached."""
    from workers.backends.embedded import COLLECTION, ensure_schema

    with pool.connection() as conn:
        for index in ("user_id_idx", "text_lemmatized_idx"):
            conn.execute(f"DROP INDEX IF EXISTS {COLLECTION}_{index}")
    now = datetime.now(UTC).isoformat()
    while start < target and time.monotonic() < deadline:
        stop = min(target, start + CHUNK)
        with pool.connection() as conn:
            conn.execute(FILL.format(table=COLLECTION, pool=VECTOR_POOL),
                         {"start": start, "stop": stop, "first_user": start // PER_USER,
                          "users": (stop - start) // PER_USER, "words": WORDS, "now": now})
        start = stop
    with pool.connection() as conn:
        ensure_schema(conn)  # the same DDL memfleet runs: recreates both indexes
    with pool.connection() as conn:
        conn.execute(f"ANALYZE {COLLECTION}")
    return start


def _mem0_store(pool: ConnectionPool) -> Any:
    from mem0.vector_stores.pgvector import PGVector

    from workers.backends.embedded import COLLECTION
    from workers.model import EMBEDDING_DIMS

    store = PGVector(dbname=None, collection_name=COLLECTION, embedding_model_dims=EMBEDDING_DIMS, user=None,
                     password=None, host=None, port=None, diskann=False, hnsw=False, connection_pool=pool)
    store._collection_ensured = True
    return store


def _measure(store: Any, users: int, count: int, warmup: int = 3) -> list[float]:
    """Latency (ms) of mem0's vector search for random users, each with a random query vector."""
    rng = random.Random(count)
    samples: list[float] = []
    for n in range(warmup + count):
        user = f"user-{rng.randrange(users):07d}"
        vector = [rng.uniform(-0.5, 0.5) for _ in range(384)]
        started = time.perf_counter()
        found = store.search("", vectors=vector, top_k=TOP_K, filters={"user_id": user})
        elapsed = (time.perf_counter() - started) * 1000
        if len(found) != PER_USER or any(r.payload["user_id"] != user for r in found):
            raise RuntimeError(f"search for {user} returned {len(found)} rows, expected its {PER_USER}")
        if n >= warmup:
            samples.append(elapsed)
    return samples


def _drop_user_index(pool: ConnectionPool) -> None:
    from workers.backends.embedded import COLLECTION

    with pool.connection() as conn:
        conn.execute(f"DROP INDEX {COLLECTION}_user_id_idx")


def _rows(measured: dict[int, dict[str, list[float]]], sizes: tuple[int, int], fill_time: float) -> list[Row]:
    rows: list[Row] = []
    for rows_in, runs in measured.items():
        for kind, samples in runs.items():
            label = "memfleet (user_id index)" if kind == "indexed" else "mem0 stock (no index)"
            rows += [
                row("scale", f"{label}, {rows_in:,} rows: p50", percentile(samples, 50), "ms",
                    notes=f"{len(samples)} searches of random users, {PER_USER} memories each, top {TOP_K}"),
                row("scale", f"{label}, {rows_in:,} rows: p99", percentile(samples, 99), "ms"),
            ]
    reached = list(measured)
    if len(reached) < 2 or reached[-1] < sizes[1]:
        return [*rows, note("scale", "indexed p50, large / small", f"the fill reached only {reached[-1]:,} rows "
                            f"of {sizes[1]:,} in the time box ({fill_time:.0f} s)")]
    small, large = (percentile(measured[n]["indexed"], 50) for n in reached)
    stock_large = percentile(measured[reached[1]]["stock"], 50)
    return [
        *rows,
        row("scale", f"indexed p50, {reached[1]:,} / {reached[0]:,} rows", large / small, "x", at_most=1.5,
            notes=f"fill + index builds took {fill_time:.0f} s"),
        row("scale", f"stock / indexed p50 at {reached[1]:,} rows", stock_large / large, "x"),
    ]
