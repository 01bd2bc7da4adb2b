"""Fact extraction (`infer=True`) on the embedded backend: once per write, from the user's own context.

memfleet runs the steps of mem0's extraction itself, with mem0's prompt (`workers.mem0_adapter`),
rather than call mem0's `AsyncMemory.add`: that gives each fact a new uuid4, asks the LLM again
when a write is retried, and stores in several commits; a step of our own can sit between the
LLM's answer and the first stored memory. For a write of user U with op id O:

1. Context, all of it U's: U's `NEAREST` memories closest to the new messages (the fused search,
   over U's rows only) and the last `LAST_MESSAGES` messages of U's session (`memfleet_messages`).
2. One LLM call with mem0's extraction prompt (`workers.llm`). Its answer is read as mem0 reads
   it; a fact repeated in it counts once, and one the nearest memories hold word for word (same
   hash) is marked known and not stored again, as mem0 does.
3. The extraction is recorded under (U, O) (`workers.backends.extraction`) before anything is stored.
4. In one transaction: the facts become memories with ids uuid5(U, O, position), carrying the
   write's metadata, the timestamp of its last message that has one and its `expires_at`; the
   messages join U's session context; the extraction is marked applied. If the LLM found no fact,
   or its answer did not parse (counted), the messages themselves are stored, as `infer=False` does.

A retry finds the recorded extraction and applies it: the LLM is not asked again, and re-applying
stores nothing twice. mem0's entity linking is not run (it needs spaCy), so no entity data is kept.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import structlog

from producer.contract import MAX_CONTENT_CHARS, AddRequest, Message
from workers import mem0_adapter
from workers.backends import extraction
from workers.backends.base import BackendUnavailable, Fence
from workers.backends.indexing import Said, dense_text, keyword_line
from workers.backends.pg_store import NewMemory
from workers.embedder import BatchingEmbedder
from workers.llm import ExtractionLLM

log = structlog.get_logger("memfleet.backend")

FACT_NAMESPACE = uuid.UUID("0b0d5e1c-3f7a-4c52-9d2e-6a8f4b1c7e93")
NEAREST = 10  # existing memories in the prompt (mem0: 10)
LAST_MESSAGES = 10  # the session's messages kept and put in the prompt (mem0's SQLiteManager: 10)

#: runs `fn(conn, *args)` on a pooled connection in a thread; an outage is `BackendUnavailable`
InStore = Callable[..., Awaitable[Any]]
#: runs `fn(conn, user_id, *args)` as a write under a lease's fence (`EmbeddedBackend._write`)
FencedWrite = Callable[..., Awaitable[Any]]


def fact_id(user_id: str, op_id: str, position: int) -> str:
    return str(uuid.uuid5(FACT_NAMESPACE, f"{user_id}\0{op_id}\0{position}"))


def session_scope(user_id: str) -> str:
    """mem0's session scope of a user's writes (`_build_session_scope` of `{"user_id": ...}`)."""
    return f"user_id={user_id}"


class Inference:
    def __init__(self, llm: ExtractionLLM, embedder: BatchingEmbedder, in_store: InStore,
                 write: FencedWrite) -> None:
        self.llm = llm
        self.embedder = embedder
        self.in_store = in_store
        self.write = write

    async def add(self, user_id: str, request: AddRequest, op_id: str,
                  as_said: Callable[[], Awaitable[list[NewMemory]]],
                  fence: Fence | None = None) -> tuple[list[str], int]:
        """Store the facts of write `op_id` (or its messages, if the LLM finds none); return (ids
        stored now, number stored before). `as_said` gives the messages as `infer=False` stores them."""
        conversation = mem0_adapter.conversation([_turn(m) for m in request.messages])
        (vector,) = await self.embedder.embed([conversation])
        found = await self.in_store(extraction.context, user_id, op_id, conversation,
                                    np.asarray(vector, dtype=np.float32), session_scope(user_id), NEAREST,
                                    LAST_MESSAGES)
        recorded = found.recorded or await self._extract(user_id, op_id, request, conversation, found, fence)
        if recorded.applied:
            return [], len(recorded.memory_ids)
        memories = await as_said() if recorded.as_said else await self._facts(user_id, op_id, request, recorded.facts)
        # Facts the user's memories already held count as stored before.
        total = len(request.messages) if recorded.as_said else len(recorded.facts)
        now = datetime.now(UTC)
        # Ids of their own, so that a re-applied write adds nothing twice; a microsecond apart, so
        # that the session keeps them in the order they were said.
        messages = [{**_turn(m), "id": str(uuid.uuid5(FACT_NAMESPACE, f"{user_id}\0{op_id}\0message\0{i}")),
                     "name": m.name, "created_at": (now + timedelta(microseconds=i)).isoformat()}
                    for i, m in enumerate(request.messages)]
        try:
            # Under the lease's fence, as every write is: a late holder stores nothing (invariant 10).
            stored = await self.write(fence, user_id, extraction.apply, op_id, memories, messages,
                                      session_scope(user_id), LAST_MESSAGES, now.isoformat())
        except LookupError:
            raise BackendUnavailable("the write's extraction vanished before it was applied") from None
        if stored is None:  # applied by an earlier try, between our reading and our lock
            return [], total
        return stored, total - len(stored)

    async def _extract(self, user_id: str, op_id: str, request: AddRequest, conversation: str,
                       found: extraction.Context, fence: Fence | None) -> extraction.Extraction:
        # The store filtered by user; check.
        own = [r for r in found.nearest if mem0_adapter.payload_user(r.payload) == user_id]
        system, prompt = mem0_adapter.extraction_prompt(
            [mem0_adapter.read_payload(r.payload).text for r in own], conversation, found.last_messages,
            _observed(request.messages))
        answer = await self.llm.complete(system, prompt)
        facts = mem0_adapter.extracted(answer)
        if facts is None:
            self.llm.counters.errors["unparsed"] += 1
            log.warning("llm_answer_unparsed", user_id=user_id, op_id=op_id, chars=len(answer or ""))
        kept = _readable(facts or [], {str(mem0_adapter.read_payload(r.payload).text_hash) for r in own})
        # No fact (or no readable answer): the messages are stored as said, so nothing said is lost.
        # Fenced too: recorded late, after a forget, it would keep the LLM's words about the user.
        recorded: extraction.Extraction = await self.write(fence, user_id, extraction.record, op_id, kept, not kept)
        return recorded

    async def _facts(self, user_id: str, op_id: str, request: AddRequest,
                     facts: list[dict[str, Any]]) -> list[NewMemory]:
        """The new facts as memories; a fact's id comes from its position among all the facts."""
        when = next((m.timestamp for m in reversed(request.messages) if m.timestamp), None)
        new = [(position, Said(str(f["text"]), None, when), f) for position, f in enumerate(facts) if not f["known"]]
        if not new:
            return []
        vectors = np.asarray(await self.embedder.embed([dense_text(s) for _, s, _ in new]), dtype=np.float32)
        metadata = {**request.metadata, **{k: v for m in request.messages for k, v in m.metadata.items()}}
        now = datetime.now(UTC).isoformat()
        memories = []
        for (position, said, fact), vector in zip(new, vectors, strict=True):
            payload = mem0_adapter.new_payload(user_id, said.content, metadata=metadata, timestamp=when,
                                               attributed_to=fact["attributed_to"], created_at=now)
            memories.append(NewMemory(fact_id(user_id, op_id, position), vector, payload, keyword_line(said),
                                      expires_at=request.expires_at))
        return memories


def _turn(message: Message) -> dict[str, str]:
    """A message as the prompt shows it: `Name: content` when it has a speaker (mem0's examples)."""
    return {"role": message.role, "content": f"{message.name}: {message.content}" if message.name else message.content}


def _observed(messages: list[Message]) -> str | None:
    """The date the messages were said (the prompt's "Observation Date"), if they say."""
    when = next((m.timestamp for m in reversed(messages) if m.timestamp), None)
    return None if when is None else datetime.fromisoformat(when).date().isoformat()


def _readable(facts: list[dict[str, Any]], hashes: set[str]) -> list[dict[str, Any]]:
    """The facts with a text of a memory's size, each once, in the LLM's order; `known` marks those
    the user's nearest memories hold word for word (mem0 drops them by hash too)."""
    kept: list[dict[str, Any]] = []
    seen: set[str] = set()
    for fact in facts:
        text = fact.get("text")
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_CONTENT_CHARS:
            continue
        digest = mem0_adapter.text_hash(text.strip())
        if digest in seen:
            continue
        seen.add(digest)
        attributed = fact.get("attributed_to")
        kept.append({"text": text.strip(), "attributed_to": attributed if attributed in ("user", "assistant") else None,
                     "known": digest in hashes})
    return kept
