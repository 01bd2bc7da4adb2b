"""1b. mem0 used directly, as its docs show: one AsyncMemory, one `add(infer=False)` per message, many at once.

Same Postgres (embedded, pgvector), same model and same table layout as memfleet (`hnsw` off, as memfleet
runs it), but mem0's own per-message path: one embedding, one INSERT and one history row per message.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from bench.common import Row, row, say
from workers.backends.pg_server import stop_embedded_postgres

COLLECTION = "mem0_direct"  # not memfleet's "memories": mem0 creates and owns this one
CONCURRENCY = 50

Entry = tuple[str, dict[str, Any], dict[str, Any]]  # user id, message, metadata


def build_memory(pg_url: str, directory: Path) -> Any:
    from mem0 import AsyncMemory
    from mem0.configs.base import MemoryConfig

    from workers.model import EMBEDDING_DIMS, verified_model_dir

    return AsyncMemory(MemoryConfig(
        vector_store={"provider": "pgvector",
                      "config": {"collection_name": COLLECTION, "embedding_model_dims": EMBEDDING_DIMS,
                                 "connection_string": pg_url, "hnsw": False, "diskann": False}},
        embedder={"provider": "huggingface",
                  "config": {"model": str(verified_model_dir()), "embedding_dims": EMBEDDING_DIMS,
                             "model_kwargs": {"device": "cpu", "local_files_only": True}}},
        # Never called with infer=False; mem0 builds the client at start-up all the same.
        llm={"provider": "openai", "config": {"api_key": "unused", "openai_base_url": "http://127.0.0.1:9/x"}},
        history_db_path=str(directory / "history.db"),
    ))


async def run(entries: list[Entry], directory: Path, *, limit: int, seconds: float) -> list[Row]:
    from workers.backends.pg_server import start_embedded_postgres

    pg_url = await asyncio.to_thread(start_embedded_postgres, directory)
    memory = None
    try:
        memory = await asyncio.to_thread(build_memory, pg_url, directory)
        # mem0 creates its table on first use, and concurrent first calls race on CREATE TABLE: one goes first.
        await memory.add("warm-up", user_id="bench-warmup", infer=False)
        gate = asyncio.Semaphore(CONCURRENCY)
        started = time.perf_counter()
        deadline = started + seconds
        finished: list[float] = []

        async def add(user_id: str, message: dict[str, Any], metadata: dict[str, Any]) -> None:
            async with gate:
                if time.perf_counter() > deadline:
                    return
                result = await memory.add([message], user_id=user_id, infer=False, metadata=metadata)
                if len(result["results"]) != 1:
                    raise RuntimeError(f"mem0 stored {len(result['results'])} memories for one message")
                finished.append(time.perf_counter())

        await asyncio.gather(*(add(*e) for e in entries[:limit]))
        rows_stored = (await asyncio.to_thread(memory.vector_store.col_info))["count"]
        if rows_stored != len(finished) + 1:  # + the warm-up
            raise RuntimeError(f"mem0 reported {len(finished) + 1} adds but its table has {rows_stored} rows")
    finally:
        if memory is not None:
            await asyncio.to_thread(memory.vector_store.connection_pool.close)
            await asyncio.to_thread(memory.db.close)
        stop_embedded_postgres(directory)
    elapsed = max(finished) - started if finished else float("nan")
    rate = len(finished) / elapsed
    say(f"mem0 direct: {len(finished)} memories in {elapsed:.1f} s, {rate:.0f}/s")
    return [row("ingest", "mem0 AsyncMemory direct", rate, "memories/s",
                notes=f"{len(finished):,} of {len(entries):,} texts in {elapsed:.1f} s, {CONCURRENCY} concurrent")]
