"""The contract between memfleet and arq's insides (producer/arq_adapter.py for the producer,
workers/arq_worker.py for the worker): if arq changes under us, these fail first and say where."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
from typing import Any

import pytest
from arq import func
from arq.jobs import Job, deserialize_job_raw, serialize_job
from arq.worker import Worker

from producer import wire
from producer.arq_adapter import ARQ_JOB, ARQ_RESULT, ARQ_VERSION, check_version, queue_job
from producer.redis_pool import redis_pool
from producer.services import RedisServer
from producer.settings import ProducerSettings
from tests.support import eventually
from workers.arq_worker import FleetWorker, screening_deserializer

# sha256 of arq 0.28.0's `Worker.main` source, which DoorbellWorker.main replaces with a copy.
WORKER_MAIN_SHA256 = "45ca1591c9717466eec76e17fa958f84acf6085103d692a84ee25d9904e7f8fc"


def test_the_pinned_arq_is_installed_and_another_is_refused() -> None:
    check_version(ARQ_VERSION)
    with pytest.raises(ImportError, match=r"arq==0\.28\.0"):
        check_version("0.29.0")


def test_doorbell_worker_copies_the_main_loop_of_this_arq() -> None:
    source = inspect.getsource(Worker.main)
    assert hashlib.sha256(source.encode()).hexdigest() == WORKER_MAIN_SHA256, (
        "arq's Worker.main changed: bring DoorbellWorker.main in line with it, then update the hash"
    )


def test_fleet_worker_relies_on_arqs_slot_accounting() -> None:
    worker = FleetWorker(functions=[func(_noop, name="noop")], redis_settings=None, handle_signals=False)
    assert isinstance(worker.job_counter, int) and isinstance(worker.sem, asyncio.Semaphore)
    assert isinstance(worker.tasks, dict)


async def _noop(ctx: dict[str, Any]) -> None:
    return None


def test_screening_reads_arqs_job_record_and_answers_with_one() -> None:
    """arq 0.28.0's `run_job` unpacks what the job deserializer returns as its own job record."""

    def screen(function: str, args: list[Any], kwargs: dict[str, Any]) -> None:
        if function != "noop":
            raise ValueError("not noop")

    deserialize = screening_deserializer(wire.loads, screen, "refuse")
    body = serialize_job("noop", ("a", 1), {"b": 2}, 3, 1234, serializer=wire.dumps)
    function, args, kwargs, job_try, enqueued = deserialize_job_raw(body, deserializer=deserialize)
    assert (function, list(args), kwargs, job_try, enqueued) == ("noop", ["a", 1], {"b": 2}, 3, 1234)
    other = serialize_job("other", (), {}, None, 1234, serializer=wire.dumps)
    function, args, kwargs, job_try, _ = deserialize_job_raw(other, deserializer=deserialize)
    assert function == "refuse" and not kwargs and job_try is None
    assert list(args) == [{"function": "other", "reason": f"not noop; {len(other)} bytes"}]


async def test_a_job_queued_in_our_transaction_is_one_arq_reads_and_runs() -> None:
    server = RedisServer().start()
    ran: list[tuple[str, int]] = []

    async def note(ctx: dict[str, Any], word: str, number: int) -> None:
        ran.append((word, number))

    try:
        pool = redis_pool(ProducerSettings(redis_url=server.url))
        try:
            async with pool.pipeline(transaction=True) as pipe:
                queue_job(pipe, pool, "note", ("hello", 7), "job-1", "q")
                await pipe.execute()
            # arq's own keys and its own reader agree with what we wrote.
            assert await pool.exists(ARQ_JOB + "job-1")
            info = await Job("job-1", pool, _queue_name="q", _deserializer=wire.loads).info()
            assert info is not None and (info.function, list(info.args)) == ("note", ["hello", 7])
            worker = FleetWorker(functions=[func(note, name="note")], queue_name="q", redis_pool=pool,
                                 burst=True, poll_delay=0.01, handle_signals=False, keep_result=5,
                                 job_serializer=wire.dumps, job_deserializer=wire.loads)
            await asyncio.wait_for(worker.main(), 30)
            assert ran == [("hello", 7)]
            assert await pool.exists(ARQ_RESULT + "job-1"), "results live under arq's result prefix"
        finally:
            await pool.aclose()
    finally:
        server.stop()


class DroppingProxy:
    """A TCP proxy in front of a real redis-server that cuts the client's connection the first
    time it sends a command containing all of `trigger`: a Redis restart at that exact moment."""

    def __init__(self, upstream_port: int, *trigger: bytes) -> None:
        self.upstream_port, self.trigger, self.dropped = upstream_port, trigger, 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter, watch: bool) -> None:
            while data := await r.read(65536):
                if watch and not self.dropped and all(t in data for t in self.trigger):
                    self.dropped += 1
                    break
                w.write(data)
                await w.drain()
            client_w.close()
            server_w.close()

        await asyncio.gather(pump(client_r, server_w, True), pump(server_r, client_w, False),
                             return_exceptions=True)


async def test_worker_survives_a_connection_dropped_while_it_claims_a_job() -> None:
    ran: list[str] = []

    async def note(ctx: dict[str, object], value: str) -> None:
        ran.append(value)

    redis = RedisServer().start()
    # arq claims a job with WATCH in-progress key, EXISTS in-progress key, ZSCORE, MULTI/EXEC.
    proxy = DroppingProxy(redis.port, b"EXISTS", b"arq:in-progress:")
    try:
        async with proxy as url:
            pool = redis_pool(ProducerSettings(redis_url=url))
            await pool.enqueue_job("note", "once", _queue_name="q")
            # One job slot: had the dropped claim kept it, the job could never start.
            worker = FleetWorker(functions=[func(note, name="note")], queue_name="q", redis_pool=pool,
                                 burst=True, max_jobs=1, poll_delay=0.01, handle_signals=False,
                                 job_serializer=wire.dumps, job_deserializer=wire.loads)
            await asyncio.wait_for(worker.main(), 30)  # stock arq's Worker dies here with WatchError
            await pool.aclose()
        assert proxy.dropped == 1, "the connection was never cut where it matters"
        assert ran == ["once"]
    finally:
        redis.stop()


async def test_worker_does_not_recheck_the_job_it_is_running() -> None:
    """arq re-checks every queued id on each poll, the running ones too (WATCH, EXISTS, ZSCORE):
    with long drains that was ~1,400 commands a second, taken out of the encoder's GIL time."""
    started, release = asyncio.Event(), asyncio.Event()

    async def hold(ctx: dict[str, object]) -> None:
        started.set()
        await release.wait()

    redis = RedisServer().start()
    try:
        pool = redis_pool(ProducerSettings(redis_url=redis.url))
        await pool.enqueue_job("hold", _queue_name="q")
        worker = FleetWorker(functions=[func(hold, name="hold")], queue_name="q", redis_pool=pool,
                             poll_delay=0.01, handle_signals=False, job_serializer=wire.dumps,
                             job_deserializer=wire.loads)
        running = asyncio.create_task(worker.main())
        try:
            await asyncio.wait_for(started.wait(), 10)
            before, polls = await _calls(pool, "watch"), await _calls(pool, "zrangebyscore")

            async def polled() -> bool:
                return await _calls(pool, "zrangebyscore") >= polls + 50

            # Each poll reads the running job's id from the queue again.
            await eventually(polled, 30, "the worker to poll the queue 50 times")
            checks = await _calls(pool, "watch") - before
            release.set()
            await eventually(lambda: worker.jobs_complete == 1, 10, "the held job to finish")
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
            await pool.aclose()
        assert checks == 0, f"the worker re-checked its own running job {checks} times in 50 polls"
    finally:
        redis.stop()


async def _calls(pool: Any, command: str) -> int:
    stats = await pool.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))
