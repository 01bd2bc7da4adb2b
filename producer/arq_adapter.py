"""Everything memfleet takes from arq beyond its public API, in one place, for arq 0.28.0 only.

arq's maintainers have declared it maintenance-only (arq #510), so our dependence on its insides
is kept small and visible here, and tests/test_arq_adapter.py states it as a contract:

- the Redis key prefixes arq keeps jobs under (`arq.constants`), for forget's clean-up;
- the two commands `ArqRedis.enqueue_job` sends, issued inside our own MULTI/EXEC (`queue_job`),
  or, for many writes at once, inside one Lua script (`WriteEnqueuer`);
- `Worker.start_jobs`' slot accounting (`job_counter`, `sem`), which `FleetWorker` repairs;
- `Worker.main`, which `DoorbellWorker` replaces with a copy that waits on a doorbell;
- `Worker.handle_sig_wait_for_completion` and `Worker.handle_sig`, the signal handlers, which
  `FleetWorker` wraps to tell the process that a shutdown began (`on_signal`);
- the record a job body holds (`{"t", "f", "a", "k", "et"}`), which `screening_deserializer`
  checks, and replaces with a call of the refusal function when a body must not run.

This module is in `producer` because workers import producer and never the reverse.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from importlib.metadata import version
from signal import Signals
from typing import Any

import msgpack  # type: ignore[import-untyped]
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix, retry_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms
from arq.worker import Worker
from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, WatchError

ARQ_VERSION = "0.28.0"

ARQ_JOB = job_key_prefix
ARQ_RESULT = result_key_prefix
ARQ_IN_PROGRESS = in_progress_key_prefix
ARQ_RETRY = retry_key_prefix


def check_version(installed: str) -> None:
    if installed != ARQ_VERSION:
        raise ImportError(
            f"memfleet needs arq=={ARQ_VERSION} (it relies on arq's internals, see producer/arq_adapter.py); "
            f"arq {installed} is installed: pip install 'arq=={ARQ_VERSION}'"
        )


check_version(version("arq"))


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


def queue_job(pipe: Pipeline, redis: ArqRedis, function: str, args: tuple[Any, ...], job_id: str, queue: str) -> None:
    """Add the commands that put job `job_id` on `queue` to `pipe` (a transaction of `redis`).

    arq's `enqueue_job` checks for an existing job under a WATCH. When the connection drops under
    that WATCH (a Redis restart), redis-py raises WatchError, which arq reads as "already queued"
    and answers None: the job is silently lost. Our job ids are fresh, so that check buys nothing;
    queueing the job in the caller's transaction means it is accepted with the caller's records,
    or not at all. These are the two commands `ArqRedis.enqueue_job` sends.
    """
    now = timestamp_ms()
    body = serialize_job(function, args, {}, None, now, serializer=redis.job_serializer)
    pipe.psetex(ARQ_JOB + job_id, redis.expires_extra_ms, body)
    pipe.zadd(queue, {job_id: now})


# KEYS[1]: the queue. ARGV: job-set TTL (ms), job-set size, arq job TTL (ms), enqueue time (ms), then
# the writes as one MessagePack array of [log key, job-set key, arq job key, op JSON, op id, job body].
# One argument for all of them, because redis-py packs each argument in Python; the per-write keys
# are not declared in KEYS, which only Redis Cluster needs, and arq does not run on Cluster.
# Per write it sends what `queue_job` and a write's transaction send (RPUSH, PSETEX, ZADD), and adds
# the op id to the user's job set, a sorted set by enqueue time that keeps the newest ids within
# the TTL only, however long the user writes.
_ENQUEUE_WRITES = """
local jobs_ttl, jobs_max, job_ttl, now = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local writes = cmsgpack.unpack(ARGV[5])
for _, w in ipairs(writes) do
  redis.call('rpush', w[1], w[4])
  redis.call('zadd', w[2], now, w[5])
  redis.call('zremrangebyscore', w[2], '-inf', '(' .. string.format('%d', now - jobs_ttl))
  redis.call('zremrangebyrank', w[2], 0, -jobs_max - 1)
  redis.call('pexpire', w[2], jobs_ttl)
  redis.call('psetex', w[3], job_ttl, w[6])
  redis.call('zadd', KEYS[1], now, w[5])
end
return #writes
"""


class WriteEnqueuer:
    """Puts writes into their users' logs and their jobs on a queue, in one step: all or none.

    With `wait_replicas`, each step is followed by Redis's WAIT on the same connection: `enqueue`
    returns once that many replicas have the writes too, or `wait_timeout` seconds have passed, and
    says how many did.
    """

    def __init__(self, redis: ArqRedis, queue: str, function: str, user_jobs_ttl: int, user_jobs_max: int,
                 wait_replicas: int = 0, wait_timeout: float = 1.0) -> None:
        self.redis = redis
        self.queue = queue
        self.function = function
        self.user_jobs_ttl = user_jobs_ttl  # seconds an op id stays in its user's job set
        self.user_jobs_max = user_jobs_max  # op ids a user's job set keeps, the newest
        self.wait_replicas = wait_replicas
        self.wait_timeout = wait_timeout
        self._script: AsyncScript = redis.register_script(_ENQUEUE_WRITES)

    async def enqueue(self, writes: Sequence[tuple[str, str, str, str | bytes, tuple[Any, ...]]]) -> int:
        """`writes`: (log key, job-set key, job id, the op as JSON, the job's arguments), in order.
        Returns how many replicas acknowledged them (0 when not asked to wait)."""
        now = timestamp_ms()
        serializer = self.redis.job_serializer
        packed = msgpack.packb(
            [(log_key, jobs_key, ARQ_JOB + job_id, op_json, job_id,
              serialize_job(self.function, args, {}, None, now, serializer=serializer))
             for log_key, jobs_key, job_id, op_json, args in writes],
            use_bin_type=False,  # Redis's Lua MessagePack reads only the original string type
        )
        args = [self.user_jobs_ttl * 1000, self.user_jobs_max, self.redis.expires_extra_ms, now, packed]
        if not self.wait_replicas:
            await self._script(keys=[self.queue], args=args)
            return 0
        try:
            return await self._run_and_wait(args)
        except NoScriptError:
            # The pipeline was re-sent to a new primary (a failover) that does not have the script yet:
            # it ran nowhere. Sending it again loads the script first.
            return await self._run_and_wait(args)

    async def _run_and_wait(self, args: list[Any]) -> int:
        # One pipeline, so one connection: WAIT counts the replicas that have this connection's writes.
        # Were the connection to break, the pipeline is re-sent whole, on a new connection.
        async with self.redis.pipeline(transaction=False) as pipe:
            await self._script(keys=[self.queue], args=args, client=pipe)
            pipe.wait(self.wait_replicas, int(self.wait_timeout * 1000))
            _, replicas = await pipe.execute()
        return int(replicas)


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
            # Imported here: the producer imports this module too, and has no use for structlog.
            import structlog

            structlog.get_logger("memfleet.worker").warning("redis_connection_lost", during="claiming a job")


class DoorbellWorker(FleetWorker):
    """A FleetWorker that waits on a Redis list between polls instead of a timer.

    The producer pushes a token onto `doorbell` with each job (`producer.enqueue.ring`), so the
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
