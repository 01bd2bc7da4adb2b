"""arq's settings for a worker process (`worker_settings`), and its start-up and shutdown.

One process serves both queues: arq's own Worker for bulk writes and, started in `on_startup`,
a second arq Worker for interactive reads with its own job slots, woken by the producer's
doorbell, so searches never queue behind an ingest. Both share one backend (one model, one
connection pool).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog
from arq import func
from arq.worker import Function

from producer import keys, wire
from producer.logs import configure_logging
from producer.redis_pool import redis_pool
from workers.arq_worker import DoorbellWorker, screening_deserializer
from workers.backends.base import MemoryBackend
from workers.embedder import BatchingEmbedder
from workers.expiry import sweep_expired_memories
from workers.jobs import (
    READ_TRIES,
    apply_write,
    export_memories,
    get_memory,
    list_memories,
    memory_history,
    memory_owners,
    search,
)
from workers.observability import publish_encoder_use, publish_llm_use
from workers.refusal import JobScreen, refuse
from workers.settings import WorkerConfig
from workers.state import WorkerState
from workers.stranded import watch_for_stranded_writes
from workers.supervision import supervise

log = structlog.get_logger("memfleet.worker")

# A refusal is one transaction; a second try only covers a worker that died in the middle.
REFUSE_TRIES = 3


async def build_backend(config: WorkerConfig) -> MemoryBackend:
    if config.mem0_api_key:
        from workers.backends.hosted import HostedBackend

        return await HostedBackend.start(config, timeout=config.mem0_timeout)
    from workers.backends.embedded import EmbeddedBackend

    return await EmbeddedBackend.start(config)


def _screened(functions: list[Function]) -> dict[str, Any]:
    """A Worker's `functions` and `job_deserializer`: it runs calls of `functions` that fit them,
    and dead-letters any other job body unread (workers.refusal)."""
    return {
        "functions": [*functions, func(refuse, name=keys.REFUSED, keep_result=0, max_tries=REFUSE_TRIES)],
        # JSON, never pickle: nothing read from Redis is executed.
        "job_deserializer": screening_deserializer(wire.loads, JobScreen(functions), keys.REFUSED),
    }


def _read_functions() -> list[Function]:
    reads = {keys.SEARCH: search, keys.LIST: list_memories, keys.GET: get_memory, keys.HISTORY: memory_history,
             keys.EXPORT: export_memories, keys.OWNERS: memory_owners}
    # Answers go to the reader's reply list (workers.replies), never into arq results.
    return [func(job, name=name, keep_result=0, max_tries=READ_TRIES)  # type: ignore[arg-type]
            for name, job in reads.items()]


async def startup(config: WorkerConfig, ctx: dict[str, Any]) -> None:
    configure_logging(config.log_format, config.log_level)
    # Every job's PostgreSQL work runs in `asyncio.to_thread`: with the default 6 threads, a few
    # concurrent jobs starve the rest. The LLM of fact extraction is called without a thread
    # (workers.llm), so writes waiting on it hold none.
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(max_workers=config.search_concurrency * 4 + config.concurrency, thread_name_prefix="jobs")
    )
    backend = await build_backend(config)
    state = WorkerState(config, backend)
    state.install(ctx)
    if not backend.can_infer:
        log.info("fact_extraction_off", reason="no LLM configured; add stores messages as they are")
    reads = DoorbellWorker(
        **_screened(_read_functions()),
        queue_name=keys.INTERACTIVE_QUEUE,
        doorbell=keys.INTERACTIVE_DOORBELL,
        redis_pool=ctx["redis"],
        ctx=ctx,
        max_jobs=config.search_concurrency,
        poll_delay=0.005,
        job_timeout=30,
        keep_result=0,
        handle_signals=False,
        job_completion_wait=read_wait(config),
        health_check_interval=5,
        health_check_key=f"{keys.WORKER_HEALTH}{_worker_name()}:reads",
        job_serializer=wire.dumps,
    )
    state.read_worker = reads
    state.read_task = supervise("read-worker", reads.async_run, vital=True)
    state.sweeper_task = supervise("expiry-sweeper",
                                   lambda: sweep_expired_memories(backend, config.expiry_sweep_interval))
    state.stranded_task = supervise("stranded-writes",
                                    lambda: watch_for_stranded_writes(ctx["redis"], config.stranded_check_interval))
    embedder = getattr(backend, "embedder", None)
    if isinstance(embedder, BatchingEmbedder):  # the hosted backend embeds nothing here
        bulk_and_query = embedder
        cache = getattr(backend, "search_cache", None)
        search_use = cache.counted if cache is not None else None
        state.encoder_task = supervise("encoder-use", lambda: publish_encoder_use(
            ctx["redis"], _worker_name(), bulk_and_query, search=search_use))
    inference = getattr(backend, "inference", None)
    if inference is not None:  # fact extraction is on: count the LLM's calls for /metrics
        llm_counters = inference.llm.counters
        state.llm_task = supervise("llm-use", lambda: publish_llm_use(ctx["redis"], llm_counters))
    # What start-up made (the model, torch, mem0) lives as long as the process. Out of the
    # collector's reach, a full collection no longer walks its half a million objects: that paused
    # a search for ~300 ms every few dozen queries (a user with 17k memories, whose results are big).
    gc.collect()
    gc.freeze()
    log.info("worker_started", backend=backend.name, pid=os.getpid(), concurrency=config.concurrency)


async def shutdown(ctx: dict[str, Any]) -> None:
    state = WorkerState.find(ctx)
    if state is None:
        return
    if state.read_worker is not None and state.read_task is not None:
        state.read_worker.drain()  # stop taking reads, finish running ones
        with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
            await asyncio.wait_for(state.read_task, timeout=read_wait(state.config) + 1)
    for task in (state.encoder_task, state.sweeper_task, state.stranded_task, state.llm_task):
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    backend = state.backend
    await backend.close()
    embedder = getattr(backend, "embedder", None)
    if isinstance(embedder, BatchingEmbedder):
        log.info("worker_stopped", pid=os.getpid(), embedded_texts=embedder.bulk.texts + embedder.query.texts,
                 encoder_batches=embedder.bulk.batches + embedder.query.batches,
                 encoder_busy_seconds=round(embedder.bulk.busy_seconds, 2),
                 query_encoder_busy_seconds=round(embedder.query.busy_seconds, 2))
    else:
        log.info("worker_stopped", pid=os.getpid())


def write_wait(config: WorkerConfig) -> int:
    """Seconds running writes get after SIGTERM, while reads are still served. Then reads get
    `read_wait`, and the rest of MEMFLEET_SHUTDOWN_WAIT is for closing (workers.stopping)."""
    return max(1, int(config.shutdown_wait * 0.6))


def read_wait(config: WorkerConfig) -> int:
    return max(1, int(config.shutdown_wait * 0.2))


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def worker_settings(config: WorkerConfig) -> dict[str, Any]:
    """arq's settings for the bulk-queue worker; its start-up also brings up the read worker and
    the backend. A dict of `Worker` arguments, which arq takes wherever it takes a settings class."""
    functions = [
        # Lease waits are retries too; the real failure budget is per op (`max_tries` setting).
        # Outcomes live under memfleet:outcome:<op id> (ids and counts only), not in arq results.
        func(apply_write, name=keys.APPLY_WRITE, keep_result=0, max_tries=10_000),  # type: ignore[arg-type]
    ]
    return {
        **_screened(functions),
        "queue_name": keys.BULK_QUEUE,
        "keep_result": 0,  # also for jobs arq gives up on: their arguments must not linger for an hour
        # Ours rather than arq's (`redis_settings`): it follows a Sentinel failover, and retries.
        "redis_pool": redis_pool(config, keys.BULK_QUEUE),
        "on_startup": functools.partial(startup, config),
        "on_shutdown": shutdown,
        "job_serializer": wire.dumps,  # JSON, never pickle: nothing read from Redis is executed
        "max_jobs": config.concurrency,
        "job_timeout": config.job_timeout,
        "poll_delay": 0.02,
        "health_check_interval": 5,
        "health_check_key": f"{keys.WORKER_HEALTH}{_worker_name()}:writes",
        # On SIGTERM, stop taking jobs and give running ones this long before cancelling them.
        "job_completion_wait": write_wait(config),
    }
