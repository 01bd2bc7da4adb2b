"""The one query that ranks a user's memories (`search`), over the user's own memories only.

It fuses two signals:
- dense: cosine similarity of the query's embedding to each memory's (its text in context,
  `workers.backends.indexing`; vectors kept in half precision), min-max normalized over the user's
  memories;
- keywords: Okapi BM25 (Lucene's idf, k1 = 1.5, b = 0.75) over each memory's keyword text,
  stemmed by PostgreSQL's `english` text-search configuration, with document frequencies and the
  average length counted over the user's memories, so that no other user's data can move a score;
  divided by the best BM25 score of the query.
The score is the mean of the two (a convex combination with equal weights, the fusion that
Bruch et al., "An Analysis of Fusion Functions for Hybrid Retrieval", 2023, found more robust than
reciprocal rank). Any word of the question can match (OR semantics), unlike `plainto_tsquery`.
"""

from __future__ import annotations

import builtins
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from workers.backends.filters_sql import filter_sql
from workers.backends.pg_schema import POSTINGS, TABLE, TEXT_SEARCH, visible_sql
from workers.backends.pg_store import Row, iso

BM25_K1 = 1.5
BM25_B = 0.75
DENSE_WEIGHT = 0.5


# The user's memories ranked for a query: BM25 and cosine over the user's rows, fused. One statement,
# and one pass over the user's rows (BM25's lengths and statistics come from the same scan as the
# cosines). BM25 scores were once computed apart, while the query was encoded, and sent back with
# the vector: for a user with 13,000 memories that match some word, the round trip of their scores
# cost 40 ms, more than the overlap saved anyone.
_SEARCH = """
WITH terms AS (
    SELECT ARRAY(SELECT DISTINCT lexeme FROM unnest(to_tsvector('{config}', %(query)s))) AS lexemes
),
mine AS MATERIALIZED (
    SELECT id, keyword_count, context_of, 1 - (vector <=> %(vector)s::halfvec) AS cosine
    FROM {table} WHERE user_id = %(user_id)s AND {visible} AND ({filters})
),
corpus AS MATERIALIZED (  -- one row, computed once: a generic plan once re-ran it per posting
    SELECT count(*)::float8 AS n, greatest(avg(keyword_count), 1)::float8 AS avgdl,
           min(cosine) AS low, max(cosine) AS high
    FROM mine
),
own AS MATERIALIZED (  -- a term by its place in the query: grouping on an integer, not a text
    SELECT p.memory_id AS id, array_position(terms.lexemes, p.term) AS term, p.tf, m.context_of
    FROM {postings} p JOIN mine m ON m.id = p.memory_id, terms
    WHERE p.user_id = %(user_id)s AND p.term = ANY(terms.lexemes)
),
credited AS (  -- a line counts for its own memory and for those whose context holds it
    SELECT id, term, tf FROM own
    UNION ALL
    SELECT later.id, own.term, own.tf FROM own CROSS JOIN LATERAL unnest(own.context_of) AS later(id)
),
term_counts AS MATERIALIZED (  -- summed before the join: the join then meets one row per pair
    SELECT c.id, m.keyword_count, c.term, c.tf::float8 AS tf
    FROM (SELECT id, term, sum(tf) AS tf FROM credited GROUP BY id, term) c JOIN mine m USING (id)
),
idf AS (
    SELECT term, ln(1 + ((SELECT n FROM corpus) - count(*) + 0.5) / (count(*) + 0.5)) AS idf
    FROM term_counts GROUP BY term
),
bm25 AS MATERIALIZED (
    SELECT t.id, sum(
        i.idf * t.tf * ({k1} + 1) / (t.tf + {k1} * (1 - {b} + {b} * t.keyword_count / (SELECT avgdl FROM corpus)))
    ) AS score
    FROM term_counts t JOIN idf i USING (term)
    GROUP BY t.id
),
fused AS (
    SELECT m.id,
           {dense} * coalesce((m.cosine - (SELECT low FROM corpus))
                              / nullif((SELECT high - low FROM corpus), 0), 1)
           + (1 - {dense}) * coalesce(k.score / nullif((SELECT max(score) FROM bm25), 0), 0) AS score
    FROM mine m LEFT JOIN bm25 k USING (id)
    ORDER BY score DESC, id
    LIMIT %(limit)s
)
-- The payloads of the few found, each by its key: as a join, with nested loops off, it was a hash
-- join over all the user's rows (40 ms of a search at 100,000 memories).
SELECT f.id, (SELECT t.payload FROM {table} t WHERE t.user_id = %(user_id)s AND t.id = f.id), f.score,
       (SELECT t.expires_at FROM {table} t WHERE t.user_id = %(user_id)s AND t.id = f.id)
FROM fused f
ORDER BY f.score DESC, f.id
"""


def search(conn: psycopg.Connection[Any], user_id: str, query: str, vector: np.ndarray, limit: int,
           filters: dict[str, Any]) -> builtins.list[Row]:
    """The user's `limit` best memories for `query` (whose embedding is `vector`), best first."""
    rows = _run(conn, _SEARCH, filters, {"query": query, "vector": vector, "user_id": user_id, "limit": limit})
    return [Row(str(r[0]), r[1], float(r[2]), iso(r[3])) for r in rows]


def _run(conn: psycopg.Connection[Any], query: str, filters: dict[str, Any],
         params: dict[str, Any]) -> builtins.list[tuple[Any, ...]]:
    condition, filter_params = filter_sql(filters)
    statement = sql.SQL(query).format(
        config=sql.SQL(TEXT_SEARCH), table=sql.Identifier(TABLE), postings=sql.Identifier(POSTINGS),
        filters=condition, k1=sql.Literal(BM25_K1), b=sql.Literal(BM25_B), dense=sql.Literal(DENSE_WEIGHT),
        visible=sql.SQL(visible_sql()),
    )
    with conn.transaction():
        # The planner estimates a user's rows from the average user, and a user with 10,000
        # memories then got nested loops over them: seconds instead of milliseconds. Every join
        # here is between whole per-user sets, which hash joins serve whatever their sizes.
        conn.execute("SET LOCAL enable_nestloop = off")
        # Never prepared: psycopg prepares a statement on its fifth run, and PostgreSQL then may
        # switch to a generic plan, which cannot see how many memories the user has or how common
        # the query's terms are; one such plan took 330 ms where the custom one takes 20.
        return conn.execute(statement, {**params, **filter_params}, prepare=False).fetchall()
