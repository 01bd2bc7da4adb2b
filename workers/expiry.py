"""The expiry sweeper: every worker deletes memories whose expiry has passed, as a delete does.

An expired memory is invisible from the moment it expires (every read checks `expires_at`); this
only makes it go for good, index, history texts and all, within about one interval. Sweeps of
several workers never collide (`pg_lifecycle.sweep` skips rows another holds), so every worker
runs one and none is special.
"""

from __future__ import annotations

import asyncio

import structlog

from workers.backends.base import BackendUnavailable, MemoryBackend

log = structlog.get_logger("memfleet.worker")


async def sweep_expired_memories(backend: MemoryBackend, interval: float) -> None:
    """Sweep forever: again at once while a sweep finds expired memories, else after `interval` seconds."""
    while True:
        try:
            swept = await backend.sweep_expired()
        except BackendUnavailable:
            swept = 0  # the store is away: its outage is reported by the jobs that need it
        except Exception:
            # A bug must not end the sweeping: log it and go on. Tracebacks are logged without any
            # exception's message (producer.logs.traceback_without_messages).
            log.exception("expiry_sweep_failed")
            swept = 0
        if swept:
            log.info("expired_memories_deleted", memories=swept)
        else:
            await asyncio.sleep(interval)
