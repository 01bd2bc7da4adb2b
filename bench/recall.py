"""5. Found: LoCoMo's evidence recall for memfleet's search, stock mem0 search and plain BM25, side by side.

LoCoMo's retrieval metric: for each question (categories 1-4; 5 is adversarial, with no evidence to
find), the fraction of its gold `evidence` turns (`dia_id`) among the top k results, averaged over the
questions; hit@k is the fraction of questions with at least one evidence turn in the top k. Each system
indexes the same turns, one user per conversation, and answers each question for that conversation's user:
- memfleet: `Memfleet.search` through the queue (bench/fleet.py measures it, with its latency);
- mem0 stock: `AsyncMemory.add(infer=False)` of each turn (with its speaker as `name`), then
  `AsyncMemory.search(question, filters={"user_id": ...}, top_k=20)`; same model, same PostgreSQL;
- plain BM25: bm25s with PyStemmer's English stemmer over each conversation's raw turns.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import Row, percentile, row, say
from workers.backends.pg_server import stop_embedded_postgres

KS = (1, 5, 10, 20)
CATEGORIES = (1, 2, 3, 4)
CONCURRENCY = 50


@dataclass(frozen=True)
class Question:
    user_id: str
    text: str
    evidence: frozenset[str]


def questions(files: list[Path], user_of: Callable[[Path], str]) -> list[Question]:
    found = []
    for path in files:
        for qa in json.loads(path.read_text(encoding="utf-8"))["qa"]:
            if qa.get("category") in CATEGORIES and qa.get("evidence"):
                found.append(Question(user_of(path), qa["question"], frozenset(e.strip() for e in qa["evidence"])))
    return found


def turns(path: Path) -> Iterator[tuple[str, str, str]]:
    """(dia_id, speaker, text) of every turn, as `memfleet ingest --format locomo` reads it."""
    from producer.ingest import read_messages

    for entry in read_messages([path], "locomo"):
        yield str(entry.message.metadata["dia_id"]), entry.message.name or "", entry.message.content


def rows(system: str, asked: list[Question], ranked: list[list[str]], latency_ms: list[float] | None,
         goals: dict[int, float] | None = None) -> list[Row]:
    """recall@k and hit@k of one system's rankings (dia_ids, best first), and its search latency."""
    goals = goals or {}
    result = []
    pairs = list(zip(asked, ranked, strict=True))
    for k in KS:
        recall = statistics.fmean(len(q.evidence & set(r[:k])) / len(q.evidence) for q, r in pairs)
        hit = statistics.fmean(bool(q.evidence & set(r[:k])) for q, r in pairs)
        notes = f"{len(asked)} questions, categories 1-4; hit@{k} {hit:.2f}"
        if k in goals:
            result.append(row("recall", f"{system}: recall@{k}", recall, "", at_least=goals[k], notes=notes))
        else:
            result.append(row("recall", f"{system}: recall@{k}", recall, "", notes=notes))
    if latency_ms:
        result.append(row("recall", f"{system}: search p50", percentile(latency_ms, 50), "ms",
                          notes=f"p99 {percentile(latency_ms, 99):.1f} ms"))
    return result


def bm25(files: list[Path]) -> list[Row]:
    import bm25s
    import Stemmer

    stemmer = Stemmer.Stemmer("english")
    asked, ranked, latency = [], [], []
    for path in files:
        ids, texts = zip(*((dia, text) for dia, _, text in turns(path)), strict=True)
        index = bm25s.BM25()
        index.index(bm25s.tokenize(list(texts), stopwords="en", stemmer=stemmer, show_progress=False),
                    show_progress=False)
        for q in questions([path], lambda p: p.stem):
            started = time.perf_counter()
            tokens = bm25s.tokenize([q.text], stopwords="en", stemmer=stemmer, show_progress=False)
            found: list[str] = []
            if tokens.vocab:
                hits, scores = index.retrieve(tokens, k=min(max(KS), len(ids)), show_progress=False)
                found = [ids[int(i)] for i, s in zip(hits[0], scores[0], strict=True) if s > 0]
            latency.append((time.perf_counter() - started) * 1000)
            asked.append(q)
            ranked.append(found)
    say(f"plain BM25: {len(asked)} questions")
    return rows("plain BM25 (bm25s)", asked, ranked, latency)


async def mem0_stock(files: list[Path], directory: Path) -> list[Row]:
    from bench.mem0_direct import build_memory
    from workers.backends.pg_server import start_embedded_postgres

    pg_url = await asyncio.to_thread(start_embedded_postgres, directory)
    memory: Any = None
    try:
        memory = await asyncio.to_thread(build_memory, pg_url, directory)
        # mem0 creates its table on first use, and concurrent first calls race on CREATE TABLE: one goes first.
        await memory.add("warm-up", user_id="bench-warmup", infer=False)
        gate = asyncio.Semaphore(CONCURRENCY)

        async def add(user_id: str, dia: str, name: str, text: str) -> None:
            async with gate:
                await memory.add([{"role": "user", "content": text, "name": name}], user_id=user_id, infer=False,
                                 metadata={"dia_id": dia})

        started = time.perf_counter()
        await asyncio.gather(*(add(path.stem, *turn) for path in files for turn in turns(path)))
        say(f"mem0 stock: indexed in {time.perf_counter() - started:.0f} s")
        asked = questions(files, lambda p: p.stem)
        ranked, latency = [], []
        for q in asked:
            begun = time.perf_counter()
            found = await memory.search(q.text, filters={"user_id": q.user_id}, top_k=max(KS))
            latency.append((time.perf_counter() - begun) * 1000)
            ranked.append([str(r["metadata"]["dia_id"]) for r in found["results"]])
    finally:
        if memory is not None:
            await asyncio.to_thread(memory.vector_store.connection_pool.close)
            await asyncio.to_thread(memory.db.close)
        stop_embedded_postgres(directory)
    return rows("stock mem0 (infer=False)", asked, ranked, latency)
