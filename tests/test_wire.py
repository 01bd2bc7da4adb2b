"""Job bodies are JSON: a pickle put on the queue by hand is refused, never unpickled."""

from __future__ import annotations

import pickle
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from producer import keys, wire
from producer.client import Memfleet
from tests.support import uid


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


@pytest.mark.parametrize("queue,function", [(keys.INTERACTIVE_QUEUE, keys.SEARCH), (keys.BULK_QUEUE, keys.APPLY_WRITE)])
async def test_pickled_job_is_refused_not_run(fleet: Memfleet, tmp_path: Path, queue: str, function: str) -> None:
    marker = tmp_path / "pwned"
    job_id = f"evil-{uid()}"
    async with fleet.redis.pipeline(transaction=True) as pipe:
        pipe.psetex(keys.ARQ_JOB + job_id, 60_000, _pickled_job(function, marker))
        pipe.zadd(queue, {job_id: int(time.time() * 1000)})
        pipe.lpush(keys.INTERACTIVE_DOORBELL, 1)
        await pipe.execute()
    deadline = time.monotonic() + 30
    while await fleet.redis.zscore(queue, job_id) is not None:
        assert time.monotonic() < deadline, "no worker took the job off the queue"
        await anyio.sleep(0.05)
    assert not await fleet.redis.exists(keys.ARQ_JOB + job_id), "the refused job's body is still in Redis"
    assert not marker.exists(), "a worker unpickled the job body"
    # The workers are still there and still answer JSON jobs.
    user = uid("wire")
    assert await fleet.search(user, "anything") == []
