"""Calling the mem0 platform through its SDK: transport trouble (timeouts, refused connections,
408/429/5xx) becomes `BackendUnavailable`, so the job is retried later, and any other refusal
`BackendRejected`, in words of ours (status codes and class names, never the platform's response
body, which can echo memory text). Calls one per memory run a bounded number at a time (`each`)."""

from __future__ import annotations

import asyncio
import email.utils
import math
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import TypeVar

import httpx

from workers import mem0_adapter
from workers.backends.base import BackendRejected, BackendUnavailable

T = TypeVar("T")
A = TypeVar("A")

RETRYABLE_4XX = frozenset({408, 429})
# Requests one job keeps in flight at once when it needs one per memory (checks, history, restore).
PER_MEMORY_CONCURRENCY = 8


async def call_platform_or_none(operation: str, call: Awaitable[T]) -> T | None:
    """`call_platform`, but the platform's 404 (no such memory) is None rather than an error."""
    try:
        return await call_platform(operation, call)
    except BackendRejected as exc:
        if exc.status == 404:
            return None
        raise


async def each(fn: Callable[[A], Awaitable[T]], items: Iterable[A]) -> list[T]:
    """`fn` of every item, `PER_MEMORY_CONCURRENCY` at a time, in the items' order. If one fails,
    those not done are cancelled (a job that failed leaves no requests behind)."""
    gate = asyncio.Semaphore(PER_MEMORY_CONCURRENCY)

    async def one(item: A) -> T:
        async with gate:
            return await fn(item)

    tasks = [asyncio.ensure_future(one(item)) for item in items]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


async def call_platform(operation: str, call: Awaitable[T]) -> T:
    """Await an SDK call: transport trouble raises `BackendUnavailable`, a refusal `BackendRejected`."""
    try:
        return await call
    except Exception as exc:
        error = mem0_adapter.platform_error(exc)
        translated = None if error is None else translate(operation, exc, error)
        if translated is None:
            raise
        # `from None`: the SDK's exception text is the response body, which may quote memory text.
        raise translated from None


def translate(operation: str, exc: BaseException, error: mem0_adapter.PlatformError) -> Exception | None:
    cause = error.cause
    if isinstance(cause, httpx.TransportError):
        return BackendUnavailable(f"mem0 platform unreachable during {operation}: {type(cause).__name__}")
    if isinstance(cause, httpx.HTTPStatusError):
        status: int | None = cause.response.status_code
        retry_after = retry_after_seconds(cause.response.headers.get("Retry-After"))
    else:
        status, retry_after = error.status, error.retry_after
    if status is None:
        if error.network is not None:
            return BackendUnavailable(f"mem0 platform unreachable during {operation}: {error.network}")
        return None
    if status in RETRYABLE_4XX or status >= 500:
        message = f"mem0 platform answered HTTP {status} to {operation}"
        return BackendUnavailable(message, retry_after=retry_after)
    if 400 <= status < 500:
        code = error.code or f"HTTP_{status}"
        return BackendRejected(
            f"mem0 platform rejected {operation} with HTTP {status} ({type(exc).__name__}, {code}); "
            "not retried: the request or the API key needs fixing",
            status=status,
        )
    return None


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: delay-seconds or an HTTP date."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None
