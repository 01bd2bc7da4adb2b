"""Every `memfleet` command, run as a user would run it: a subprocess against the test fleet."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from redis import Redis

from producer.client import Memfleet
from producer.ingest import JOB_SIZE, Entry, Input, LineError, group, read_entries, read_locomo
from producer.services import RedisServer
from tests.support import eventually, live_workers, locomo_file, stop_process, uid, wait_for_workers

MEMFLEET = [sys.executable, "-m", "producer.cli"]


def memfleet(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MEMFLEET, *args], env={**os.environ, **env, "COLUMNS": "200"},
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def env(worker_env: dict[str, str], fleet: Memfleet) -> dict[str, str]:
    return worker_env


def test_add_search_list_forget(env: dict[str, str]) -> None:
    user = uid("cli")
    added = memfleet("add", "--user", user, "I keep bees on my roof", "--metadata", '{"topic": "hobby"}', env=env)
    assert added.returncode == 0, added.stderr
    assert "stored 1" in added.stdout

    found = memfleet("search", "--user", user, "insects", "--json", env=env)
    assert found.returncode == 0, found.stderr
    results = json.loads(found.stdout)
    assert [r["text"] for r in results] == ["I keep bees on my roof"]
    assert set(results[0]) >= {"id", "text", "score", "metadata"} and results[0]["metadata"]["topic"] == "hobby"

    listed = memfleet("list", "--user", user, "--json", env=env)
    assert [m["text"] for m in json.loads(listed.stdout)["memories"]] == ["I keep bees on my roof"]
    assert "I keep bees" in memfleet("list", "--user", user, env=env).stdout  # the table form

    forgot = memfleet("forget", "--user", user, env=env)
    assert forgot.returncode == 0 and "1 memories deleted" in forgot.stdout
    assert json.loads(memfleet("list", "--user", user, "--json", env=env).stdout)["memories"] == []


@pytest.mark.parametrize("bad", [" alice", "*", "al ice", "x" * 200])
def test_bad_user_id_is_a_clear_error_not_a_traceback(env: dict[str, str], bad: str) -> None:
    for command in (["add", "--user", bad, "hi"], ["search", "--user", bad, "q"], ["list", "--user", bad],
                    ["forget", "--user", bad]):
        result = memfleet(*command, env=env)
        assert result.returncode == 2
        assert "user_id" in result.stderr and "Traceback" not in result.stderr


def test_filter_injection_is_refused(env: dict[str, str]) -> None:
    result = memfleet("search", "--user", "alice", "q", "--filters", '{"OR": [{"user_id": "bob"}]}', env=env)
    assert result.returncode == 2 and "not allowed" in result.stderr and "Traceback" not in result.stderr


def test_nul_and_lone_surrogates_exit_2_and_queue_nothing(private_redis: RedisServer) -> None:
    """Issue #22: text no store can hold is refused before it is queued, with a line saying why."""
    env = {"REDIS_URL": private_redis.url}
    refused = [
        (memfleet("add", "--user", "alice", "hi", "--metadata", '{"k": "a\\u0000b"}', env=env), "NUL"),
        (memfleet("add", "--user", "alice", "hi", "--metadata", '{"k": "a\\ud800b"}', env=env), "surrogate"),
        # Bytes that are not UTF-8 reach Python's argv as lone surrogates.
        (memfleet("add", "--user", "alice", "caf\udce9 au lait", env=env), "surrogate"),
        (memfleet("search", "--user", "alice", "caf\udce9", env=env), "surrogate"),
        (memfleet("search", "--user", "alice", "q", "--filters", '{"k": "\\u0000"}', env=env), "NUL"),
    ]
    for result, why in refused:
        assert result.returncode == 2, result.stderr
        assert why in result.stderr and "Traceback" not in result.stderr
    redis = Redis.from_url(private_redis.url)
    try:
        assert redis.keys("*") == [], "nothing may be queued for a refused request"
    finally:
        redis.close()


def test_search_without_a_worker_fails_with_advice(tmp_path: Path) -> None:
    from producer.services import RedisServer

    server = RedisServer().start()
    try:
        result = memfleet("search", "--user", "alice", "q", env={"REDIS_URL": server.url,
                                                                  "MEMFLEET_SEARCH_TIMEOUT": "0.5"})
    finally:
        server.stop()
    assert result.returncode == 1
    assert "memfleet worker" in result.stderr and "Traceback" not in result.stderr


def test_unreachable_redis_is_a_clear_error() -> None:
    result = memfleet("stats", env={"REDIS_URL": "redis://127.0.0.1:1/0"})
    assert result.returncode == 1 and "REDIS_URL" in result.stderr and "Traceback" not in result.stderr
    # The URL is named, its password is not.
    for command in (["stats"], ["keys", "list"]):
        result = memfleet(*command, env={"REDIS_URL": "redis://:hunter2@127.0.0.1:1/0"})
        assert result.returncode == 1 and "127.0.0.1:1" in result.stderr and "hunter2" not in result.stderr


def test_ingest_jsonl_reports_bad_lines_and_stores_the_good_ones(env: dict[str, str], tmp_path: Path) -> None:
    user_a, user_b = uid("ing"), uid("ing")
    lines = [
        json.dumps({"user_id": user_a, "role": "user", "content": "I was born in Lisbon"}),
        "{not json",
        json.dumps({"user_id": user_b, "role": "assistant", "content": "Noted: you like jazz", "name": "bot",
                    "metadata": {"session": 1}, "id": "m-1"}),
        json.dumps({"user_id": user_a, "role": "user"}),
        json.dumps({"user_id": " " + user_a, "role": "user", "content": "aliased"}),
        json.dumps({"user_id": user_a, "role": "user", "content": "x" * 20_000}),
        "",
        json.dumps({"user_id": user_a, "content": "My sister is called Ana"}),
    ]
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = memfleet("ingest", str(path), "--wait", "--json", env=env)
    assert result.returncode == 1, "a file with bad lines must exit non-zero"
    summary = json.loads(result.stdout)
    assert summary["messages"] == 3 and summary["users"] == 2 and summary["stored"] == 3
    assert summary["errors"] == 4
    assert summary["errors_by_kind"] == {"bad_json": 1, "missing_field": 1, "bad_user_id": 1, "oversize_content": 1}
    for line in (2, 4, 5, 6):
        assert f"{path}:{line}:" in result.stderr

    again = json.loads(memfleet("ingest", str(path), "--wait", "--json", env=env).stdout)
    assert (again["stored"], again["duplicates"]) == (0, 3), "re-running ingest must store nothing new"


def test_ingest_locomo_and_trace_results_to_turns(env: dict[str, str]) -> None:
    path = locomo_file("conv-30.json")
    user = f"locomo-{path.stem}"
    memfleet("forget", "--user", user, env=env)
    result = memfleet("ingest", str(path), "--format", "locomo", "--wait", "--json", env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    turns = sum(1 for _ in read_locomo(Input(path)))
    assert summary["messages"] == turns and summary["stored"] == turns and summary["users"] == 1

    # A question's evidence turn, searched by its own words, comes back traced to its turn.
    conversation = json.loads(path.read_text())
    evidence = next(q["evidence"][0] for q in conversation["qa"] if q.get("evidence"))
    turn = next(t for k, v in conversation.items() if k.startswith("session_") and isinstance(v, list)
                for t in v if t["dia_id"] == evidence)
    found = json.loads(memfleet("search", "--user", user, turn["text"], "--limit", "5", "--json", env=env).stdout)
    assert evidence in [r["metadata"]["dia_id"] for r in found]
    assert all(set(r["metadata"]) >= {"dia_id", "session", "date_time"} for r in found)
    texts = {t.message.content for t in read_locomo(Input(path)) if isinstance(t, Entry)}
    assert all(r["text"] in texts for r in found)
    memfleet("forget", "--user", user, env=env)


def test_locomo_reader_on_a_shared_conversation() -> None:
    path = locomo_file("conv-30.json")
    conversation = json.loads(path.read_text())
    expected = sum(len(v) for k, v in conversation.items()
                   if k.startswith("session_") and k.removeprefix("session_").isdigit())
    items = list(read_entries([path], "locomo"))
    entries = [e for e in items if isinstance(e, Entry)]
    assert [e for e in items if isinstance(e, LineError)] == []
    assert len(entries) == expected and {e.user_id for e in entries} == {"locomo-conv-30"}
    requests = list(group(entries))
    first = requests[0].messages[0]
    assert first.role == "user" and first.name == conversation["session_1"][0]["speaker"]
    assert first.metadata == {"dia_id": "D1:1", "session": 1, "date_time": conversation["session_1_date_time"]}
    assert all(len(r.messages) <= JOB_SIZE for r in requests) and len(requests) > 1


async def test_dlq_list_and_purge(env: dict[str, str], fleet: Memfleet) -> None:
    from producer import keys

    user = uid("dlq")
    forged = json.dumps({"op_id": "w-forged-cli", "request": {"kind": "forget", "user_id": "someone-else"}})
    await fleet.redis.rpush(keys.write_log(user), forged)  # type: ignore[misc]
    assert memfleet("add", "--user", user, "a genuine write", env=env).returncode == 0

    listed = json.loads(memfleet("dlq", "list", "--json", env=env).stdout)
    (letter,) = [d for d in listed if d["user_id"] == user]
    assert letter["job_id"] == "w-forged-cli" and "another user" in letter["reason"]
    assert "op" not in letter, "dlq list shows no content"
    assert "dead letter" in memfleet("dlq", "list", env=env).stdout

    # A forged write cannot be retried into another user's log: retry leaves it alone.
    assert "retried 0" in memfleet("dlq", "retry", "w-forged-cli", env=env).stdout
    purged = memfleet("dlq", "purge", "w-forged-cli", env=env)
    assert purged.returncode == 0 and "purged 1" in purged.stdout
    assert all(d["job_id"] != "w-forged-cli" for d in json.loads(memfleet("dlq", "list", "--json", env=env).stdout))


def test_stats_shows_workers_and_exits_zero_while_one_lives(env: dict[str, str]) -> None:
    # A job of this test's own, so that `completed` does not depend on which tests ran before.
    assert memfleet("add", "--user", uid("stats"), "counted", env=env).returncode == 0
    result = memfleet("stats", "--json", env=env)
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert len(stats["workers"]) >= 2
    assert {"queued", "in_progress", "completed", "failed", "dead_letters", "oldest_queued_seconds"} <= set(stats)
    assert stats["completed"] > 0


def test_stats_exits_non_zero_without_workers() -> None:
    from producer.services import RedisServer

    server = RedisServer().start()
    try:
        result = memfleet("stats", env={"REDIS_URL": server.url})
    finally:
        server.stop()
    assert result.returncode == 1 and "no worker is alive" in result.stderr


async def test_worker_command_starts_processes_and_stops_cleanly(env: dict[str, str], fleet: Memfleet) -> None:
    before = len((await fleet.stats()).workers)
    proc = subprocess.Popen([*MEMFLEET, "worker", "--processes", "2", "--concurrency", "4"],
                            env={**os.environ, **env})
    try:
        await wait_for_workers(fleet, before + 2)
    finally:
        code = await asyncio.to_thread(stop_process, proc, signal.SIGINT)
    assert code == 0

    async def gone() -> bool:
        return await live_workers(fleet) == before

    await eventually(gone, 10, "stopped workers to leave the health list")


async def test_arq_runs_worker_settings_directly(env: dict[str, str], fleet: Memfleet) -> None:
    """`arq workers.WorkerSettings`, the ecosystem's way, serves both queues."""
    before = len((await fleet.stats()).workers)
    arq = Path(sys.executable).with_name("arq")
    proc = subprocess.Popen([str(arq), "workers.WorkerSettings"], env={**os.environ, **env})
    try:
        await wait_for_workers(fleet, before + 1)
        user = uid("arq")
        await (await fleet.add(user, ["served by arq's own runner"])).outcome()
        assert [r.text for r in await fleet.search(user, "runner")] == ["served by arq's own runner"]
    finally:
        code = await asyncio.to_thread(stop_process, proc)
    assert code == 0


def test_demo_starts_what_it_needs_and_exits_zero(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(MEMFLEET_DATA_DIR=str(tmp_path / "data"), COLUMNS="200")
    result = subprocess.run([*MEMFLEET, "demo"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "started a private redis-server" in result.stdout
    assert "all isolation checks passed" in result.stdout
    assert result.stdout.count(" ok ") >= 10
