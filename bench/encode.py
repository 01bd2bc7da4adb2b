"""1a. The ceiling: MiniLM encoding the LoCoMo texts in plain batches, in this process, nothing else.

Measured in fp32 (what mem0 and sentence-transformers do by default) and, where the CPU computes
bf16 natively (AVX512-BF16 or AMX, see `workers.model.resolve_precision`), in bf16 too, each at a
few batch sizes. The reference for the ingest ratio is the best of all of them: the fastest this
machine encodes these texts with this model, whatever the worker is set to. Also one search query
at a time, by the model itself and as the worker encodes it (the frozen trace of
`workers.traced_encoder`, one torch thread): the floor under any search latency (section 2).

Then the encoders a worker runs at default settings (`workers.encoders`: ONNX Runtime where bf16 is
not native, one batch per core at a time), on the same texts sorted by length as the worker sorts
them: what memfleet's ingest can reach at most, and how far their embeddings are from the model's.
"""

from __future__ import annotations

import functools
import gc
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from bench.common import Row, locomo_questions, percentile, row, say

BATCH_SIZES = (16, 32, 64, 128)
QUERIES = 100


def run(texts: list[str]) -> list[Row]:
    import torch

    from workers.model import Precision, load_model, resolve_precision, set_precision
    from workers.traced_encoder import TracedEncoder

    precisions: list[Precision] = ["fp32"] if resolve_precision("auto") == "fp32" else ["fp32", "bf16"]
    model = load_model()
    rows: list[Row] = []
    vectors: dict[str, np.ndarray] = {}
    best: tuple[float, str, int] = (0.0, "", 0)  # texts/s, precision, batch size
    try:
        for precision in precisions:
            set_precision(model, precision)
            model.encode(texts[:32], batch_size=16, show_progress_bar=False)  # warm-up: first-call allocations
            rates: dict[int, float] = {}
            for batch_size in BATCH_SIZES:
                started = time.perf_counter()
                vectors[precision] = model.encode(texts, batch_size=batch_size, show_progress_bar=False)
                rates[batch_size] = len(texts) / (time.perf_counter() - started)
                say(f"raw encode, {precision}, batch {batch_size}: {rates[batch_size]:.0f} texts/s")
            query_ms = _query_ms(functools.partial(model.encode, batch_size=1, show_progress_bar=False))
            traced = TracedEncoder(model)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                traced_ms = _query_ms(traced.encode)
            finally:
                torch.set_num_threads(threads)
            best = max(best, *((rate, precision, b) for b, rate in rates.items()))
            rows += [row("ingest", f"raw encode, {precision}, batch {b}", rates[b], "texts/s") for b in BATCH_SIZES]
            rows.append(row("search", f"one query encoded alone, {precision}, p50", percentile(query_ms, 50), "ms",
                            notes=f"in-process, {len(query_ms)} LoCoMo questions, model.encode on all cores"))
            rows.append(row("search", f"one query, traced, one thread, {precision}, p50", percentile(traced_ms, 50),
                            "ms", notes="as the worker encodes queries: the floor under a search"))
        set_precision(model, "fp32")
        rows += _worker_encoders(model, texts, unit_rows_of=vectors["fp32"])
    finally:
        del model
        gc.collect()
    rate, fastest, batch_size = best
    rows.append(row("ingest", "raw encode (reference)", rate, "texts/s",
                    notes=f"the best of {' and '.join(precisions)} at batches {', '.join(map(str, BATCH_SIZES))}: "
                          f"{fastest}, batch {batch_size}; {len(texts):,} texts"))
    if "bf16" in vectors:
        from workers.embedder import unit_rows

        fp32, bf16 = (unit_rows(vectors[p]) for p in ("fp32", "bf16"))
        drift = 1 - (fp32 * bf16).sum(axis=1)
        rows.append(row("ingest", "bf16 vs fp32 embeddings: max 1 - cos, x 1e-4", float(drift.max()) * 1e4, "",
                        notes=f"median {float(np.median(drift)):.1e} over the same texts"))
    return rows


def _worker_encoders(model: Any, texts: list[str], *, unit_rows_of: np.ndarray) -> list[Row]:
    import torch

    from workers.embedder import unit_rows
    from workers.encoders import build_encoders
    from workers.settings import WorkerConfig

    config = WorkerConfig()
    encoders = build_encoders(model, runtime=config.embed_runtime, precision=config.embed_precision,
                              streams=config.embed_threads)
    what = f"{encoders.runtime} {encoders.precision}, {len(encoders.bulk)} streams, batch {config.embed_batch}"
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    batches = [order[i : i + config.embed_batch] for i in range(0, len(order), config.embed_batch)]
    _streamed(encoders.bulk, texts, batches[:4])  # warm-up
    started = time.perf_counter()
    vectors = _streamed(encoders.bulk, texts, batches)
    rate = len(texts) / (time.perf_counter() - started)
    say(f"raw encode, as the worker runs it ({what}): {rate:.0f} texts/s")
    drift = 1 - (unit_rows(vectors) * unit_rows(unit_rows_of)).sum(axis=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker's query thread runs
    try:
        query_ms = _query_ms(lambda batch: encoders.query.encode(batch))
    finally:
        torch.set_num_threads(threads)
    return [
        row("ingest", "raw encode, the worker's encoders", rate, "texts/s",
            notes=f"{what}; length-sorted batches, one per stream at a time"),
        row("ingest", "the worker's encoders vs the model in fp32: max 1 - cos, x 1e-6", float(drift.max()) * 1e6, "",
            at_most=1000, notes=f"median {float(np.median(drift)):.1e}; {len(texts):,} texts; the moonshot's bound "
                                "is 1e-3"),
        row("search", f"one query, the worker's query encoder ({encoders.runtime}), p50", percentile(query_ms, 50),
            "ms", notes="one thread, as a search is encoded"),
    ]


def _streamed(encoders: Sequence[Any], texts: list[str], batches: list[list[int]]) -> np.ndarray:
    """Encode `batches` of `texts` with one thread per encoder, each taking the next batch when free."""
    import torch

    out = np.zeros((len(texts), 384), dtype=np.float32)

    def stream(k: int) -> None:
        torch.set_num_threads(1)  # as the worker's bulk threads run
        for batch in batches[k :: len(encoders)]:
            out[batch] = encoders[k].encode([texts[i] for i in batch])

    with ThreadPoolExecutor(len(encoders)) as pool:
        list(pool.map(stream, range(len(encoders))))
    return out


def _query_ms(encode: Callable[[list[str]], object]) -> list[float]:
    timings = []
    for question in locomo_questions()[:QUERIES]:
        started = time.perf_counter()
        encode([question])
        timings.append((time.perf_counter() - started) * 1000)
    return timings
