"""1a. The ceiling: MiniLM encoding the LoCoMo texts in plain batches, in this process, nothing else.

Also one search query at a time: the floor under any search latency (section 2).
"""

from __future__ import annotations

import gc
import time

from bench.common import Row, locomo_questions, percentile, row, say

BATCH_SIZES = (16, 64)
QUERIES = 100


def run(texts: list[str]) -> list[Row]:
    from workers.model import load_model

    model = load_model()
    try:
        model.encode(texts[:32], batch_size=16, show_progress_bar=False)  # warm-up: first-call allocations
        rates: dict[int, float] = {}
        for batch_size in BATCH_SIZES:
            started = time.perf_counter()
            model.encode(texts, batch_size=batch_size, show_progress_bar=False)
            rates[batch_size] = len(texts) / (time.perf_counter() - started)
            say(f"raw encode, batch {batch_size}: {rates[batch_size]:.0f} texts/s")
        query_ms = []
        for question in locomo_questions()[:QUERIES]:
            started = time.perf_counter()
            model.encode([question], batch_size=1, show_progress_bar=False)
            query_ms.append((time.perf_counter() - started) * 1000)
    finally:
        del model
        gc.collect()
    best = max(rates, key=rates.__getitem__)
    return [
        *(row("ingest", f"raw encode, batch {b}", rates[b], "texts/s") for b in BATCH_SIZES),
        row("ingest", "raw encode (reference)", rates[best], "texts/s",
            notes=f"the faster of the two: batch {best}; {len(texts):,} texts"),
        row("search", "one query encoded alone, p50", percentile(query_ms, 50), "ms",
            notes=f"in-process, {len(query_ms)} LoCoMo questions: the floor under a search"),
    ]
