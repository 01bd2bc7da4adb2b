"""Background tasks that do not die in silence.

A worker runs tasks beside its jobs: some it cannot serve without (the read worker, the
embedder's loops: `vital`), and helpers that keep things tidy (the expiry sweep, the stranded-write
check, the counters it publishes). An asyncio task that raises just ends, its exception kept until
someone asks; here a crash is logged with its traceback (frames and classes only:
`producer.logs`). A helper is started again after `pause` seconds. A vital task's crash stops the
worker as SIGTERM does (its running jobs finish), so that whatever runs it starts a fresh one.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

log = structlog.get_logger("memfleet.worker")

RESTART_PAUSE = 5.0


def supervise(name: str, start: Callable[[], Coroutine[Any, Any, object]], *, vital: bool = False,
              pause: float = RESTART_PAUSE, stop: Callable[[], None] | None = None) -> asyncio.Task[None]:
    """Run `start()` as a task named `name`, watched as the module says. `stop` ends the worker
    (default: SIGTERM to this process)."""

    async def run() -> None:
        while True:
            try:
                await start()
                return  # it ended by itself: the worker is stopping
            except Exception:
                log.exception("background_task_failed", task=name, vital=vital)
            if vital:
                (stop or terminate)()
                return
            await asyncio.sleep(pause)

    return asyncio.create_task(run(), name=name)


def terminate() -> None:
    """Stop this worker as SIGTERM does: its running jobs finish."""
    os.kill(os.getpid(), signal.SIGTERM)
