"""The batching embedder on the real MiniLM: queries beside bulk work, and the precision it runs at."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from structlog.testing import capture_logs

from producer.ingest import read_messages
from tests.encoder_checks import needs_native_bf16
from tests.support import eventually, locomo_file
from workers.backends.base import BackendUnavailable
from workers.backends.embedded import EmbeddedBackend
from workers.embedder import BULK_NICENESS, BatchingEmbedder, Encoder, unit_rows
from workers.model import BF16_FLAGS, bf16_native, load_model, resolve_precision, set_precision
from workers.onnx_encoder import OnnxEncoder
from workers.traced_encoder import TracedEncoder


def _turns(limit: int) -> list[str]:
    turns = [e.message.content for e in read_messages([locomo_file()], "locomo")]
    assert len(turns) >= limit
    return turns[:limit]


@dataclass
class Watched:
    """The real model, noting each encode call's span; `hold` keeps a call waiting inside the encoder
    until it is set, and `meet` makes each stream's first call wait there for the other stream's."""

    model: Encoder
    hold: threading.Event | None = None
    meet: threading.Barrier | None = None
    calls: list[tuple[float, float]] = field(default_factory=list)
    running: int = 0

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        self.running += 1
        try:
            if self.hold is not None and not self.hold.wait(60):
                raise TimeoutError("held in the encoder for a minute")
            if self.meet is not None and not self.calls:
                self.meet.wait()  # BrokenBarrierError if the other stream never comes
            return self.model.encode(*args, **kwargs)
        finally:
            self.running -= 1
            self.calls.append((started, time.perf_counter()))


async def test_a_query_runs_beside_a_bulk_batch_not_after_it(backend: EmbeddedBackend) -> None:
    release = threading.Event()
    bulk, queries = Watched(backend.embedder.encoders[0], hold=release), Watched(backend.embedder.query_encoder)
    embedder = BatchingEmbedder([bulk], query_encoder=queries, window=1024, batch_size=512)
    embedder.start()
    try:
        ingest = asyncio.create_task(embedder.embed(_turns(360)))
        # The bulk batch (all 360 texts) is in the encoder, held there until the query is answered:
        # a query that waited for bulk work would never be.
        await eventually(lambda: bulk.running > 0, 30, "the bulk batch to reach the encoder", interval=0.001)
        try:
            (query,) = await asyncio.wait_for(embedder.embed(["what did Caroline paint?"], query=True), 30)
        finally:
            release.set()
        assert len(await ingest) == 360
        # Same model, same answer, whichever thread encoded it.
        (again,) = await embedder.embed(["what did Caroline paint?"])
        assert float(np.dot(query, again)) > 0.9999
        # Each thread's tally (what /metrics shows) counts its own texts, and at least the time its
        # model calls took.
        assert (embedder.bulk.texts, embedder.query.texts) == (361, 1)
        assert (embedder.bulk.batches, embedder.query.batches) == (len(bulk.calls), 1)
        assert embedder.bulk.busy_seconds >= sum(end - start for start, end in bulk.calls)
        ((q_start, q_end),) = queries.calls
        assert embedder.query.busy_seconds >= q_end - q_start
    finally:
        release.set()
        await embedder.close()


async def test_bulk_streams_encode_batches_at_once_and_keep_each_request_whole(backend: EmbeddedBackend) -> None:
    first = backend.embedder.encoders[0]
    twin = cast(OnnxEncoder | TracedEncoder, first).twin()
    # Each stream's first batch waits in the encoder for the other's: they run at once, or fail.
    meet = threading.Barrier(2, timeout=60)
    streams = [Watched(first, meet=meet), Watched(twin, meet=meet)]
    embedder = BatchingEmbedder(streams, window=1024, batch_size=16)
    embedder.start()
    try:
        turns = _turns(200)
        requests = [turns[i : i + 25] for i in range(0, 200, 25)]  # eight jobs' texts, queued together
        results = await asyncio.gather(*(embedder.embed(texts) for texts in requests))
    finally:
        await embedder.close()
    expected = unit_rows(first.encode(turns))
    assert [len(r) for r in results] == [25] * 8
    # Each vector is its own text's: another text's would be 0.2 or more away. In bf16 the padding of
    # the batch a text lands in moves its vector by up to ~3e-5.
    assert (1 - np.sum(np.concatenate(results) * expected, axis=1)).max() < 1e-3
    assert sum(len(s.calls) for s in streams) == 13 == embedder.bulk.batches  # 200 texts in batches of 16


@dataclass
class OneShort:
    """A broken encoder: one vector fewer than the texts it was given."""

    model: Encoder

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.encode(*args, **kwargs)[:-1]


async def test_an_encoder_that_loses_a_vector_fails_its_callers_and_the_embedder_goes_on(
    backend: EmbeddedBackend,
) -> None:
    model, stopped = backend.embedder.encoders[0], asyncio.Event()
    embedder = BatchingEmbedder([OneShort(model)], query_encoder=OneShort(model), window=64, batch_size=16,
                                stop=stopped.set)
    embedder.start()
    try:
        for query in (False, True):  # it once waited forever (bulk), or killed the query loop
            with pytest.raises(ValueError, match="returned 2 vectors for 3 texts"):
                await asyncio.wait_for(embedder.embed(["a", "b", "c"], query=query), 30)
            with pytest.raises(ValueError, match="returned 0 vectors for 1 texts"):
                await asyncio.wait_for(embedder.embed(["d"], query=query), 30)
        assert not stopped.is_set(), "a failed batch stopped the embedder"
    finally:
        await embedder.close()


class LoopBug(BatchingEmbedder):
    """An embedder whose bulk loop meets a bug of its own."""

    async def _serve_bulk(self) -> None:
        raise KeyError("a bug in the loop")


async def test_a_crashed_embedder_loop_fails_its_waiters_and_stops_the_worker(backend: EmbeddedBackend) -> None:
    stopped = asyncio.Event()
    model = backend.embedder.encoders[0]
    embedder = LoopBug([model], stop=stopped.set)
    embedder.start()
    try:
        with capture_logs() as logs, pytest.raises(BackendUnavailable, match="the embedder stopped"):
            await asyncio.wait_for(embedder.embed(["waits for the loop"]), 30)
        assert stopped.is_set()
        assert [(e["task"], e["vital"]) for e in logs if e["event"] == "background_task_failed"] == [("embedder", True)]
        with pytest.raises(BackendUnavailable):  # and whatever comes later is refused at once
            await embedder.embed(["later"], query=True)
    finally:
        await embedder.close()


async def test_bulk_streams_run_nicer_than_queries(backend: EmbeddedBackend) -> None:
    """Searches must not queue for the CPU behind bulk batches: the bulk threads yield to them."""
    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    embedder = backend.embedder
    loop = asyncio.get_running_loop()
    bulk = await loop.run_in_executor(embedder._pool, niceness)
    query = await loop.run_in_executor(embedder._query_pool, niceness)
    assert bulk == min(19, niceness() + BULK_NICENESS) and query == niceness() < bulk


def test_vectors_are_unit_length() -> None:
    rows = unit_rows(np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32))
    assert np.allclose(rows, [[0.6, 0.8], [0.0, 0.0]])


def test_precision_setting() -> None:
    assert resolve_precision("fp32") == "fp32" and resolve_precision("bf16") == "bf16"
    # auto is bf16 exactly where the CPU computes it natively, as the kernel reports its flags.
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    native = bool(flags & set(BF16_FLAGS))
    assert bf16_native() == native
    assert resolve_precision("auto") == ("bf16" if native else "fp32")


@pytest.mark.slow
@needs_native_bf16  # a ranking check of the precision `auto` picks only where bf16 is native
def test_bf16_finds_what_fp32_finds_on_locomo() -> None:
    """bf16 is the default where the CPU has it: its rankings must match fp32's."""
    turns = _turns(360)
    questions = [q["question"] for q in json.loads(locomo_file().read_text())["qa"][:40]]
    model = load_model()
    found = {}
    for precision in ("fp32", "bf16"):
        set_precision(model, precision)
        memories = unit_rows(model.encode(turns, batch_size=32))
        queries = unit_rows(model.encode(questions, batch_size=32))
        found[precision] = np.argsort(-(queries @ memories.T), axis=1)[:, :5]
    overlap = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(found["fp32"], found["bf16"], strict=True)])
    assert overlap >= 0.95, f"top-5 overlap between bf16 and fp32 is {overlap:.2f}"
