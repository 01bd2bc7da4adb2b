"""Connecting to Redis (producer/redis_pool.py): the Sentinel settings, and enqueues that wait for a
replica before they are acknowledged. Real redis-servers, no worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import cast

import pytest
import redis
from pydantic import ValidationError

from producer import keys
from producer.client import Memfleet
from producer.contract import AddRequest, Message
from producer.errors import RedisUnavailable, WriteNotReplicated
from producer.services import RedisServer, free_port
from producer.settings import ProducerSettings
from tests.replicated_redis import RedisProcess
from tests.support import eventually_sync


def test_sentinel_settings_are_host_port_pairs_with_a_master(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMFLEET_REDIS_SENTINELS", "10.0.0.1:26379, sentinel-b:26380,")
    monkeypatch.setenv("MEMFLEET_REDIS_SENTINEL_MASTER", "memfleet")
    settings = ProducerSettings()
    assert settings.redis_sentinels == [("10.0.0.1", 26379), ("sentinel-b", 26380)]
    assert settings.wait_replicas == 1 and settings.redis_configured
    assert "Sentinels 10.0.0.1:26379,sentinel-b:26380" in settings.redis_location
    monkeypatch.setenv("MEMFLEET_REDIS_WAIT_REPLICAS", "0")
    assert ProducerSettings().wait_replicas == 0

    monkeypatch.setenv("MEMFLEET_REDIS_SENTINELS", "10.0.0.1")
    with pytest.raises(ValidationError, match=r"host:port pairs separated by commas.*'10\.0\.0\.1'"):
        ProducerSettings()
    monkeypatch.setenv("MEMFLEET_REDIS_SENTINELS", "10.0.0.1:26379")
    monkeypatch.delenv("MEMFLEET_REDIS_SENTINEL_MASTER")
    with pytest.raises(ValidationError, match="MEMFLEET_REDIS_SENTINELS and MEMFLEET_REDIS_SENTINEL_MASTER together"):
        ProducerSettings()


def test_a_plain_redis_url_waits_for_no_replica_and_hides_its_password() -> None:
    settings = ProducerSettings(redis_url="redis://app:s3cret@redis.internal:6379/2")
    assert settings.wait_replicas == 0
    assert "s3cret" not in settings.redis_location and "redis.internal:6379/2" in settings.redis_location


async def test_unreachable_sentinels_fail_fast_and_say_which() -> None:
    settings = ProducerSettings(redis_sentinels=[("127.0.0.1", free_port())], redis_sentinel_master="memfleet")
    with pytest.raises(RedisUnavailable, match=r"the primary of 'memfleet' \(Sentinels 127\.0\.0\.1:"):
        await Memfleet.connect(settings)


@pytest.fixture
def primary(private_redis: RedisServer) -> RedisServer:
    """The test's own redis-server, as the primary its replicas (if any) follow."""
    return private_redis


def _write(user: str) -> AddRequest:
    return AddRequest(user_id=user, messages=[Message(content="a fact worth keeping", id="fact-1")])


async def test_an_enqueue_no_replica_confirms_is_not_acknowledged(primary: RedisServer) -> None:
    fleet = await Memfleet.connect(ProducerSettings(redis_url=primary.url, redis_wait_replicas=1,
                                                    redis_wait_timeout=0.2))
    try:
        with pytest.raises(WriteNotReplicated, match="only 0 of the 1 replica"):
            await fleet.submit([_write("lonely")])
        # Redis took it: it may still take effect, which is why the error says how to send it again.
        assert await fleet.redis.llen(keys.write_log("lonely")) == 1  # type: ignore[misc]
    finally:
        await fleet.close()


async def test_an_acknowledged_enqueue_is_on_the_replica_already(primary: RedisServer, tmp_path: Path) -> None:
    replica = RedisProcess(tmp_path / "replica", ["--replicaof", "127.0.0.1", str(primary.port)]).start()
    fleet = await Memfleet.connect(ProducerSettings(redis_url=primary.url, redis_wait_replicas=1,
                                                    redis_wait_timeout=10))
    try:
        reader = replica.client()
        for n in range(50):
            (handle,) = await fleet.submit([_write(f"kept-{n}")])
            # Read at once from the replica, with nothing in between: WAIT returned, so it is there.
            entries = cast(list[bytes], reader.lrange(keys.write_log(f"kept-{n}"), 0, -1))
            logged = [json.loads(raw)["op_id"] for raw in entries]
            assert logged == [handle.op_id]
            assert reader.zscore(keys.BULK_QUEUE, handle.op_id) is not None, "its job must be there too"
    finally:
        await fleet.close()
        replica.stop()


@pytest.mark.parametrize("command", [["producer.cli", "stats"], ["producer.cli", "keys", "list"], ["workers"]])
def test_a_bad_sentinel_setting_is_one_line_not_a_traceback(command: list[str]) -> None:
    env = {**os.environ, "MEMFLEET_REDIS_SENTINELS": "10.0.0.1", "MEMFLEET_REDIS_SENTINEL_MASTER": "memfleet"}
    done = subprocess.run([sys.executable, "-m", *command], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "MEMFLEET_REDIS_SENTINELS takes host:port pairs" in done.stderr


def _keys_cli(redis_url: str, *args: str, wait_timeout: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REDIS_URL": redis_url, "MEMFLEET_REDIS_WAIT_REPLICAS": "1",
           "MEMFLEET_REDIS_WAIT_TIMEOUT": wait_timeout}
    return subprocess.run([sys.executable, "-m", "producer.cli", "keys", *args], env=env, capture_output=True,
                          text=True, timeout=60)


def test_a_revocation_waits_for_a_replica_or_says_it_could_come_back(primary: RedisServer, tmp_path: Path) -> None:
    """A revoked key must stay revoked through a failover: the revocation is acknowledged only once
    a replica has it (else the promoted replica would still hold the key, and it would work again)."""
    assert _keys_cli(primary.url, "create", "lonely", wait_timeout="0.2").returncode == 0
    alone = _keys_cli(primary.url, "revoke", "lonely", wait_timeout="0.2")
    assert alone.returncode == 1 and "Traceback" not in alone.stderr
    assert "revoked on the primary, but only 0 of the 1 replica(s)" in " ".join(alone.stderr.split())
    assert redis.Redis.from_url(primary.url).hlen(keys.API_KEYS) == 0, "the primary has revoked it all the same"

    replica = RedisProcess(tmp_path / "replica", ["--replicaof", "127.0.0.1", str(primary.port)]).start()
    try:
        assert _keys_cli(primary.url, "create", "kept", wait_timeout="10").returncode == 0
        reader = replica.client()
        eventually_sync(lambda: reader.hlen(keys.API_KEYS) == 1, 30, "the key to reach the replica")
        revoked = _keys_cli(primary.url, "revoke", "kept", wait_timeout="10")
        assert revoked.returncode == 0, revoked.stderr
        # Read from the replica with nothing in between: the revocation returned, so it is there.
        assert reader.hlen(keys.API_KEYS) == 0 and reader.hlen(keys.API_KEY_NAMES) == 0
    finally:
        replica.stop()
