"""mem0's hybrid search (semantic + BM25 keyword + entity boosts), with its independent steps at once.

`AsyncMemory.search` runs its steps one after another, each in a thread: lemmatize, extract
entities, embed the query, vector query, keyword query. Only the vector query needs the query's
embedding, and the encode is most of a search's time. So here the text side (lemmatize, entities,
keyword query) runs in one thread while the model encodes the query, and the vector goes to
PostgreSQL as a numpy row in pgvector's binary format rather than as 384 floats in text. Filters,
candidates, scoring and ranking are mem0's own code; `tests/test_write_path.py` checks that the
results equal `AsyncMemory.search`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from mem0.memory.main import _payload_is_expired
from mem0.utils.entity_extraction import extract_entities
from mem0.utils.lemmatization import lemmatize_for_bm25
from mem0.utils.scoring import get_bm25_params, normalize_bm25, score_and_rank

THRESHOLD = 0.1  # AsyncMemory.search's default: candidates below this semantic score are dropped
SCOPE_KEYS = ("user_id", "agent_id", "run_id")


@dataclass(frozen=True)
class Hit:
    id: str
    payload: dict[str, Any]
    score: float


@dataclass(frozen=True)
class _TextSide:
    lemmatized: str
    entities: list[tuple[str, str]]
    keyword_hits: list[Any] | None  # None: the store has no keyword search


async def hybrid_search(
    memory: Any, embed: Callable[[str], Awaitable[np.ndarray]], query: str, filters: dict[str, Any], limit: int
) -> list[Hit]:
    """What `memory.search(query, top_k=limit, filters=filters)` finds, in the same order and scores."""
    query = query.strip()
    scope = store_filters(memory, filters)
    fetch = max(limit * 4, 60)  # mem0 over-fetches candidates for its re-scoring
    store = memory.vector_store
    text_side = asyncio.create_task(asyncio.to_thread(_text_side, store, query, scope, fetch))
    try:
        vector = await embed(query)
        semantic = await asyncio.to_thread(store.search, query=query, vectors=vector, top_k=fetch, filters=scope)
    except BaseException:
        text_side.cancel()
        with contextlib.suppress(BaseException):
            await text_side
        raise
    text = await text_side

    bm25: dict[str, float] = {}
    if text.keyword_hits is not None:
        midpoint, steepness = get_bm25_params(query, lemmatized=text.lemmatized)
        for hit in text.keyword_hits:
            if hit.score and hit.score > 0:
                bm25[str(hit.id)] = normalize_bm25(hit.score, midpoint, steepness)
    boosts = await memory._compute_entity_boosts_async(text.entities, scope) if text.entities else {}
    candidates = [{"id": str(r.id), "score": r.score, "payload": r.payload}
                  for r in semantic if not _payload_is_expired(r.payload)]
    ranked = score_and_rank(semantic_results=candidates, bm25_scores=bm25, entity_boosts=boosts,
                            threshold=THRESHOLD, top_k=limit)
    return [Hit(r["id"], r["payload"], r["score"]) for r in ranked if (r.get("payload") or {}).get("data")]


def store_filters(memory: Any, filters: dict[str, Any]) -> dict[str, Any]:
    """Filters as `AsyncMemory.search` hands them to its vector store: AND/OR/NOT and operator
    conditions translated by mem0's `_process_metadata_filters`, scope keys kept as they are."""
    effective = dict(filters)
    if memory._has_advanced_operators(effective):
        processed = memory._process_metadata_filters(effective)
        for key in list(effective):
            if key in ("AND", "OR", "NOT") or (key not in SCOPE_KEYS and isinstance(effective[key], dict)):
                del effective[key]
        effective.update(processed)
    return effective


def _text_side(store: Any, query: str, scope: dict[str, Any], fetch: int) -> _TextSide:
    lemmatized = lemmatize_for_bm25(query)
    hits = store.keyword_search(query=lemmatized, top_k=fetch, filters=scope)
    return _TextSide(lemmatized, extract_entities(query), hits)
