"""arq's Worker as memfleet runs it: what the worker takes from arq beyond its public API.

The worker-side twin of `producer.arq_adapter` (which checks the pinned arq version on import, for
both), for arq 0.28.0 only; tests/test_arq_adapter.py states what it relies on:

- `Worker.start_jobs`' slot accounting (`job_counter`, `sem`), which `FleetWorker` repairs;
- `Worker.main`, which `DoorbellWorker` replaces with a copy that waits on a doorbell;
- `Worker.handle_sig_wait_for_completion` and `Worker.handle_sig`, the signal handlers, which
  `FleetWorker` wraps to tell the process that a shutdown began (`on_signal`), and which `drain`
  calls to stop a worker that handles no signals (the read worker);
- the record a job body holds (`{"t", "f", "a", "k", "et"}`), which `screening_deserializer`
  checks, and replaces with a call of the refusal function when a body must not run.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from signal import Signals
from typing import Any

import structlog
from arq.utils import timestamp_ms
from arq.worker import Worker
from redis.exceptions import WatchError

import producer.arq_adapter  # noqa: F401  (its import refuses an arq other than the pinned one)

log = structlog.get_logger("memfleet.worker")


# What a screen is given, `(function, args, kwargs)`; it raises ValueError, with a reason safe to
# log and to keep, for a call the worker must not run.
Screen = Callable[[str, list[Any], dict[str, Any]], None]


def screening_deserializer(
    loads: Callable[[bytes], Any], screen: Screen, refuse: str
) -> Callable[[bytes], dict[str, Any]]:
    """A Worker's `job_deserializer` that hands arq only calls it may run.

    A body that `loads` cannot decode, that is not arq's job record, or whose call `screen`
    rejects, is handed to arq as a call of the function `refuse` instead, with one argument:
    `{"function": the name the body gave, if it is a short string, "reason": why}`. arq then runs
    `refuse` under the job's id, tries and clean-up, so the refusal is recorded like a job's end,
    while the function the body named never runs. Without this, arq fails an undecodable job in
    its own code, where nothing of ours can dead-letter or count it. Nothing of the body but its
    size is passed on: it came from Redis, and may be anything.
    """

    def deserialize(raw: bytes) -> dict[str, Any]:
        function: Any = None
        try:
            body = loads(raw)
        except Exception as exc:  # whatever the body is, it must not get past here
            reason = f"the body does not decode ({exc.__class__.__name__})"
        else:
            if not _is_job_record(body):
                reason = "the body is not an arq job record"
            else:
                function = body["f"]
                try:
                    screen(function, body["a"], body["k"])
                    return body  # type: ignore[no-any-return]
                except ValueError as exc:
                    reason = str(exc)
                except Exception as exc:  # a screen's own bug refuses the job too, rather than letting it by
                    reason = f"the screen failed ({exc.__class__.__name__})"
        refusal = {"function": function if isinstance(function, str) and len(function) <= 64 else None,
                   "reason": f"{reason}; {len(raw)} bytes"}
        return {"t": None, "f": refuse, "a": [refusal], "k": {}, "et": timestamp_ms()}

    return deserialize


def _is_job_record(body: Any) -> bool:
    # What arq 0.28.0's `serialize_job` writes and `Worker.run_job` reads back.
    return (isinstance(body, dict) and isinstance(body.get("f"), str) and isinstance(body.get("a"), list)
            and isinstance(body.get("k"), dict) and isinstance(body.get("et"), int)
            and (body.get("t") is None or isinstance(body.get("t"), int)))



class FleetWorker(Worker):
    """arq's Worker, made to survive a Redis connection that drops while it claims a job, and
    not to re-check the jobs it is running itself on every poll.

    `on_signal` is called with the signal that starts a shutdown (SIGTERM, SIGINT), before arq's
    own handling of it: arq's wait for running jobs is bounded, but what follows it (closing its
    Redis connection, the shutdown hook) is not, so the process needs a clock of its own.
    """

    def __init__(self, *args: Any, on_signal: Callable[[int], None] | None = None, **kwargs: Any) -> None:
        self.on_signal = on_signal  # before arq's __init__, which installs the signal handlers
        super().__init__(*args, **kwargs)

    def drain(self) -> None:
        """Stop taking jobs, give running ones `job_completion_wait` seconds, then cancel what is
        left; `async_run` returns then. What SIGTERM does to a worker that handles signals."""
        self.handle_sig_wait_for_completion(signal.SIGTERM)

    def handle_sig_wait_for_completion(self, signum: Signals) -> None:
        if self.on_signal is not None:
            self.on_signal(signum)
        super().handle_sig_wait_for_completion(signum)

    def handle_sig(self, signum: Signals) -> None:
        if self.on_signal is not None:
            self.on_signal(signum)
        super().handle_sig(signum)

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        # Running jobs stay at the head of the queue until they finish, and arq checks each id it
        # reads (WATCH, EXISTS, ZSCORE, UNWATCH) on every poll: a long drain costs ~200 round trips
        # a second, and the GIL time they take is taken from the encoder thread.
        job_ids = [j for j in job_ids if j.decode() not in self.tasks]
        try:
            await super().start_jobs(job_ids)
        except WatchError:
            # redis-py raises WatchError when the connection drops under arq's WATCH. arq has then
            # taken a job slot for the job it was claiming and lets the error end the worker.
            # Give the slot back; the job is still queued and the next poll claims it.
            self.job_counter -= 1
            self.sem.release()
            log.warning("redis_connection_lost", during="claiming a job")


class DoorbellWorker(FleetWorker):
    """A FleetWorker that waits on a Redis list between polls instead of a timer.

    The producer pushes a token onto `doorbell` with each job (`producer.doorbell.ring`), so the
    worker claims a read the moment it is queued rather than at its next poll; it also polls when
    one of its jobs ends, to fill the freed slot. `idle_poll` bounds the wait, so a job queued
    without a token (by hand, or a retry arq deferred) still starts.
    """

    def __init__(self, *args: Any, doorbell: str, idle_poll: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.doorbell = doorbell
        self.idle_poll = idle_poll
        # One BLPOP in flight at a time, kept across waits: cancelling it would cost a reconnect.
        self._ring: asyncio.Task[Any] | None = None
        # Set when one of our jobs ends. An event rather than the job tasks themselves: a job that
        # ends while we poll is pruned from `tasks` by that same poll, and would wake nobody.
        self._slot_freed = asyncio.Event()

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        await super().start_jobs(job_ids)
        for job_id in job_ids:
            task = self.tasks.get(job_id.decode())
            if task is not None:
                task.add_done_callback(lambda _: self._slot_freed.set())

    async def main(self) -> None:
        # arq's Worker.main minus start-up hooks (this Worker gets its pool and ctx from the bulk
        # Worker), with the fixed sleep between polls replaced by `_wait_for_work`.
        self.ctx["redis"] = self.pool
        try:
            while True:
                await self._poll_iteration()
                await self._wait_for_work()
        finally:
            if self._ring is not None:
                self._ring.cancel()

    async def _wait_for_work(self) -> None:
        if not self.allow_pick_jobs:  # shutting down: arq's own wait for running jobs ends main()
            await asyncio.sleep(self.poll_delay_s)
            return
        if self._ring is None:
            self._ring = asyncio.create_task(self.pool.blpop([self.doorbell], timeout=self.idle_poll))  # type: ignore[arg-type]
        freed = asyncio.create_task(self._slot_freed.wait())
        try:
            await asyncio.wait([self._ring, freed], timeout=self.idle_poll + 1, return_when=asyncio.FIRST_COMPLETED)
        finally:
            freed.cancel()
        self._slot_freed.clear()  # the poll that follows fills whatever slot freed
        if self._ring.done():
            ring, self._ring = self._ring, None
            if ring.exception() is not None:
                await asyncio.sleep(self.poll_delay_s)  # Redis is away: the next poll reports it or reconnects
