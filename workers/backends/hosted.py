"""The hosted mem0 platform (api.mem0.ai, or any host speaking its API) through `mem0.AsyncMemoryClient`.

The platform stores, embeds, searches and extracts facts itself, so this backend is a thin mapping:
every call names the user explicitly (`user_id` in the body, the filters or the query string).
Calls go through `workers.backends.platform_calls` (what an error becomes: retried or refused, in
words of ours) and records through `workers.backends.platform_records`.

The platform's by-id endpoints (get, update, delete, history, the batches) are scoped to the project,
not to a user: any memory of the project answers to its id. So each of those calls is preceded by a
get of the memory whose `user_id` must be the caller's, and another user's memory is treated exactly
as an unknown id.
"""

from __future__ import annotations

import asyncio
import builtins
import itertools
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import structlog

# mem0 reads MEM0_TELEMETRY and MEM0_DIR on import: `workers.process` has set them.
from mem0 import AsyncMemoryClient

from producer.contract import (
    AddRequest,
    ExportedMemory,
    ExportPage,
    HistoryEvent,
    MemoryChange,
    MemoryPage,
    MemoryRecord,
)
from workers import mem0_adapter
from workers.backends.base import BackendUnavailable, Fence, ForgetIncomplete
from workers.backends.platform_calls import call_platform, call_platform_or_none, each
from workers.backends.platform_records import (
    ORIGIN_KEY,
    expiration_day,
    is_batchable,
    is_live,
    page_number,
    results_of,
    said_at_seconds,
    to_event,
    to_exported,
    to_record,
    unix_seconds,
    update_fields,
)
from workers.settings import WorkerConfig

log = structlog.get_logger("memfleet.backend")

# Seconds for each HTTP request (the SDK's own default is 300, longer than any job may take).
DEFAULT_TIMEOUT = 30.0
COUNT_PAGE_SIZE = 100  # walked only when an answer lacks its total `count`
HISTORY_EVENTS = frozenset({"ADD", "UPDATE", "DELETE"})


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
        expiry = {"expiration_date": expiration_day(request.expires_at)} if request.expires_at else {}
        for said_at, run in itertools.groupby(request.messages, key=lambda m: m.timestamp):
            messages = [m.model_dump(include={"role", "content", "name"}, exclude_none=True) for m in run]
            when = {"timestamp": unix_seconds(said_at), **expiry} if said_at else expiry
            response = await call_platform("add", self.client.add(messages, user_id=user_id, metadata=metadata or None,
                                                          infer=request.infer, **when))
            added += [str(r["id"]) for r in results_of(response) if r.get("event") == "ADD"]
        return added, 0

    async def forget(self, user_id: str, *, fence: Fence | None = None) -> int:
        before = await self.count(user_id)
        await call_platform("forget", self.client.delete_all(user_id=user_id))
        # The platform may delete asynchronously: check, and let a retry finish the job if needed.
        remaining = await self.count(user_id)
        if remaining:
            raise ForgetIncomplete(f"{remaining} memories of the user remain after forget")
        return before

    # -- one memory at a time -------------------------------------------------------------------------

    async def get(self, user_id: str, memory_id: str) -> MemoryRecord | None:
        found = await self._own(user_id, memory_id)
        return None if found is None else to_record(found)

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
        batch = [c for c in changes if is_batchable(c)]
        if len(batch) < 2:
            batch = []  # one change: the memory's own endpoint
        single = [c for c in changes if c not in batch]
        if batch:
            items = [{"memory_id": c.memory_id, **update_fields(c, found[c.memory_id])} for c in batch]
            if await call_platform_or_none("update", self.client.batch_update(items)) is None:
                return await self._gone(user_id, [c.memory_id for c in batch])

        async def change(c: MemoryChange) -> Any:
            fields = update_fields(c, found[c.memory_id])
            return await call_platform_or_none("update", self.client.update(c.memory_id, **fields))

        answers = await each(change, single)
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
            done = await call_platform_or_none("delete", self.client.delete(memory_ids[0]))
        else:
            batch = [{"memory_id": i} for i in memory_ids]
            done = await call_platform_or_none("delete", self.client.batch_delete(batch))
        return [] if done is not None else await self._gone(user_id, memory_ids)

    async def export(self, user_id: str, limit: int, cursor: str | None) -> ExportPage:
        """A page of the user's memories with their history, paged like `list` (page numbers)."""
        page = await self.list(user_id, limit, cursor)
        # Another user's record (the platform's mistake) gets no history call and is not exported.
        own = [r for r in page.memories if r.user_id == user_id]
        if foreign := [r.id for r in page.memories if r.user_id != user_id]:
            log.error("foreign_memory_dropped", user_id=user_id, backend=self.name, dropped=len(foreign),
                      memory_ids=foreign)
        histories = await each(lambda r: self._events(user_id, r.id), own)
        memories = [to_exported(user_id, r, events) for r, events in zip(own, histories, strict=True)]
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
                 and (m.expires_at is None or expiration_day(m.expires_at) >= today)]

        async def add(m: ExportedMemory) -> builtins.list[str]:
            message = {"role": m.role, "content": m.text, **({"name": m.name} if m.name else {})}
            extra: dict[str, Any] = {}
            if said := said_at_seconds(m):  # the platform backdates `created_at` by it
                extra["timestamp"] = said
            if m.expires_at:
                extra["expiration_date"] = expiration_day(m.expires_at)
            response = await call_platform("import", self.client.add(
                [message], user_id=user_id, metadata={**m.metadata, ORIGIN_KEY: m.id}, infer=False, **extra))
            return [str(r["id"]) for r in results_of(response) if r.get("event") == "ADD"]

        added = await each(add, fresh)
        return [i for ids in added for i in ids], sum(m.id in already for m in memories)

    async def owners(self, memory_ids: builtins.list[str]) -> dict[str, builtins.list[str]]:
        """The user holding each memory id (a get each), of the ids the platform has."""
        answers = await each(lambda i: call_platform_or_none("owners", self.client.get(i)), memory_ids)
        return {i: [str(a["user_id"])] for i, a in zip(memory_ids, answers, strict=True)
                if isinstance(a, dict) and a.get("user_id") and is_live(a)}

    async def sweep_expired(self) -> int:
        """Nothing to do: the platform expires memories itself (after their `expiration_date`), so
        this always returns 0."""
        return 0

    async def _own(self, user_id: str, memory_id: str) -> dict[str, Any] | None:
        """The platform's record of the memory if it is the user's and has not expired, else None."""
        found = await call_platform_or_none("get", self.client.get(memory_id))
        if not isinstance(found, dict) or found.get("user_id") != user_id or not is_live(found):
            return None
        return found

    async def _check(self, user_id: str, memory_ids: builtins.list[str]) -> tuple[
            dict[str, dict[str, Any]], builtins.list[str]]:
        """The user's memories among `memory_ids` by id, and the ids that are not."""
        answers = await each(lambda i: self._own(user_id, i), memory_ids)
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
        answer = await call_platform_or_none("history", self.client.history(memory_id))
        rows = [] if answer is None else results_of(answer)
        events = [to_event(r) for r in rows if r.get("user_id") == user_id and str(r.get("memory_id")) == memory_id
                  and r.get("event") in HISTORY_EVENTS]
        return sorted(events, key=lambda e: e.at or "")

    async def _restored(self, user_id: str, memory_ids: builtins.list[str]) -> set[str]:
        """Which of the exported ids `memory_ids` the user already has a restored memory of."""
        filters = {"AND": [{"user_id": user_id}, {ORIGIN_KEY: {"in": memory_ids}}]}
        origins: set[str] = set()
        page = 1
        while True:
            call = self.client.get_all(filters=filters, page=page, page_size=COUNT_PAGE_SIZE)
            answer = await call_platform("import", call)
            origins |= {str((r.get("metadata") or {}).get(ORIGIN_KEY)) for r in results_of(answer)
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
        response = await call_platform("search", self.client.search(query, filters=scoped, top_k=limit))
        return [to_record(r) for r in results_of(response) if is_live(r)]

    async def list(self, user_id: str, limit: int, cursor: str | None) -> MemoryPage:
        """One page of the user's memories; the cursor is the next page number.

        Offset pages: a memory added or deleted meanwhile can shift the later pages by one.
        """
        page = page_number(cursor)
        call = self.client.get_all(filters={"user_id": user_id}, page=page, page_size=limit)
        response = await call_platform("list", call)
        if isinstance(response, list):
            # A bare list is the unpaginated answer, i.e. the whole set: page it here.
            start = (page - 1) * limit
            rows, more = response[start : start + limit], len(response) > start + limit
        else:
            rows, more = results_of(response), bool(response.get("next"))
        records = [to_record(r) for r in rows if is_live(r)]
        return MemoryPage(memories=records, next_cursor=str(page + 1) if more else None)

    async def count(self, user_id: str) -> int:
        total, page = 0, 1
        while True:
            call = self.client.get_all(filters={"user_id": user_id}, page=page, page_size=COUNT_PAGE_SIZE)
            response = await call_platform("count", call)
            if isinstance(response, list):
                return len(response)
            if isinstance(response.get("count"), int):
                return int(response["count"])  # the paginated answer's total: no need to walk the pages
            total += len(results_of(response))
            if not response.get("next"):
                return total
            page += 1
