"""What every part of the client shares: its Redis and settings, and what a lost Redis becomes."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from arq.connections import ArqRedis
from redis.exceptions import ConnectionError as RedisConnectionError

from producer.arq_adapter import WriteEnqueuer
from producer.errors import MemfleetError, RedisUnavailable
from producer.settings import ProducerSettings

P = ParamSpec("P")
R = TypeVar("R")


class ClientBase:
    """The state `Memfleet`'s parts work on (`producer.client.memfleet` builds it)."""

    redis: ArqRedis
    settings: ProducerSettings
    _writes: WriteEnqueuer


def redis_lost(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Redis already retries for about three minutes (`producer.redis_pool`); a
    connection error that still reaches a public method means Redis is gone: say so plainly."""

    @functools.wraps(fn)
    async def call(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except MemfleetError:
            raise  # ours already say what happened (NoWorkerError is a TimeoutError, an OSError)
        except (RedisConnectionError, OSError) as exc:
            # Not redis-py's message: it names hosts and ports, and reaches HTTP answers.
            raise RedisUnavailable(f"lost Redis ({exc.__class__.__name__}); retry shortly") from exc

    return call
