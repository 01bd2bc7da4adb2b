"""A large user's search index in a worker's memory (workers.backends.search_cache): used only while
current, dropped on any change, bounded in memory; and ranking as the table does (test_retrieval
checks that on a LoCoMo conversation)."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import numpy as np
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import eventually, scratch_database, uid
from workers.backends import pg_search, search_index
from workers.backends.embedded import EmbeddedBackend
from workers.backends.pg_schema import search_version_sql, user_key
from workers.backends.pg_server import prepare_database
from workers.backends.search_cache import SearchCache
from workers.scoped import AsyncScopedMemory
from workers.supervision import supervise

LINES = ["I adopted a greyhound named Biscuit", "My sister lives in Lisbon", "I play the cello on Sundays",
         "We went hiking in the Alps last June", "I am allergic to peanuts"]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def cached(backend: EmbeddedBackend) -> AsyncIterator[EmbeddedBackend]:
    """The session's backend with a cache of its own that keeps every user's index; nothing reads
    in the background unless a test starts its reader."""
    cache = SearchCache(backend.pool, min_memories=0, max_bytes=64 * 2**20, idle=600, clock=Clock())
    yield dataclasses.replace(backend, search_cache=cache, search_indexing=None, reindexing=None)


def cache_of(backend: EmbeddedBackend) -> SearchCache:
    assert backend.search_cache is not None
    return backend.search_cache


def version(backend: EmbeddedBackend, user: str) -> int:
    with backend.pool.connection() as conn:
        key = user_key(user)
        row = conn.execute(f"SELECT {search_version_sql('%s')}", (key,)).fetchone()
    assert row is not None
    return int(row[0])


def untracked(backend: EmbeddedBackend, statement: str, *params: object) -> None:
    """Run a statement with triggers off (as a replica applies changes): the search version does
    not move, so a held index cannot know of the change."""
    with backend.pool.connection() as conn, conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        conn.execute(statement, params)


async def test_every_change_to_a_users_memories_moves_their_search_version_and_no_one_elses(
        backend: EmbeddedBackend) -> None:
    user, bystander = uid("version"), uid("bystander")
    await AsyncScopedMemory(bystander, backend).add(LINES[:1])
    memory = AsyncScopedMemory(user, backend)
    seen = [version(backend, user)]
    others = version(backend, bystander)
    (first, *_), _ = await memory.add(LINES)
    seen.append(version(backend, user))
    await memory.update([{"memory_id": first, "text": "I adopted a whippet named Biscuit"}])
    seen.append(version(backend, user))
    with backend.pool.connection() as conn:
        conn.execute("DELETE FROM memfleet_postings WHERE user_id = %s AND memory_id = %s", (user, first))
    seen.append(version(backend, user))
    await memory.delete([first])
    seen.append(version(backend, user))
    await memory.delete_all()
    seen.append(version(backend, user))
    assert all(a < b for a, b in itertools.pairwise(seen)), seen
    assert version(backend, bystander) == others
    with backend.pool.connection() as conn:  # kept after the forget, and by a hash, not by the id
        key = user_key(user)
        keys = conn.execute("SELECT user_key FROM memfleet_search_versions WHERE user_key IN (%s, %s)", (user, key))
        assert keys.fetchall() == [(key,)]


async def test_a_search_uses_the_held_index_while_current_and_drops_it_on_a_change(cached: EmbeddedBackend) -> None:
    user = uid("held")
    cache = cache_of(cached)
    memory = AsyncScopedMemory(user, cached)
    ids, _ = await memory.add(LINES)
    await cache.read(user)
    assert cache.users() == [user]
    # A row the index cannot know of (the version did not move): a search that finds it ranked in SQL.
    untracked(cached, "UPDATE memfleet_memories SET payload = jsonb_set(payload, '{data}', '\"I own a dog\"') "
                      "WHERE user_id = %s AND id = %s", user, ids[1])
    (top, *_) = await memory.search("Which dog do I have?", limit=1)
    assert top.id == ids[0], "the held index was not used"  # it knows the greyhound, not the new text
    await memory.update([{"memory_id": ids[2], "text": "I own a dog"}])  # a tracked change: the index goes
    (top, *_) = await memory.search("Which dog do I have?", limit=1)
    assert top.text == "I own a dog"
    assert cache.users() == []
    await cache.read(user)
    await memory.delete([ids[0]])
    found = await memory.search("greyhound Biscuit", limit=10)
    assert ids[0] not in {r.id for r in found}
    assert cache.users() == []
    await cache.read(user)
    await memory.delete_all()
    assert cache.users() == []
    assert await memory.search("greyhound", limit=10) == []


async def test_a_held_index_of_a_user_changed_elsewhere_goes_without_a_search(
        backend: EmbeddedBackend, cached: EmbeddedBackend) -> None:
    """What another worker deleted leaves this one's memory at its next check, searched or not."""
    cache = cache_of(cached)
    changed, unchanged = uid("elsewhere"), uid("unchanged")
    for user in (changed, unchanged):
        await AsyncScopedMemory(user, cached).add(LINES)
        await cache.read(user)
    await cache.recheck()
    assert sorted(cache.users()) == sorted([changed, unchanged])
    await AsyncScopedMemory(changed, backend).delete_all()  # as another worker: this cache is not told
    assert sorted(cache.users()) == sorted([changed, unchanged])
    await cache.recheck()
    assert cache.users() == [unchanged]
    await AsyncScopedMemory(unchanged, cached).delete_all()


async def test_an_index_holding_an_expired_memory_is_not_used(cached: EmbeddedBackend) -> None:
    user = uid("expiring")
    cache = cache_of(cached)
    memory = AsyncScopedMemory(user, cached)
    soon = (datetime.now(UTC) + timedelta(seconds=2)).isoformat()
    (fleeting,), _ = await memory.add(["My locker code is 4512"], expires_at=soon)
    await memory.add(LINES)
    index = await cache.read(user)
    assert index.expires is not None
    assert fleeting in {r.id for r in await memory.search("locker code", limit=10)}
    assert cache.users() == [user]

    async def gone() -> bool:
        return fleeting not in {r.id for r in await memory.search("locker code", limit=10)}

    await eventually(gone, timeout=30, what="the expired memory still found")
    # A search at the moment of expiry may rank from the index and lose the memory when reading
    # the payloads (they are read later, as expired); any search after that finds the index stale.
    await memory.search("locker code", limit=10)
    assert cache.users() == []
    await memory.delete_all()


async def test_indexes_stay_within_their_memory_and_go_when_idle(cached: EmbeddedBackend) -> None:
    cache = cache_of(cached)
    first, second = uid("budget"), uid("budget")
    for user in (first, second):
        await AsyncScopedMemory(user, cached).add(LINES)
    one = await cache.read(first)
    cache.max_bytes = one.nbytes * 3 // 2  # room for one index of this size
    await cache.read(second)
    assert cache.users() == [second]
    await cache.read(first)
    assert cache.users() == [first]
    clock = cache._clock
    assert isinstance(clock, Clock)
    clock.now += cache.idle + 1
    cache.tidy()
    assert cache.users() == []
    for user in (first, second):
        await AsyncScopedMemory(user, cached).delete_all()


async def test_a_search_of_a_large_user_has_the_index_read_in_the_background(backend: EmbeddedBackend) -> None:
    cache = SearchCache(backend.pool, min_memories=len(LINES), max_bytes=64 * 2**20, idle=600)
    cached = dataclasses.replace(backend, search_cache=cache, search_indexing=None, reindexing=None)
    reader = supervise("search-index-test", cache.run)
    user = uid("large")
    memory = AsyncScopedMemory(user, cached)
    try:
        await memory.add(LINES[:-1])
        before = await memory.search("Where does my sister live?")
        await asyncio.sleep(0)  # a read, if one were asked for, would start now
        assert cache.users() == []  # one memory short: searched in SQL, no index asked for
        await memory.add(LINES[-1:])
        in_sql = await memory.search("Where does my sister live?")
        await asyncio.sleep(0)
        assert cache.users() == []  # searched once: many users of a load test are, and no more
        await memory.search("Who plays the cello?")  # a second search asks for the index
        await eventually(lambda: cache.users() == [user], timeout=30, what="the index was not read")
        in_memory = await memory.search("Where does my sister live?")
        assert [(r.id, round(r.score or 0, 5)) for r in in_memory] == [(r.id, round(r.score or 0, 5)) for r in in_sql]
        assert before[0].id == in_sql[0].id
        await memory.delete_all()
        assert cache.users() == []
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


def test_a_truncate_makes_every_held_index_stale(backend: EmbeddedBackend) -> None:
    """An operator's TRUNCATE fires no row trigger: it moves every user's version at once."""
    with scratch_database(str(backend.pool.conninfo), "truncdb") as url:
        prepare_database(url)
        statement = f"SELECT {search_version_sql('%s')}"
        key = user_key("someone")
        with psycopg.connect(url, autocommit=True) as conn:
            seen = [conn.execute(statement, (key,)).fetchone()]
            for table in ("memfleet_postings", "memfleet_memories"):
                conn.execute(f"TRUNCATE {table}")
                seen.append(conn.execute(statement, (key,)).fetchone())
    assert seen[0] is not None and seen[1] is not None and seen[2] is not None
    assert seen[0][0] < seen[1][0] < seen[2][0]


WORDS = ["apple", "river", "cello", "lisbon", "greyhound", "peanut", "hiking", "sister"]
# A memory: its own words (none: no postings), words of context counted in its length, a vector
# from a pool of three (equal cosines: ties), whether it has expired, the later memories whose
# context holds it (positions, any of them, itself and missing ones included).
memory_rows = st.tuples(st.lists(st.sampled_from(WORDS), max_size=5), st.integers(0, 12), st.integers(0, 2),
                        st.booleans(), st.lists(st.integers(0, 11), max_size=3))


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(rows=st.lists(memory_rows, min_size=1, max_size=12),
       query=st.lists(st.sampled_from([*WORDS, "unheard"]), max_size=4), query_seed=st.integers(0, 3))
def test_the_index_ranks_any_users_memories_as_the_sql_statement_does(
        backend: EmbeddedBackend, rows: list[tuple[list[str], int, int, bool, list[int]]], query: list[str],
        query_seed: int) -> None:
    user = uid("property")
    ids = [str(uuid_of(user, n)) for n in range(len(rows))]
    vectors = [np.random.default_rng(seed).standard_normal(384).astype(np.float32) for seed in range(3)]
    text = " ".join(query)
    query_vector = np.random.default_rng(100 + query_seed).standard_normal(384).astype(np.float32)
    with backend.pool.connection() as conn:
        try:
            for n, (words, context, vector, expired, later) in enumerate(rows):
                conn.execute(
                    """INSERT INTO memfleet_memories
                           (user_id, id, vector, payload, keyword_count, context_of, expires_at)
                       VALUES (%s, %s, %s::halfvec, %s, %s, %s::uuid[],
                               CASE WHEN %s THEN now() - interval '1 hour' END)""",
                    (user, ids[n], vectors[vector], psycopg.types.json.Jsonb({"data": " ".join(words)}),
                     len(words) + context, [ids[i] if i < len(ids) else str(uuid_of(user, 99)) for i in later],
                     expired))
                conn.execute("""INSERT INTO memfleet_postings (user_id, term, memory_id, tf)
                                SELECT %s, lexeme, %s, cardinality(positions)
                                FROM unnest(to_tsvector('english', %s))""", (user, ids[n], " ".join(words)))
            table = pg_search.search(conn, user, text, query_vector, len(rows), {})  # all: no cut between ties
            lexemes = conn.execute("SELECT ARRAY(SELECT DISTINCT lexeme FROM unnest(to_tsvector('english', %s)))",
                                   (text,)).fetchone()
            with conn.transaction():
                index = search_index.load(conn, user, "")
        finally:
            conn.execute("DELETE FROM memfleet_postings WHERE user_id = %s", (user,))
            conn.execute("DELETE FROM memfleet_memories WHERE user_id = %s", (user,))
    assert lexemes is not None
    ranked = [(str(index.ids[n]), score) for n, score in search_index.rank(index, lexemes[0], query_vector, len(rows))]
    assert [score for _, score in ranked] == pytest.approx([r.score for r in table], abs=1e-6)
    assert {memory for memory, _ in ranked} == {r.id for r in table}
    # Best first, equal scores by id, as ORDER BY score DESC, id ...
    for (first, high), (second, low) in itertools.pairwise(ranked):
        assert high > low or (high == low and uuid.UUID(first) < uuid.UUID(second))
    # ... and so the SQL statement's order, but where two of its scores are within rounding.
    for position, (memory, score) in enumerate(ranked):
        tied = {r.id for r in table if abs(float(r.score or 0) - score) <= 1e-6}
        assert memory == table[position].id or memory in tied


def uuid_of(user: str, n: int) -> uuid.UUID:
    return uuid.uuid5(uuid.NAMESPACE_URL, f"{user}/{n}")
