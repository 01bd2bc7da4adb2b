"""`memfleet loadtest`: unique canary facts per user, ingested through the queue, then hunted for.

Every user gets canaries no other user has. After ingestion, each user is searched for its own
first canary (it must come back) and for its neighbour's (nothing of the neighbour may come back);
every result of every search must belong to the user searched. A single foreign result is a leak.

The jobs go through the Python API (`PythonVia`) or, with `--http`, through `memfleet serve` with
one user key per user (`producer.http.loadtest.HttpVia`), which also checks that every key is
refused when it names its neighbour.
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import time
from dataclasses import dataclass
from typing import Any, Protocol

from producer.client import Memfleet
from producer.contract import AddRequest, ForgetRequest, MemoryRecord, Message

WORDS = ("amber", "basalt", "cobalt", "dune", "ember", "fjord", "garnet", "harbor", "indigo", "juniper",
         "kelp", "lichen", "marble", "nectar", "onyx", "pepper", "quartz", "rowan", "saffron", "tundra")


@dataclass(frozen=True)
class Canaries:
    user_id: str
    token: str
    facts: list[str]


def make_canaries(users: int, messages: int, run: str) -> list[Canaries]:
    result = []
    for i in range(users):
        token = f"k{run}{i:06d}"
        facts = [f"Canary {token}-{j}: my {WORDS[(i + j) % len(WORDS)]} locker code is {secrets.token_hex(4)}"
                 for j in range(messages)]
        result.append(Canaries(f"load-{run}-{i:06d}", token, facts))
    return result


class Via(Protocol):
    """How the load test's jobs reach the fleet."""

    name: str

    async def ingest(self, everyone: list[Canaries]) -> int:
        """Store every user's canaries (each with its own message id); return how many are stored."""
        ...

    async def search(self, user: Canaries, query: str, limit: int) -> list[MemoryRecord]: ...

    async def refused_as_neighbour(self, user: Canaries, neighbour: Canaries) -> bool:
        """Whether acting as `user` and naming `neighbour` is refused (where the way has such a check)."""
        ...


class PythonVia:
    """The Python API: writes submitted in bulk, searches one by one."""

    name = "python"

    def __init__(self, fleet: Memfleet) -> None:
        self.fleet = fleet

    async def ingest(self, everyone: list[Canaries]) -> int:
        handles = []
        for start in range(0, len(everyone), 500):
            handles += await self.fleet.submit(
                AddRequest(user_id=c.user_id, messages=canary_messages(c)) for c in everyone[start : start + 500]
            )
        outcomes = await self.fleet.wait(handles, timeout=3600)
        return sum(o.stored + o.duplicates for o in outcomes)

    async def search(self, user: Canaries, query: str, limit: int) -> list[MemoryRecord]:
        return await self.fleet.search(user.user_id, query, limit=limit)

    async def refused_as_neighbour(self, user: Canaries, neighbour: Canaries) -> bool:
        return True  # the Python API is trusted to name any user: nothing to refuse


def canary_messages(canaries: Canaries) -> list[Message]:
    return [Message(content=f, id=f"{canaries.token}-{j}") for j, f in enumerate(canaries.facts)]


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


async def run_loadtest(
    fleet: Memfleet, users: int, messages: int, concurrency: int = 32, via: Via | None = None
) -> dict[str, Any]:
    via = via or PythonVia(fleet)
    run = secrets.token_hex(3)
    everyone = make_canaries(users, messages, run)
    before = await fleet.stats()

    started = time.perf_counter()
    stored = await via.ingest(everyone)
    ingest_seconds = time.perf_counter() - started

    latencies: list[float] = []
    leaks: list[dict[str, str]] = []
    missing: list[str] = []
    unrefused: list[str] = []
    gate = asyncio.Semaphore(concurrency)

    async def timed_search(user: Canaries, query: str) -> list[MemoryRecord]:
        async with gate:
            t = time.perf_counter()
            found = await via.search(user, query, limit=max(messages, 5))
            latencies.append((time.perf_counter() - t) * 1000)
            return found

    async def hunt(i: int) -> None:
        own, neighbour = everyone[i], everyone[(i + 1) % len(everyone)]
        own_results = await timed_search(own, own.facts[0])
        if own.facts[0] not in [r.text for r in own_results]:
            missing.append(own.user_id)
        foreign_results = await timed_search(own, neighbour.facts[0]) if users > 1 else []
        if users > 1:
            async with gate:
                if not await via.refused_as_neighbour(own, neighbour):
                    unrefused.append(own.user_id)
        for r in [*own_results, *foreign_results]:
            if r.user_id != own.user_id or own.token not in r.text:
                leaks.append({"searched": own.user_id, "memory_id": r.id, "owner": r.user_id})

    search_started = time.perf_counter()
    await asyncio.gather(*(hunt(i) for i in range(users)))
    search_seconds = time.perf_counter() - search_started
    after = await fleet.stats()

    # Leave nothing behind.
    await fleet.wait(await fleet.submit(ForgetRequest(user_id=c.user_id) for c in everyone), timeout=3600)
    return {
        "via": via.name,
        "users": users,
        "messages_per_user": messages,
        "workers": len(after.workers),
        "stored": stored,
        "ingest_seconds": round(ingest_seconds, 2),
        "ingest_messages_per_second": round(users * messages / ingest_seconds, 1),
        "searches": len(latencies),
        "searches_per_second": round(len(latencies) / search_seconds, 1),
        "search_ms": {
            "p50": round(statistics.median(latencies), 1),
            "p95": round(percentile(latencies, 95), 1),
            "p99": round(percentile(latencies, 99), 1),
            "max": round(max(latencies), 1),
        },
        "leaks": len(leaks) + len(unrefused),
        "neighbour_not_refused": len(unrefused),
        "leak_examples": leaks[:5],
        "own_canaries_missing": len(missing),
        "foreign_results_dropped_by_workers": after.foreign_dropped - before.foreign_dropped,
        "failed_jobs": after.failed - before.failed,
    }
