"""The large users' search indexes a worker keeps in memory, and when it may use one.

A user with at least `min_memories` memories who searches again asks for their index
(`workers.backends.search_index`); a background task (`run`) reads it, off the search's path, and
until it is there the search ranks in SQL (`pg_search`), as every search of a smaller user does.
The two rank alike.

An index is used only while it is current: the user's search version, which PostgreSQL moves in
the transaction of any change to the user's memories or postings (`pg_schema`), is read beside the
query's terms at every search (`state`, while the query is encoded); a moved version or an expired
memory drops the index at once; so does a PostgreSQL restart or failover (the version is read
with the server's start time). Every held index is also checked every `RECHECK_INTERVAL`
seconds, searched or not (`recheck`), so what a delete or forget on any worker removed leaves
every worker's memory within seconds. Nothing else needs to tell a worker about a change: any
worker on any host may have written.

What it costs, and its bounds:
- memory: about 1.8 kB per memory (the vector in single precision and the credited term counts);
  indexes past `max_bytes` in all go, least recently searched first, and one that has not been
  searched for `idle` seconds goes too;
- reading: 0.6-0.7 s of one core for 20,000 memories, 3.4-4.7 s for 100,000 (Intel Xeon with
  AMX); an index is read again at the earliest ten times that long after the last read of it, so
  a user whose memories change
  all the time (a bulk ingest) costs at most a tenth of a core, and is searched in SQL meanwhile.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import structlog
from psycopg_pool import ConnectionPool

from producer.client import SearchIndexUse
from workers.backends import search_index
from workers.backends.pg_pool import run_blocking
from workers.backends.pg_schema import TABLE, TEXT_SEARCH, search_version_sql, user_key, visible_sql
from workers.backends.pg_store import Row, iso
from workers.backends.search_index import UserIndex

log = structlog.get_logger("memfleet.search")

RELOAD_SPACING = 10.0  # an index is read again at the earliest this many times its last read's duration after it
RECHECK_INTERVAL = 10.0  # seconds between checks that every held index is still current
MAX_ASKED = 100_000  # users remembered as searched once (their ids only)
FAILED_READ_PAUSE = 60.0  # seconds before a user's index is read again after a read that failed


def _versioned(user_key: str) -> str:
    """The user's search version, prefixed by the server's start time: a failover to a standby
    that had not received the last writes could hand out a version number again, never on the
    same server start (and a restart is just a version change)."""
    return f"pg_postmaster_start_time()::text || '/' || {search_version_sql(user_key)}"


# The user's search version, the query's distinct stemmed terms (as `pg_search` takes them), the
# server's clock (memories expire by it) and whether the user has `enough` memories to be indexed.
_STATE = f"""
SELECT {_versioned("%(key)s")},
       ARRAY(SELECT DISTINCT lexeme FROM unnest(to_tsvector('{TEXT_SEARCH}', %(query)s))),
       now(),
       (SELECT count(*) FROM (SELECT FROM {TABLE} WHERE user_id = %(user_id)s AND {visible_sql()}
                              LIMIT %(enough)s) AS first_rows) >= %(enough)s
"""

_VERSION = f"SELECT {_versioned('%(key)s')}"
# The versions of many users, in the order of their keys.
_VERSIONS = f"""SELECT {_versioned('k.key')}
FROM unnest(%(keys)s::text[]) WITH ORDINALITY AS k(key, n) ORDER BY k.n"""

_FOUND = f"""
SELECT id, payload, expires_at FROM {TABLE}
WHERE user_id = %(user_id)s AND id = ANY(%(ids)s::uuid[]) AND {visible_sql()}
"""


@dataclass(frozen=True)
class SearchState:
    version: str  # `_versioned`
    lexemes: builtins.list[str]
    now: datetime
    large: bool  # the user has at least `min_memories` memories


@dataclass
class _Entry:
    index: UserIndex
    used: float  # when it was last searched (the cache's clock)


class SearchCache:
    """The indexes one worker process holds (see the module)."""

    def __init__(self, pool: ConnectionPool, *, min_memories: int, max_bytes: int, idle: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pool = pool
        self.min_memories = min_memories
        self.max_bytes = max_bytes
        self.idle = idle
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently searched first
        self._wanted: dict[str, None] = {}  # users whose index a search asked for, in order
        self._not_before: dict[str, float] = {}  # the earliest next read of each user's index
        self._asked: dict[str, float] = {}  # when each user's search last asked for a read first, oldest first
        self._wake = asyncio.Event()
        self.use = SearchIndexUse()  # counted here, published with the encoder's counters
        self._reading: str | None = None  # the user whose index is being read
        self._forgotten = False  # ... and who was forgotten meanwhile: the index read is not kept

    @property
    def nbytes(self) -> int:
        return sum(entry.index.nbytes for entry in self._entries.values())

    def counted(self) -> SearchIndexUse:
        """The counters, with what is held now."""
        return self.use.model_copy(update={"held": len(self._entries), "bytes": self.nbytes})

    def users(self) -> builtins.list[str]:
        """The users whose index is held, least recently searched first."""
        return list(self._entries)

    def state(self, user_id: str, query: str) -> SearchState:
        """What a search needs to know before it ranks (blocking: call it in a thread)."""
        params = {"key": user_key(user_id), "query": query, "user_id": user_id, "enough": self.min_memories}
        with self.pool.connection() as conn:
            row = conn.execute(_STATE, params, prepare=False).fetchone()
        assert row is not None  # a SELECT without FROM: always one row
        version, lexemes, now, large = row
        return SearchState(str(version), list(lexemes), now, bool(large))

    def current(self, user_id: str, state: SearchState) -> UserIndex | None:
        """The user's index if it is held and current, counted as a search ranked in memory. Else
        None, counted as a search in SQL: a stale index is dropped, and a large user's is asked for."""
        entry = self._entries.get(user_id)
        index = entry.index if entry is not None else None
        if index is not None and (index.version != state.version
                                  or (index.expires is not None and index.expires <= state.now)):
            del self._entries[user_id]
            index = None
        if entry is None or index is None:
            self.use.in_sql += 1
            if state.large:
                self.want(user_id)
            return None
        self.use.in_memory += 1
        entry.used = self._clock()
        self._entries.move_to_end(user_id)
        return index

    def search(self, user_id: str, index: UserIndex, state: SearchState, vector: np.ndarray,
               limit: int) -> builtins.list[Row]:
        """The user's `limit` best memories from their index (blocking), as `pg_search.search` gives them."""
        ranked = search_index.rank(index, state.lexemes, vector, limit)
        return self.found(user_id, [(index.ids[n], score) for n, score in ranked])

    def want(self, user_id: str) -> None:
        """Ask for the user's index to be read in the background: at the user's second search
        within `idle` seconds (a read costs about four searches in SQL, and a load test searches
        many users once), once it may be read again."""
        now = self._clock()
        first = self._asked.pop(user_id, None)
        self._asked[user_id] = now if first is None or now - first > self.idle else first
        while len(self._asked) > MAX_ASKED:
            self._asked.pop(next(iter(self._asked)))
        if first is None or now - first > self.idle:
            return
        if user_id not in self._wanted and now >= self._not_before.get(user_id, 0.0):
            self._wanted[user_id] = None
            self._wake.set()

    def evict(self, user_id: str) -> None:
        """Drop the user's index, and one being read (a forget: nothing of the user stays here)."""
        self._forgotten = self._forgotten or user_id == self._reading
        self._entries.pop(user_id, None)
        self._wanted.pop(user_id, None)
        self._not_before.pop(user_id, None)
        self._asked.pop(user_id, None)

    def found(self, user_id: str, ranked: builtins.list[tuple[uuid.UUID, float]]) -> builtins.list[Row]:
        """The payloads of what `search_index.rank` found, in its order (blocking). A memory deleted
        or expired since the index was checked is left out."""
        params = {"user_id": user_id, "ids": [memory for memory, _ in ranked]}
        with self.pool.connection() as conn:
            rows = {r[0]: r for r in conn.execute(_FOUND, params, prepare=False).fetchall()}
        return [Row(str(memory), rows[memory][1], score, iso(rows[memory][2])) for memory, score in ranked
                if memory in rows]

    async def run(self) -> None:
        """Read the indexes searches ask for, and drop the idle ones; until cancelled."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=min(self.idle / 4, RECHECK_INTERVAL))
            self._wake.clear()
            self.tidy()
            await self.recheck()
            while self._wanted:
                user_id = next(iter(self._wanted))
                del self._wanted[user_id]
                await self.read(user_id)

    async def read(self, user_id: str) -> UserIndex:
        """Read the user's index now and keep it, within the budget (what `run` does for each user
        a search asked for)."""
        self._not_before[user_id] = self._clock() + FAILED_READ_PAUSE  # until this read succeeds
        self._reading, self._forgotten = user_id, False
        started = self._clock()
        try:
            index: UserIndex = await run_blocking(self._read, user_id)
        finally:
            self._reading = None
        took = self._clock() - started
        self._not_before[user_id] = self._clock() + RELOAD_SPACING * took
        self.use.reads += 1
        if not self._forgotten:
            self._keep(user_id, index)
        log.info("search_index_read", memories=len(index.ids), mb=round(index.nbytes / 2**20, 1),
                 seconds=round(took, 3), held=len(self._entries))
        return index

    def _read(self, user_id: str) -> UserIndex:
        with self.pool.connection() as conn, conn.transaction():
            # One snapshot for the version and the rows: the index is exactly the rows at that version.
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            (version,) = conn.execute(_VERSION, {"key": user_key(user_id)}).fetchone() or ("",)
            return search_index.load(conn, user_id, str(version))

    def _keep(self, user_id: str, index: UserIndex) -> None:
        if index.nbytes <= self.max_bytes:
            self._entries[user_id] = _Entry(index, self._clock())
            self._entries.move_to_end(user_id)
        while self.nbytes > self.max_bytes:
            self._entries.popitem(last=False)

    async def recheck(self) -> None:
        """Drop every held index whose user changed: what a delete or a forget on another worker
        leaves here goes within `RECHECK_INTERVAL`, searched again or not. Only the query runs in a
        thread; the indexes are only ever changed on the event loop."""
        held = {user_id: entry.index.version for user_id, entry in self._entries.items()}
        if not held:
            return
        current = await run_blocking(self._versions, [user_key(u) for u in held])
        for (user_id, version), now in zip(held.items(), current, strict=True):
            entry = self._entries.get(user_id)
            if entry is not None and entry.index.version == version != now:
                del self._entries[user_id]

    def _versions(self, keys: builtins.list[str]) -> builtins.list[str]:
        with self.pool.connection() as conn:
            return [str(v) for (v,) in conn.execute(_VERSIONS, {"keys": keys}, prepare=False).fetchall()]

    def tidy(self) -> None:
        """Drop the indexes not searched for `idle` seconds, and forget who asked that long ago."""
        now = self._clock()
        for user_id in [u for u, entry in self._entries.items() if now - entry.used > self.idle]:
            del self._entries[user_id]
        for user_id in [u for u, t in self._not_before.items() if t <= now]:
            del self._not_before[user_id]
        for user_id in [u for u, t in self._asked.items() if now - t > self.idle]:
            del self._asked[user_id]


