"""Job bodies are JSON: a pickle put on the queue by hand is refused, never unpickled, and a body
that does not fit its function is refused too; both are dead-lettered and counted."""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from arq.jobs import serialize_job
from arq.utils import timestamp_ms
from redis.asyncio import Redis
from structlog.testing import capture_logs

from producer import keys, wire
from producer.arq_adapter import ARQ_JOB, queue_job
from producer.client import Memfleet
from producer.contract import DeadLetter
from producer.services import RedisServer
from tests.support import eventually, uid
from workers.refusal import refuse
from workers.settings import WorkerConfig
from workers.worker import worker_settings

SECRET = "a secret the body carries"


class _CreatesFile:
    """Unpickling this opens (and so creates) a file: what an attacker's payload would do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def _pickled_job(function: str, marker: Path) -> bytes:
    return pickle.dumps({"t": 1, "f": function, "a": [_CreatesFile(marker)], "k": {}, "et": int(time.time() * 1000)})


def test_the_payload_is_live(tmp_path: Path) -> None:
    """The test below proves something only if unpickling this payload really creates the file."""
    marker = tmp_path / "unpickled"
    pickle.loads(_pickled_job(keys.SEARCH, marker))
    assert marker.exists()


def test_wire_round_trip_is_json() -> None:
    body = wire.dumps({"a": ["alice", {"query": "x"}], "r": ValueError("bad cursor")})
    assert wire.loads(body) == {"a": ["alice", {"query": "x"}], "r": "ValueError: bad cursor"}
    with pytest.raises(TypeError):
        wire.dumps({"a": object()})


def test_a_worker_hands_arq_only_calls_that_fit_its_functions() -> None:
    deserialize = worker_settings(WorkerConfig())["job_deserializer"]  # the bulk queue's Worker
    fits = serialize_job(keys.APPLY_WRITE, ("alice", "op-1"), {}, None, timestamp_ms(), serializer=wire.dumps)
    assert deserialize(fits)["f"] == keys.APPLY_WRITE
    assert deserialize(fits)["a"] == ["alice", "op-1"]
    refused = {
        "a pickle": (_pickled_job(keys.APPLY_WRITE, Path("/nonexistent/never")), "does not decode"),
        "not UTF-8": (b"\xff\xfe" + SECRET.encode(), "does not decode"),
        "JSON, not a job": (wire.dumps([SECRET]), "not an arq job record"),
        "too many arguments": (_json_job(keys.APPLY_WRITE, ["alice", "op-1", SECRET]), "apply_write(user_id, op_id)"),
        "too few": (_json_job(keys.APPLY_WRITE, ["alice"]), "apply_write(user_id, op_id)"),
        "a keyword it lacks": (_json_job(keys.APPLY_WRITE, ["alice", "op-1"], {SECRET: 1}), "apply_write"),
        "a read, on the writes' queue": (_json_job(keys.SEARCH, [{"query": SECRET}]), "names no function"),
        "a function it lacks": (_json_job("os.system", [SECRET]), "names no function"),
        "the refusal itself, forged": (_json_job(keys.REFUSED, [{"reason": SECRET}]), "names no function"),
    }
    for case, (body, why) in refused.items():
        call = deserialize(body)
        assert call["f"] == keys.REFUSED, case
        (refusal,) = call["a"]
        assert why in refusal["reason"] and f"{len(body)} bytes" in refusal["reason"], (case, refusal)
        assert SECRET not in json.dumps(call), f"{case}: the refusal repeats the body"


def _json_job(function: str, args: list[Any], kwargs: dict[str, Any] | None = None) -> bytes:
    return wire.dumps({"t": None, "f": function, "a": args, "k": kwargs or {}, "et": timestamp_ms()})


async def _put_on_queue(fleet: Memfleet, queue: str, job_id: str, body: bytes) -> None:
    """What anyone who can write to Redis could do: a job body of their own, straight onto a queue."""
    async with fleet.redis.pipeline(transaction=True) as pipe:
        pipe.psetex(ARQ_JOB + job_id, 60_000, body)
        pipe.zadd(queue, {job_id: int(time.time() * 1000)})
        pipe.lpush(keys.INTERACTIVE_DOORBELL, 1)
        await pipe.execute()


async def _dead_letter_of(fleet: Memfleet, job_id: str, timeout: float = 30) -> DeadLetter:
    found: list[DeadLetter] = []

    async def lettered() -> bool:
        found[:] = [d for d in await fleet.dead_letters() if d.job_id == job_id]
        return bool(found)

    await eventually(lettered, timeout, f"job {job_id} in the dead-letter list")
    (letter,) = found
    return letter


@pytest.mark.parametrize("queue,function", [(keys.INTERACTIVE_QUEUE, keys.SEARCH), (keys.BULK_QUEUE, keys.APPLY_WRITE)])
async def test_pickled_job_is_refused_not_run(fleet: Memfleet, tmp_path: Path, queue: str, function: str) -> None:
    marker = tmp_path / "pwned"
    job_id = f"evil-{uid()}"
    before = await fleet.stats()
    await _put_on_queue(fleet, queue, job_id, _pickled_job(function, marker))
    letter = await _dead_letter_of(fleet, job_id)
    try:
        assert "does not decode" in letter.reason and letter.user_id == "?" and letter.op == ""
        assert str(marker) not in letter.model_dump_json(), "the dead letter repeats the body"
        deadline = time.monotonic() + 30
        while await fleet.redis.zscore(queue, job_id) is not None:
            assert time.monotonic() < deadline, "the refused job stayed on the queue"
            await anyio.sleep(0.05)
        assert not await fleet.redis.exists(ARQ_JOB + job_id), "the refused job's body is still in Redis"
        assert not marker.exists(), "a worker unpickled the job body"
        after = await fleet.stats()
        # Tests run one at a time: this job is the only one refused or dead-lettered meanwhile.
        assert after.counters.get("unknown:refused", 0) == before.counters.get("unknown:refused", 0) + 1
        assert after.dead_letters == before.dead_letters + 1
        assert after.failed == before.failed + 1
    finally:
        assert await fleet.purge_dead_letters([job_id]) == 1
    # The workers are still there and still answer JSON jobs.
    user = uid("wire")
    assert await fleet.search(user, "anything") == []


MISFITS = {
    "a search with two arguments": (keys.INTERACTIVE_QUEUE, keys.SEARCH, ("alice", SECRET), "search"),
    "a write without its op id": (keys.BULK_QUEUE, keys.APPLY_WRITE, ("alice",), "write"),
    "a function no worker has": (keys.BULK_QUEUE, "os.system", (SECRET,), "unknown"),
}


@pytest.mark.parametrize("case", MISFITS, ids=list(MISFITS))
async def test_a_job_that_does_not_fit_its_function_is_refused_not_run(fleet: Memfleet, case: str) -> None:
    queue, function, args, kind = MISFITS[case]
    job_id = f"misfit-{uid()}"
    before = await fleet.stats()
    async with fleet.redis.pipeline(transaction=True) as pipe:  # as a producer of another version might
        queue_job(pipe, fleet.redis, function, args, job_id, queue)
        pipe.lpush(keys.INTERACTIVE_DOORBELL, 1)
        await pipe.execute()
    letter = await _dead_letter_of(fleet, job_id)
    try:
        assert letter.reason.startswith(f"refused {kind} job:") and SECRET not in letter.model_dump_json()
        counted = f"{kind}:refused"

        async def counted_once() -> bool:
            return (await fleet.stats()).counters.get(counted, 0) == before.counters.get(counted, 0) + 1

        await eventually(counted_once, 10, f"{counted} counted once")
        after = await fleet.stats()
        ran = {k: v for k, v in after.counters.items() if k.startswith(("search:", "write:", "list:"))
               and not k.endswith(":refused") and v != before.counters.get(k, 0)}
        assert ran == {}, f"the job's function ran: {ran}"
        if function == keys.SEARCH:  # its reader, if there were one, hears why instead of timing out
            popped = await fleet.redis.blpop([keys.reply(job_id)], timeout=10)  # type: ignore[misc]
            assert popped is not None and json.loads(popped[1])["rejected"] is True
    finally:
        assert await fleet.purge_dead_letters([job_id]) == 1


async def test_a_refused_job_run_again_is_dead_lettered_once(private_redis: RedisServer) -> None:
    """arq runs a job again when its worker died before marking it done: the refusal is recorded once."""
    redis = Redis.from_url(private_redis.url)
    try:
        ctx = {"redis": redis, "job_id": f"twice-{uid()}", "job_try": 1}
        refusal = {"function": keys.APPLY_WRITE, "reason": "does not fit apply_write"}
        with capture_logs() as logs:
            await refuse(ctx, refusal)
            await refuse({**ctx, "job_try": 2}, refusal)  # the same job, retried
        letters = [DeadLetter.model_validate_json(raw) for raw in await redis.lrange(keys.DEAD_LETTERS, 0, -1)]
        assert [(d.job_id, d.tries) for d in letters] == [(ctx["job_id"], 1)]
        assert await redis.hget(keys.STATS, "write:refused") == b"1"
        assert [e["event"] for e in logs] == ["job_refused"]
        # Another job with the same fault is a refusal of its own.
        await refuse({**ctx, "job_id": f"other-{uid()}"}, refusal)
        assert await redis.llen(keys.DEAD_LETTERS) == 2
    finally:
        await redis.aclose()
