"""A real `memfleet serve` in a subprocess on a free port, and keys for it."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from producer.client import Memfleet
from producer.http.apikeys import KeyStore
from producer.services import free_port
from tests.support import uid


@dataclass(frozen=True)
class ApiServer:
    url: str
    redis_url: str


@contextlib.contextmanager
def serving(redis_url: str, env: dict[str, str] | None = None, timeout: float = 60.0,
            log: Path | None = None) -> Iterator[ApiServer]:
    """`memfleet serve` on a free port; its output goes to `log` if given."""
    port = free_port()
    out = log.open("ab") if log is not None else None
    proc = subprocess.Popen(
        [sys.executable, "-m", "producer.cli", "serve", "--port", str(port)],
        env={**os.environ, "REDIS_URL": redis_url, "MEMFLEET_LOG_FORMAT": "json", **(env or {})},
        stdout=out, stderr=subprocess.STDOUT if out is not None else None,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, f"memfleet serve exited with {proc.returncode}"
            try:
                if httpx.get(f"{url}/openapi.json", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"memfleet serve did not answer within {timeout:g}s"
            time.sleep(0.1)
        yield ApiServer(url, redis_url)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if out is not None:
            out.close()


def create_key(redis_url: str, name: str, *options: str) -> str:
    """`memfleet keys create NAME [options]`, run as a user would; the key is its last line."""
    done = subprocess.run(
        [sys.executable, "-m", "producer.cli", "keys", "create", name, *options],
        env={**os.environ, "REDIS_URL": redis_url}, capture_output=True, text=True, timeout=60, check=True,
    )
    return done.stdout.strip().splitlines()[-1]


async def user_keys(fleet: Memfleet, *users: str) -> list[str]:
    """A user key for each of `users`, made through the key store as the server reads it."""
    store = KeyStore(fleet.redis)
    return [(await store.create(uid(f"key-{n}"), user_id=user))[1] for n, user in enumerate(users)]


def token(key: str) -> dict[str, str]:
    return {"Authorization": f"Token {key}"}
