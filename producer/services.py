"""Starting what a command needs locally: a private redis-server and worker processes."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from importlib.util import find_spec

import anyio
from rich.console import Console

from producer.client import Memfleet
from producer.cores import usable_cores
from producer.errors import RedisUnavailable, ServiceError
from producer.settings import KILL_GRACE, ProducerSettings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    """A throw-away `redis-server` on a free loopback port, keeping nothing on disk."""

    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    directory: str = ""

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServiceError("redis-server is not on PATH: install Redis, or set REDIS_URL to a running one")
        self.directory = tempfile.mkdtemp(prefix="memfleet-redis-")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.directory],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise ServiceError(f"redis-server did not answer on port {self.port} within {timeout:g}s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)


def worker_command() -> list[str]:
    if find_spec("workers") is None or find_spec("mem0") is None:
        raise ServiceError("running a worker needs the local extra: pip install 'memfleet[local]'")
    return [sys.executable, "-m", "workers"]


def start_workers(processes: int = 1, env: dict[str, str] | None = None) -> list[subprocess.Popen[bytes]]:
    """Start `processes` worker processes (each one arq worker serving both queues).

    They stop when this process is gone (`MEMFLEET_SUPERVISOR_PID`, workers.stopping), rather
    than run on unsupervised after a `kill -9` of it.
    """
    command = worker_command()
    # Each process's model would otherwise use every core, and P processes would fight over them.
    threads = {"MEMFLEET_EMBED_THREADS": str(max(1, usable_cores() // processes))}
    supervisor = {"MEMFLEET_SUPERVISOR_PID": str(os.getpid())}
    return [subprocess.Popen(command, env={**threads, **os.environ, **(env or {}), **supervisor})
            for _ in range(processes)]


def stop_workers(procs: list[subprocess.Popen[bytes]], timeout: float | None = None) -> int:
    """SIGTERM each worker, wait for it to finish its jobs, and return the worst exit code.

    A worker exits within its shutdown wait (MEMFLEET_SHUTDOWN_WAIT) by itself; one that has not
    `KILL_GRACE` seconds after that (by default) is killed.
    """
    if timeout is None:
        timeout = ProducerSettings().shutdown_wait + KILL_GRACE
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    worst = 0
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            code = proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        worst = max(worst, abs(code))
    return worst


@contextlib.contextmanager
def local_redis(settings: ProducerSettings, console: Console) -> Iterator[ProducerSettings]:
    if settings.redis_configured and _reachable(settings):
        yield settings
        return
    why = "REDIS_URL is unset" if not settings.redis_configured else f"{settings.redis_location} is unreachable"
    server = RedisServer().start()
    console.print(f"[dim]{why}: started a private redis-server on {server.url}[/dim]")
    try:
        yield settings.model_copy(update={"redis_url": server.url})
    finally:
        server.stop()


def _reachable(settings: ProducerSettings) -> bool:
    async def ping() -> bool:
        try:
            async with await Memfleet.connect(settings) as fleet:
                return bool(await fleet.redis.ping())
        except RedisUnavailable:
            return False

    return anyio.run(ping)


@contextlib.asynccontextmanager
async def local_workers(
    fleet: Memfleet, console: Console, processes: int = 0, timeout: float = 180.0
) -> AsyncIterator[None]:
    """Start `processes` workers for the duration (or one, if `processes` is 0 and none is running)."""
    if not processes and (await fleet.stats()).workers:
        yield
        return
    processes = processes or 1
    console.print(f"[dim]starting {processes} worker process(es) (embedded Postgres, MiniLM)[/dim]")
    before = len((await fleet.stats()).workers)
    # Workers started for one command keep their per-job log lines to themselves.
    quiet = {"MEMFLEET_LOG_LEVEL": os.environ.get("MEMFLEET_LOG_LEVEL", "WARNING")}
    procs = start_workers(processes, {"REDIS_URL": fleet.settings.effective_redis_url, **quiet})
    try:
        deadline = time.monotonic() + timeout
        while len((await fleet.stats()).workers) < before + processes:
            if any(p.poll() is not None for p in procs):
                raise ServiceError("a worker exited while starting; run `memfleet worker` to see why")
            if time.monotonic() > deadline:
                raise ServiceError(f"the worker did not come up within {timeout:g}s")
            await anyio.sleep(0.2)
        yield
    finally:
        code = await anyio.to_thread.run_sync(stop_workers, procs)
        if code:
            console.print(f"[yellow]the worker exited with code {code}[/yellow]")
