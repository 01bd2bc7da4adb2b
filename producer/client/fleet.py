"""How the fleet is doing: queues, jobs and workers (`stats`), and each worker's encoder
(`encoder_use`), read from Redis so that any producer gives the same answer."""

from __future__ import annotations

import time

from pydantic import BaseModel, Field

from producer import counters, keys
from producer.arq_adapter import jobs_in_progress, queue_state
from producer.client.base import ClientBase, redis_lost


class FleetStats(BaseModel):
    queued: dict[str, int]
    in_progress: int
    completed: int
    failed: int
    dead_letters: int
    foreign_dropped: int
    oldest_queued_seconds: float | None
    workers: list[str]
    counters: dict[str, int]


class EncoderCounts(BaseModel):
    """One encoder thread of a worker since the worker started."""

    busy_seconds: float = 0.0  # its rate over time is the thread's utilisation (0 to 1)
    cpu_seconds: float = 0.0  # CPU time inside the model (busy, less waiting for a core)
    texts: int = 0
    batches: int = 0


class SearchIndexUse(BaseModel):
    """A worker's search indexes in memory (`workers.backends.search_cache`), since it started."""

    held: int = 0  # users whose index it holds now
    bytes: int = 0  # what they take
    reads: int = 0  # indexes read
    in_memory: int = 0  # searches ranked from a held index
    in_sql: int = 0  # searches ranked by the SQL statement (no index held or current, or filtered)


class EncoderUse(BaseModel):
    """What a worker publishes under `keys.ENCODER_USE`: its bulk thread (writes) and its query
    thread (searches), which run beside each other; and how its searches were ranked."""

    bulk: EncoderCounts
    query: EncoderCounts
    search: SearchIndexUse = Field(default_factory=SearchIndexUse)  # all zero from a worker without the indexes



class FleetHealth(ClientBase):
    """The fleet's numbers, for `memfleet stats` and `GET /metrics`."""

    @redis_lost
    async def encoder_use(self) -> dict[str, EncoderUse]:
        """Each live worker's encoder counters, by worker (`<host>:<pid>`, as in `stats().workers`).

        Workers of the hosted backend have no encoder and publish nothing.
        """
        names = [k async for k in self.redis.scan_iter(match=keys.ENCODER_USE + "*", count=1000)]
        if not names:
            return {}
        found: dict[str, EncoderUse] = {}
        for name, raw in zip(names, await self.redis.mget(names), strict=True):
            if raw is None:
                continue  # expired between SCAN and MGET: that worker is gone
            try:
                found[name.decode().removeprefix(keys.ENCODER_USE)] = EncoderUse.model_validate_json(raw)
            except ValueError:
                continue  # not a worker's record: one bad key must not take the whole scrape down
        return dict(sorted(found.items()))

    @redis_lost
    async def stats(self) -> FleetStats:
        now_ms = time.time() * 1000
        queues = await queue_state(self.redis, keys.QUEUES, now_ms)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.STATS)
            self.settings.dead_letter_limits.prune(pipe)  # answers how many are left
            replies = await pipe.execute()
        depth = {q.rsplit(":", 1)[-1]: state.depth for q, state in queues.items()}
        oldest = [state.oldest_ms for state in queues.values() if state.oldest_ms is not None]
        fleet = counters.reported(replies[-2])
        health = [k.decode() async for k in self.redis.scan_iter(match=keys.WORKER_HEALTH + "*", count=1000)]
        workers = sorted({h.removeprefix(keys.WORKER_HEALTH).rsplit(":", 1)[0] for h in health})
        return FleetStats(
            queued=depth,
            in_progress=await jobs_in_progress(self.redis),
            completed=counters.completed(fleet),
            failed=counters.failed(fleet),
            dead_letters=replies[-1],
            foreign_dropped=fleet.get(counters.FOREIGN_DROPPED, 0),
            oldest_queued_seconds=round((now_ms - min(oldest)) / 1000, 3) if oldest else None,
            workers=workers,
            counters=fleet,
        )
