"""1c, 2 and 4: memfleet itself. One worker process at default settings behind a private redis-server.

1c. `memfleet ingest --format locomo --wait --json` in a subprocess, the worker's RSS sampled meanwhile.
2.  Search latency as the client sees it (enqueue → answer), idle and while a bulk ingest runs.
4.  The worker's RSS right after start-up (model loaded) and its peak during the ingest.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil  # type: ignore[import-untyped]

from bench.common import MB, PeakRss, Row, locomo_questions, note, percentile, row, say
from producer import keys
from producer.client import Memfleet, WriteHandle
from producer.contract import AddRequest, Message
from producer.ingest import group, read_messages
from producer.services import RedisServer, start_workers, stop_workers
from producer.settings import ProducerSettings

REPO = Path(__file__).resolve().parents[1]
SEARCH_USER = "bench-search"
SEARCH_USER_MEMORIES = 200
RSS_GOAL_MB = 1536


async def run(files: list[Path], directory: Path, *, ingest: bool, search: bool, searches: int) -> list[Row]:
    redis = RedisServer().start()
    env = {"REDIS_URL": redis.url, "MEMFLEET_DATA_DIR": str(directory), "MEMFLEET_LOG_LEVEL": "WARNING"}
    procs: list[subprocess.Popen[bytes]] = []
    rows: list[Row] = []
    try:
        settings = ProducerSettings().model_copy(update={"redis_url": redis.url})
        async with await Memfleet.connect(settings) as fleet:
            started = time.perf_counter()
            procs = start_workers(1, env)
            await _wait_for_worker(fleet, procs[0])
            startup = time.perf_counter() - started
            rss = psutil.Process(procs[0].pid).memory_info().rss / MB
            say(f"worker up in {startup:.1f} s, RSS {rss:.0f} MB")
            rows.append(row("memory", "worker RSS after start-up", rss, "MB", at_most=RSS_GOAL_MB,
                            notes=f"model loaded; start-up took {startup:.1f} s"))
            if ingest:
                rows += await _cli_ingest(files, env, procs[0].pid)
            if search:
                rows += await _search_latency(fleet, files, searches)
    finally:
        code = await asyncio.to_thread(stop_workers, procs)
        redis.stop()
        if code:
            say(f"the worker exited with code {code}")
    return rows


async def _wait_for_worker(fleet: Memfleet, proc: subprocess.Popen[bytes], timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not (await fleet.stats()).workers:
        if proc.poll() is not None:
            raise RuntimeError(f"the worker exited with code {proc.returncode} while starting")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the worker did not come up within {timeout:g}s")
        await asyncio.sleep(0.2)


async def _cli_ingest(files: list[Path], env: dict[str, str], worker_pid: int) -> list[Row]:
    command = [sys.executable, "-m", "producer.cli", "ingest", *map(str, files), "--format", "locomo", "--wait",
               "--json"]
    with PeakRss(worker_pid) as rss:
        done = await asyncio.to_thread(subprocess.run, command, env={**os.environ, **env}, cwd=REPO,
                                       capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"memfleet ingest exited with {done.returncode}: {done.stderr.strip()[-500:]}")
    summary = json.loads(done.stdout)
    rate = summary["stored"] / summary["seconds"]
    say(f"memfleet ingest: {summary['stored']} stored in {summary['seconds']:.1f} s, {rate:.0f}/s")
    return [
        row("ingest", "memfleet ingest (1 worker)", rate, "memories/s",
            notes=f"{summary['stored']:,} stored of {summary['messages']:,} in {summary['seconds']:.1f} s "
                  f"({summary['jobs']} jobs, {summary['failed_jobs']} failed), CLI end to end"),
        row("memory", "worker peak RSS during ingest", rss.peak / MB, "MB", at_most=RSS_GOAL_MB,
            notes="sampled every 0.2 s (Postgres runs in its own processes)"),
    ]


async def _search_latency(fleet: Memfleet, files: list[Path], searches: int) -> list[Row]:
    requests = list(group(read_messages(files, "locomo")))
    bulk_messages = sum(len(r.messages) for r in requests)
    texts = [m.content for r in requests for m in r.messages][:SEARCH_USER_MEMORIES]
    messages = [Message(content=t, id=f"bench-{i}") for i, t in enumerate(texts)]
    handles = await fleet.submit(AddRequest(user_id=SEARCH_USER, messages=messages[i : i + 64])
                                 for i in range(0, len(messages), 64))
    await fleet.wait(handles, timeout=600)
    questions = locomo_questions()
    warmup, idle, loaded = questions[:10], questions[10 : 10 + searches], questions[10 + searches : 10 + 2 * searches]
    for query in warmup:
        if not await fleet.search(SEARCH_USER, query):
            raise RuntimeError(f"a search of {SEARCH_USER} found nothing: are its memories stored?")
    idle_ms = [await _timed_search(fleet, q) for q in idle]
    say(f"idle search: p50 {percentile(idle_ms, 50):.1f} ms, p99 {percentile(idle_ms, 99):.1f} ms")

    # The same LoCoMo conversations again, for other users: a bulk ingest the searches compete with.
    bulk = [AddRequest(user_id=f"bulk-{r.user_id}", messages=r.messages, metadata=r.metadata) for r in requests]
    bulk_handles = await fleet.submit(bulk)
    last_of_user = {h.user_id: h for h in bulk_handles}  # a user's writes apply in order: its last is done last
    loaded_ms: list[float] = []
    for query in loaded:
        elapsed = await _timed_search(fleet, query)
        if await _all_done(fleet, list(last_of_user.values())):
            break  # the ingest ended during this search: it no longer counts as "under load"
        loaded_ms.append(elapsed)
    ended = len(loaded_ms) < len(loaded)
    say(f"search during ingest: {len(loaded_ms)} searches before the ingest ended" if ended
        else f"search during ingest: {len(loaded_ms)} searches, the ingest still running after the last")
    during = (f"{len(loaded_ms)} of {len(loaded)} sequential searches while {bulk_messages:,} messages were being "
              f"ingested ({'it ended after them' if ended else 'still running after the last'})")
    rows = [
        row("search", "search p50, idle", percentile(idle_ms, 50), "ms", at_most=15,
            notes=f"{len(idle_ms)} sequential searches, {len(texts)} memories, top 10, enqueue → answer"),
        row("search", "search p99, idle", percentile(idle_ms, 99), "ms", at_most=50),
    ]
    if not loaded_ms:
        return [*rows, note("search", "search during ingest", f"not measured: {during}")]
    return [
        *rows,
        row("search", "search p50, during ingest", percentile(loaded_ms, 50), "ms", notes=during),
        row("search", "search p99, during ingest", percentile(loaded_ms, 99), "ms", at_most=150),
    ]


async def _timed_search(fleet: Memfleet, query: str) -> float:
    started = time.perf_counter()
    await fleet.search(SEARCH_USER, query)
    return (time.perf_counter() - started) * 1000


async def _all_done(fleet: Memfleet, handles: list[WriteHandle]) -> bool:
    return bool(await fleet.redis.exists(*(keys.write_outcome(h.op_id) for h in handles)) == len(handles))
