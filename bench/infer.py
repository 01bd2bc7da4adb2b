"""9. Fact extraction (`infer=True`) across 200 users: does the LLM's latency stay hidden?

One worker at default settings (64 writes at a time) behind a private redis-server, its LLM the
stand-in of the tests (tests/llm_standin.py, in this process: one fact per message). The same
writes (two LoCoMo turns each, `writes` per user, all submitted at once, round-robin over the
users) are stored by other users in each phase: once with `infer=False`, then `rounds` times each,
alternating, with `infer=True` and an LLM that answers at once and one that takes 500 ms a call
(the machine is shared: the best round of each is compared). Per phase: writes/s from submit to
the last outcome; that every write stored; that each user's prompts reached the LLM in the order
the user wrote; the mean number of jobs running (sampled every 0.5 s); and where the CPU went, per
write: the encoder threads' CPU time in the model, the rest of the worker process's CPU time
(Python: jobs, tokenizing, psycopg, the event loop, HTTP to the LLM) and PostgreSQL's processes'.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil  # type: ignore[import-untyped]

from bench.common import Row, row, say
from bench.fleet import wait_for_worker
from producer.client import Memfleet
from producer.contract import AddRequest, Message
from producer.ingest import read_messages
from producer.services import RedisServer, start_workers, stop_workers
from producer.settings import ProducerSettings
from tests.llm_standin import LlmStandIn
from workers.backends.pg_server import stop_embedded_postgres
from workers.observability import ENCODER_USE_INTERVAL

USERS = 200
LATENCIES = (0.0, 0.5)
PUBLISHED = ENCODER_USE_INTERVAL + 0.5  # a worker publishes its encoder counters this often, and then some


@dataclass(frozen=True)
class Phase:
    label: str
    writes: int
    seconds: float
    stored: int
    failed: int
    out_of_order: int  # users whose prompts reached the LLM out of their write order
    encoder_s: float  # CPU seconds of the worker's encoder threads in the model
    worker_cpu_s: float  # CPU seconds of the worker process (the encoder threads included)
    postgres_cpu_s: float
    running: float  # mean jobs in progress
    load: float  # the machine's 1-minute load average at the end

    @property
    def rate(self) -> float:
        return self.writes / self.seconds

    @property
    def per_cpu_second(self) -> float:
        """Writes per CPU second of the worker: what the rate would be with a core of its own."""
        return self.writes / self.worker_cpu_s

    def per_write_ms(self) -> str:
        python = max(self.worker_cpu_s - self.encoder_s, 0.0)
        return (f"CPU per write: encoder {self.encoder_s / self.writes * 1000:.1f} ms, rest of the worker "
                f"{python / self.writes * 1000:.1f} ms, PostgreSQL {self.postgres_cpu_s / self.writes * 1000:.1f} ms; "
                f"worker busy {self.worker_cpu_s / self.seconds:.0%} of a core, {self.running:.0f} jobs running "
                f"on average, load {self.load:.1f}")


async def run(files: list[Path], directory: Path, *, writes: int, rounds: int) -> list[Row]:
    turns = [entry.message for entry in read_messages(files, "locomo")]
    redis = RedisServer().start()
    procs: list[subprocess.Popen[bytes]] = []
    with LlmStandIn() as llm:
        env = {"REDIS_URL": redis.url, "MEMFLEET_DATA_DIR": str(directory), "MEMFLEET_LOG_LEVEL": "WARNING",
               "MEMFLEET_LLM_BASE_URL": llm.url}
        try:
            settings = ProducerSettings().model_copy(update={"redis_url": redis.url})
            async with await Memfleet.connect(settings) as fleet:
                procs = start_workers(1, env)
                await wait_for_worker(fleet, procs[0])
                phases = [await _phase(fleet, llm, procs[0].pid, directory, turns, writes, "plain", None)]
                for n in range(rounds):
                    for latency in LATENCIES:
                        phases.append(await _phase(fleet, llm, procs[0].pid, directory, turns, writes,
                                                   f"llm{latency * 1000:.0f}-r{n + 1}", latency))
        finally:
            await asyncio.to_thread(stop_workers, procs)
            stop_embedded_postgres(directory)
            redis.stop()
    return _rows(phases, writes)


def _requests(turns: list[Message], prefix: str, writes: int, infer: bool) -> list[AddRequest]:
    """`writes` adds per user of two turns each, round-robin over the users; each turn names its
    user and write (`[u007 w3]`), so that the LLM's prompts can be told apart and put in order."""
    requests = []
    for w in range(writes):
        for u in range(USERS):
            first = (u * writes + w) * 2
            said = [turns[(first + i) % len(turns)] for i in range(2)]
            requests.append(AddRequest(user_id=f"{prefix}-u{u:03d}", infer=infer, messages=[
                Message(role="user" if i == 0 else "assistant", content=f"[u{u:03d} w{w}] {m.content}",
                        timestamp=m.timestamp) for i, m in enumerate(said)]))
    return requests


async def _phase(fleet: Memfleet, llm: LlmStandIn, worker: int, directory: Path, turns: list[Message],
                 writes: int, label: str, latency: float | None) -> Phase:
    llm.reset()
    llm.latency = latency or 0.0
    requests = _requests(turns, f"bench-{label}", writes, infer=latency is not None)
    seen = len(llm.prompts)
    await asyncio.sleep(PUBLISHED)  # the encoder's counters as of now, the last phase's included
    encoder, cpu, postgres = await _encoder_cpu(fleet), _cpu(worker), _postgres_cpu(directory)
    started = time.perf_counter()
    running: list[int] = []
    sampler = asyncio.create_task(_sample_running(fleet, running))
    try:
        outcomes = await fleet.wait(await fleet.submit(requests), timeout=3600)
    finally:
        sampler.cancel()
    seconds = time.perf_counter() - started
    cpu, postgres = _cpu(worker) - cpu, _postgres_cpu(directory) - postgres
    await asyncio.sleep(PUBLISHED)
    encoder = await _encoder_cpu(fleet) - encoder
    failed = sum(1 for o in outcomes if o.error)
    phase = Phase(label, len(requests), seconds, sum(o.stored for o in outcomes), failed,
                  _out_of_order(llm, seen) if latency is not None else 0, encoder, cpu, postgres,
                  sum(running) / max(len(running), 1), os.getloadavg()[0])
    say(f"infer {label}: {phase.writes} writes in {seconds:.1f} s, {phase.rate:.1f}/s, {phase.stored} memories, "
        f"{failed} failed; {phase.per_write_ms()}")
    return phase


async def _sample_running(fleet: Memfleet, into: list[int]) -> None:
    while True:
        await asyncio.sleep(0.5)
        into.append((await fleet.stats()).in_progress)


def _out_of_order(llm: LlmStandIn, seen: int) -> int:
    order: dict[str, list[int]] = {}
    for prompt in llm.prompts[seen:]:
        role_content = prompt.new_messages()
        if role_content:
            tag = role_content[0][1].split("]", 1)[0].lstrip("[")  # "u007 w3"
            user, write = tag.split()
            order.setdefault(user, []).append(int(write[1:]))
    return sum(1 for seq in order.values() if seq != sorted(seq))


async def _encoder_cpu(fleet: Memfleet) -> float:
    return sum(u.bulk.cpu_seconds + u.query.cpu_seconds for u in (await fleet.encoder_use()).values())


def _cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def _postgres_cpu(directory: Path) -> float:
    """CPU seconds of the embedded PostgreSQL's processes so far (the pool keeps its backends)."""
    try:
        postmaster = psutil.Process(int((directory / "pg" / "postmaster.pid").read_text().split("\n", 1)[0]))
        total = 0.0
        for proc in [postmaster, *postmaster.children(recursive=True)]:
            times = proc.cpu_times()
            total += times.user + times.system
        return total
    except (OSError, ValueError, psutil.Error):
        return 0.0


def _rows(phases: list[Phase], writes: int) -> list[Row]:
    plain, inferred = phases[0], phases[1:]
    shape = f"{USERS} users x {writes} writes of 2 LoCoMo turns, submitted at once"
    rows = [
        row("infer", "infer=False writes/s (same messages)", plain.rate, "writes/s",
            notes=f"{shape}; {plain.stored} memories, {plain.failed} failed, {plain.seconds:.1f} s; "
                  f"{plain.per_write_ms()}"),
    ]
    best = {}
    for latency in LATENCIES:
        label = f"llm{latency * 1000:.0f}-"
        rounds = [p for p in inferred if p.label.startswith(label)]
        best[latency] = top = max(rounds, key=lambda p: p.rate)
        rates = ", ".join(f"{p.rate:.1f}" for p in rounds)
        rows.append(row("infer", f"inferred writes/s, LLM {latency * 1000:.0f} ms", top.rate, "writes/s",
                        notes=f"{shape}; best of {len(rounds)} rounds ({rates}); {top.stored} facts, "
                              f"{sum(p.failed for p in rounds)} failed in all rounds; {top.per_write_ms()}"))
    instant, slow = best[0.0], best[0.5]
    rows += [
        row("infer", "inferred writes/s: LLM 500 ms / 0 ms", slow.rate / instant.rate, "x", at_least=0.8,
            notes="the LLM's latency hidden by concurrency (64 writes at a time per worker)"),
        row("infer", "inferred writes per worker CPU-second: LLM 500 ms / 0 ms",
            slow.per_cpu_second / instant.per_cpu_second, "x",
            notes=f"{slow.per_cpu_second:.1f} and {instant.per_cpu_second:.1f} writes per CPU-second: the same work "
                  f"per write whatever the LLM's latency; {slow.writes * 0.5 / slow.seconds:.1f} writes waited on "
                  f"the LLM at a time, of {slow.running:.0f} jobs running (the rates above follow the CPU the "
                  "worker got on a shared machine)"),
        row("infer", "inferred / infer=False writes/s (LLM 0 ms)", instant.rate / plain.rate, "x",
            notes="what extraction costs beside the LLM: a second encode (the context query) and one of the "
                  "facts, the context search, two more commits"),
        row("infer", "users whose writes reached the LLM out of order", sum(p.out_of_order for p in inferred), "",
            at_most=0, notes=f"of {USERS} users in each of the {len(inferred)} inferred phases"),
    ]
    return rows
