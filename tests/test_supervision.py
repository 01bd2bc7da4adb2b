"""Background tasks of a worker (workers/supervision.py): a crash is logged, then the task is
started again, or, for a task the worker cannot serve without, the worker is stopped."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from tests.support import eventually
from workers.supervision import supervise


async def test_a_helper_that_crashes_is_logged_and_started_again() -> None:
    starts: list[int] = []

    async def flaky() -> None:
        starts.append(len(starts))
        if len(starts) < 3:
            raise KeyError("a passing bug")
        await asyncio.Event().wait()  # the third start keeps running

    with capture_logs() as logs:
        task = supervise("flaky", flaky, pause=0.01)
        try:
            await eventually(lambda: len(starts) == 3, 10, "the helper to be started a third time")
            assert not task.done()
        finally:
            task.cancel()
    failures = [e for e in logs if e["event"] == "background_task_failed"]
    assert [(e["task"], e["vital"], e["exc_info"]) for e in failures] == [("flaky", False, True)] * 2


async def test_a_vital_task_that_crashes_stops_the_worker_and_is_not_restarted() -> None:
    starts: list[int] = []
    stopped = asyncio.Event()

    async def reads() -> None:
        starts.append(1)
        raise RuntimeError("the read worker broke")

    with capture_logs() as logs:
        task = supervise("read-worker", reads, vital=True, pause=0.01, stop=stopped.set)
        await asyncio.wait_for(task, 10)
    assert stopped.is_set() and starts == [1]
    assert [e["task"] for e in logs if e["event"] == "background_task_failed" and e["vital"]] == ["read-worker"]
