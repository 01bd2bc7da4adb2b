"""One log line and one counter per job run: ids, kind, duration and outcome, never content; and
each worker's encoder counters, published for `GET /metrics`.

A job's failure reaches arq (which logs it, traceback and message) only in words of ours: an error
of a database or a library is replaced by `JobFailed` naming its class and where it was raised,
because its message may quote what the job was given (PostgreSQL's errors quote the data of the
statement that failed).
"""

from __future__ import annotations

import asyncio
import functools
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import structlog
from arq import Retry
from redis.exceptions import RedisError

from producer import keys
from producer.client import EncoderCounts, EncoderUse, SearchIndexUse
from producer.counters import JobCount
from producer.errors import InvalidRequest, JobFailed, MemfleetError, MemoryNotFound
from workers.embedder import BatchingEmbedder

if TYPE_CHECKING:
    from workers.llm import LLMCounters

log = structlog.get_logger("memfleet.worker")

P = ParamSpec("P")
R = TypeVar("R")

# Often enough that a scrape sees a batch within seconds of its end; one SET per interval is
# nothing beside a worker's job traffic. Its key lives `keys.ENCODER_USE_TTL`: three missed refreshes.
ENCODER_USE_INTERVAL = 2.0


def observed(kind: str) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Log one line per job run and count its outcome in `keys.STATS`.

    The count is best effort: when Redis is down, the job's own exception is what arq and the
    log must see, not the failed HINCRBY.
    """

    def wrap(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(fn)
        async def run(*args: P.args, **kwargs: P.kwargs) -> R:
            ctx: dict[str, Any] = args[0]  # type: ignore[assignment]
            start = time.perf_counter()
            bound = log.bind(
                job_id=ctx.get("job_id"), kind=kind, user_id=_user_of(args[1:]), attempt=ctx.get("job_try")
            )
            outcome = "ok"
            try:
                return await fn(*args, **kwargs)
            except Retry:
                outcome = "retry"
                raise
            except asyncio.CancelledError:
                outcome = "cancelled"  # arq's job timeout, or shutdown
                raise
            except MemoryNotFound:
                outcome = "not_found"  # an answer (workers.replies), not a failure
                raise
            except InvalidRequest as exc:
                outcome = "invalid"
                bound = bound.bind(error=str(exc))
                raise
            except Exception as exc:
                outcome = "failed"
                where = raised_at(exc)
                bound = bound.bind(error=exc.__class__.__name__, where=where)
                if isinstance(exc, MemfleetError):
                    raise exc from None  # ours say it in words; what caused them need not be told
                raise JobFailed(f"{kind} job failed: {exc.__class__.__name__} at {where}") from None
            finally:
                ms = round((time.perf_counter() - start) * 1000, 1)
                (bound.info if outcome in ("ok", "retry") else bound.warning)("job", outcome=outcome, duration_ms=ms)
                await _count(ctx["redis"], JobCount(kind, outcome).field())

        return run

    return wrap


def raised_at(exc: BaseException) -> str:
    """Where `exc` was raised, as `file.py:line`: enough to find it, nothing of what it was about."""
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else "?"


async def _count(redis: Any, counter: str) -> None:
    try:
        await redis.hincrby(keys.STATS, counter, 1)
    except (RedisError, OSError) as exc:
        log.warning("stats_not_counted", counter=counter, error=exc.__class__.__name__)


def _user_of(args: tuple[Any, ...]) -> str | None:
    first = args[0] if args else None
    if isinstance(first, dict):
        first = first.get("user_id")
    return first if isinstance(first, str) and len(first) <= 128 else None


async def publish_encoder_use(
    redis: Any, worker: str, embedder: BatchingEmbedder, interval: float = ENCODER_USE_INTERVAL,
    search: Callable[[], SearchIndexUse] | None = None,
) -> None:
    """Keep `worker`'s encoder counters (and `search()`, its search-index counters) under
    `keys.ENCODER_USE`, until cancelled.

    The API process reads them at scrape time: it cannot ask the worker, and must not load a model.
    """
    key = keys.ENCODER_USE + worker
    while True:
        use = EncoderUse(bulk=EncoderCounts(**asdict(embedder.bulk)), query=EncoderCounts(**asdict(embedder.query)),
                         search=search() if search is not None else SearchIndexUse())
        try:
            await redis.set(key, use.model_dump_json(), ex=keys.ENCODER_USE_TTL)
        except (RedisError, OSError) as exc:
            # Metrics are not worth stopping for: the next round writes the counters, which only grow.
            log.warning("encoder_use_not_published", error=exc.__class__.__name__)
        await asyncio.sleep(interval)


async def publish_llm_use(redis: Any, counters: LLMCounters, interval: float = ENCODER_USE_INTERVAL) -> None:
    """Add what the LLM of fact extraction did to `keys.STATS` every `interval` seconds, until
    cancelled, and once more then. Fleet-wide sums: /metrics reads them as counters."""
    try:
        while True:
            await asyncio.sleep(interval)
            await _add_llm_counts(redis, counters)
    except asyncio.CancelledError:
        await _add_llm_counts(redis, counters)
        raise


async def _add_llm_counts(redis: Any, counters: LLMCounters) -> None:
    fields = counters.take()
    if not fields:
        return
    try:
        async with redis.pipeline(transaction=True) as pipe:
            for name, n in fields.items():
                pipe.hincrby(keys.STATS, name, n)
            await pipe.execute()
    except (RedisError, OSError) as exc:
        counters.give_back(fields)  # counted with the next round
        log.warning("llm_use_not_published", error=exc.__class__.__name__)
