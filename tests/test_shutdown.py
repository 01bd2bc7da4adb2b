"""A worker stops in time whatever its Redis and PostgreSQL are doing, and stops with its supervisor.

Each test runs its own redis-server, data directory and worker, and breaks them with real signals:
SIGSTOP freezes a server (connections stay open, nothing answers), SIGKILL removes it. A short
MEMFLEET_SHUTDOWN_WAIT keeps the tests quick; the rule is the same at the default 40 s.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import pytest

from producer.client import Memfleet
from producer.contract import AddRequest, Message
from producer.services import RedisServer, worker_command
from producer.settings import ProducerSettings
from tests.support import eventually, eventually_sync, uid, wait_for_workers
from workers.backends.pg_server import stop_embedded_postgres
from workers.stopping import OVERRUN_EXIT_CODE

pytestmark = pytest.mark.slow

WAIT = 6.0  # MEMFLEET_SHUTDOWN_WAIT in these tests
# Python's start-up and the scheduling of a loaded 2-core machine, on top of the wait.
SLACK = 4.0


def _env(redis: RedisServer, data_dir: Path) -> dict[str, str]:
    return {**os.environ, "REDIS_URL": redis.url, "MEMFLEET_DATA_DIR": str(data_dir), "MEMFLEET_LOG_FORMAT": "json",
            "MEMFLEET_SHUTDOWN_WAIT": str(WAIT), "MEMFLEET_CONCURRENCY": "4", "MEMFLEET_JOB_TIMEOUT": "60"}


def _postgres(data_dir: Path) -> list[psutil.Process]:
    """The embedded PostgreSQL's postmaster and every process it runs."""
    postmaster = psutil.Process(int((data_dir / "pg" / "postmaster.pid").read_text().split("\n", 1)[0]))
    return [postmaster, *postmaster.children(recursive=True)]


@contextlib.contextmanager
def frozen(processes: list[psutil.Process]) -> Iterator[None]:
    """SIGSTOP the processes for the duration: they keep their sockets open and answer nothing."""
    stopped = []
    try:
        for proc in processes:
            proc.send_signal(signal.SIGSTOP)
            stopped.append(proc)
        yield
    finally:
        for proc in stopped:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGCONT)


def _gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)  # dead, its new parent yet to reap it
    except psutil.NoSuchProcess:
        return True


async def _busy_worker(redis: RedisServer) -> Memfleet:
    """A client, once the worker is up and running a long write."""
    client = await Memfleet.connect(ProducerSettings(redis_url=redis.url))
    await wait_for_workers(client, 1)
    user = uid("stop")
    await client.submit([AddRequest(user_id=user, messages=[
        Message(content=f"a long write, message {j}.{i}: " + "words to embed " * 30) for i in range(256)
    ]) for j in range(8)])

    async def running() -> bool:
        return (await client.stats()).in_progress > 0

    await eventually(running, 60, "the write to start", interval=0.05)
    return client


async def test_sigterm_exits_within_the_wait_while_redis_and_postgres_hang(tmp_path: Path) -> None:
    redis = RedisServer().start()
    log = tmp_path / "worker.log"
    client: Memfleet | None = None
    with log.open("wb") as stderr:
        worker = subprocess.Popen(worker_command(), env=_env(redis, tmp_path / "data"), stderr=stderr)
    try:
        client = await _busy_worker(redis)
        assert redis.process is not None
        with frozen([psutil.Process(redis.process.pid), *_postgres(tmp_path / "data")]):
            signalled = time.monotonic()
            worker.send_signal(signal.SIGTERM)
            try:
                code = worker.wait(WAIT + SLACK)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the worker was still running {WAIT + SLACK:g}s after SIGTERM (wait {WAIT:g}s)")
            took = time.monotonic() - signalled
        # Its running write could not finish, nor could it close its connections: the clock ran out.
        assert code == OVERRUN_EXIT_CODE, f"exit code {code} after {took:.1f}s"
        assert took >= WAIT - 0.5, f"it exited after {took:.1f}s, before its jobs had their wait"
        assert b'"event": "shutdown_overrun"' in log.read_bytes()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        if client is not None:
            await client.close()
        stop_embedded_postgres(tmp_path / "data")  # a worker that overran never stopped it
        redis.stop()


async def test_worker_stops_by_itself_when_its_supervisor_is_killed_and_redis_is_gone(tmp_path: Path) -> None:
    """What happened in the field: `memfleet worker` killed with -9, then its Redis stopped. The
    orphaned worker must not run on; it stops by itself, within its wait, with Redis gone."""
    redis = RedisServer().start()
    log = tmp_path / "supervisor.log"
    client: Memfleet | None = None
    children: list[psutil.Process] = []
    with log.open("wb") as output:
        supervisor = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker"],
                                      env=_env(redis, tmp_path / "data"), stdout=output, stderr=output)
    try:
        client = await _busy_worker(redis)
        children = psutil.Process(supervisor.pid).children()
        assert len(children) == 1, children
        (worker,) = children
        supervisor.send_signal(signal.SIGKILL)
        supervisor.wait()
        assert redis.process is not None
        redis.process.send_signal(signal.SIGKILL)  # Redis stopped, as in the report: no clean shutdown
        redis.process.wait()
        # Within its wait of losing its supervisor, plus the watch's half-second poll.
        eventually_sync(lambda: _gone(worker.pid), WAIT + SLACK + 1,
                        f"the orphaned worker to stop within its wait ({WAIT:g}s) of losing its supervisor")
        assert b'"event": "supervisor_gone"' in log.read_bytes()
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()  # psutil checks it is still the same process, not a reused pid
        if client is not None:
            await client.close()
        stop_embedded_postgres(tmp_path / "data")
        redis.stop()
