"""Fencing (design invariant 10): a worker paused past its lease cannot write after waking.

The lease is in Redis and the write in PostgreSQL. A worker's write runs in a thread; when its job
times out, the coroutine is cancelled but the thread goes on. If that thread had taken its
connection and not yet sent its write when the pause began, it sends it on waking, after another
worker may have applied later writes of the user, a forget included. Each lease carries a token
that grows per user, and the transaction that applies a write records it, refusing an older one.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import threading
import uuid
from pathlib import Path

import psycopg
import pytest
from arq import Retry
from redis.asyncio import Redis
from structlog.testing import capture_logs

from producer import keys
from producer.client import Memfleet, WriteHandle
from producer.contract import AddRequest, ForgetRequest, Message, WriteOp
from producer.services import RedisServer, start_workers, stop_workers
from producer.settings import ProducerSettings
from tests.support import eventually, pg_dump, uid, wait_for_workers
from workers.backends.embedded import EmbeddedBackend
from workers.backends.pg_schema import TABLE
from workers.backends.pg_server import stop_embedded_postgres
from workers.jobs import apply_op
from workers.write_log import WriteLog


def canary() -> str:
    return f"fencecanary{uuid.uuid4().hex[:10]}"


def _rows(pg_url: str, user: str) -> int:
    with psycopg.connect(pg_url) as conn:
        row = conn.execute(f"SELECT count(*) FROM {TABLE} WHERE user_id = %s", (user,)).fetchone()
    return int(row[0]) if row else 0


async def test_a_write_sent_after_its_lease_passed_on_is_refused(redis: Redis, backend: EmbeddedBackend) -> None:
    """Deterministic: the seam holds the first holder's write thread with its connection taken."""
    user, secret = uid("fence"), canary()
    ops = [WriteOp.new(AddRequest(user_id=user, messages=[Message(content=f"the vault code is {secret}")])),
           WriteOp.new(AddRequest(user_id=user, messages=[Message(content="an ordinary note")])),
           WriteOp.new(ForgetRequest(user_id=user))]
    for op in ops:
        await redis.rpush(keys.write_log(user), op.model_dump_json())  # type: ignore[misc]
    held, release = threading.Event(), threading.Event()

    def hold_the_first(writer: str) -> None:
        if writer == user and not held.is_set():
            held.set()
            release.wait(60)

    apply = functools.partial(apply_op, backend, redis)
    pg_url = str(backend.pool.conninfo)
    backend.before_write = hold_the_first
    try:
        with capture_logs() as logs:
            # The first holder's apply times out (its job timeout is 1 s) while its thread is held
            # in the seam: the coroutine is cancelled and the lease handed back; the thread is not.
            with pytest.raises(Retry):
                await WriteLog(redis, apply, max_tries=8, job_timeout=1.0).run(user, ops[0].op_id, attempt=1)
            assert held.is_set()
            # The next holder applies the whole log, ending with the forget.
            outcome = await WriteLog(redis, apply, max_tries=8, job_timeout=30.0).run(user, ops[2].op_id, attempt=1)
            assert outcome.kind == "forget" and await redis.llen(keys.write_log(user)) == 0  # type: ignore[misc]
            release.set()  # the first holder's thread wakes and sends its write

            def settled() -> bool:  # refused, or (without fencing) stored after the forget
                return any(e["event"] == "write_fenced_out" for e in logs) or _rows(pg_url, user) > 0

            await eventually(settled, 30, "the late write to be refused or stored")
    finally:
        release.set()
        backend.before_write = None
    assert _rows(pg_url, user) == 0, "a write sent after its lease passed on undid the forget"
    assert secret not in pg_dump(pg_url)


@pytest.mark.slow
async def test_sigstop_mid_apply_then_a_forget_then_sigcont_leaves_nothing(tmp_path: Path) -> None:
    """Real processes and signals: the pause lands at a different point of the apply each round."""
    server = RedisServer().start()
    data_dir = tmp_path / "data"
    # A short lease (job timeout + 5 s) and idle-transaction limit, so that each round waits seconds.
    env = {"REDIS_URL": server.url, "MEMFLEET_DATA_DIR": str(data_dir), "MEMFLEET_JOB_TIMEOUT": "3",
           "MEMFLEET_PG_IDLE_TRANSACTION_TIMEOUT": "2", "MEMFLEET_LOG_FORMAT": "json"}
    procs: list[subprocess.Popen[bytes]] = []
    fleet: Memfleet | None = None
    secrets: dict[str, list[str]] = {}
    try:
        fleet = await Memfleet.connect(ProducerSettings(redis_url=server.url, write_timeout=120))
        procs = start_workers(2, env)
        await wait_for_workers(fleet, 2)
        runner, standby = procs
        standby.send_signal(signal.SIGSTOP)
        for pause_after in (1, 4, 9):
            user = uid("stop")
            secrets[user] = [canary() for _ in range(12)]
            adds = await fleet.submit(
                AddRequest(user_id=user, messages=[Message(content=f"note {i}: {s}", id=f"{user}-{i}")])
                for i, s in enumerate(secrets[user]))
            (forget,) = await fleet.submit([ForgetRequest(user_id=user)])
            await eventually(lambda: _applied(fleet, adds, pause_after), 60,  # noqa: B023
                             f"{pause_after} writes of {user} to be applied")
            runner.send_signal(signal.SIGSTOP)
            standby.send_signal(signal.SIGCONT)
            assert (await forget.outcome(timeout=120)).kind == "forget"
            runner.send_signal(signal.SIGCONT)  # it wakes past its lease, with its job timed out
            runner, standby = standby, runner
            standby.send_signal(signal.SIGSTOP)
        standby.send_signal(signal.SIGCONT)
        # Every thread a worker started has ended once it exits: only then is nothing late in flight.
        assert stop_workers(procs) == 0
        pg_url = _embedded_url(data_dir)
        for user in secrets:
            assert _rows(pg_url, user) == 0, user
        dump = pg_dump(pg_url)
        assert not [s for said in secrets.values() for s in said if s in dump]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
        stop_workers(procs)
        if fleet is not None:
            await fleet.close()
        stop_embedded_postgres(data_dir)
        server.stop()


async def _applied(fleet: Memfleet | None, handles: list[WriteHandle], count: int) -> bool:
    assert fleet is not None
    return sum(o is not None for o in await fleet.outcomes(handles)) >= count


def _embedded_url(data_dir: Path) -> str:
    """The URL of the PostgreSQL in `data_dir`, started again for reading if the workers stopped it."""
    from workers.backends.pg_server import start_embedded_postgres

    return start_embedded_postgres(data_dir)
