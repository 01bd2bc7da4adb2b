"""Real parts only: a real redis-server, the embedded PostgreSQL with pgvector, real mem0 and MiniLM.

The session starts one private redis-server (or uses REDIS_URL), and two worker processes against
an empty temporary data directory, both at once, as a fleet would; their LLM (fact extraction) is
a local stand-in on the OpenAI wire (tests/llm_standin.py). Whatever a test starts is
stopped in a `finally`; the session fails if any process it started is still alive at its end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from redis.asyncio import Redis

from producer.client import Memfleet
from producer.services import RedisServer, start_workers, stop_workers
from producer.settings import ProducerSettings
from tests.http_support import ApiServer, serving
from tests.llm_standin import LlmStandIn
from tests.processes import kill_all, leftovers, mark_session
from tests.support import wait_for_processes
from workers.backends.pg_server import stop_embedded_postgres
from workers.process import set_up_process
from workers.settings import WorkerConfig

if TYPE_CHECKING:
    from workers.backends.embedded import EmbeddedBackend

WORKER_PROCESSES = 2
SESSION = pytest.StashKey[str]()
TEMP_DIR = pytest.StashKey[str]()
OWN_TEMP = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[SESSION] = mark_session()
    if config.option.basetemp is None:
        # pytest's numbered /tmp/pytest-of-<user>/pytest-N directories are shared by every session
        # of the user, and each keeps only the newest three: on a machine where several people run
        # tests at once, another session deleted (then reused) this one's data directories under
        # its running workers. A directory of our own cannot be taken away.
        config.option.basetemp = tempfile.mkdtemp(prefix="memfleet-tests-")
        config.stash[OWN_TEMP] = config.option.basetemp
    # As any worker process does, before a test module imports mem0 (workers.backends.*).
    set_up_process()


@pytest.fixture(scope="session", autouse=True)
def session_temp_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's temporary directory, where every test's data directory lives."""
    directory = tmp_path_factory.getbasetemp()
    request.config.stash[TEMP_DIR] = str(directory)
    return directory


@pytest.hookimpl(trylast=True)  # after the session fixtures are torn down
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if anything the suite started outlived it, then stop it."""
    marker = session.config.stash.get(SESSION, None)
    temp_dir = session.config.stash.get(TEMP_DIR, None)
    if marker is None or temp_dir is None:
        return
    alive = leftovers(marker, temp_dir)
    if alive:
        kill_all(marker, temp_dir)
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_line("processes the tests started are still running (now killed):", red=True)
            for line in alive:
                reporter.write_line(f"  {line}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    own = session.config.stash.get(OWN_TEMP, None)
    if own is not None and session.exitstatus == pytest.ExitCode.OK:
        shutil.rmtree(own, ignore_errors=True)  # kept when something failed, to look into


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    server = RedisServer().start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own, with no worker: what is put there stays there to be read."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def redis(private_redis: RedisServer) -> AsyncIterator[Redis]:
    """A client of the test's own redis-server (`private_redis`)."""
    client = Redis.from_url(private_redis.url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    directory = tmp_path_factory.mktemp("memfleet-data")
    try:
        yield directory
    finally:
        stop_embedded_postgres(directory)


@pytest.fixture(scope="session")
def llm() -> Iterator[LlmStandIn]:
    """The LLM of the session's workers (fact extraction, `infer=True`): a local stand-in."""
    with LlmStandIn() as standin:
        yield standin


@pytest.fixture(scope="session")
def worker_env(redis_url: str, data_dir: Path, llm: LlmStandIn) -> dict[str, str]:
    # Expired memories are swept every second (default 10 s), so that a test sees the sweep soon.
    # Every user's search index is kept in memory once searched (default: users with 2,000
    # memories), so that the suite's searches, after a user's first, use it and check it current.
    return {"REDIS_URL": redis_url, "MEMFLEET_DATA_DIR": str(data_dir), "MEMFLEET_LOG_FORMAT": "json",
            "MEMFLEET_EXPIRY_SWEEP_INTERVAL": "1", "MEMFLEET_LLM_BASE_URL": llm.url,
            "MEMFLEET_LLM_MODEL": "standin-extractor", "MEMFLEET_SEARCH_INDEX_MIN_MEMORIES": "1"}


@pytest.fixture(scope="session")
def workers(worker_env: dict[str, str]) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = start_workers(WORKER_PROCESSES, worker_env)
    try:
        yield procs
    finally:
        code = stop_workers(procs)
    assert code == 0, "a worker did not shut down cleanly"


@pytest.fixture(scope="session")
async def fleet(redis_url: str, workers: list[subprocess.Popen[bytes]]) -> AsyncIterator[Memfleet]:
    client = await Memfleet.connect(ProducerSettings(redis_url=redis_url, search_timeout=30))
    try:
        await wait_for_processes(client, workers)
        yield client
    finally:
        await client.close()


@pytest.fixture(scope="session")
async def backend(data_dir: Path, fleet: Memfleet) -> AsyncIterator[EmbeddedBackend]:
    """An in-process backend on the same embedded PostgreSQL as the workers."""
    from workers.backends.embedded import EmbeddedBackend

    started = await EmbeddedBackend.start(WorkerConfig(data_dir=data_dir))
    try:
        yield started
    finally:
        await started.close()


@pytest.fixture(scope="session")
def api_server(redis_url: str, fleet: Memfleet) -> Iterator[ApiServer]:
    """`memfleet serve` on a free port, in front of the session's workers."""
    with serving(redis_url, {"MEMFLEET_SEARCH_TIMEOUT": "30"}) as server:
        yield server
