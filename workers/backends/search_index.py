"""One user's search index held in a worker's memory: `pg_search`'s ranking, computed in numpy.

`pg_search` ranks with one SQL statement that reads every vector and every posting of the query's
words: about a microsecond a row at each of its steps, so 430 ms for a user with 100,000 memories.
Here the same inputs are read once (`load`) into arrays:
- the user's vectors, as unit rows in single precision (cosines are one matrix-vector product);
- the keyword counts already credited (a line's postings counted for its own memory and for those
  whose context holds it, as `pg_search` does at every search), one sparse column per term.

`rank` then computes the same function as `pg_search`: min-max normalized cosine and BM25
(Lucene's idf, k1 = 1.5, b = 0.75, statistics over the user's memories) divided by its best,
averaged; ties go to the lower id. It is exact, not an approximation: the two differ only in
floating-point rounding, and the tests compare them.

An index describes the rows as they were in one snapshot, identified by the user's search version
(`pg_schema`'s trigger moves it on every change of the user's memories or postings); the caller
(`workers.backends.search_cache`) uses it only while that version is current and no memory in it
has expired.
"""

from __future__ import annotations

import builtins
import functools
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import psycopg
from scipy import sparse

from workers.backends.pg_schema import POSTINGS, TABLE, visible_sql
from workers.backends.pg_search import BM25_B, BM25_K1, DENSE_WEIGHT

# The user's visible memories numbered in id order, so that a row's number breaks ties as the id does.
_NUMBERED = f"""
numbered AS MATERIALIZED (
    SELECT id, (row_number() OVER (ORDER BY id) - 1)::int4 AS n, keyword_count, vector, context_of, expires_at
    FROM {TABLE} WHERE user_id = %(user_id)s AND {visible_sql()}
)"""

# Each column packed into one bytea (the binary send format of each value, concatenated): one
# value to read, and numpy reads it without a Python object per row.
_ROWS = f"""
WITH {_NUMBERED}
SELECT count(*), string_agg(uuid_send(id), ''::bytea ORDER BY n),
       string_agg(int4send(keyword_count), ''::bytea ORDER BY n),
       string_agg(halfvec_send(vector), ''::bytea ORDER BY n), min(expires_at)
FROM numbered
"""

_POSTINGS = f"""
WITH {_NUMBERED}
SELECT p.term, string_agg(int4send(m.n), ''::bytea), string_agg(int4send(p.tf), ''::bytea)
FROM {POSTINGS} p JOIN numbered m ON m.id = p.memory_id
WHERE p.user_id = %(user_id)s
GROUP BY p.term
"""

# (line, later): the memory `later` has `line` in its keyword context, so `line`'s postings count for it.
_CONTEXT = f"""
WITH {_NUMBERED}
SELECT string_agg(int4send(m.n), ''::bytea), string_agg(int4send(later.n), ''::bytea)
FROM numbered m CROSS JOIN LATERAL unnest(m.context_of) AS c(id) JOIN numbered later ON later.id = c.id
"""

_INT4 = np.dtype(">i4")


@dataclass(frozen=True)
class UserIndex:
    version: str  # the user's search version the rows were read at (opaque: `search_cache`)
    ids: builtins.list[uuid.UUID]  # in id order; a row's number is its place here
    vectors: np.ndarray  # (n, dims) float32, rows of unit length (zero rows stay zero)
    lengths: np.ndarray  # (n,) float64: BM25's document length of each row
    terms: dict[str, int]  # stemmed term -> its column in `credited`
    credited: sparse.csc_matrix  # (n, terms): each row's term counts, credited through context
    expires: datetime | None  # the first expiry among the rows: the index is stale from then on

    @functools.cached_property
    def bm25_norms(self) -> np.ndarray:
        """BM25's length normalization of each row, k1 (1 - b + b dl / avgdl): the same for every query."""
        avgdl = max(float(self.lengths.mean()), 1.0) if len(self.lengths) else 1.0
        norms: np.ndarray = BM25_K1 * (1 - BM25_B + BM25_B * self.lengths / avgdl)
        return norms

    @property
    def nbytes(self) -> int:
        c = self.credited
        return int(self.vectors.nbytes + self.lengths.nbytes + c.data.nbytes + c.indices.nbytes
                   + c.indptr.nbytes + 80 * len(self.ids) + 80 * len(self.terms))


def load(conn: psycopg.Connection[Any], user_id: str, version: str) -> UserIndex:
    """The user's index as of one snapshot; `version` must have been read in the same snapshot
    (the caller's REPEATABLE READ transaction)."""
    params = {"user_id": user_id}
    found = conn.execute(_ROWS, params, prepare=False).fetchone()
    assert found is not None  # an aggregate: always one row
    count, ids, lengths, vectors, expires = found
    n = int(count)
    if n == 0:
        return UserIndex(version, [], np.zeros((0, 0), np.float32), np.zeros(0), {}, sparse.csc_matrix((0, 0)), None)
    terms: dict[str, int] = {}
    members: builtins.list[np.ndarray] = []
    counts: builtins.list[np.ndarray] = []
    for term, rows, tfs in conn.execute(_POSTINGS, params, prepare=False):
        terms[term] = len(terms)
        members.append(np.frombuffer(rows, dtype=_INT4))
        counts.append(np.frombuffer(tfs, dtype=_INT4))
    columns = np.repeat(np.arange(len(terms)), [len(m) for m in members])
    own = sparse.csr_matrix((_joined(counts).astype(np.float64), (_joined(members), columns)), shape=(n, len(terms)))
    pairs = conn.execute(_CONTEXT, params, prepare=False).fetchone()
    assert pairs is not None  # an aggregate: always one row (NULLs when no memory has a context)
    lines, later = pairs
    if lines is not None:  # credit[later, line] = 1 for each pair: a line's counts also go to `later`
        line_rows, later_rows = np.frombuffer(lines, dtype=_INT4), np.frombuffer(later, dtype=_INT4)
        credit = sparse.csr_matrix((np.ones(len(line_rows)), (later_rows, line_rows)), shape=(n, n))
        own = own + credit @ own
    return UserIndex(
        version=version, ids=[uuid.UUID(bytes=bytes(ids[i:i + 16])) for i in range(0, 16 * n, 16)],
        vectors=_unit_rows(_halfvecs(bytes(vectors), n)),
        lengths=np.frombuffer(lengths, dtype=_INT4).astype(np.float64),
        terms=terms, credited=sparse.csc_matrix(own), expires=expires)


def rank(index: UserIndex, lexemes: builtins.list[str], vector: np.ndarray,
         limit: int) -> builtins.list[tuple[int, float]]:
    """The `limit` best rows for a query (its distinct stemmed terms and its embedding), best first,
    as (row number, score)."""
    n = len(index.ids)
    if n == 0:
        return []
    query = np.asarray(vector, dtype=np.float32).astype(np.float16).astype(np.float32)  # as `::halfvec` rounds it
    norm = float(np.linalg.norm(query))
    cosine = index.vectors @ (query / norm if norm else query)
    low, high = float(cosine.min()), float(cosine.max())
    dense = (cosine - low) / (high - low) if high > low else np.ones(n, dtype=np.float32)
    score = DENSE_WEIGHT * dense.astype(np.float64)
    keywords = _bm25(index, lexemes)
    if keywords is not None:
        score += (1 - DENSE_WEIGHT) * keywords
    top = min(limit, n)
    # Every row tied with the last of the top, then ordered as ORDER BY score DESC, id.
    threshold = np.partition(score, n - top)[n - top]
    candidates = np.flatnonzero(score >= threshold)
    ordered = candidates[np.lexsort((candidates, -score[candidates]))][:top]
    return [(int(i), float(score[i])) for i in ordered]


def _bm25(index: UserIndex, lexemes: builtins.list[str]) -> np.ndarray | None:
    """BM25 of each row divided by the best (0 where no term matches), or None if none does."""
    n = len(index.ids)
    norm = index.bm25_norms
    total = np.zeros(n)
    matched = False
    for lexeme in dict.fromkeys(lexemes):
        column = index.terms.get(lexeme)
        if column is None:
            continue
        start, stop = index.credited.indptr[column], index.credited.indptr[column + 1]
        if start == stop:
            continue
        rows = index.credited.indices[start:stop]
        tf = index.credited.data[start:stop]
        df = stop - start
        idf = np.log(1 + (n - df + 0.5) / (df + 0.5))
        total[rows] += idf * tf * (BM25_K1 + 1) / (tf + norm[rows])
        matched = True
    if not matched:
        return None
    best = float(total.max())
    return total / best if best > 0 else np.zeros(n)


def _joined(parts: builtins.list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def _halfvecs(raw: bytes, n: int) -> np.ndarray:
    """pgvector's binary halfvec values, concatenated: each is int16 dims, int16 unused, then the
    big-endian half floats."""
    dims = int.from_bytes(raw[:2], "big")
    stride = 4 + 2 * dims
    return np.frombuffer(raw, dtype=np.uint8).reshape(n, stride)[:, 4:].copy().view(">f2").astype(np.float32)


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit: np.ndarray = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
    return unit
