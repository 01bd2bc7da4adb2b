"""What every benchmark shares: result rows, percentiles, the LoCoMo data, progress lines, RSS sampling."""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import psutil  # type: ignore[import-untyped]

LOCOMO = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "locomo"
SECTIONS = ("ingest", "search", "scale", "memory", "recall", "stream", "million", "users", "infer", "replicas",
            "heavy")
MB = 1024 * 1024


class Skipped(Exception):
    """A benchmark cannot run here (its data or a tool is missing); the message says why."""


@dataclass(frozen=True)
class Row:
    section: str
    metric: str
    value: float | None
    unit: str
    goal: str = ""
    met: bool | None = None
    notes: str = ""

    @property
    def shown(self) -> str:
        if self.value is None:
            return "—"
        digits = 2 if abs(self.value) < 10 else 1 if abs(self.value) < 100 else 0
        return f"{self.value:,.{digits}f} {self.unit}".strip()


def row(section: str, metric: str, value: float, unit: str, *, at_most: float | None = None,
        at_least: float | None = None, notes: str = "") -> Row:
    """A measured value, with its goal (if any) and whether it is met."""
    if at_most is not None:
        return Row(section, metric, value, unit, f"≤ {at_most:g} {unit}".strip(), value <= at_most, notes)
    if at_least is not None:
        return Row(section, metric, value, unit, f"≥ {at_least:g} {unit}".strip(), value >= at_least, notes)
    return Row(section, metric, value, unit, notes=notes)


def note(section: str, metric: str, notes: str) -> Row:
    """A row without a value: a skipped or failed benchmark."""
    return Row(section, metric, None, "", notes=notes)


def percentile(samples: list[float], p: float) -> float:
    """Nearest-rank percentile (p99 of 200 samples is the second largest)."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(len(ordered) * p / 100) - 1))]


def say(message: str) -> None:
    """A progress line on stderr; stdout is kept for the table."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def locomo_files(count: int) -> list[Path]:
    files = sorted(LOCOMO.glob("conv-*.json"))
    if not files:
        raise Skipped(f"LoCoMo data not found in {LOCOMO} (it lives in ../shared beside the repo)")
    return files[:count]


def locomo_questions() -> list[str]:
    """Every distinct LoCoMo question, in file order: search queries nobody has cached."""
    seen: dict[str, None] = {}
    for path in sorted(LOCOMO.glob("conv-*.json")):
        for qa in json.loads(path.read_text(encoding="utf-8")).get("qa", []):
            if isinstance(qa.get("question"), str) and qa["question"].strip():
                seen.setdefault(qa["question"].strip(), None)
    return list(seen)


class Poller:
    """Calls `poll()` every `interval` seconds on a thread of its own while inside `with`, until it
    returns True: a measurement taken beside the work it measures."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=type(self).__name__, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def poll(self) -> bool:
        raise NotImplementedError

    def _run(self) -> None:
        while not self.poll():
            if self._stop.wait(self.interval):
                return


class PeakRss(Poller):
    """A process's peak resident set size (`with PeakRss(pid) as rss: ...; rss.peak`)."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(interval)
        self.process = psutil.Process(pid)
        self.peak = 0

    def poll(self) -> bool:
        try:
            self.peak = max(self.peak, self.process.memory_info().rss)
        except psutil.Error:
            return True  # the process is gone: its peak is what was seen
        return False


def make_vector_pool(pool: Any, size: int, dims: int = 384) -> None:
    """`bench_vectors(k, vector)`: `size` random vectors, for tables filled by SQL alone (a search
    reads every vector of a user whatever its value)."""
    with pool.connection() as conn:
        conn.execute(f"""CREATE TABLE bench_vectors AS SELECT k, (SELECT array_agg(random() - 0.5)
                         FROM generate_series(1, {dims}) WHERE k >= 0)::vector({dims}) AS vector
                         FROM generate_series(0, {size - 1}) AS k""")
        conn.execute("ALTER TABLE bench_vectors ADD PRIMARY KEY (k)")


def vacuum_memory_tables(pool: Any) -> None:
    """Statistics and a visibility map for memfleet's tables after a fill, as autovacuum would
    leave them: the planner then sees the rows that are there."""
    with pool.connection() as conn:
        conn.execute("VACUUM ANALYZE memfleet_memories")
        conn.execute("VACUUM ANALYZE memfleet_postings")

