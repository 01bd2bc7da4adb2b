"""The hosted mem0 platform (api.mem0.ai, or any host speaking its API) through `mem0.AsyncMemoryClient`.

The platform stores, embeds, searches and extracts facts itself, so this backend is a thin mapping:
every call names the user explicitly (`user_id` in the body, the filters or the query string), and
transport trouble (timeouts, refused connections, 408/429/5xx) becomes `BackendUnavailable` so the
job is retried later. Error messages carry status codes and class names only, never the platform's
response body: a body can echo memory text, and these messages end up in logs and in Redis.

The platform's by-id endpoints (get, update, delete, history, the batches) are scoped to the project,
not to a user: any memory of the project answers to its id. So each of those calls is preceded by a
get of the memory whose `user_id` must be the caller's, and another user's memory is treated exactly
as an unknown id.
"""

from __future__ import annotations

import asyncio
import builtins
import email.utils
import itertools
import math
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, TypeVar

import httpx
import structlog

# mem0 reads MEM0_TELEMETRY and MEM0_DIR on import: `workers.process` has set them.
from mem0 import AsyncMemoryClient

from producer.contract import (
    MAX_HISTORY_EVENTS,
    AddRequest,
    ExportedMemory,
    ExportPage,
    HistoryEvent,
    MemoryChange,
    MemoryPage,
    MemoryRecord,
    check_memory_id,
)
from producer.errors import InvalidRequest
from workers import mem0_adapter
from workers.backends.base import BackendRejected, BackendUnavailable, Fence, ForgetIncomplete, InvalidCursor
from workers.settings import WorkerConfig

log = structlog.get_logger("memfleet.backend")

T = TypeVar("T")
A = TypeVar("A")

# Seconds for each HTTP request (the SDK's own default is 300, longer than any job may take).
DEFAULT_TIMEOUT = 30.0
COUNT_PAGE_SIZE = 100  # walked only when an answer lacks its total `count`
RETRYABLE_4XX = frozenset({408, 429})
EVENT_NAMESPACE = uuid.UUID("5d1f2a8e-93c4-4b7e-a1f0-6c2e8d4b9a17")
# Requests one job keeps in flight at once when it needs one per memory (checks, history, restore).
PER_MEMORY_CONCURRENCY = 8
HISTORY_EVENTS = frozenset({"ADD", "UPDATE", "DELETE"})
# Platform metadata key holding the id a restored memory was exported with, so that an import run
# twice finds what it stored the first time. Callers never see it (`_record` drops it) and cannot
# set or filter on it: caller keys are letters, digits and '_' (contract.check_metadata).
ORIGIN_KEY = "memfleet-origin"


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
        await mem0_adapter.close_platform_client(self.client)

    # -- writes ---------------------------------------------------------------------------------------

    async def add(self, user_id: str, request: AddRequest, keys: list[str], op_id: str, *,
                  fence: Fence | None = None) -> tuple[list[str], int]:
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
        expiry = {"expiration_date": _expiration_date(request.expires_at)} if request.expires_at else {}
        for said_at, run in itertools.groupby(request.messages, key=lambda m: m.timestamp):
            messages = [m.model_dump(include={"role", "content", "name"}, exclude_none=True) for m in run]
            when = {"timestamp": _unix_seconds(said_at), **expiry} if said_at else expiry
            response = await _call("add", self.client.add(messages, user_id=user_id, metadata=metadata or None,
                                                          infer=request.infer, **when))
            added += [str(r["id"]) for r in _results(response) if r.get("event") == "ADD"]
        return added, 0

    async def forget(self, user_id: str, *, fence: Fence | None = None) -> int:
        before = await self.count(user_id)
        await _call("forget", self.client.delete_all(user_id=user_id))
        # The platform may delete asynchronously: check, and let a retry finish the job if needed.
        remaining = await self.count(user_id)
        if remaining:
            raise ForgetIncomplete(f"{remaining} memories of the user remain after forget")
        return before

    # -- one memory at a time -------------------------------------------------------------------------

    async def get(self, user_id: str, memory_id: str) -> MemoryRecord | None:
        found = await self._own(user_id, memory_id)
        return None if found is None else _record(found)

    async def history(self, user_id: str, memory_id: str) -> builtins.list[HistoryEvent] | None:
        """The user's events for the memory, oldest first; None if there are none (unknown id, or
        another user's). The platform keeps the history of a deleted memory, texts and all (as mem0
        does): of a memory that is no longer there (deleted, expired), only the events and their
        times are given out, never a text."""
        memory: dict[str, Any] | None
        events: builtins.list[HistoryEvent]
        memory, events = await asyncio.gather(self._own(user_id, memory_id), self._events(user_id, memory_id))
        if not events:
            return None
        if memory is None:
            return [e.model_copy(update={"old_text": None, "new_text": None}) for e in events]
        return events

    async def update(self, user_id: str, changes: builtins.list[MemoryChange], *,
                     fence: Fence | None = None) -> builtins.list[str]:
        """Check that every memory is the user's, then change them: changes of text and metadata
        only in one batch call, the others (timestamp, expiry) one call each.

        The platform has no transaction. A memory that goes between the check and the change (it
        expires at midnight UTC meanwhile) is reported not found, and the changes of the other
        memories that were made stay made (if the batch itself found one gone, the single changes are
        not made). A retried update sets the same values again.
        """
        found, missing = await self._check(user_id, [c.memory_id for c in changes])
        if missing:
            return missing
        batch = [c for c in changes if _batchable(c)]
        if len(batch) < 2:
            batch = []  # one change: the memory's own endpoint
        single = [c for c in changes if c not in batch]
        if batch:
            items = [{"memory_id": c.memory_id, **_fields(c, found[c.memory_id])} for c in batch]
            if await _unless_missing("update", self.client.batch_update(items)) is None:
                return await self._gone(user_id, [c.memory_id for c in batch])

        async def change(c: MemoryChange) -> Any:
            return await _unless_missing("update", self.client.update(c.memory_id, **_fields(c, found[c.memory_id])))

        answers = await _each(change, single)
        return [c.memory_id for c, answer in zip(single, answers, strict=True) if answer is None]

    async def delete(self, user_id: str, memory_ids: builtins.list[str], *,
                     fence: Fence | None = None) -> builtins.list[str]:
        """Check that every memory is the user's, then delete them in one call.

        The platform keeps a deleted memory's history, texts included (`history` never gives them
        out). A memory that goes between the check and the delete is reported not found; a delete
        retried after its answer was lost reports the memories it deleted as not found.
        """
        _, missing = await self._check(user_id, memory_ids)
        if missing:
            return missing
        if len(memory_ids) == 1:
            done = await _unless_missing("delete", self.client.delete(memory_ids[0]))
        else:
            done = await _unless_missing("delete", self.client.batch_delete([{"memory_id": i} for i in memory_ids]))
        return [] if done is not None else await self._gone(user_id, memory_ids)

    async def export(self, user_id: str, limit: int, cursor: str | None) -> ExportPage:
        """A page of the user's memories with their history, paged like `list` (page numbers)."""
        page = await self.list(user_id, limit, cursor)
        # Another user's record (the platform's mistake) gets no history call and is not exported.
        own = [r for r in page.memories if r.user_id == user_id]
        if foreign := [r.id for r in page.memories if r.user_id != user_id]:
            log.error("foreign_memory_dropped", user_id=user_id, backend=self.name, dropped=len(foreign),
                      memory_ids=foreign)
        histories = await _each(lambda r: self._events(user_id, r.id), own)
        memories = [_exported(user_id, r, events) for r, events in zip(own, histories, strict=True)]
        return ExportPage(memories=memories, next_cursor=page.next_cursor)

    async def restore(self, user_id: str, memories: builtins.list[ExportedMemory], *,
                      fence: Fence | None = None) -> tuple[builtins.list[str], int]:
        """Add exported memories again. The platform assigns ids, so a restored memory has a new id,
        not the one it was exported with; its history starts afresh with the platform's ADD.

        Each memory is added with its exported id in its platform metadata (`ORIGIN_KEY`), and one
        already restored that way is not added again, so an import run twice stores each memory once.
        A memory whose expiry has passed is not added (it would be gone at once).
        """
        already = await self._restored(user_id, [m.id for m in memories])
        today = datetime.now(UTC).date().isoformat()
        fresh = [m for m in memories if m.id not in already
                 and (m.expires_at is None or _expiration_date(m.expires_at) >= today)]

        async def add(m: ExportedMemory) -> builtins.list[str]:
            message = {"role": m.role, "content": m.text, **({"name": m.name} if m.name else {})}
            extra: dict[str, Any] = {}
            if said := _said_at(m):  # the platform backdates `created_at` by it
                extra["timestamp"] = said
            if m.expires_at:
                extra["expiration_date"] = _expiration_date(m.expires_at)
            response = await _call("import", self.client.add(
                [message], user_id=user_id, metadata={**m.metadata, ORIGIN_KEY: m.id}, infer=False, **extra))
            return [str(r["id"]) for r in _results(response) if r.get("event") == "ADD"]

        added = await _each(add, fresh)
        return [i for ids in added for i in ids], sum(m.id in already for m in memories)

    async def owners(self, memory_ids: builtins.list[str]) -> dict[str, builtins.list[str]]:
        """The user holding each memory id (a get each), of the ids the platform has."""
        answers = await _each(lambda i: _unless_missing("owners", self.client.get(i)), memory_ids)
        return {i: [str(a["user_id"])] for i, a in zip(memory_ids, answers, strict=True)
                if isinstance(a, dict) and a.get("user_id") and _live(a)}

    async def sweep_expired(self) -> int:
        """Nothing to do: the platform expires memories itself (after their `expiration_date`), so
        this always returns 0."""
        return 0

    async def _own(self, user_id: str, memory_id: str) -> dict[str, Any] | None:
        """The platform's record of the memory if it is the user's and has not expired, else None."""
        found = await _unless_missing("get", self.client.get(memory_id))
        if not isinstance(found, dict) or found.get("user_id") != user_id or not _live(found):
            return None
        return found

    async def _check(self, user_id: str, memory_ids: builtins.list[str]) -> tuple[
            dict[str, dict[str, Any]], builtins.list[str]]:
        """The user's memories among `memory_ids` by id, and the ids that are not."""
        answers = await _each(lambda i: self._own(user_id, i), memory_ids)
        found = {i: a for i, a in zip(memory_ids, answers, strict=True) if a is not None}
        return found, [i for i in memory_ids if i not in found]

    async def _gone(self, user_id: str, memory_ids: builtins.list[str]) -> builtins.list[str]:
        """After the platform answered 404 to a change of memories that were all there: which went."""
        _, gone = await self._check(user_id, memory_ids)
        if not gone:
            raise BackendUnavailable("mem0 platform answered 404 for memories it still has; retrying")
        return gone

    async def _events(self, user_id: str, memory_id: str) -> builtins.list[HistoryEvent]:
        """The platform's history of the memory: the user's events only, oldest first."""
        answer = await _unless_missing("history", self.client.history(memory_id))
        rows = [] if answer is None else _results(answer)
        events = [_event(r) for r in rows if r.get("user_id") == user_id and str(r.get("memory_id")) == memory_id
                  and r.get("event") in HISTORY_EVENTS]
        return sorted(events, key=lambda e: e.at or "")

    async def _restored(self, user_id: str, memory_ids: builtins.list[str]) -> set[str]:
        """Which of the exported ids `memory_ids` the user already has a restored memory of."""
        filters = {"AND": [{"user_id": user_id}, {ORIGIN_KEY: {"in": memory_ids}}]}
        origins: set[str] = set()
        page = 1
        while True:
            answer = await _call("import", self.client.get_all(filters=filters, page=page, page_size=COUNT_PAGE_SIZE))
            origins |= {str((r.get("metadata") or {}).get(ORIGIN_KEY)) for r in _results(answer)
                        if r.get("user_id") == user_id}
            if isinstance(answer, list) or not answer.get("next"):
                return origins & set(memory_ids)
            page += 1

    # -- reads ----------------------------------------------------------------------------------------

    async def search(
        self, user_id: str, query: str, limit: int, filters: dict[str, Any]
    ) -> list[MemoryRecord]:
        scope: dict[str, Any] = {"user_id": user_id}
        # The caller's filters go below the scope as one more AND term, their own AND/OR/NOT intact,
        # so no combination of them can widen the search past this user.
        scoped = {"AND": [scope, filters]} if filters else scope
        response = await _call("search", self.client.search(query, filters=scoped, top_k=limit))
        return [_record(r) for r in _results(response) if _live(r)]

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
        records = [_record(r) for r in rows if _live(r)]
        return MemoryPage(memories=records, next_cursor=str(page + 1) if more else None)

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


async def _unless_missing(operation: str, call: Awaitable[T]) -> T | None:
    """`_call`, but the platform's 404 (no such memory) is None rather than an error."""
    try:
        return await _call(operation, call)
    except BackendRejected as exc:
        if exc.status == 404:
            return None
        raise


async def _each(fn: Callable[[A], Awaitable[T]], items: Iterable[A]) -> list[T]:
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


async def _call(operation: str, call: Awaitable[T]) -> T:
    """Await an SDK call: transport trouble raises `BackendUnavailable`, a refusal `BackendRejected`."""
    try:
        return await call
    except Exception as exc:
        error = mem0_adapter.platform_error(exc)
        translated = None if error is None else _translate(operation, exc, error)
        if translated is None:
            raise
        # `from None`: the SDK's exception text is the response body, which may quote memory text.
        raise translated from None


def _translate(operation: str, exc: BaseException, error: mem0_adapter.PlatformError) -> Exception | None:
    cause = error.cause
    if isinstance(cause, httpx.TransportError):
        return BackendUnavailable(f"mem0 platform unreachable during {operation}: {type(cause).__name__}")
    if isinstance(cause, httpx.HTTPStatusError):
        status: int | None = cause.response.status_code
        retry_after = _retry_after(cause.response.headers.get("Retry-After"))
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


def _said_at(memory: ExportedMemory) -> int | None:
    """When an exported memory was said (else made), in Unix seconds; None if unknown or unreadable
    (`created_at` is not checked on import: it is informative)."""
    try:
        return next((_unix_seconds(t) for t in (memory.timestamp, memory.created_at) if t), None)
    except ValueError:
        return None


def _expiration_date(expires_at: str) -> str:
    """An expiry as the platform's `expiration_date`: the day (UTC) at whose end it falls due.

    The platform expires by day, at the end of the date given, so an expiry inside a day is
    coarsened to the end of that day: set to expire at 10:00, a memory expires at 24:00 (UTC)
    here. An expiry at midnight is the day before's end, and is exact.
    """
    when = datetime.fromisoformat(expires_at)
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    return (when.astimezone(UTC) - timedelta(microseconds=1)).date().isoformat()


def _expires_at(expiration_date: Any) -> str | None:
    """The platform's `expiration_date` as the instant it falls due: the next midnight, UTC."""
    if not expiration_date:
        return None
    try:
        day = date.fromisoformat(str(expiration_date)[:10])
    except ValueError:
        return None
    return datetime.combine(day + timedelta(days=1), time(), UTC).isoformat()


def _live(result: dict[str, Any]) -> bool:
    """The platform hides expired memories itself; this makes sure (and agrees with its clock to a day)."""
    due = _expires_at(result.get("expiration_date"))
    return due is None or datetime.fromisoformat(due) > datetime.now(UTC)


def _batchable(change: MemoryChange) -> bool:
    """The batch endpoint takes text and metadata only."""
    return change.timestamp is None and change.expires_at is None and not change.clear_expiry


def _fields(change: MemoryChange, current: dict[str, Any]) -> dict[str, Any]:
    """The platform's update fields for `change` to the memory `current` (its platform record)."""
    fields: dict[str, Any] = {}
    if change.text is not None:
        fields["text"] = change.text
    if change.metadata is not None:  # replaced, but a restored memory keeps where it came from
        origin = (current.get("metadata") or {}).get(ORIGIN_KEY)
        fields["metadata"] = {**change.metadata, **({ORIGIN_KEY: origin} if origin else {})}
    if change.timestamp is not None:
        fields["timestamp"] = _unix_seconds(change.timestamp)
    if change.expires_at is not None:
        fields["expiration_date"] = _expiration_date(change.expires_at)
    elif change.clear_expiry:
        fields["expiration_date"] = None  # the SDK sends this null; the platform clears the date
    return fields


def _event(row: dict[str, Any]) -> HistoryEvent:
    # memfleet's history events have UUIDs (an import stores them as such); one the platform gave
    # in another form is named by a UUID derived from it, the same every time.
    event_id = str(row.get("id"))
    try:
        check_memory_id(event_id)
    except InvalidRequest:
        event_id = str(uuid.uuid5(EVENT_NAMESPACE, event_id))
    return HistoryEvent(id=event_id, memory_id=str(row["memory_id"]), event=row["event"],
                        old_text=row.get("old_memory"), new_text=row.get("new_memory"),
                        at=row.get("created_at") or row.get("updated_at"))


def _exported(user_id: str, record: MemoryRecord, events: list[HistoryEvent]) -> ExportedMemory:
    return ExportedMemory(
        user_id=user_id, id=record.id, text=record.text, role="assistant" if record.role == "assistant" else "user",
        name=record.name or None, metadata=record.metadata, created_at=record.created_at,
        updated_at=record.updated_at, expires_at=record.expires_at, history=events[-MAX_HISTORY_EVENTS:],
    )


def _record(result: dict[str, Any]) -> MemoryRecord:
    return MemoryRecord(
        id=str(result["id"]),
        # The platform's own answer, never the scope we asked for: the caller drops another user's records.
        user_id=str(result.get("user_id") or ""),
        text=str(result.get("memory") or ""),
        name=result.get("actor_id"),
        role=result.get("role"),
        score=result.get("score"),
        metadata={k: v for k, v in (result.get("metadata") or {}).items() if k != ORIGIN_KEY},
        created_at=result.get("created_at"),
        updated_at=result.get("updated_at"),
        expires_at=_expires_at(result.get("expiration_date")),
    )
