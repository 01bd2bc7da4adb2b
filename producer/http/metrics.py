"""`GET /metrics`: Prometheus text, for an app key only (Prometheus: `authorization: {type: Token}`).

Fleet-wide numbers (jobs by kind and outcome, queue depth, oldest job, live workers, dead
letters, foreign results dropped, each worker's encoder counters) are read from Redis at scrape
time, so any API process gives the same answer. Latency is what callers of this process waited,
per job kind and outcome. User ids never become labels; key names and worker names do (there are
few, and operators chose them or run them).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from producer import counters
from producer.client import EncoderUse, FleetStats
from producer.errors import NoWorkerError, WriteTimeout
from producer.http.auth import Principal, principal

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class FleetCollector(Collector):
    """Turns the last `FleetStats` read into metric families."""

    def __init__(self) -> None:
        self.stats: FleetStats | None = None
        self.encoders: dict[str, EncoderUse] = {}

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        if stats is None:
            return
        jobs = CounterMetricFamily("memfleet_jobs", "Jobs run by the workers, by kind and outcome",
                                   labels=["kind", "outcome"])
        for job, runs in sorted(counters.jobs(stats.counters).items()):
            jobs.add_metric([job.kind, job.outcome], runs)
        yield jobs
        depth = GaugeMetricFamily("memfleet_queue_depth", "Jobs waiting in each queue", labels=["queue"])
        for queue, count in stats.queued.items():
            depth.add_metric([queue], count)
        yield depth
        yield GaugeMetricFamily("memfleet_oldest_queued_seconds", "Age of the oldest waiting job (0: none)",
                                value=stats.oldest_queued_seconds or 0.0)
        yield GaugeMetricFamily("memfleet_jobs_in_progress", "Jobs being run now", value=stats.in_progress)
        yield GaugeMetricFamily("memfleet_live_workers", "Worker processes with a fresh health check",
                                value=len(stats.workers))
        yield GaugeMetricFamily("memfleet_dead_letters", "Dead letters: writes that could not be applied, refused jobs",
                                value=stats.dead_letters)
        yield CounterMetricFamily("memfleet_foreign_results_dropped", "Results of another user dropped by a worker",
                                  value=stats.foreign_dropped)
        yield from self._encoders()
        yield from _llm(stats.counters)

    def _encoders(self) -> Iterator[Metric]:
        # Counters since each worker started, per worker: a restart is a new series, which
        # Prometheus's rate() expects; summing the fleet here would go backwards on a restart.
        labels = ["worker", "encoder"]
        busy = CounterMetricFamily(
            "memfleet_encoder_busy_seconds",
            "Seconds an encoder thread spent in the model; rate() is its utilisation (0 to 1)", labels=labels)
        cpu = CounterMetricFamily(
            "memfleet_encoder_cpu_seconds",
            "CPU seconds an encoder thread spent in the model (busy seconds less waits for a core)", labels=labels)
        texts = CounterMetricFamily("memfleet_encoder_texts", "Texts an encoder thread embedded", labels=labels)
        batches = CounterMetricFamily("memfleet_encoder_batches", "Model calls of an encoder thread", labels=labels)
        for worker, use in self.encoders.items():
            for encoder, counts in (("bulk", use.bulk), ("query", use.query)):
                busy.add_metric([worker, encoder], counts.busy_seconds)
                cpu.add_metric([worker, encoder], counts.cpu_seconds)
                texts.add_metric([worker, encoder], counts.texts)
                batches.add_metric([worker, encoder], counts.batches)
        yield from (busy, cpu, texts, batches)
        yield from _search_indexes(self.encoders)


def _search_indexes(workers: dict[str, EncoderUse]) -> Iterator[Metric]:
    """Each worker's search indexes in memory, and how its searches were ranked."""
    held = GaugeMetricFamily("memfleet_search_index_held", "Users whose search index a worker holds in memory",
                             labels=["worker"])
    size = GaugeMetricFamily("memfleet_search_index_bytes", "Memory of a worker's search indexes", labels=["worker"])
    reads = CounterMetricFamily("memfleet_search_index_reads", "Search indexes a worker read", labels=["worker"])
    ranked = CounterMetricFamily("memfleet_searches", "Searches a worker ranked, from a held index (memory) "
                                 "or by the SQL statement (sql)", labels=["worker", "ranked"])
    for worker, use in workers.items():
        held.add_metric([worker], use.search.held)
        size.add_metric([worker], use.search.bytes)
        reads.add_metric([worker], use.search.reads)
        ranked.add_metric([worker, "memory"], use.search.in_memory)
        ranked.add_metric([worker, "sql"], use.search.in_sql)
    yield from (held, size, reads, ranked)


def _llm(fleet: dict[str, int]) -> Iterator[Metric]:
    """The LLM of fact extraction (`infer=True`), fleet-wide: calls, latency, errors, tokens."""
    llm = counters.LLMCounts.parse(fleet)
    yield CounterMetricFamily("memfleet_llm_calls", "Calls to the LLM of fact extraction, answered or failed",
                              value=llm.calls)
    errors = CounterMetricFamily("memfleet_llm_errors", "LLM calls that failed, and answers that did not parse, "
                                 "by reason", labels=["reason"])
    for reason in counters.LLM_ERROR_REASONS:
        errors.add_metric([reason], llm.errors.get(reason, 0))
    yield errors
    tokens = CounterMetricFamily("memfleet_llm_tokens", "Tokens the LLM reported using, by kind", labels=["kind"])
    tokens.add_metric(["prompt"], llm.prompt_tokens)
    tokens.add_metric(["completion"], llm.completion_tokens)
    yield tokens
    cumulative, buckets = 0, []
    for bound in counters.LLM_LATENCY_BUCKETS:
        cumulative += llm.latency.get(f"{bound:g}", 0)
        buckets.append((f"{bound:g}", cumulative))
    yield HistogramMetricFamily("memfleet_llm_latency_seconds", "Seconds each LLM call took",
                                buckets=[*buckets, ("+Inf", llm.calls)], sum_value=llm.latency_ms / 1000)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.fleet = FleetCollector()
        self.registry.register(self.fleet)
        self.job_seconds = Histogram(
            "memfleet_api_job_seconds", "Seconds callers of this API process waited for a job, by kind and outcome",
            ["kind", "outcome"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.scope_refused = Counter(
            "memfleet_api_scope_refused", "Requests of a user key that named another user (answered 403)",
            ["key"], registry=self.registry,
        )


router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, who: Annotated[Principal, Depends(principal)]) -> Response:
    if who.key.kind != "app":
        return JSONResponse({"kind": "forbidden", "detail": "metrics need an app key"}, status_code=403)
    state: Metrics = request.app.state.metrics
    fleet = request.app.state.fleet
    stats, encoders = await fleet.stats(), await fleet.encoder_use()
    # Set together after the awaits, and rendered without one: a concurrent scrape cannot mix in its own.
    state.fleet.stats, state.fleet.encoders = stats, encoders
    return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)


@contextlib.contextmanager
def timed(request: Request, kind: str) -> Iterator[None]:
    """Record how long the caller waited for a job of `kind`, and how it ended."""
    start = time.perf_counter()
    outcome = "ok"
    try:
        yield
    except (NoWorkerError, WriteTimeout):
        outcome = "timeout"
        raise
    except Exception:
        outcome = "error"
        raise
    finally:
        state: Metrics = request.app.state.metrics
        state.job_seconds.labels(kind=kind, outcome=outcome).observe(time.perf_counter() - start)
