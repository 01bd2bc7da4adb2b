"""The embedded backend's connection pool: opened with pgvector's binary dumper on each
connection, and the one way blocking database work runs off the event loop (`run_blocking`)."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
from pgvector.psycopg.vector import VectorBinaryDumper
from psycopg import OperationalError
from psycopg.types import TypeInfo
from psycopg_pool import ConnectionPool, PoolTimeout

from workers.backends.base import BackendRejected, BackendUnavailable
from workers.settings import WorkerConfig


def register_vector_dumper(conn: psycopg.Connection[Any]) -> None:
    """Send numpy rows to PostgreSQL in pgvector's binary format: as Python lists, psycopg would
    format every float in Python, holding the GIL the encoder thread needs."""
    info = TypeInfo.fetch(conn, "vector")
    if info is None:
        raise BackendUnavailable("the pgvector extension is missing from the database")
    conn.adapters.register_dumper("numpy.ndarray", type("NumpyVectorDumper", (VectorBinaryDumper,), {"oid": info.oid}))


async def open_pool(pg_url: str, config: WorkerConfig) -> ConnectionPool:
    """A pool of `config.pg_pool_size` connections to `pg_url`, open and checked."""
    # Check each connection as it is handed out: after a PostgreSQL restart the pooled ones are
    # dead, and a job should get a fresh one rather than fail on a stale one.
    # A session left idle inside a transaction (its worker paused, or cut off) is ended by the
    # server, so that the locks it holds do not stop the user's next lease holder for long.
    idle = int(config.pg_idle_transaction_timeout * 1000)
    pool = ConnectionPool(pg_url, min_size=1, max_size=config.pg_pool_size, open=False, timeout=10,
                          check=ConnectionPool.check_connection, configure=register_vector_dumper,
                          kwargs={"options": f"-c idle_in_transaction_session_timeout={idle}"})
    await asyncio.to_thread(pool.open, wait=True, timeout=30)
    return pool


async def run_blocking(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run blocking database work off the event loop. An outage becomes a retryable error; a
    statement PostgreSQL refused (a constraint, a trigger, data it cannot take) a refusal, which
    the same write would meet again. Either is named by class only: PostgreSQL's messages quote
    the statement's data, which is the user's messages."""
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except (OperationalError, PoolTimeout) as exc:
        raise BackendUnavailable(f"PostgreSQL unavailable: {exc.__class__.__name__}") from exc
    except psycopg.DatabaseError as exc:
        raise BackendRejected(f"PostgreSQL refused the statement ({exc.__class__.__name__})") from exc
