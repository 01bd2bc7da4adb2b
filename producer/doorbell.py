"""The doorbell: reads wake an idle read worker (`workers.arq_worker.DoorbellWorker`) at once."""

from __future__ import annotations

from redis.asyncio.client import Pipeline

# Tokens left by reads that no worker was there to take are capped: a worker that comes up later
# drains at most this many before it sleeps again.
DOORBELL_TOKENS = 64


def ring(pipe: Pipeline, doorbell: str) -> None:
    """Add the commands that wake one idle worker blocked on `doorbell` to `pipe`."""
    pipe.lpush(doorbell, 1)
    pipe.ltrim(doorbell, 0, DOORBELL_TOKENS - 1)
