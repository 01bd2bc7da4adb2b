"""`Memfleet`, the API an app server calls: enqueue memory jobs for a user and, for reads, wait
for the answer. Its parts: writes, reads, waiting for writes, dead letters, the fleet's health."""

from __future__ import annotations

from types import TracebackType

from arq.connections import ArqRedis

from producer import keys
from producer.arq_adapter import WriteEnqueuer
from producer.client.dead_letters import DeadLetters
from producer.client.fleet import FleetHealth
from producer.client.reads import Reads
from producer.client.writes import Writes
from producer.redis_pool import check_redis, redis_pool
from producer.settings import ProducerSettings


class Memfleet(Writes, Reads, DeadLetters, FleetHealth):
    """Producer client. Use as `async with Memfleet.connect() as fleet: ...`."""

    def __init__(self, redis: ArqRedis, settings: ProducerSettings) -> None:
        self.redis = redis
        self.settings = settings
        self._writes = WriteEnqueuer(redis, keys.BULK_QUEUE, keys.APPLY_WRITE, keys.PENDING_USERS,
                                     keys.USER_JOBS_TTL, keys.USER_JOBS_MAX, wait_replicas=settings.wait_replicas,
                                     wait_timeout=settings.redis_wait_timeout)

    @classmethod
    async def connect(cls, settings: ProducerSettings | None = None) -> Memfleet:
        settings = settings or ProducerSettings()
        await check_redis(settings)
        return cls(redis_pool(settings, keys.BULK_QUEUE), settings)

    async def __aenter__(self) -> Memfleet:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self.redis.aclose()
