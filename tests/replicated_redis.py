"""A replicated Redis watched by Sentinel, from real processes: a primary, replicas and three Sentinels.

Every process listens on a free loopback port and keeps its files under one directory, so the
session's leftover check (tests/processes.py) finds them by their command lines. Sentinel decides
quickly here (a server is down after 1 s without an answer) so that a failover takes seconds.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import redis

from producer.services import free_port
from tests.support import eventually_sync

MASTER = "memfleet"
SENTINELS = 3
QUORUM = 2
DOWN_AFTER_MS = 1000


@dataclass
class RedisProcess:
    """One redis-server (a data server, or a Sentinel when `config` is given)."""

    directory: Path
    args: list[str] = field(default_factory=list)
    config: Path | None = None
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisProcess:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.config is not None:
            command = ["redis-server", str(self.config), "--sentinel"]
        else:
            command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
                       "--save", "", "--appendonly", "no", *self.args]
        log = (self.directory / "redis.log").open("ab")
        with log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        eventually_sync(self._answers, 10, f"redis-server on port {self.port} to answer")
        return self

    def _answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.ConnectionError:
            return False

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_connect_timeout=1, socket_timeout=5)

    def kill(self) -> None:
        """kill -9: no shutdown, no last words to the replicas."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class SentinelGroup:
    """A primary, `replicas` replicas of it, and three Sentinels monitoring them as `MASTER`."""

    root: Path
    replicas: int = 1
    nodes: list[RedisProcess] = field(default_factory=list)
    sentinels: list[RedisProcess] = field(default_factory=list)

    def start(self) -> SentinelGroup:
        try:
            primary = RedisProcess(self.root / "node-0").start()
            self.nodes.append(primary)
            for n in range(1, self.replicas + 1):
                self.nodes.append(RedisProcess(self.root / f"node-{n}",
                                               ["--replicaof", "127.0.0.1", str(primary.port)]).start())
            for n in range(SENTINELS):
                sentinel = RedisProcess(self.root / f"sentinel-{n}")
                sentinel.directory.mkdir(parents=True)
                sentinel.config = sentinel.directory / "sentinel.conf"
                sentinel.config.write_text(
                    f"port {sentinel.port}\nbind 127.0.0.1\ndir {sentinel.directory}\n"
                    f"sentinel monitor {MASTER} 127.0.0.1 {primary.port} {QUORUM}\n"
                    f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
                    f"sentinel failover-timeout {MASTER} 10000\n"
                    f"sentinel parallel-syncs {MASTER} 1\n"
                )
                self.sentinels.append(sentinel.start())
            # Sentinels find the replicas and each other through the primary, within a few seconds.
            eventually_sync(self._settled, 30, "the Sentinels to see the replicas and each other")
        except BaseException:
            self.stop()
            raise
        return self

    def _settled(self) -> bool:
        for sentinel in self.sentinels:
            state = sentinel.client().sentinel_master(MASTER)  # type: ignore[no-untyped-call]
            if state["num-slaves"] < self.replicas or state["num-other-sentinels"] < SENTINELS - 1:
                return False
        return all(cast(dict[str, Any], node.client().info("replication")).get("master_link_status") == "up"
                   for node in self.nodes[1:])

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The Sentinels, as `ProducerSettings.redis_sentinels` takes them."""
        return [("127.0.0.1", s.port) for s in self.sentinels]

    @property
    def setting(self) -> str:
        """The Sentinels, as MEMFLEET_REDIS_SENTINELS takes them."""
        return ",".join(f"{host}:{port}" for host, port in self.addresses)

    def primary_port(self) -> int | None:
        """The primary's port, as the Sentinels that answer agree on it (None while they do not)."""
        answers = set()
        for sentinel in self.sentinels:
            with contextlib.suppress(redis.ConnectionError):
                host_port = sentinel.client().sentinel_get_master_addr_by_name(MASTER)  # type: ignore[no-untyped-call]
                answers.add(int(host_port[1]) if host_port else None)
        return answers.pop() if len(answers) == 1 else None

    def node(self, port: int) -> RedisProcess:
        (found,) = [n for n in self.nodes if n.port == port]
        return found

    def stop(self) -> None:
        for process in [*self.sentinels, *self.nodes]:
            process.stop()
