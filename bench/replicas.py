"""9. What an acknowledged enqueue costs when it waits for a replica (Redis WAIT).

A primary and one replica on loopback (no worker: this measures the producer). The same writes are
enqueued with `MEMFLEET_REDIS_WAIT_REPLICAS` 0 and 1, in alternating rounds so that both see the
same machine load:
- one write at a time (an app server's `add`): latency of each `submit`, and the rate;
- 20,000 writes in one `submit` (bulk ingest sends 500 per step): the rate.
On loopback the replica is microseconds away, so this is WAIT's own cost, the floor; across
machines add a network round trip per step.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

from bench.common import Row, percentile, row, say
from producer.client import Memfleet
from producer.contract import AddRequest, Message
from producer.services import RedisServer, free_port
from producer.settings import ProducerSettings

SINGLES = 2_000
BULK = 20_000
ROUNDS = 5


async def _singles(fleet: Memfleet, round_: int) -> list[float]:
    latencies = []
    for i in range(SINGLES):
        request = AddRequest(user_id=f"bench-{i % 100}", messages=[Message(content=f"round {round_} note {i}")])
        started = time.perf_counter()
        await fleet.submit([request])
        latencies.append(time.perf_counter() - started)
    return latencies


async def _bulk(fleet: Memfleet, round_: int) -> float:
    requests = [AddRequest(user_id=f"bench-{i % 1000}", messages=[Message(content=f"bulk {round_} note {i}")])
                for i in range(BULK)]
    started = time.perf_counter()
    await fleet.submit(requests)
    return BULK / (time.perf_counter() - started)


async def _measure(url: str) -> dict[int, tuple[list[float], list[float]]]:
    results: dict[int, tuple[list[float], list[float]]] = {0: ([], []), 1: ([], [])}
    fleets = {n: await Memfleet.connect(ProducerSettings(redis_url=url, redis_wait_replicas=n)) for n in (0, 1)}
    try:
        for round_ in range(ROUNDS):
            for n, fleet in fleets.items():
                results[n][0].extend(await _singles(fleet, round_))
                results[n][1].append(await _bulk(fleet, round_))
                await fleet.redis.flushdb()  # each round starts from an empty Redis
    finally:
        for fleet in fleets.values():
            await fleet.close()
    return results


def run(directory: Path) -> list[Row]:
    directory.mkdir(parents=True, exist_ok=True)
    primary = RedisServer().start()
    replica = subprocess.Popen(["redis-server", "--port", str(free_port()), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", str(directory), "--replicaof", "127.0.0.1",
                                str(primary.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        results = asyncio.run(_with_replica(primary.url))
    finally:
        replica.terminate()
        replica.wait(10)
        primary.stop()
    rows = []
    load = os.getloadavg()[0]
    for n, (latencies, rates) in results.items():
        label = "waits for 1 replica" if n else "no wait"
        rate = len(latencies) / sum(latencies)
        say(f"replicas, {label}: one at a time p50 {percentile(latencies, 50) * 1e3:.2f} ms, "
            f"p99 {percentile(latencies, 99) * 1e3:.2f} ms, {rate:,.0f}/s; bulk {max(rates):,.0f}/s")
        notes = f"{ROUNDS} rounds alternating with the other setting; load average {load:.1f} at the end"
        rows += [
            row("replicas", f"enqueue one write, p50, {label}", percentile(latencies, 50) * 1e3, "ms", notes=notes),
            row("replicas", f"enqueue one write, p99, {label}", percentile(latencies, 99) * 1e3, "ms"),
            row("replicas", f"enqueue one at a time, {label}", rate, "writes/s"),
            row("replicas", f"enqueue {BULK:,} in one submit, {label}", max(rates), "writes/s",
                notes=f"best of {ROUNDS}; 500 writes per step" + (", one WAIT per step" if n else "")),
        ]
    return rows


async def _with_replica(url: str) -> dict[int, tuple[list[float], list[float]]]:
    probe = await Memfleet.connect(ProducerSettings(redis_url=url))
    try:
        deadline = time.monotonic() + 30
        while (await probe.redis.info("replication")).get("slave0", {}).get("state") != "online":
            if time.monotonic() > deadline:
                raise RuntimeError("the replica was not in sync within 30 s")
            await asyncio.sleep(0.1)
    finally:
        await probe.close()
    return await _measure(url)
