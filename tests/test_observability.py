"""`observed`: one log line and one counter per job run, and never a Redis error in place of the
job's own; the fleet's counters are built and read by one model (`producer.counters`)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from producer import counters, keys
from producer.counters import JobCount, LLMCounts
from producer.errors import JobFailed
from producer.services import RedisServer, free_port
from workers.observability import observed


@observed("probe")
async def probe(ctx: dict[str, Any], user_id: str, fail: bool) -> str:
    if fail:
        raise LookupError("the job's own failure")
    return "done"


async def test_a_run_is_counted_and_logged_with_ids_only() -> None:
    server = RedisServer().start()
    redis = Redis.from_url(server.url)
    try:
        with capture_logs() as logs:
            assert await probe({"redis": redis, "job_id": "j-1", "job_try": 1}, "alice", False) == "done"
        assert await redis.hget(keys.STATS, "probe:ok") == b"1"
    finally:
        await redis.aclose()
        server.stop()
    (line,) = logs
    assert line["event"] == "job" and line["outcome"] == "ok"
    assert (line["job_id"], line["user_id"], line["kind"], line["attempt"]) == ("j-1", "alice", "probe", 1)


async def test_with_redis_down_the_job_error_is_the_one_raised() -> None:
    # Nothing listens on this port: HINCRBY fails at once, as it does while Redis is down.
    away = Redis(port=free_port(), socket_connect_timeout=0.5)
    try:
        with capture_logs() as logs, pytest.raises(JobFailed, match="probe job failed: LookupError") as raised:
            await probe({"redis": away, "job_id": "j-2", "job_try": 1}, "alice", True)
    finally:
        await away.aclose()
    # The job's failure, by class and place: its message (which may quote the job's data) is not passed on.
    assert "the job's own failure" not in str(raised.value) and "test_observability.py:" in str(raised.value)
    job, missed = logs
    assert job["outcome"] == "failed" and job["error"] == "LookupError"
    assert missed["event"] == "stats_not_counted" and missed["counter"] == "probe:failed"


def test_the_counters_are_read_as_they_are_written() -> None:
    assert JobCount.parse(JobCount("write", "not_found").field()) == JobCount("write", "not_found")
    for other in (counters.op_failures("op-1"), counters.op_llm_waits("op-1"), counters.FOREIGN_DROPPED, "llm_calls"):
        assert JobCount.parse(other) is None, other
    stored = {JobCount("write", "ok").field(): 3, JobCount("search", "failed").field(): 1,
              JobCount("unknown", "refused").field(): 2, JobCount("list", "retry").field(): 7,
              counters.op_failures("op-1"): 5, counters.FOREIGN_DROPPED: 4}
    fleet = counters.reported({k.encode(): str(v).encode() for k, v in stored.items()})
    assert counters.op_failures("op-1") not in fleet and fleet[counters.FOREIGN_DROPPED] == 4
    assert (counters.completed(fleet), counters.failed(fleet)) == (3, 3)
    llm = LLMCounts(calls=2, latency_ms=300, prompt_tokens=10, errors=Counter(timeout=1),
                    latency=Counter({"0.25": 1, "inf": 1}))
    assert LLMCounts.parse({**llm.fields(), **fleet}) == llm
    assert counters.latency_bucket(0.2) == "0.25" and counters.latency_bucket(1e6) == "inf"
