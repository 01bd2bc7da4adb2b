"""`observed`: one log line and one counter per job run, and never a Redis error in place of the job's own."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from producer import keys
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
