"""Writes: each is validated, then put in its user's write log with its job, in one step, and
applied in the user's order (`workers.write_log`)."""

from __future__ import annotations

import builtins
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from producer import keys
from producer.client.base import redis_lost
from producer.client.outcomes import Outcomes, WriteHandle
from producer.contract import (
    AddRequest,
    DeleteRequest,
    EncodedMessage,
    ExportedMemory,
    ForgetRequest,
    ImportRequest,
    MemoryChange,
    Message,
    UpdateRequest,
    WriteOp,
    WriteRequest,
    check_expiry,
    check_future,
    new_op_ids,
    parse,
)
from producer.errors import WriteNotReplicated

# Writes per MULTI/EXEC when enqueueing many at once.
SUBMIT_CHUNK = 500


def _expiry(value: str | datetime | None) -> str | None:
    """A datetime as the ISO 8601 text the contract takes; a string as it is (the contract checks it)."""
    return check_expiry(value) if isinstance(value, datetime) else value


class Writes(Outcomes):
    """Writes of one user take effect in the order they were accepted; `WriteHandle.outcome()`
    (or `wait`) says when and how."""

    async def add(
        self,
        user_id: str,
        messages: Sequence[Message | dict[str, Any] | str],
        *,
        metadata: dict[str, Any] | None = None,
        infer: bool = False,
        expires_at: str | datetime | None = None,
    ) -> WriteHandle:
        """Add messages as one write; each becomes a memory (with `infer`, the facts an LLM finds in
        them). `expires_at` (ISO 8601 or a datetime; UTC if it has no zone): when they expire."""
        request = parse(AddRequest, {
            "user_id": user_id,
            "messages": [{"content": m} if isinstance(m, str) else m for m in messages],
            "metadata": metadata or {},
            "infer": infer,
            "expires_at": _expiry(expires_at),
        })
        check_future(request.expires_at)
        return (await self.submit([request]))[0]

    async def update(
        self,
        user_id: str,
        memory_id: str,
        *,
        text: str | None = None,
        metadata: dict[str, Any] | None = None,
        timestamp: str | None = None,
        expires_at: str | datetime | None = None,
        clear_expiry: bool = False,
    ) -> WriteHandle:
        """Change one memory: its text (embedded and indexed again), its metadata (replaced), when it
        was said, or its expiry (`clear_expiry`: it no longer expires). What is left out stays."""
        change = {"memory_id": memory_id, "text": text, "metadata": metadata, "timestamp": timestamp,
                  "expires_at": _expiry(expires_at), "clear_expiry": clear_expiry}
        return await self.update_many(user_id, [change])

    async def update_many(self, user_id: str, changes: Sequence[MemoryChange | dict[str, Any]]) -> WriteHandle:
        """Change up to 100 memories of one user in one write: all of them, or none if any id is
        not the user's (then `outcome()` raises `MemoryNotFound`)."""
        request = parse(UpdateRequest, {"user_id": user_id, "changes": list(changes)})
        for change in request.changes:
            check_future(change.expires_at)
        return (await self.submit([request]))[0]

    async def delete(self, user_id: str, memory_id: str) -> WriteHandle:
        """Delete one memory, leaving no text of it behind (docs/isolation.md, "Lifecycle")."""
        return await self.delete_many(user_id, [memory_id])

    async def delete_many(self, user_id: str, memory_ids: Sequence[str]) -> WriteHandle:
        """Delete up to 100 memories of one user: all of them, or none if any id is not the user's."""
        return (await self.submit([parse(DeleteRequest, {"user_id": user_id, "memory_ids": list(memory_ids)})]))[0]

    async def restore(self, user_id: str, memories: Sequence[ExportedMemory | dict[str, Any]]) -> WriteHandle:
        """Store up to 100 exported memories (`export`) of one user again, with their ids and
        history; one that is already there is left as it is, so restoring twice stores each once."""
        return (await self.submit([parse(ImportRequest, {"user_id": user_id, "memories": list(memories)})]))[0]

    async def forget(self, user_id: str) -> WriteHandle:
        return (await self.submit([parse(ForgetRequest, {"user_id": user_id})]))[0]

    @redis_lost
    async def submit(self, requests: Iterable[WriteRequest]) -> builtins.list[WriteHandle]:
        """Enqueue validated writes in one round trip, each after the user's earlier writes."""
        requests = builtins.list(requests)
        ops = [WriteOp(op_id=op_id, request=r) for op_id, r in zip(new_op_ids(len(requests)), requests, strict=True)]
        await self._enqueue([(op.op_id, op.request.user_id, op.model_dump_json()) for op in ops])
        return [WriteHandle(self, op.op_id, op.request.user_id, op.request.kind) for op in ops]

    @redis_lost
    async def submit_encoded(
        self, adds: Sequence[tuple[str, Sequence[EncodedMessage]]]
    ) -> builtins.list[WriteHandle]:
        """`submit` for adds of (user id, messages encoded by `contract.encode_message`): bulk ingest's
        path, which encodes each message as it reads it (`WriteOp.encode_add`)."""
        op_ids = new_op_ids(len(adds))
        await self._enqueue([
            (op_id, user_id, WriteOp.encode_add(op_id, user_id, messages))
            for op_id, (user_id, messages) in zip(op_ids, adds, strict=True)
        ])
        return [WriteHandle(self, op_id, user_id, "add") for op_id, (user_id, _) in zip(op_ids, adds, strict=True)]

    async def _enqueue(self, ops: Sequence[tuple[str, str, str | bytes]]) -> None:
        # Each op (id, user, JSON) goes into its user's log and onto the queue in one atomic step:
        # accepted with its job, or not at all. Steps are bounded so that no one of them holds
        # Redis up for long.
        for start in range(0, len(ops), SUBMIT_CHUNK):
            replicas = await self._writes.enqueue([
                (keys.write_log(user_id), keys.user_jobs(user_id), op_id, op_json, (user_id, op_id), user_id)
                for op_id, user_id, op_json in ops[start : start + SUBMIT_CHUNK]
            ])
            self._check_replicated(replicas)

    def _check_replicated(self, replicas: int) -> None:
        wanted = self.settings.wait_replicas
        if replicas < wanted:
            raise WriteNotReplicated(
                f"Redis took the write(s), but only {replicas} of the {wanted} replica(s) asked for "
                f"(MEMFLEET_REDIS_WAIT_REPLICAS) confirmed them within {self.settings.redis_wait_timeout:g}s: "
                "not acknowledged, as a failover now could lose them. Check the replicas (INFO replication); "
                "submitting again with the same message ids stores nothing twice"
            )
