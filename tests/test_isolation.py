"""Isolation under hostile input, concurrency and failure: ids, filters, foreign rows, order, forget."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from arq.jobs import JobStatus
from psycopg import sql
from redis.asyncio import Redis
from structlog.testing import capture_logs

from producer import keys
from producer.client import Memfleet
from producer.contract import AddRequest, ForgetRequest, MemoryRecord, Message, WriteOp
from producer.errors import InvalidRequest
from tests.support import eventually, uid
from tests.test_contract import INJECTED_FILTERS, REJECTED_IDS
from workers.backends import pg_schema, pg_store
from workers.backends.embedded import EmbeddedBackend
from workers.backends.memories import memory_id
from workers.backends.pg_pool import register_vector_dumper
from workers.scoped import AsyncScopedMemory


async def _read_directly(fleet: Memfleet, function: str, payload: Any) -> dict[str, Any]:
    """Put a read on the queue without the producer's checks, as a hostile client could."""
    job = await fleet.redis.enqueue_job(function, payload, _queue_name=keys.INTERACTIVE_QUEUE)
    assert job is not None
    popped = await fleet.redis.blpop([keys.reply(job.job_id)], timeout=30)  # type: ignore[misc]
    assert popped is not None, "the worker must answer even a job it refuses"
    return dict(json.loads(popped[1]))


async def _write_directly(fleet: Memfleet, user_id: Any) -> None:
    """Put an apply_write job on the queue by hand and check that the worker refused this job."""
    before = (await fleet.stats()).counters.get("write:invalid", 0)
    job = await fleet.redis.enqueue_job(keys.APPLY_WRITE, user_id, "w-direct", _queue_name=keys.BULK_QUEUE)
    assert job is not None

    async def finished() -> bool:
        return await job.status() == JobStatus.not_found  # run, and nothing of it kept

    await eventually(finished, 15, "the worker to take the hand-made write")
    # Tests run one at a time, so exactly this job was refused; a run would have counted `write:ok`.
    assert (await fleet.stats()).counters.get("write:invalid", 0) == before + 1
    assert not await fleet.redis.exists(keys.write_outcome("w-direct"))


def _refused(reply: dict[str, Any], field: str) -> bool:
    return bool(reply.get("rejected")) and field in reply["error"] and "ok" not in reply


# -- every entry point refuses bad ids ------------------------------------------------------------


@pytest.mark.parametrize("user_id", REJECTED_IDS.values(), ids=list(REJECTED_IDS))
async def test_python_api_refuses_bad_ids(fleet: Memfleet, user_id: Any) -> None:
    with pytest.raises(InvalidRequest, match="user_id"):
        await fleet.add(user_id, ["secret"])
    with pytest.raises(InvalidRequest, match="user_id"):
        await fleet.search(user_id, "secret")
    with pytest.raises(InvalidRequest, match="user_id"):
        await fleet.list(user_id)
    with pytest.raises(InvalidRequest, match="user_id"):
        await fleet.forget(user_id)


@pytest.mark.parametrize("user_id", REJECTED_IDS.values(), ids=list(REJECTED_IDS))
def test_scoped_memory_refuses_bad_ids(user_id: Any) -> None:
    with pytest.raises(ValueError, match="user_id"):
        AsyncScopedMemory(user_id, backend=None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "user_id", [v for v in REJECTED_IDS.values() if isinstance(v, str) and "\x00" not in v][:12]
)
async def test_worker_refuses_bad_ids_put_on_the_queue_directly(fleet: Memfleet, user_id: str) -> None:
    for function, payload in ((keys.SEARCH, {"user_id": user_id, "query": "secret"}),
                              (keys.LIST, {"user_id": user_id})):
        assert _refused(await _read_directly(fleet, function, payload), "user_id")
    await _write_directly(fleet, user_id)


async def test_worker_refuses_non_string_ids_put_on_the_queue_directly(fleet: Memfleet) -> None:
    for bad in (7, True, ["a", "b"], {"ne": "x"}, None):
        assert _refused(await _read_directly(fleet, keys.SEARCH, {"user_id": bad, "query": "secret"}), "user_id")
        await _write_directly(fleet, bad)


@pytest.mark.parametrize("filters", INJECTED_FILTERS.values(), ids=list(INJECTED_FILTERS))
async def test_worker_refuses_filter_injection_put_on_the_queue_directly(
    fleet: Memfleet, filters: dict[str, Any]
) -> None:
    reply = await _read_directly(fleet, keys.SEARCH, {"user_id": "alice", "query": "q", "filters": filters})
    assert _refused(reply, "filters")


async def test_a_forged_write_in_a_users_log_is_dead_lettered_not_applied(fleet: Memfleet) -> None:
    victim, intruder = uid("victim"), uid("intruder")
    forged = json.dumps({"op_id": "w-forged", "request": {"kind": "add", "user_id": intruder,
                                                          "messages": [{"content": "forged"}]}})
    await fleet.redis.rpush(keys.write_log(victim), forged)  # type: ignore[misc]
    outcome = await (await fleet.add(victim, ["genuine"])).outcome()
    assert outcome.stored == 1
    assert [r.text for r in (await fleet.list(victim)).memories] == ["genuine"]
    assert (await fleet.list(intruder)).memories == []
    letters = [json.loads(x) for x in await fleet.redis.lrange(keys.DEAD_LETTERS, 0, -1)]  # type: ignore[misc]
    assert any(d["user_id"] == victim and "another user" in d["reason"] for d in letters)


# -- defense in depth ---------------------------------------------------------------------------------


class ScopeIgnoringBackend(EmbeddedBackend):
    """A backend with a scoping bug: it searches and lists every user's rows."""

    async def search(self, user_id: str, query: str, limit: int, filters: dict[str, Any]) -> list[MemoryRecord]:
        return await self._everyone(limit)

    async def _everyone(self, limit: int) -> list[MemoryRecord]:
        def rows() -> list[MemoryRecord]:
            with self.pool.connection() as conn:
                found = conn.execute(f"SELECT user_id, id, payload FROM {pg_schema.TABLE} LIMIT %s",
                                     (limit,)).fetchall()
            return [MemoryRecord(id=str(i), user_id=u, text=p.get("data", "")) for u, i, p in found]

        return await asyncio.to_thread(rows)


def _insert_row(backend: EmbeddedBackend, key_user: str, payload: dict[str, Any], vector: list[float]) -> None:
    with psycopg.connect(_pg_url(backend), autocommit=True) as conn:
        register_vector_dumper(conn)
        memory = pg_store.NewMemory(memory_id(key_user, payload["data"]), np.asarray(vector, dtype=np.float32),
                                    payload, payload["data"])
        pg_store.insert(conn, key_user, [memory])


async def test_foreign_rows_inserted_into_the_store_never_come_out(backend: EmbeddedBackend) -> None:
    owner, intruder = uid("owner"), uid("intruder")
    secret = "the launch code is 0000"
    (vector,) = await backend.embedder.embed([secret])
    _insert_row(backend, intruder, {"user_id": intruder, "data": secret}, vector)
    leaky = ScopeIgnoringBackend(backend.pool, backend.embedder, can_infer=False)
    memory = AsyncScopedMemory(owner, leaky)
    with capture_logs() as logs:
        found = await memory.search("launch code", limit=50)
    assert all(r.user_id == owner for r in found)
    assert secret not in [r.text for r in found]
    assert memory.foreign_dropped >= 1
    # A security event naming the ids of what was dropped, never its text.
    (event,) = [e for e in logs if e["event"] == "foreign_memory_dropped"]
    assert event["log_level"] == "error" and event["user_id"] == owner
    assert len(event["memory_ids"]) == memory.foreign_dropped
    assert "launch code" not in repr(logs)
    # The honest backend never returned it in the first place.
    honest = AsyncScopedMemory(owner, backend)
    assert await honest.search("launch code", limit=50) == []
    assert (await honest.get_all()).memories == []


async def test_a_row_filed_under_a_user_but_claiming_another_is_dropped(backend: EmbeddedBackend) -> None:
    """A row whose key says `owner` but whose payload names someone else (a corrupted or forged row)
    is returned by the store for `owner`, and `AsyncScopedMemory` drops it."""
    owner, other = uid("owner"), uid("other")
    secret = "the vault opens with 4321"
    (vector,) = await backend.embedder.embed([secret])
    _insert_row(backend, owner, {"user_id": other, "data": secret}, vector)
    memory = AsyncScopedMemory(owner, backend)
    assert await memory.search("vault", limit=10) == []
    assert (await memory.get_all()).memories == []
    assert memory.foreign_dropped == 2


async def test_a_scoped_view_adds_messages_for_its_own_user_only(backend: EmbeddedBackend) -> None:
    user = uid("view")
    memory = AsyncScopedMemory(user, backend)
    ids, duplicates = await memory.add(["I grow tomatoes", {"content": "and basil", "role": "assistant"}],
                                       metadata={"topic": "garden"})
    assert len(ids) == 2 and duplicates == 0
    stored = (await memory.get_all()).memories
    assert {r.user_id for r in stored} == {user} and {r.metadata["topic"] for r in stored} == {"garden"}
    # Metadata cannot carry a scope either: refused before anything is stored.
    with pytest.raises(InvalidRequest, match="metadata"):
        await memory.add(["smuggled"], metadata={"user_id": "someone-else"})
    assert await memory.count() == 2
    await memory.delete_all()


def _pg_url(backend: EmbeddedBackend) -> str:
    return str(backend.pool.conninfo)


# -- per-user order -----------------------------------------------------------------------------------


async def test_add_forget_add_leaves_exactly_the_last_add_under_load(fleet: Memfleet) -> None:
    rounds = 50
    users = [uid("order") for _ in range(rounds)]
    bystanders = [uid("load") for _ in range(20)]

    async def one_round(user: str) -> None:
        # Three separate enqueues, as three requests of an app would be.
        await fleet.add(user, [f"A for {user}"])
        await fleet.forget(user)
        await fleet.add(user, [f"B for {user}"])

    async def load(user: str) -> None:
        for i in range(5):
            await fleet.add(user, [f"load {i} of {user}"])

    await asyncio.gather(*(one_round(u) for u in users), *(load(b) for b in bystanders))
    await _settled(fleet)
    for user in users:
        assert [r.text for r in (await fleet.list(user)).memories] == [f"B for {user}"]


async def test_a_write_re_sent_after_a_lost_reply_is_not_applied_twice(fleet: Memfleet) -> None:
    """A transaction whose reply was lost is re-sent whole: its ops land in the log a second time,
    possibly behind later writes. The copies must not be applied again (a stale forget would
    delete what was written since)."""
    user = uid("resent")
    first: list[AddRequest | ForgetRequest] = [
        AddRequest(user_id=user, messages=[Message(content="A")]),
        ForgetRequest(user_id=user),
        AddRequest(user_id=user, messages=[Message(content="B")]),
    ]
    handles = await fleet.submit(first)
    await fleet.wait(handles)
    await (await fleet.add(user, ["C"])).outcome()
    for handle, request in zip(handles, first, strict=True):
        copy = WriteOp(op_id=handle.op_id, request=request)
        await fleet.redis.rpush(keys.write_log(user), copy.model_dump_json())  # type: ignore[misc]
    await (await fleet.add(user, ["D"])).outcome()
    assert sorted(r.text for r in (await fleet.list(user)).memories) == ["B", "C", "D"]
    assert not await fleet.redis.llen(keys.write_log(user))  # type: ignore[misc]


async def _settled(fleet: Memfleet, timeout: float = 120) -> None:
    async def settled() -> bool:
        stats = await fleet.stats()
        logs = [k async for k in fleet.redis.scan_iter(match="memfleet:writes:*")]
        return not logs and stats.queued["bulk"] == 0 and stats.in_progress == 0

    await eventually(settled, timeout, "writes to settle", interval=0.1)


# -- forget leaves nothing behind ---------------------------------------------------------------------


async def test_forget_leaves_nothing_in_store_history_or_redis(
    fleet: Memfleet, backend: EmbeddedBackend, data_dir: Path
) -> None:
    user, neighbour = uid("forget"), uid("keep")
    secret = f"my passport number is {user[-8:]}"
    added = await (await fleet.add(user, [secret, "I live on Elm street"], metadata={"topic": "private"})).outcome()
    await (await fleet.add(neighbour, ["neighbour's memory"])).outcome()
    assert (await fleet.search(user, "passport"))[0].text == secret
    await fleet.list(user)
    with psycopg.connect(_pg_url(backend)) as conn:
        history = conn.execute(f"SELECT count(*) FROM {pg_schema.HISTORY} WHERE memory_id = ANY(%s::uuid[])",
                               (added.memory_ids,)).fetchone()
        assert history == (2,)

    forgot = await (await fleet.forget(user)).outcome()
    assert forgot.deleted == 2

    # The memory table and the user's postings (the keyword index).
    assert await AsyncScopedMemory(user, backend).count() == 0
    with psycopg.connect(_pg_url(backend)) as conn:
        rows = conn.execute(f"SELECT count(*) FROM {pg_schema.TABLE} WHERE payload::text LIKE %s", (f"%{user}%",))
        assert rows.fetchone() == (0,)
        assert pg_store.remaining(conn, user) == 0
        assert conn.execute(f"SELECT count(*) FROM {pg_schema.POSTINGS} WHERE term = 'passport'").fetchone() == (0,)
        # No table of the database holds the text any more: history keeps texts of deleted memories
        # unless a forget purges it.
        assert _tables_containing(conn, [secret, "Elm street"]) == []
    # No file of the worker's data directory outside PostgreSQL's own (mem0 kept history in SQLite).
    assert _files_containing(data_dir, [secret], skip=data_dir / "pg") == []
    # Redis: no job arguments, results or logs holding the user's text, and no pre-forget job data.
    leftovers = await _redis_values_containing(fleet, [secret, "Elm street", "passport"])
    assert leftovers == []
    # The neighbour is untouched.
    assert [r.text for r in (await fleet.list(neighbour)).memories] == ["neighbour's memory"]


async def test_forget_takes_answered_reads_and_leaves_queued_ones_to_run(redis: Redis) -> None:
    """A read queued when a forget applies runs after it, on what the forget left: taking it away
    would leave its reader waiting for an answer that never comes (the fuzzer met that as a 504)."""
    from producer.arq_adapter import ARQ_JOB
    from workers.purge import purge_user_jobs

    user = uid("reader")
    answered, queued = "r-answered", "r-queued"
    await redis.sadd(keys.user_reads(user), answered, queued)  # type: ignore[misc]
    await redis.rpush(keys.reply(answered), b"an answer naming the user's memories")  # type: ignore[misc]
    await redis.zadd(keys.INTERACTIVE_QUEUE, {queued: 1})
    await redis.set(ARQ_JOB + queued, b"the read's arguments")
    await purge_user_jobs(redis, user, keep=set())
    assert not await redis.exists(keys.reply(answered))
    assert await redis.zscore(keys.INTERACTIVE_QUEUE, queued) is not None
    assert await redis.exists(ARQ_JOB + queued)
    assert await redis.smembers(keys.user_reads(user)) == {queued.encode()}  # type: ignore[misc]


def _tables_containing(conn: psycopg.Connection[Any], needles: list[str]) -> list[str]:
    tables = [r[0] for r in conn.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"
    ).fetchall()]
    return [t for t in tables for n in needles
            if conn.execute(sql.SQL("SELECT count(*) FROM {} t WHERE t::text LIKE %s").format(sql.Identifier(t)),
                            (f"%{n}%",)).fetchone() != (0,)]


def _files_containing(root: Path, needles: list[str], skip: Path | None = None) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and (skip is None or skip not in path.parents):
            blob = path.read_bytes()
            found += [str(path) for n in needles if n.encode() in blob]
    return found


async def _redis_values_containing(fleet: Memfleet, needles: list[str]) -> list[str]:
    found = []
    async for key in fleet.redis.scan_iter(count=1000):
        kind = (await fleet.redis.type(key)).decode()
        if kind == "string":
            values = [await fleet.redis.get(key)]
        elif kind == "list":
            values = await fleet.redis.lrange(key, 0, -1)  # type: ignore[misc]
        elif kind == "set":
            values = list(await fleet.redis.smembers(key))  # type: ignore[misc]
        elif kind == "zset":
            values = await fleet.redis.zrange(key, 0, -1)
        elif kind == "hash":
            values = [*(await fleet.redis.hgetall(key)).keys(), *(await fleet.redis.hgetall(key)).values()]  # type: ignore[misc]
        else:
            values = []
        blob = b"".join(v for v in values if v)
        if any(n.encode() in blob for n in needles):
            found.append(key.decode())
    return found


async def test_read_results_do_not_outlive_their_reader(fleet: Memfleet) -> None:
    user = uid("reader")
    await (await fleet.add(user, ["a result that must not linger"])).outcome()
    assert await fleet.search(user, "linger")
    assert (await fleet.list(user)).memories
    assert await _redis_values_containing(fleet, ["a result that must not linger"]) == []
