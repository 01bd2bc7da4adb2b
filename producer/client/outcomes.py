"""Waiting for writes: a `WriteHandle` per accepted write, and the outcomes of many at once."""

from __future__ import annotations

import asyncio
import builtins
import time
from collections.abc import Sequence

from producer import keys
from producer.client.base import ClientBase, redis_lost
from producer.contract import WriteKind, WriteOutcome
from producer.errors import MemoryNotFound, WriteDeadLettered, WriteTimeout

# First poll interval when waiting for writes; it backs off to 100 ms.
RESULT_POLL = 0.005


class WriteHandle:
    """A write that was accepted. `outcome()` waits until it has taken effect."""

    def __init__(self, client: Outcomes, op_id: str, user_id: str, kind: WriteKind) -> None:
        self._client = client
        self.op_id = op_id
        self.user_id = user_id
        self.kind = kind

    async def outcome(self, timeout: float | None = None) -> WriteOutcome:
        """Wait until the write has taken effect; raise `WriteDeadLettered` if it was dead-lettered,
        `MemoryNotFound` if it named a memory the user does not have (and so did nothing)."""
        (outcome,) = await self._client.wait([self], timeout)
        if outcome.error:
            raise WriteDeadLettered(f"write {self.op_id} failed: {outcome.error}")
        if outcome.not_found:
            raise MemoryNotFound(outcome.not_found)
        return outcome


class Outcomes(ClientBase):
    """What accepted writes did, once they have taken effect (`keys.write_outcome`)."""

    @redis_lost
    async def wait(
        self, handles: Sequence[WriteHandle], timeout: float | None = None
    ) -> builtins.list[WriteOutcome]:
        """Wait for many writes at once (one MGET per round, however many are outstanding)."""
        deadline = time.monotonic() + (timeout or self.settings.write_timeout)
        outcomes: dict[str, WriteOutcome] = {}
        delay = RESULT_POLL
        while True:
            waiting = [h for h in handles if h.op_id not in outcomes]
            if not waiting:
                return [outcomes[h.op_id] for h in handles]
            for handle, outcome in zip(waiting, await self.outcomes(waiting), strict=True):
                if outcome is not None:
                    outcomes[handle.op_id] = outcome
            if len(outcomes) < len(handles):
                if time.monotonic() > deadline:
                    raise WriteTimeout(
                        f"{len(handles) - len(outcomes)} write(s) did not take effect in time; they stay queued. "
                        "Is a worker running and keeping up (`memfleet stats`)?"
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, 0.1)

    @redis_lost
    async def outcomes(self, handles: Sequence[WriteHandle]) -> builtins.list[WriteOutcome | None]:
        """The outcome of each write that has taken effect, None for the others; no waiting."""
        found: builtins.list[WriteOutcome | None] = []
        for start in range(0, len(handles), 1000):
            values = await self.redis.mget([keys.write_outcome(h.op_id) for h in handles[start : start + 1000]])
            found += [None if v is None else WriteOutcome.model_validate_json(v) for v in values]
        return found
