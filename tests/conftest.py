"""Real parts only: a real redis-server, the embedded PostgreSQL with pgvector, real mem0 and MiniLM.

The session starts one private redis-server (or uses REDIS_URL), and two worker processes against
an empty temporary data directory, both at once, as a fleet would.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from producer.client import Memfleet
from producer.services import RedisServer, start_workers, stop_workers
from producer.settings import ProducerSettings
from tests.http_support import ApiServer, serving
from tests.support import wait_for_workers
from workers.backends.embedded import EmbeddedBackend
from workers.settings import WorkerConfig

WORKER_PROCESSES = 2


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    server = RedisServer().start()
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("memfleet-data")


@pytest.fixture(scope="session")
def worker_env(redis_url: str, data_dir: Path) -> dict[str, str]:
    return {"REDIS_URL": redis_url, "MEMFLEET_DATA_DIR": str(data_dir), "MEMFLEET_LOG_FORMAT": "json"}


@pytest.fixture(scope="session")
def workers(worker_env: dict[str, str]) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = start_workers(WORKER_PROCESSES, worker_env)
    yield procs
    assert stop_workers(procs) == 0, "a worker did not shut down cleanly"


@pytest.fixture(scope="session")
async def fleet(redis_url: str, workers: list[subprocess.Popen[bytes]]) -> AsyncIterator[Memfleet]:
    client = await Memfleet.connect(ProducerSettings(redis_url=redis_url, search_timeout=30))
    await wait_for_workers(client, WORKER_PROCESSES)
    yield client
    await client.close()


@pytest.fixture(scope="session")
async def backend(data_dir: Path, fleet: Memfleet) -> AsyncIterator[EmbeddedBackend]:
    """An in-process backend on the same embedded Postgres and history file as the workers."""
    started = await EmbeddedBackend.start(WorkerConfig(data_dir=data_dir))
    yield started
    await started.close()


@pytest.fixture(scope="session")
def api_server(redis_url: str, fleet: Memfleet) -> Iterator[ApiServer]:
    """`memfleet serve` on a free port, in front of the session's workers."""
    with serving(redis_url, {"MEMFLEET_SEARCH_TIMEOUT": "30"}) as server:
        yield server
