"""Streaming `memfleet ingest`: order per user, gzip and stdin, errors by line, bounded memory."""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import pytest

from producer import keys
from producer.client import Memfleet
from producer.contract import MAX_METADATA_VALUE_CHARS, MAX_WRITE_METADATA_BYTES, Message, WriteOp
from producer.ingest import Entry, Ingest, Input, LineError, group, read_entries
from producer.services import RedisServer
from producer.settings import ProducerSettings
from tests.support import uid

MEMFLEET = [sys.executable, "-m", "producer.cli"]
RSS_LIMIT_MB = 150


def memfleet(*args: str, env: dict[str, str], stdin: str | None = None,
             timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MEMFLEET, *args], env={**os.environ, **env, "COLUMNS": "200"}, input=stdin,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def env(worker_env: dict[str, str], fleet: Memfleet) -> dict[str, str]:
    return worker_env


@pytest.fixture
async def private_fleet(private_redis: RedisServer) -> AsyncIterator[Memfleet]:
    client = await Memfleet.connect(ProducerSettings(redis_url=private_redis.url))
    yield client
    await client.close()


def _lines(path: Path, records: Sequence[Mapping[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_group_keeps_each_users_order_and_the_window_bound() -> None:
    rng = random.Random(3)
    users = [f"u{i}" for i in range(7)]
    entries = [Entry(rng.choice(users), Message(content=f"m{n}")) for n in range(500)]
    pulled = 0

    def counted() -> Iterator[Entry]:
        nonlocal pulled
        for entry in entries:
            pulled += 1
            yield entry

    requests, emitted = [], 0
    for request in group(counted(), job_size=4, window=6):
        assert pulled - emitted <= 6 + 1, "more messages buffered than the window holds"
        emitted += len(request.messages)
        requests.append(request)
    assert all(1 <= len(r.messages) <= 4 for r in requests)
    assert emitted == 500
    for user in users:
        sent = [m.content for r in requests if r.user_id == user for m in r.messages]
        assert sent == [e.message.content for e in entries if e.user_id == user]


async def test_a_job_stores_no_more_metadata_than_a_write_may(private_fleet: Memfleet, tmp_path: Path) -> None:
    """Lines with metadata near the row limit: a user's run is cut into jobs that each pass the
    contract's per-write budget (the worker would dead-letter one over it), in file order."""
    user = uid("meta")
    note = "x" * (MAX_METADATA_VALUE_CHARS - 10)
    records = [{"user_id": user, "content": f"line {n}", "metadata": {"a": note, "b": note, "n": n}}
               for n in range(300)]
    run = Ingest(private_fleet, [Input(_lines(tmp_path / "meta.jsonl", records))], "jsonl")
    tally = await run.run()
    assert tally.messages == 300 and tally.errors == 0
    log = await private_fleet.redis.lrange(keys.write_log(user), 0, -1)  # type: ignore[misc]
    ops = [WriteOp.model_validate_json(raw) for raw in log]  # validation charges each write's rows
    assert len(ops) > 300 * 2_000 // MAX_WRITE_METADATA_BYTES, "jobs were not cut by the metadata budget"
    assert [m.metadata["n"] for op in ops for m in op.request.messages] == list(range(300))  # type: ignore[union-attr]


async def test_order_per_user_is_kept_across_window_flushes(private_fleet: Memfleet, tmp_path: Path) -> None:
    """Through the real pipeline into a real Redis: each user's log holds its lines in file order."""
    rng = random.Random(5)
    users = [uid("order") for _ in range(20)]
    records = [{"user_id": rng.choice(users), "content": f"line {n}"} for n in range(2_000)]
    path = _lines(tmp_path / "order.jsonl", records)
    run = Ingest(private_fleet, [Input(path)], "jsonl", job_size=8, window=16)  # flushes all the time
    tally = await run.run()
    assert tally.messages == 2_000 and tally.errors == 0
    assert tally.jobs > 2_000 / 8, "the small window must have split users' runs"
    for user in users:
        log = await private_fleet.redis.lrange(keys.write_log(user), 0, -1)  # type: ignore[misc]
        stored = [m.content for raw in log for m in WriteOp.model_validate_json(raw).request.messages]  # type: ignore[union-attr]
        assert stored == [r["content"] for r in records if r["user_id"] == user]
    assert await private_fleet.redis.zcard(keys.BULK_QUEUE) == tally.jobs


async def test_wait_keeps_at_most_its_window_outstanding(fleet: Memfleet, tmp_path: Path) -> None:
    """With real workers: `wait` stores everything while never more than its window is outstanding."""
    users = [uid("wait") for _ in range(30)]
    records = [{"user_id": users[n % 30], "content": f"fact {n} about my week"} for n in range(120)]
    path = _lines(tmp_path / "wait.jsonl", records)
    seen: list[int] = []
    run = Ingest(fleet, [Input(path)], "jsonl", wait=True, job_size=2, wait_window=8,
                 on_progress=lambda r: seen.append(r.outstanding))
    tally = await run.run()
    assert (tally.messages, tally.jobs, tally.stored, tally.failed_jobs) == (120, 60, 120, 0)
    assert run.outstanding == 0 and seen and max(seen) <= 8


def test_ingest_gzip_then_the_same_lines_plain_stores_nothing_new(env: dict[str, str], tmp_path: Path) -> None:
    user = uid("gz")
    body = "".join(json.dumps({"user_id": user, "content": f"I visited city number {n}"}) + "\n" for n in range(40))
    packed = tmp_path / "trips.jsonl.gz"
    packed.write_bytes(gzip.compress(body.encode()))
    result = memfleet("ingest", str(packed), "--wait", "--json", env=env)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["messages"], summary["users"], summary["stored"], summary["errors"]) == (40, 1, 40, 0)

    (tmp_path / "trips.jsonl").write_text(body, encoding="utf-8")
    again = json.loads(memfleet("ingest", str(tmp_path / "trips.jsonl"), "--wait", "--json", env=env).stdout)
    assert (again["stored"], again["duplicates"]) == (0, 40), "compressing a file must not change its ids"
    listed = json.loads(memfleet("list", "--user", user, "--json", env=env).stdout)["memories"]
    assert len(listed) == 40


def test_ingest_from_stdin_reports_bad_lines_by_number_and_stores_the_good_ones(env: dict[str, str]) -> None:
    user_a, user_b = uid("stdin"), uid("stdin")
    lines = [
        json.dumps({"user_id": user_a, "content": "My cat is called Miso"}),
        "[1, 2",
        json.dumps({"user_id": user_b, "content": "I work night shifts", "role": "assistant"}),
        json.dumps({"user_id": user_a, "content": "I moved in May", "timestamp": "last spring"}),
        json.dumps({"user_id": user_b, "content": "x" * (2 << 20)}),  # over the line limit: skipped unread
        json.dumps({"user_id": user_a, "content": "I play the cello"}),
    ]
    result = memfleet("ingest", "-", "--wait", "--json", env=env, stdin="\n".join(lines) + "\n")
    assert result.returncode == 1, "bad lines must make the exit code 1"
    summary = json.loads(result.stdout)
    assert (summary["messages"], summary["users"], summary["stored"], summary["errors"]) == (3, 2, 3, 3)
    assert summary["errors_by_kind"] == {"bad_json": 1, "invalid_field": 1, "line_too_long": 1}
    for number, kind in ((2, "bad_json"), (4, "invalid_field"), (5, "line_too_long")):
        assert f"stdin:{number}: {kind}:" in result.stderr
    assert "Traceback" not in result.stderr and "Miso" not in result.stderr
    found = json.loads(memfleet("list", "--user", user_a, "--json", env=env).stdout)["memories"]
    assert sorted(m["text"] for m in found) == ["I play the cello", "My cat is called Miso"]


def test_ingest_of_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    result = memfleet("ingest", str(tmp_path / "nope.jsonl"), env={"REDIS_URL": "redis://127.0.0.1:1/0"})
    assert result.returncode == 2 and "nope.jsonl" in result.stderr and "Traceback" not in result.stderr


def test_peak_memory_stays_bounded_on_a_large_file(private_redis: RedisServer, tmp_path: Path) -> None:
    """200,000 lines (~35 MB): the producer's RSS stays under the limit however many it has read."""
    rng = random.Random(8)
    path = tmp_path / "large.jsonl"
    lines = 200_000
    with path.open("w", encoding="utf-8") as f:
        for n in range(lines):
            f.write(json.dumps({"user_id": f"user-{rng.randrange(40_000)}", "role": "user",
                                "content": f"message {n} " + "lorem ipsum dolor sit amet " * 3}) + "\n")
    proc = subprocess.Popen([*MEMFLEET, "ingest", str(path), "--json"],
                            env={**os.environ, "REDIS_URL": private_redis.url},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    try:
        process = psutil.Process(proc.pid)
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                peak = max(peak, process.memory_info().rss)
            except psutil.Error:
                break  # it has just exited
            time.sleep(0.02)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    summary = json.loads(stdout)
    assert summary["messages"] == lines and summary["errors"] == 0
    assert peak > 0 and peak / 2**20 <= RSS_LIMIT_MB, f"peak RSS {peak / 2**20:.0f} MB"


def test_read_entries_names_errors_by_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"user_id": "a", "content": "fine"}\n\xff\xfe\n\n{"user_id": "*", "content": "x"}\n')
    items = list(read_entries([path], "jsonl"))
    assert [type(i).__name__ for i in items] == ["Entry", "LineError", "LineError"]
    errors = [i for i in items if isinstance(i, LineError)]
    assert [(e.source, e.kind) for e in errors] == [(f"{path}:2", "bad_json"), (f"{path}:4", "bad_user_id")]


def test_a_terminal_gets_a_progress_bar_with_rate_and_eta(private_redis: RedisServer, tmp_path: Path) -> None:
    import pty

    path = _lines(tmp_path / "bar.jsonl", [{"user_id": f"bar-{n % 50}", "content": f"line {n}"} for n in range(5_000)])
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([*MEMFLEET, "ingest", str(path)], stdout=subprocess.PIPE, stderr=terminal,
                            env={**os.environ, "REDIS_URL": private_redis.url, "COLUMNS": "200", "TERM": "xterm"})
    os.close(terminal)
    shown = b""
    try:
        while chunk := _read(controller):
            shown += chunk
        stdout, _ = proc.communicate(timeout=60)
    finally:
        os.close(controller)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    bar = shown.decode(errors="replace")
    assert "ingest" in bar and "5,000 messages" in bar and "/s" in bar and "ETA" in bar and "100%" in bar
    assert b"messages" in stdout  # the summary still goes to stdout


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # the terminal's other end closed: the command has exited
        return b""
