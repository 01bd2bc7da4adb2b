"""The leak load test at CI scale: 1,000 users with unique canaries through the queue, and 300 of
them through `memfleet serve` (what only HTTP adds, one key per user, needs no more users than that)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from producer.client import Memfleet

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_loadtest_1000_users_has_no_leaks_and_misses_nothing(worker_env: dict[str, str], fleet: Memfleet) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "producer.cli", "loadtest", "--users", "1000", "--messages", "2", "--json"],
        env={**os.environ, **worker_env}, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    print(json.dumps(report))  # the figures, for the CI log
    assert report["users"] == 1000 and report["stored"] == 2000
    assert report["searches"] == 2000
    assert report["leaks"] == 0
    assert report["own_canaries_missing"] == 0
    assert report["failed_jobs"] == 0


def test_loadtest_300_users_over_http_has_no_leaks(worker_env: dict[str, str], fleet: Memfleet) -> None:
    """The same through `memfleet serve`, each user with its own user key, each key refused for its neighbour."""
    result = subprocess.run(
        [sys.executable, "-m", "producer.cli", "loadtest", "--http", "--users", "300", "--messages", "2", "--json"],
        env={**os.environ, **worker_env}, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    print(json.dumps(report))
    assert report["via"] == "http" and report["users"] == 300 and report["stored"] == 600
    assert report["searches"] == 600
    assert report["leaks"] == 0 and report["neighbour_not_refused"] == 0
    assert report["own_canaries_missing"] == 0
    assert report["failed_jobs"] == 0
