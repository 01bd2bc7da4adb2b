"""The one way memfleet connects to Redis: to REDIS_URL, or to the primary its Sentinels name.

Producer, workers, `memfleet serve` and the key store all connect here, so that they all follow a
failover alike. Under Sentinel each new connection asks the Sentinels for the current primary; a
connection to a primary that went away breaks, and the command is retried on a new one, which
finds the new primary. A former primary that came back as a replica answers writes with READONLY,
which redis-py turns into a broken connection too.
"""

from __future__ import annotations

from typing import Any

from arq.connections import ArqRedis
from redis.asyncio.connection import ConnectionPool, SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer import keys, wire
from producer.errors import RedisUnavailable
from producer.settings import REDIS_RETRIES, ProducerSettings

# A Sentinel answers from memory: one that takes longer is down, ask the next.
SENTINEL_TIMEOUT = 1.0


def redis_pool(settings: ProducerSettings, queue: str = keys.BULK_QUEUE, *, fail_fast: bool = False) -> ArqRedis:
    """A client for memfleet's Redis whose jobs go to `queue` by default, as JSON.

    It rides out a restart or a failover of up to about three minutes (every command is retried on
    connection errors, on a new connection), unless `fail_fast`: then the first failure raises,
    which is what a start-up check wants. Nothing connects until the first command.
    """
    if fail_fast:
        retry = Retry(NoBackoff(), 0)
        connect_timeout = 2.0
    else:
        retry = Retry(ExponentialBackoff(cap=5.0, base=0.05), REDIS_RETRIES)
        connect_timeout = 1.0
    options: dict[str, Any] = {
        "socket_connect_timeout": connect_timeout,
        "retry": retry,
        # OSError: while Redis is down, opening a connection fails with ConnectionRefusedError.
        "retry_on_error": [RedisConnectionError, RedisTimeoutError, OSError],
    }
    pool: ConnectionPool
    if settings.redis_sentinels:
        # REDIS_URL, if set, gives the primary's database and credentials; its host is not used.
        url = parse_url(settings.effective_redis_url)
        credentials = {k: url[k] for k in ("db", "username", "password") if k in url}
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            settings.redis_sentinels,
            sentinel_kwargs={"socket_connect_timeout": SENTINEL_TIMEOUT, "socket_timeout": SENTINEL_TIMEOUT},
        )
        assert settings.redis_sentinel_master is not None  # the settings require both
        tls = settings.effective_redis_url.startswith("rediss://")
        pool = _PrimaryPool(  # type: ignore[no-untyped-call]
            settings.redis_sentinel_master, sentinel, is_master=True,
            connection_class=_PrimaryTlsConnection if tls else _PrimaryConnection, **credentials, **options,
        )
    else:
        pool = ConnectionPool.from_url(settings.effective_redis_url, **options)
    redis = ArqRedis(pool, job_serializer=wire.dumps, job_deserializer=wire.loads, default_queue_name=queue)
    redis.auto_close_connection_pool = True  # closing the client closes its connections
    return redis


async def check_redis(settings: ProducerSettings) -> None:
    """Raise `RedisUnavailable` at once if Redis is not there at all (one try, no retries)."""
    probe = redis_pool(settings, fail_fast=True)
    try:
        await probe.ping()
    except (RedisConnectionError, OSError) as exc:
        raise RedisUnavailable(
            f"cannot reach Redis at {settings.redis_location}: set REDIS_URL (or MEMFLEET_REDIS_SENTINELS "
            "and MEMFLEET_REDIS_SENTINEL_MASTER) to a running Redis"
        ) from exc
    finally:
        await probe.aclose()


class _PrimaryConnection(SentinelManagedConnection):
    """A connection to the primary the Sentinels name, which tries the address they gave once.

    redis-py retries twice over: around asking the Sentinels and connecting, and inside that, around
    connecting to the address they gave. With our retry policy the inner loop knocked on a dead
    primary's address for three minutes, holding the pool's lock, long after the Sentinels had
    promoted another (177 s against a 2 s failover, in tests/test_failover.py). Trying the address
    once hands each retry back to the outer loop, which asks the Sentinels again.
    """

    async def connect_to(self, address: tuple[str, int]) -> None:
        retry, self.retry = self.retry, Retry(NoBackoff(), 0)
        try:
            await super().connect_to(address)  # type: ignore[no-untyped-call]
        finally:
            self.retry = retry


class _PrimaryTlsConnection(_PrimaryConnection, SSLConnection):
    pass


class _PrimaryPool(SentinelConnectionPool):
    """Connections to the primary the Sentinels name. It logs `redis_primary_changed` when they
    name another one (what an operator sees of a failover, from each process), and closes its
    connections to the Sentinels with its own (redis-py leaves those open)."""

    async def get_master_address(self) -> tuple[str, int]:
        before = self.master_address
        address: tuple[str, int] = await super().get_master_address()  # type: ignore[no-untyped-call]
        if before is not None and address != before:
            # Imported here: structlog is configured by the processes that log (workers, `memfleet serve`).
            import structlog

            structlog.get_logger("memfleet.redis").warning(
                "redis_primary_changed", master=self.service_name, before=f"{before[0]}:{before[1]}",
                now=f"{address[0]}:{address[1]}")
        return address

    async def disconnect(self, inuse_connections: bool = True) -> None:
        await super().disconnect(inuse_connections)
        if inuse_connections:  # closing, rather than dropping idle connections to a former primary
            for sentinel in self.sentinel_manager.sentinels:
                await sentinel.aclose()
