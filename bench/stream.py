"""5. Streaming ingest: `memfleet ingest` on generated JSONL files of 1M and 5M lines, enqueue only.

Each run starts a private redis-server (no worker: this measures the producer), runs the CLI as a
user would, in a subprocess, and measures from outside it:
- peak RSS of the producer process, sampled every 20 ms;
- time from starting the command to the first job on the queue (interpreter start-up included);
- the sustained enqueue rate: messages from the first job on the queue to the command's exit.

The file: 200,000 users, each with an equal share of the lines, in sessions of 5 messages. At any
point of the file 1,000 conversations are in progress, their lines interleaved, and every user's
sessions come in order, as in a chat export sorted by time.
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from redis import Redis

from bench.common import MB, PeakRss, Poller, Row, row, say
from producer import keys
from producer.services import RedisServer

REPO = Path(__file__).resolve().parents[1]
USERS = 200_000
SESSION = 5  # messages per session
CONCURRENT = 1_000  # conversations in progress at any point of the file
RSS_GOAL_MB = 150
FIRST_JOB_GOAL_S = 1.0
RATE_GOAL = 30_000
WORDS = ("coffee", "hiking", "sister", "painting", "guitar", "marathon", "adoption", "camping", "pottery", "dance",
         "job", "concert", "dog", "garden", "library", "beach", "the", "a", "my", "we", "went", "saw", "liked",
         "bought", "lunch", "dinner", "park", "city", "train", "book", "movie", "music", "friend", "brother",
         "weekend", "holiday", "mountain", "tea", "yesterday", "tomorrow", "because", "really")


def run(directory: Path, *, sizes: tuple[int, ...]) -> list[Row]:
    directory.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    for lines in sizes:
        path = directory / f"chat-{lines}.jsonl"
        started = time.perf_counter()
        size = write_chat_log(path, lines)
        say(f"stream: wrote {lines:,} lines ({size / MB:,.0f} MB) in {time.perf_counter() - started:.0f} s")
        try:
            rows += _measure(path, lines)
        finally:
            path.unlink()
    return rows


def write_chat_log(path: Path, lines: int, users: int = USERS, seed: int = 11) -> int:
    """Write the file described above; return its size in bytes."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for number, (user, turn) in enumerate(_turns(lines, users, rng)):
            f.write(json.dumps({
                "user_id": f"user-{user:06d}", "role": "user" if turn % 2 == 0 else "assistant",
                "content": " ".join(rng.choices(WORDS, k=rng.randint(8, 20))),
                "timestamp": f"2026-{1 + number * 12 // lines:02d}-15T10:{turn % 60:02d}:00",
            }) + "\n")
    return path.stat().st_size


def _turns(lines: int, users: int, rng: random.Random) -> Iterator[tuple[int, int]]:
    """(user, turn) pairs: sessions of `SESSION` turns, `CONCURRENT` of them interleaved."""
    per_user = lines // users
    order = list(range(users))
    rng.shuffle(order)
    # Session s of every user before session s + 1 of any: a user's sessions stay in order.
    sessions = ((u, s) for s in range(0, per_user, SESSION) for u in order)
    active: list[list[int]] = []  # [user, next turn, last turn]
    emitted = 0
    while emitted < lines:
        while len(active) < CONCURRENT and (session := next(sessions, None)) is not None:
            user, first = session
            active.append([user, first, min(first + SESSION, per_user)])
        if not active:
            return
        i = rng.randrange(len(active))
        user, turn, end = active[i]
        yield user, turn
        emitted += 1
        if turn + 1 == end:
            active[i] = active[-1]
            active.pop()
        else:
            active[i][1] = turn + 1


def _measure(path: Path, lines: int) -> list[Row]:
    redis = RedisServer().start()
    try:
        client = Redis.from_url(redis.url)
        first_job = _FirstJob(client)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "ingest", str(path), "--json"],
                                env={**os.environ, "REDIS_URL": redis.url}, cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with first_job, PeakRss(proc.pid, interval=0.02) as rss:
            stdout, stderr = proc.communicate()
        ended = time.perf_counter()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise RuntimeError(f"memfleet ingest exited with {proc.returncode}: {stderr.strip()[-500:]}")
        summary = json.loads(stdout)
        queued = int(client.zcard(keys.BULK_QUEUE))  # type: ignore[arg-type]
        redis_peak = int(client.info("memory")["used_memory_peak"])  # type: ignore[index]
        client.close()
    finally:
        redis.stop()
    if summary["messages"] != lines or queued != summary["jobs"]:
        raise RuntimeError(f"{summary['messages']:,} messages read of {lines:,}, {queued:,} jobs queued of "
                           f"{summary['jobs']:,}")
    if first_job.at is None:
        raise RuntimeError("no job was seen on the queue")
    first = first_job.at - started
    rate = lines / (ended - first_job.at)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    label = f"{lines / 1e6:g}M lines"
    say(f"stream {label}: peak RSS {rss.peak / MB:.0f} MB, first job {first:.2f} s, {rate:,.0f} messages/s, "
        f"{summary['jobs']:,} jobs, CPU {cpu:.0f} s")
    notes = (f"{summary['jobs']:,} jobs ({lines / summary['jobs']:.1f} messages each); whole run "
             f"{ended - started:.1f} s, {lines / (ended - started):,.0f}/s; producer CPU {cpu * 1e6 / lines:.0f} µs "
             f"per message; Redis peak {redis_peak / MB:,.0f} MB; load average {os.getloadavg()[0]:.1f}")
    return [
        row("stream", f"producer peak RSS, {label}", rss.peak / MB, "MB", at_most=RSS_GOAL_MB,
            notes=f"sampled every 20 ms; a {path.stat().st_size / MB:,.0f} MB file"),
        row("stream", f"first job enqueued, {label}", first, "s", at_most=FIRST_JOB_GOAL_S,
            notes="from starting the command, Python start-up included"),
        row("stream", f"enqueue rate, {label}", rate, "messages/s", at_least=RATE_GOAL, notes=notes),
    ]


class _FirstJob(Poller):
    """When the first job appeared on the bulk queue (`at`, perf_counter), polled every 5 ms."""

    def __init__(self, client: Redis) -> None:
        super().__init__(0.005)
        self.client = client
        self.at: float | None = None

    def poll(self) -> bool:
        if self.client.zcard(keys.BULK_QUEUE):
            self.at = time.perf_counter()
            return True
        return False
