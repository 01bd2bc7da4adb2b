"""The doorbell: reads wake an idle read worker (`workers.arq_worker.DoorbellWorker`) at once."""

from __future__ import annotations

from redis.asyncio.client import Pipeline

from producer.keys import DOORBELL_TOKENS


def ring(pipe: Pipeline, doorbell: str) -> None:
    """Add the commands that wake one idle worker blocked on `doorbell` to `pipe`; the tokens
    nobody takes are capped at `keys.DOORBELL_TOKENS`."""
    pipe.lpush(doorbell, 1)
    pipe.ltrim(doorbell, 0, DOORBELL_TOKENS - 1)
