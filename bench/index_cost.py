"""1d. What retrieval costs at ingest: memfleet's indexing against storing the bare message, side by side.

Both passes store the same LoCoMo writes, in the same process, through the same model and database:
- memfleet: each message is embedded as `Speaker: text`, and stored by `pg_store.insert` with its
  postings (its keyword text in context, stemmed by PostgreSQL) and the lengths index BM25 reads;
- bare: each message's text is embedded as it is, and stored with its history row only, in a table
  of the same shape without postings or lengths index: what storing costs without the retrieval work.
Each pass encodes every text (the worker's batch size and precision) and then inserts each write,
one after the other; the passes alternate, twice each, and the faster of each counts. Run one after
the other, encoding and inserting add up: an upper bound on the share of the worker's ingest
time, as the worker inserts one job's rows while it encodes the next one's texts.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from bench.common import Row, row, say
from producer.contract import AddRequest
from producer.ingest import group, read_messages
from workers.backends.pg_server import stop_embedded_postgres

BARE = "bench_bare_memories"
# What `pg_store._INSERT` writes, minus the retrieval work: no terms, no postings.
_BARE_INSERT = f"""
WITH added AS (
    INSERT INTO {BARE} (user_id, id, vector, payload, keyword_count)
    VALUES (%(user_id)s, %(id)s, %(vector)s::halfvec, %(payload)s, 0)
    ON CONFLICT DO NOTHING RETURNING id
)
INSERT INTO memfleet_history (user_id, id, memory_id, old_memory, new_memory, event, created_at, updated_at,
                              actor_id, role)
SELECT %(user_id)s, gen_random_uuid(), added.id, NULL, %(data)s, 'ADD', %(created_at)s, %(updated_at)s,
       %(actor_id)s, %(role)s
FROM added
"""


def run(files: list[Path], directory: Path) -> list[Row]:
    from workers.backends.pg_pool import register_vector_dumper
    from workers.backends.pg_server import prepare_database, start_embedded_postgres
    from workers.model import load_model, resolve_precision, set_precision
    from workers.settings import WorkerConfig

    requests = list(group(read_messages(files, "locomo")))
    messages = sum(len(r.messages) for r in requests)
    config = WorkerConfig(data_dir=directory)
    model = load_model()
    set_precision(model, resolve_precision(config.embed_precision))
    url = start_embedded_postgres(directory)
    prepare_database(url)
    pool = ConnectionPool(url, min_size=1, max_size=1, open=False, configure=register_vector_dumper)
    try:
        pool.open(wait=True, timeout=30)
        with pool.connection() as conn:
            conn.execute(f"CREATE TABLE {BARE} (LIKE memfleet_memories INCLUDING STORAGE INCLUDING CONSTRAINTS "
                         "INCLUDING DEFAULTS, PRIMARY KEY (user_id, id)) WITH (toast_tuple_target = 128)")
        model.encode(["warm up"] * 32, batch_size=config.embed_batch, show_progress_bar=False)
        best: dict[str, tuple[float, float]] = {}
        for attempt in range(2):
            for name in ("bare", "memfleet"):
                encode, insert = _pass(name, f"{name}{attempt}", requests, model, config.embed_batch, pool)
                say(f"indexing cost, {name}: encode {encode:.1f} s, insert {insert:.1f} s")
                if name not in best or encode + insert < sum(best[name]):
                    best[name] = (encode, insert)
    finally:
        pool.close()
        stop_embedded_postgres(directory)
        shutil.rmtree(directory, ignore_errors=True)
    rate = {name: messages / sum(seconds) for name, seconds in best.items()}
    cost = 1 - rate["memfleet"] / rate["bare"]
    (bare_encode, bare_insert), (full_encode, full_insert) = best["bare"], best["memfleet"]
    return [
        row("ingest", "retrieval indexing: share of ingest time", cost * 100, "%", at_most=10,
            notes=f"{messages:,} LoCoMo messages: memfleet {rate['memfleet']:.0f}/s (encode {full_encode:.1f} s + "
                  f"insert {full_insert:.1f} s) vs the bare message {rate['bare']:.0f}/s (encode {bare_encode:.1f} s "
                  f"+ insert {bare_insert:.1f} s); encode and insert one after the other, an upper bound"),
    ]


def _pass(name: str, prefix: str, requests: Sequence[AddRequest], model: Any, batch_size: int,
          pool: ConnectionPool) -> tuple[float, float]:
    """Encode every message of `requests`, then store each write; return (encode, insert) seconds."""
    from workers.backends import pg_store
    from workers.backends.indexing import Said, in_context
    from workers.backends.memories import memory_id, message_payload

    contexts = [in_context([Said(m.content, m.name, m.timestamp) for m in r.messages]) for r in requests]
    texts = ([m.content for r in requests for m in r.messages] if name == "bare"
             else [ix.dense for written in contexts for ix in written])
    started = time.perf_counter()
    vectors = np.asarray(model.encode(texts, batch_size=batch_size, show_progress_bar=False), dtype=np.float32)
    encoded = time.perf_counter()
    position = 0
    for request, written in zip(requests, contexts, strict=True):
        user = f"{prefix}-{request.user_id}"
        ids = [memory_id(user, message.id or str(position + i)) for i, message in enumerate(request.messages)]
        rows = []
        for message, mid, ix in zip(request.messages, ids, written, strict=True):
            rows.append(pg_store.NewMemory(mid, vectors[position], message_payload(user, request, message), ix.own,
                                           ix.context, tuple(ids[f] for f in ix.followers)))
            position += 1
        with pool.connection() as conn:
            if name == "bare":
                _bare_insert(conn, user, rows)
            else:
                pg_store.insert(conn, user, rows)
    return encoded - started, time.perf_counter() - encoded


def _bare_insert(conn: Any, user: str, memories: Sequence[Any]) -> None:
    with conn.cursor() as cur:
        cur.executemany(_BARE_INSERT, [
            {"user_id": user, "id": m.id, "vector": m.vector, "payload": Jsonb(m.payload), "data": m.payload["data"],
             "created_at": m.payload.get("created_at"), "updated_at": m.payload.get("updated_at"),
             "actor_id": m.payload.get("actor_id"), "role": m.payload.get("role")}
            for m in memories
        ])
