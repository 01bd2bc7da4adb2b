"""The hosted mem0 platform (api.mem0.ai, or any host speaking its API) through `mem0.AsyncMemoryClient`.

The platform stores, embeds, searches and extracts facts itself, so this backend is a thin mapping:
every call names the user explicitly (`user_id` in the body, the filters or the query string), and
transport trouble (timeouts, refused connections, 408/429/5xx) becomes `BackendUnavailable` so the
job is retried later. Error messages carry status codes and class names only, never the platform's
response body: a body can echo memory text, and these messages end up in logs and in Redis.
"""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import math
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx
import structlog

# `workers` (our parent package) has set MEM0_TELEMETRY and MEM0_DIR, which mem0 reads on import.
from mem0 import AsyncMemoryClient
from mem0.exceptions import MemoryError as Mem0Error
from mem0.exceptions import NetworkError

from producer.contract import AddRequest, MemoryPage, MemoryRecord
from workers import mem0_adapter
from workers.backends.base import BackendRejected, BackendUnavailable, ForgetIncomplete, InvalidCursor
from workers.settings import WorkerConfig

log = structlog.get_logger("memfleet.backend")

T = TypeVar("T")

# Seconds for each HTTP request (the SDK's own default is 300, longer than any job may take).
DEFAULT_TIMEOUT = 30.0
COUNT_PAGE_SIZE = 100  # walked only when an answer lacks its total `count`
RETRYABLE_4XX = frozenset({408, 429})


@dataclass
class HostedBackend:
    client: Any  # mem0.AsyncMemoryClient, one per process
    can_infer: bool = True  # the platform runs its own fact extraction
    name: str = "hosted"

    @classmethod
    async def start(cls, config: WorkerConfig, *, timeout: float = DEFAULT_TIMEOUT) -> HostedBackend:
        if not config.mem0_api_key:
            raise ValueError("MEM0_API_KEY is not set: the hosted backend needs a platform API key")
        http = httpx.AsyncClient(timeout=timeout)  # the SDK sets base_url and auth headers on it
        try:
            # The constructor pings GET /v1/ping/ with a blocking `requests.get` that has no
            # timeout: run it off the loop, and bound the wait ourselves.
            connect = asyncio.to_thread(
                AsyncMemoryClient, api_key=config.mem0_api_key, host=config.mem0_host, client=http
            )
            client = await asyncio.wait_for(connect, timeout)
        except TimeoutError:
            await http.aclose()
            message = f"{config.mem0_host} did not answer the start-up ping within {timeout:g}s"
            raise BackendUnavailable(message) from None
        except BaseException:
            await http.aclose()
            raise
        log.info("hosted_backend_started", host=config.mem0_host, project_id=client.project_id)
        return cls(client=client)

    async def close(self) -> None:
        await self.client.async_client.aclose()

    # -- writes ---------------------------------------------------------------------------------------

    async def add(self, user_id: str, request: AddRequest, keys: list[str], op_id: str) -> tuple[list[str], int]:
        """Send the request's messages in one call; return (ids the platform reports as added, 0).

        Not idempotent: the platform takes no idempotency key, so `keys` and `op_id` go unused and a
        job retried after a lost response stores its messages again (with infer=True, the platform's
        own deduplication may absorb that). With infer=True the platform also queues the work and answers
        without ids, so such an add reports nothing stored although memories appear shortly after.
        Message metadata is merged into one dict: the platform takes one per call. It also takes one
        `timestamp` (Unix seconds) per call, so each run of messages said at the same time is one call.
        """
        metadata = {**request.metadata, **{k: v for m in request.messages for k, v in m.metadata.items()}}
        added: list[str] = []
        for said_at, run in itertools.groupby(request.messages, key=lambda m: m.timestamp):
            messages = [m.model_dump(include={"role", "content", "name"}, exclude_none=True) for m in run]
            when = {"timestamp": _unix_seconds(said_at)} if said_at else {}
            response = await _call("add", self.client.add(messages, user_id=user_id, metadata=metadata or None,
                                                          infer=request.infer, **when))
            added += [str(r["id"]) for r in _results(response) if r.get("event") == "ADD"]
        return added, 0

    async def forget(self, user_id: str) -> int:
        before = await self.count(user_id)
        await _call("forget", self.client.delete_all(user_id=user_id))
        # The platform may delete asynchronously: check, and let a retry finish the job if needed.
        remaining = await self.count(user_id)
        if remaining:
            raise ForgetIncomplete(f"{remaining} memories of the user remain after forget")
        return before

    # -- reads ----------------------------------------------------------------------------------------

    async def search(
        self, user_id: str, query: str, limit: int, filters: dict[str, Any]
    ) -> list[MemoryRecord]:
        scope: dict[str, Any] = {"user_id": user_id}
        # The caller's filters go below the scope as one more AND term, their own AND/OR/NOT intact,
        # so no combination of them can widen the search past this user.
        scoped = {"AND": [scope, filters]} if filters else scope
        response = await _call("search", self.client.search(query, filters=scoped, top_k=limit))
        return [_record(r) for r in _results(response)]

    async def list(self, user_id: str, limit: int, cursor: str | None) -> MemoryPage:
        """One page of the user's memories; the cursor is the next page number.

        Offset pages: a memory added or deleted meanwhile can shift the later pages by one.
        """
        page = _page_number(cursor)
        call = self.client.get_all(filters={"user_id": user_id}, page=page, page_size=limit)
        response = await _call("list", call)
        if isinstance(response, list):
            # A bare list is the unpaginated answer, i.e. the whole set: page it here.
            start = (page - 1) * limit
            rows, more = response[start : start + limit], len(response) > start + limit
        else:
            rows, more = _results(response), bool(response.get("next"))
        return MemoryPage(memories=[_record(r) for r in rows], next_cursor=str(page + 1) if more else None)

    async def count(self, user_id: str) -> int:
        total, page = 0, 1
        while True:
            call = self.client.get_all(filters={"user_id": user_id}, page=page, page_size=COUNT_PAGE_SIZE)
            response = await _call("count", call)
            if isinstance(response, list):
                return len(response)
            if isinstance(response.get("count"), int):
                return int(response["count"])  # the paginated answer's total: no need to walk the pages
            total += len(_results(response))
            if not response.get("next"):
                return total
            page += 1


async def _call(operation: str, call: Awaitable[T]) -> T:
    """Await an SDK call: transport trouble raises `BackendUnavailable`, a refusal `BackendRejected`."""
    try:
        return await call
    except (Mem0Error, httpx.HTTPError) as exc:
        translated = _translate(operation, exc)
        if translated is None:
            raise
        # `from None`: the SDK's exception text is the response body, which may quote memory text.
        raise translated from None


def _translate(operation: str, exc: BaseException) -> Exception | None:
    cause, debug = mem0_adapter.sdk_error_details(exc)
    if isinstance(cause, httpx.TransportError):
        return BackendUnavailable(f"mem0 platform unreachable during {operation}: {type(cause).__name__}")
    if isinstance(cause, httpx.HTTPStatusError):
        status: int | None = cause.response.status_code
        retry_after = _retry_after(cause.response.headers.get("Retry-After"))
    else:
        status, retry_after = debug.get("status_code"), debug.get("retry_after")
    if status is None:
        if isinstance(exc, NetworkError):
            reason = debug.get("error_type", "network error")
            return BackendUnavailable(f"mem0 platform unreachable during {operation}: {reason}")
        return None
    if status in RETRYABLE_4XX or status >= 500:
        message = f"mem0 platform answered HTTP {status} to {operation}"
        return BackendUnavailable(message, retry_after=retry_after)
    if 400 <= status < 500:
        code = getattr(exc, "error_code", None) or f"HTTP_{status}"
        return BackendRejected(
            f"mem0 platform rejected {operation} with HTTP {status} ({type(exc).__name__}, {code}); "
            "not retried: the request or the API key needs fixing",
            status=status,
        )
    return None


def _retry_after(value: str | None) -> float | None:
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


def _page_number(cursor: str | None) -> int:
    if cursor is None:
        return 1
    if not (cursor.isascii() and cursor.isdigit()) or int(cursor) < 1:
        raise InvalidCursor("the cursor is not a page number this service returned")
    return int(cursor)


def _results(response: Any) -> list[dict[str, Any]]:
    """The memories in an answer: the v1.1 `{"results": [...]}` envelope or a bare list."""
    if isinstance(response, list):
        return response
    return list(response.get("results") or [])


def _unix_seconds(timestamp: str) -> int:
    """An ISO 8601 time as Unix seconds; a time without a zone is taken as UTC."""
    when = datetime.fromisoformat(timestamp)
    return int((when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp())


def _record(result: dict[str, Any]) -> MemoryRecord:
    return MemoryRecord(
        id=str(result["id"]),
        # The platform's own answer, never the scope we asked for: the caller drops another user's records.
        user_id=str(result.get("user_id") or ""),
        text=str(result.get("memory") or ""),
        name=result.get("actor_id"),
        role=result.get("role"),
        score=result.get("score"),
        metadata=dict(result.get("metadata") or {}),
        created_at=result.get("created_at"),
    )
