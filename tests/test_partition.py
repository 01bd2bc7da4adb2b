"""A partition: a worker cut off from Redis for longer than its lease, while it still reaches
PostgreSQL, then healed. Another worker takes the user over, and nothing is applied twice, lost or
out of order.

Worker A runs in a network namespace of its own (tests/netns.py) and reaches Redis over a veth
link; worker B runs on the machine. Both reach the embedded PostgreSQL through its Unix socket,
which a network cut does not touch. A is cut while it drains a user's log; what it sent Redis
during the cut (typically the outcome and dequeue of the write it had just applied) waits in the
kernel and is delivered when the link comes back, while B is still draining the same log.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from producer import keys
from producer.client import Memfleet, WriteHandle
from producer.contract import AddRequest, ForgetRequest, Message, WriteRequest
from producer.services import start_workers, stop_workers
from producer.settings import ProducerSettings
from tests.netns import Namespace, unavailable
from tests.replicated_redis import RedisProcess
from tests.support import eventually, uid, wait_for_workers
from workers.backends.pg_server import start_embedded_postgres, stop_embedded_postgres

pytestmark = pytest.mark.slow

BEFORE, AFTER, PER_ADD = 40, 60, 10  # adds before the forget, adds after it, messages per add
JOB_TIMEOUT = 6  # the lease lasts this + 5 s


class WriteLost(AssertionError):
    """A write left its user's log without taking effect."""


def _texts(user: str, add: int) -> list[str]:
    return [f"{user} note {add}.{i}: the tide table for pier {add * PER_ADD + i}" for i in range(PER_ADD)]


def _log(user: str) -> list[WriteRequest]:
    def add(n: int) -> AddRequest:
        messages = [Message(content=text, id=f"{n}.{i}") for i, text in enumerate(_texts(user, n))]
        return AddRequest(user_id=user, messages=messages)

    before, after = range(BEFORE), range(BEFORE, BEFORE + AFTER)
    return [*(add(n) for n in before), ForgetRequest(user_id=user), *(add(n) for n in after)]


async def _done(client: Memfleet, handles: list[WriteHandle]) -> int:
    return sum(1 for o in await client.redis.mget([keys.write_outcome(h.op_id) for h in handles]) if o)


async def test_worker_cut_off_from_redis_past_its_lease_applies_nothing_twice_or_out_of_order(tmp_path: Path) -> None:
    if (reason := unavailable()) is not None:
        pytest.skip(reason)
    namespace = Namespace().create()
    redis = RedisProcess(tmp_path / "redis", ["--bind", "127.0.0.1", namespace.host_ip, "--protected-mode", "no"])
    data = tmp_path / "postgres"
    workers: list[subprocess.Popen[bytes]] = []
    client: Memfleet | None = None
    cut = False
    try:
        redis.start()
        pg_url = await asyncio.to_thread(start_embedded_postgres, data)
        env = {"MEMFLEET_PG_URL": pg_url, "MEMFLEET_LOG_FORMAT": "json", "MEMFLEET_LOG_LEVEL": "WARNING",
               "MEMFLEET_JOB_TIMEOUT": str(JOB_TIMEOUT), "MEMFLEET_CONCURRENCY": "4"}
        # Worker A, in the namespace, reaches Redis over the link only.
        workers.append(subprocess.Popen(namespace.command([sys.executable, "-m", "workers"]), env={
            **os.environ, **env, "REDIS_URL": f"redis://{namespace.host_ip}:{redis.port}/0",
            "MEMFLEET_DATA_DIR": str(tmp_path / "a"), "MEMFLEET_SUPERVISOR_PID": str(os.getpid())}))
        client = await Memfleet.connect(ProducerSettings(redis_url=f"redis://127.0.0.1:{redis.port}/0"))
        await wait_for_workers(client, 1)
        user = uid("cut")
        handles = await client.submit(_log(user))

        async def a_is_draining() -> bool:
            assert client is not None
            return await _done(client, handles) >= 2

        await eventually(a_is_draining, 120, "worker A to apply the user's first writes")
        namespace.cut()
        cut, cut_at, done_at_cut = True, time.monotonic(), await _done(client, handles)
        assert done_at_cut < len(handles) // 2, "A drained too much before the cut to test anything"
        # Worker B, on the machine, takes the user over once A's lease has lapsed.
        workers += start_workers(1, {**env, "REDIS_URL": f"redis://127.0.0.1:{redis.port}/0",
                                     "MEMFLEET_DATA_DIR": str(tmp_path / "b")})

        async def b_took_over() -> bool:
            assert client is not None
            return await _done(client, handles) >= done_at_cut + 3

        await eventually(b_took_over, 180, "worker B to take the user over")
        assert time.monotonic() - cut_at > JOB_TIMEOUT + 5, "A was not cut off for longer than its lease"
        assert await _done(client, handles) < len(handles) - 10, "B finished before the heal: nothing to race"
        namespace.heal()
        cut = False
        # Whatever A sent during the cut reaches Redis now, while B drains the rest of the log.
        await eventually(lambda: not namespace.unsent(), 180, "what worker A sent during the cut to be delivered")

        missing: list[int] = []

        async def settled() -> bool:
            # Every write took effect, or one never will: an op leaves its log only with its outcome
            # (one Lua step), so a missing outcome with an empty log is a write that was dropped.
            # The log is read first: outcomes read after it was empty are final. (Read the other way
            # round, the last write could be applied between the two reads and look dropped.)
            assert client is not None
            drained = not await client.redis.llen(keys.write_log(user))  # type: ignore[misc]
            found = await client.redis.mget([keys.write_outcome(h.op_id) for h in handles])
            missing[:] = [position for position, outcome in enumerate(found) if outcome is None]
            return not missing or drained

        await eventually(settled, 180, "every write of the user to take effect")
        if missing:
            raise WriteLost(f"{len(missing)} write(s) left the log unapplied, at positions {missing[:10]} "
                            f"(the forget is at {BEFORE})")
        outcomes = await client.wait(handles, timeout=10)
        assert not [o for o in outcomes if o.error]
        assert (await client.stats()).dead_letters == 0
        # In order: the forget took everything before it and nothing after it, each memory once.
        with psycopg.connect(pg_url) as conn:
            rows = conn.execute("SELECT payload->>'data' FROM memfleet_memories WHERE user_id = %s",
                                (user,)).fetchall()
        expected = sorted(t for n in range(BEFORE, BEFORE + AFTER) for t in _texts(user, n))
        assert sorted(r[0] for r in rows) == expected
        assert all(p.poll() is None for p in workers), "both workers must ride out the partition"
        print(f"partition: cut after {done_at_cut} of {len(handles)} writes; all done {time.monotonic() - cut_at:.0f}s "
              "after the cut")
    finally:
        if cut:
            namespace.heal()
        if client is not None:
            await client.close()
        stop_workers(workers)
        stop_embedded_postgres(data)
        redis.stop()
        namespace.delete()
