"""`python -m bench [--quick] [--only NAME] [--out FILE]`: memfleet's benchmarks side by side, one table.

ingest  1a raw MiniLM encode, 1b mem0 AsyncMemory direct, 1c `memfleet ingest` with one worker, and ratios;
        1d what retrieval indexing adds to the cost of storing a message
search  2  enqueue → answer latency, idle and during a bulk ingest (same worker as 1c); searches/s, 64 at once
scale   3  memfleet's per-user ranking query at 10k and 1M rows
memory  4  the worker's RSS after start-up and during the ingest of 1c
recall  5  LoCoMo evidence recall@1/5/10/20: memfleet's search (with 2), stock mem0 search and plain BM25
stream  6  `memfleet ingest` streaming 1M and 5M generated lines into Redis: peak RSS, first job, enqueue rate
million 7  1M messages of 200,000 users through `memfleet ingest --wait` and one worker, counted after (~20 min)
users   8  one add each for 100,000 users through one worker: Redis keys and bytes per user, PostgreSQL
           bytes per memory
infer   9  inferred writes/s of 200 users against a stand-in LLM at 0 and 500 ms, beside infer=False of the
           same messages; per-user order; encoder, worker and PostgreSQL time per write
replicas 10 enqueue latency and rate when each enqueue waits for a replica (Redis WAIT), against none
heavy   11 search of one user with 20,000 and 100,000 short memories over 40 words: queue, SQL, in memory

Each benchmark starts what it needs (redis-server, worker, embedded PostgreSQL) in a temporary directory
and stops it afterwards. `--quick` runs small versions (one LoCoMo file, 100k rows, 2,000 users) to check it all works.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import psutil  # type: ignore[import-untyped]

from bench.common import SECTIONS, Row, Skipped, locomo_files, note, row, say
from producer.cores import usable_cores
from workers.process import set_up_process
from workers.settings import WorkerConfig


@dataclass(frozen=True)
class Scale:
    """How much each benchmark does: the full run, or `--quick`."""

    locomo_files: int  # LoCoMo conversations ingested (there are 7)
    mem0_limit: int  # texts mem0 direct adds at most (it is slow) ...
    mem0_seconds: float  # ... or for at most this long
    searches: int  # sequential searches per phase (idle, during ingest)
    big_user: int  # memories of the one user whose search latency is measured at size (0: not measured)
    table_sizes: tuple[int, int]
    table_queries: int  # per-user searches per table size
    fill_seconds: float
    stream_lines: tuple[int, ...]  # lines of each generated JSONL file streamed into Redis
    million_lines: int  # messages ingested end to end, through a worker
    users: int  # users who each add one message, for what a user costs in Redis and PostgreSQL
    infer_writes: int  # writes per user (of 200) in each phase of the fact-extraction benchmark
    heavy_sizes: tuple[int, ...]  # memories of the one heavy user, measured at each size
    heavy_queries: int


FULL = Scale(locomo_files=7, mem0_limit=1000, mem0_seconds=120, searches=200, big_user=10_000,
             table_sizes=(10_000, 1_000_000), table_queries=500, fill_seconds=600,
             stream_lines=(1_000_000, 5_000_000), million_lines=1_000_000, users=100_000, infer_writes=5,
             heavy_sizes=(20_000, 100_000), heavy_queries=100)
QUICK = Scale(locomo_files=1, mem0_limit=1000, mem0_seconds=60, searches=50, big_user=0,
              table_sizes=(10_000, 100_000), table_queries=100, fill_seconds=120, stream_lines=(200_000,),
              million_lines=20_000, users=2_000, infer_writes=2, heavy_sizes=(5_000,), heavy_queries=20)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    scale = QUICK if args.quick else FULL
    started = time.perf_counter()
    load = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="memfleet-bench-"))
    # Before mem0 is imported (mem0 direct and the scale benchmark import it here).
    set_up_process(WorkerConfig(data_dir=tmp))
    os.environ.setdefault("TQDM_DISABLE", "1")  # model-loading progress bars would bury the progress lines
    try:
        rows = _run(args.only, scale, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    title = _header(args.quick, time.perf_counter() - started, load)
    table = f"{title}\n\n{_markdown(rows)}\n"
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table, encoding="utf-8")
    say(f"written to {args.out}")
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small versions of every benchmark (about a minute)")
    parser.add_argument("--only", action="append", metavar="NAME",
                        help=f"run only these ({', '.join(SECTIONS)}); repeat or separate with commas")
    parser.add_argument("--out", type=Path, metavar="FILE", default=Path(__file__).resolve().parent / "results.md",
                        help="where to write the table (default: bench/results.md)")
    args = parser.parse_args(argv)
    only = {name.strip() for value in args.only or [",".join(SECTIONS)] for name in value.split(",") if name.strip()}
    if unknown := only - set(SECTIONS):
        parser.error(f"unknown benchmark {', '.join(sorted(unknown))}: choose from {', '.join(SECTIONS)}")
    args.only = only
    return args


def _run(only: set[str], scale: Scale, tmp: Path) -> list[Row]:
    from bench import encode, fleet, heavy, index_cost, infer, mem0_direct, million, recall, replicas, stream, users
    from bench import scale as table_scale

    rows: list[Row] = []
    files: list[Path] = []
    if only & {"ingest", "search", "memory", "recall"}:
        try:
            files = locomo_files(scale.locomo_files)
        except Skipped as exc:
            rows.append(note("ingest", "LoCoMo benchmarks (ingest, search, memory)", f"skipped: {exc}"))
    if "ingest" in only and files:
        from producer.ingest import read_messages

        messages = list(read_messages(files, "locomo"))
        say(f"ingest: {len(messages):,} LoCoMo turns from {len(files)} file(s)")
        rows += _attempt("ingest", "raw encode", lambda: encode.run([m.content for _, m in messages]))
        rows += _attempt("ingest", "retrieval indexing cost", lambda: index_cost.run(files, tmp / "index-cost"))
        entries = [(u, m.model_dump(include={"role", "content", "name"}, exclude_none=True), m.metadata)
                   for u, m in messages]
        rows += _attempt("ingest", "mem0 AsyncMemory direct", lambda: asyncio.run(
            mem0_direct.run(entries, tmp / "mem0-direct", limit=scale.mem0_limit, seconds=scale.mem0_seconds)))
    if only & {"ingest", "search", "memory", "recall"} and files:
        rows += _attempt("ingest", "memfleet worker", lambda: asyncio.run(fleet.run(
            files, tmp / "fleet", ingest=bool(only & {"ingest", "memory"}), search=bool(only & {"search", "recall"}),
            searches=scale.searches, big_user=scale.big_user)))
    if "recall" in only and files:
        rows += _attempt("recall", "stock mem0 search", lambda: asyncio.run(recall.mem0_stock(files, tmp / "mem0")))
        rows += _attempt("recall", "plain BM25", lambda: recall.bm25(files))
    if "ingest" in only and files:
        rows += _ratios(rows)
    if "scale" in only:
        rows += _attempt("scale", "per-user search at scale", lambda: table_scale.run(
            tmp / "scale", sizes=scale.table_sizes, queries=scale.table_queries, fill_seconds=scale.fill_seconds))
    if "heavy" in only:
        rows += _attempt("heavy", "one user with many memories", lambda: heavy.run(
            tmp / "heavy", sizes=scale.heavy_sizes, queries=scale.heavy_queries))
    if "stream" in only:
        rows += _attempt("stream", "streaming ingest", lambda: stream.run(tmp / "stream", sizes=scale.stream_lines))
    if "million" in only:
        rows += _attempt("million", "a million messages end to end",
                         lambda: million.run(tmp / "million", lines=scale.million_lines))
    if "users" in only:
        rows += _attempt("users", "per-user cost", lambda: asyncio.run(users.run(
            locomo_files(scale.locomo_files), tmp / "users", users=scale.users)))
    if "infer" in only:
        rows += _attempt("infer", "fact extraction across 200 users", lambda: asyncio.run(infer.run(
            locomo_files(1), tmp / "infer", writes=scale.infer_writes, rounds=2 if scale is FULL else 1)))
    if "replicas" in only:
        rows += _attempt("replicas", "enqueue waiting for a replica", lambda: replicas.run(tmp / "replicas"))
    return sorted(rows, key=lambda r: SECTIONS.index(r.section))


def _attempt(section: str, what: str, benchmark: Callable[[], list[Row]]) -> list[Row]:
    """Run one benchmark; if it fails, say so in its row and go on with the others."""
    say(f"{what} ...")
    try:
        return benchmark()
    except Skipped as exc:
        return [note(section, what, f"skipped: {exc}")]
    except Exception as exc:
        traceback.print_exc()
        return [note(section, what, f"failed: {type(exc).__name__}: {exc}")]


def _ratios(rows: list[Row]) -> list[Row]:
    value = {r.metric: r.value for r in rows if r.value is not None}
    fleet = value.get("memfleet ingest (1 worker)")
    if fleet is None:
        return []
    result = []
    if (raw := value.get("raw encode (reference)")) is not None:
        result.append(row("ingest", "memfleet / raw encode", fleet / raw, "x", at_least=0.8,
                          notes="the reference: the best stock sentence-transformers encode here"))
        result.append(row("ingest", "moonshot: memfleet / raw encode above 1", fleet / raw, "x", at_least=1.0,
                          notes="through a faster runtime, embeddings within 1 - cos 1e-3 (row above)"))
    if (own := value.get("raw encode, the worker's encoders")) is not None:
        result.append(row("ingest", "memfleet / the worker's encoders alone", fleet / own, "x",
                          notes="what the rest of the pipeline costs"))
    if (direct := value.get("mem0 AsyncMemory direct")) is not None:
        result.append(row("ingest", "memfleet / mem0 direct", fleet / direct, "x", at_least=3))
    return result


def _header(quick: bool, seconds: float, load: float) -> str:
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
              if line.startswith("model name")] if cpuinfo.exists() else []
    cpu = models[0] if models else platform.processor() or platform.machine()
    flags = cpu_flags(cpuinfo)
    features = ", ".join(f"{name} {'yes' if flag in flags else 'no'}" for name, flag in CPU_FEATURES)
    took = f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.0f} s"
    return (
        f"**memfleet benchmarks{' (--quick)' if quick else ''}**, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: "
        f"{cpu} ({features}), {usable_cores()} CPUs, {psutil.virtual_memory().total / 2**30:.1f} GiB RAM, "
        f"Python {platform.python_version()}, torch {version('torch')}, mem0ai {version('mem0ai')}; "
        f"load average {load:.2f} at start; took {took}"
    )


# What decides how fast MiniLM encodes here: bf16 is native only with one of the first two.
CPU_FEATURES = (("AVX512-BF16", "avx512_bf16"), ("AMX-BF16", "amx_bf16"), ("AVX512F", "avx512f"))


def cpu_flags(cpuinfo: Path) -> set[str]:
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _markdown(rows: list[Row]) -> str:
    lines = ["| benchmark | metric | value | goal | met | notes |", "|---|---|--:|---|---|---|"]
    for r in rows:
        met = "" if r.met is None else "yes" if r.met else "**no**"
        number = SECTIONS.index(r.section) + 1
        cells = [f"{number} {r.section}", r.metric, r.shown, r.goal, met, r.notes]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
