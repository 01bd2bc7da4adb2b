"""`WorkerState`: what a worker process holds for its jobs, built once in `on_startup`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from workers.arq_worker import DoorbellWorker
from workers.backends.base import MemoryBackend
from workers.settings import WorkerConfig

_KEY = "state"  # its one entry in arq's ctx


@dataclass
class WorkerState:
    config: WorkerConfig
    backend: MemoryBackend  # one per process, shared by every job
    read_worker: DoorbellWorker | None = None  # the interactive queue's arq Worker, run beside the bulk one
    read_task: asyncio.Task[None] | None = None
    encoder_task: asyncio.Task[None] | None = None  # publishes the encoder counters (observability)
    sweeper_task: asyncio.Task[None] | None = None  # deletes expired memories (workers.expiry)
    stranded_task: asyncio.Task[None] | None = None  # requeues writes whose job ended (workers.stranded)
    llm_task: asyncio.Task[None] | None = None  # adds the LLM's counters to the fleet's (observability)

    def install(self, ctx: dict[str, Any]) -> None:
        ctx[_KEY] = self

    @classmethod
    def of(cls, ctx: dict[str, Any]) -> WorkerState:
        state = ctx.get(_KEY)
        if not isinstance(state, cls):
            raise RuntimeError("the worker's start-up did not run (on_startup of workers.worker.worker_settings)")
        return state

    @classmethod
    def find(cls, ctx: dict[str, Any]) -> WorkerState | None:
        """The state, or None if start-up failed before building it (shutdown still runs then)."""
        state = ctx.get(_KEY)
        return state if isinstance(state, cls) else None
