"""Coalesces concurrent embedding calls into length-sorted batches; queries never wait for them.

On this machine MiniLM encodes LoCoMo turns ~2x faster in large length-sorted batches than one at
a time, and unsorted batches lose most of that to padding. So every job's texts go through one
queue: a window of up to `window` bulk texts is sorted by length and encoded `batch_size` at a
time by the bulk streams. Query embeddings (searches) have a thread of their own and start at
once, beside whatever bulk batch is running: a search costs a share of the CPU for a few
milliseconds instead of waiting for a bulk batch to finish.

Bulk streams: one thread per encoder given, each encoding its own batch on one core. Two batches
on one core each beat one batch on two cores (AVX2 EPYC, 2 cores, LoCoMo turns: 124-138 against
110-115 texts/s with PyTorch, 138-169 against 121-144 on ONNX Runtime): tokenizing, Python
between ops and the small ops that do not split well leave a core idle in a shared batch, and
stop costing anything when each core has a batch of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from workers.backends.base import BackendUnavailable
from workers.supervision import supervise, terminate


class Encoder(Protocol):
    """A sentence-transformers model, as far as this module uses it."""

    @property
    def encode(self) -> Callable[..., Any]: ...


@dataclass
class EncoderTally:
    """What one encoder thread did since start-up; busy seconds over wall time is its utilisation."""

    busy_seconds: float = 0.0  # inside the model's encode(), so waits in the event loop do not count
    cpu_seconds: float = 0.0  # CPU time of those calls (each runs on one thread): busy less waits for a core
    texts: int = 0
    batches: int = 0


@dataclass
class _Request:
    texts: list[str]
    future: asyncio.Future[list[list[float]]] = field(repr=False)
    vectors: list[list[float] | None] = field(default_factory=list, repr=False)


class BatchingEmbedder:
    """`await embed(texts)` from any job: one thread per bulk encoder serves the shared bulk queue,
    another encodes queries.

    Each encoder should be the same model behind a tokenizer of its own (`workers.encoders`): the
    threads may tokenize at the same time.
    """

    def __init__(
        self,
        encoders: Sequence[Encoder],
        *,
        query_encoder: Encoder | None = None,
        window: int = 256,
        batch_size: int = 16,
        max_wait: float = 0.005,
        stop: Callable[[], None] = terminate,
    ) -> None:
        if not encoders:
            raise ValueError("BatchingEmbedder needs at least one bulk encoder")
        self.encoders = list(encoders)
        self.query_encoder = query_encoder or self.encoders[0]
        self.window = window
        self.batch_size = batch_size
        self.max_wait = max_wait
        self._stop = stop  # what a crashed loop does after failing its waiters: ends the worker
        self._queries: deque[_Request] = deque()
        self._bulk: deque[_Request] = deque()
        self._wakeup = asyncio.Event()
        # A thread per bulk stream, one core each (module docstring). Queries get their own thread
        # so that they never queue behind a bulk batch.
        self._pool = ThreadPoolExecutor(max_workers=len(self.encoders), thread_name_prefix="embed",
                                        initializer=_bulk_thread)
        self._free: asyncio.Queue[Encoder] = asyncio.Queue()
        self._windows: set[asyncio.Task[None]] = set()
        self._query_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed-query",
                                              initializer=_one_torch_thread)
        self._task: asyncio.Task[None] | None = None
        self._query_task: asyncio.Task[None] | None = None
        self._query_wakeup = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Per thread: bulk busy time is what ingest capacity is made of, and a query thread that is
        # busy is searches waiting on the CPU; a sum would hide which one is short.
        self.bulk = EncoderTally()
        self.query = EncoderTally()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for encoder in self.encoders:
            self._free.put_nowait(encoder)
        # Vital (workers.supervision): without its loops every embed would wait forever.
        self._task = supervise("embedder", self._run, vital=True, stop=self._crashed)
        self._query_task = supervise("query-embedder", self._run_queries, vital=True, stop=self._crashed)

    def _crashed(self) -> None:
        """A loop died (its traceback is logged): what waits is failed, to be retried elsewhere."""
        for request in (*self._bulk, *self._queries):
            _fail(request, BackendUnavailable("the embedder stopped: the worker is restarting"))
        self._bulk.clear()
        self._queries.clear()
        self._stop()

    async def close(self) -> None:
        for task in (self._task, self._query_task, *self._windows):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._pool.shutdown(wait=True)
        self._query_pool.shutdown(wait=True)

    async def embed(self, texts: list[str], *, query: bool = False) -> list[list[float]]:
        if not texts:
            return []
        if self._task is None or self._query_task is None:
            raise RuntimeError("BatchingEmbedder.start() was not called")
        if self._task.done() or self._query_task.done():
            raise BackendUnavailable("the embedder stopped: the worker is restarting")
        future: asyncio.Future[list[list[float]]] = asyncio.get_running_loop().create_future()
        (self._queries if query else self._bulk).append(_Request(list(texts), future, [None] * len(texts)))
        (self._query_wakeup if query else self._wakeup).set()
        return await future

    def embed_from_thread(self, texts: list[str], *, query: bool) -> list[list[float]]:
        """For mem0, which calls its embedder synchronously from worker threads."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(self.embed(texts, query=query), self._loop).result()

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._bulk:
                # A short grace period lets concurrent jobs' texts join the window.
                if sum(len(r.texts) for r in self._bulk) < self.window:
                    await asyncio.sleep(self.max_wait)
                await self._serve_bulk()

    async def _run_queries(self) -> None:
        while True:
            await self._query_wakeup.wait()
            self._query_wakeup.clear()
            while self._queries:
                requests = [self._queries.popleft() for _ in range(min(len(self._queries), self.batch_size))]
                slots = [(r, i) for r in requests for i in range(len(r.texts))]
                await self._encode_into(self._query_pool, self.query_encoder, slots, self.query)
                for request in requests:
                    _finish(request)

    async def _serve_bulk(self) -> None:
        """Hand one window's batches to the bulk streams as they come free. Returns once the last
        batch has a stream, so that the next window is sorted while this one's last batches run."""
        window: list[_Request] = []
        size = 0
        while self._bulk and (not window or size + len(self._bulk[0].texts) <= self.window):
            window.append(self._bulk.popleft())
            size += len(window[-1].texts)
        slots = sorted(((r, i) for r in window for i in range(len(r.texts))), key=lambda s: len(s[0].texts[s[1]]))
        batches = []
        for start in range(0, len(slots), self.batch_size):
            encoder = await self._free.get()
            batches.append(asyncio.create_task(self._encode_on(encoder, slots[start : start + self.batch_size])))
        finishing = asyncio.create_task(self._finish_window(window, batches))
        self._windows.add(finishing)
        finishing.add_done_callback(self._windows.discard)

    async def _encode_on(self, encoder: Encoder, slots: list[tuple[_Request, int]]) -> None:
        try:
            await self._encode_into(self._pool, encoder, slots, self.bulk)
        finally:
            self._free.put_nowait(encoder)

    @staticmethod
    async def _finish_window(window: list[_Request], batches: list[asyncio.Task[None]]) -> None:
        await asyncio.gather(*batches)
        for request in window:
            _finish(request)

    async def _encode_into(
        self, pool: ThreadPoolExecutor, encoder: Encoder, slots: list[tuple[_Request, int]], tally: EncoderTally
    ) -> None:
        texts = [request.texts[i] for request, i in slots]
        loop = asyncio.get_running_loop()
        try:
            vectors, seconds, cpu = await loop.run_in_executor(pool, _encode, encoder, texts)
            if len(vectors) != len(texts):  # else a text would be left without a vector, its caller waiting
                raise ValueError(f"the encoder returned {len(vectors)} vectors for {len(texts)} texts")
        except Exception as exc:
            for request, _ in slots:
                _fail(request, exc)
            return
        # Counted here, on the event loop, so the two threads never update a tally at once.
        tally.busy_seconds += seconds
        tally.cpu_seconds += cpu
        tally.batches += 1
        tally.texts += len(texts)
        for (request, index), vector in zip(slots, vectors, strict=True):
            request.vectors[index] = vector



#: how much nicer than the rest of the process a bulk encoding thread runs (Linux: per thread)
BULK_NICENESS = 10


def _bulk_thread() -> None:
    """A bulk stream yields the CPU to everything else in the worker: searches, the event loop and
    PostgreSQL preempt it, and it takes what they leave. With a stream per core and nothing else
    nice, a query thread got a third of a core under ingest (AVX2 EPYC: search p99 during a LoCoMo
    ingest 115 ms); at niceness 10 the scheduler gives it ~90% of one."""
    _one_torch_thread()
    with contextlib.suppress(AttributeError, OSError):  # not on every OS; then the threads run as they are
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + BULK_NICENESS))


def _one_torch_thread() -> None:
    """Every encoding thread runs on one core. A query is a handful of tokens: one core encodes it
    faster than two that must synchronise (search p50 through the queue ~21.5 -> ~19 ms here), and
    leaves the other cores to the bulk streams, one core each. torch's setting is per calling
    thread; ONNX Runtime sessions get theirs when they are made (`workers.encoders`)."""
    import torch

    torch.set_num_threads(1)


def _encode(encoder: Encoder, texts: list[str]) -> tuple[list[list[float]], float, float]:
    """The vectors of `texts`, and the seconds and the CPU seconds (of this thread) the model took."""
    started, cpu = time.perf_counter(), time.thread_time()
    array = encoder.encode(texts, batch_size=len(texts), convert_to_numpy=True, show_progress_bar=False)
    seconds, cpu = time.perf_counter() - started, time.thread_time() - cpu
    return [row.tolist() for row in unit_rows(array)], seconds, cpu


def unit_rows(array: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 in float32: a bf16 model normalizes only to within ~0.5%."""
    rows = np.asarray(array, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms == 0, 1, norms)


def _fail(request: _Request, exc: BaseException) -> None:
    if not request.future.done():
        request.future.set_exception(exc)


def _finish(request: _Request) -> None:
    if not request.future.done():
        request.future.set_result([v for v in request.vectors if v is not None])
