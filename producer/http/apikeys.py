"""API keys, kept in Redis: app keys act for any user they name, user keys for one user until they expire.

A key is `mf.<id>.<secret>`. Redis holds the id's record with the SHA-256 of the secret, never
the secret itself: the secret is 256 random bits, so a plain hash is enough (no password
stretching), and a copy of Redis gives no usable key. The record is looked up by id and the
hash compared with `hmac.compare_digest`. Nothing is cached, so a revoked key is refused on
its very next request. With `wait_replicas` (MEMFLEET_REDIS_WAIT_REPLICAS), a revocation returns
only once that many replicas have it: else a failover could promote a replica that still holds the
key, and it would work again.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict
from redis.asyncio import Redis

from producer import keys
from producer.contract import check_user_id
from producer.errors import InvalidRequest, WriteNotReplicated

PREFIX = "mf"
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


class KeyStoreError(InvalidRequest):
    """A key could not be created or revoked (the message says why)."""


class ApiKey(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    name: str
    kind: Literal["app", "user"]
    user_id: str | None = None  # user keys only
    expires_at: float | None = None  # user keys only, Unix time
    rate_limit: int | None = None  # requests per second; None: the server's default
    created_at: float
    secret_sha256: str

    def expired(self, now: float | None = None) -> bool:
        return self.expires_at is not None and (now or time.time()) >= self.expires_at


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyStore:
    def __init__(self, redis: Redis, *, wait_replicas: int = 0, wait_timeout: float = 1.0) -> None:
        self.redis = redis
        self.wait_replicas = wait_replicas
        self.wait_timeout = wait_timeout

    async def create(
        self, name: str, *, user_id: str | None = None, ttl: float | None = None, rate_limit: int | None = None
    ) -> tuple[ApiKey, str]:
        """Store a new key and return its record and the key itself (shown once, never stored)."""
        if not name or len(name) > 64 or not set(name) <= _NAME_CHARS:
            raise KeyStoreError("a key name is 1-64 letters, digits and '_ . -'")
        if user_id is not None:
            check_user_id(user_id)
        elif ttl is not None:
            raise KeyStoreError("--ttl applies to user keys only (give --user)")
        key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        now = time.time()
        record = ApiKey(
            id=key_id, name=name, kind="user" if user_id else "app", user_id=user_id,
            expires_at=now + ttl if user_id is not None and ttl is not None else None,
            rate_limit=rate_limit, created_at=now, secret_sha256=_digest(secret),
        )
        if not await self.redis.hsetnx(keys.API_KEY_NAMES, name, key_id):  # type: ignore[misc]
            raise KeyStoreError(f"a key named {name!r} exists; revoke it first or pick another name")
        await self.redis.hset(keys.API_KEYS, key_id, record.model_dump_json())  # type: ignore[misc]
        return record, f"{PREFIX}.{key_id}.{secret}"

    async def authenticate(self, presented: str) -> ApiKey | None:
        """The live key `presented` is, or None (unknown, revoked, malformed or expired)."""
        parts = presented.split(".")
        if len(parts) != 3 or parts[0] != PREFIX or not parts[1] or not parts[2]:
            return None
        raw = await self.redis.hget(keys.API_KEYS, parts[1])  # type: ignore[misc]
        if raw is None:
            return None
        record = ApiKey.model_validate_json(raw)
        if not hmac.compare_digest(record.secret_sha256, _digest(parts[2])) or record.expired():
            return None
        return record

    async def list(self) -> list[ApiKey]:
        records = await self.redis.hvals(keys.API_KEYS)  # type: ignore[misc]
        return sorted((ApiKey.model_validate_json(r) for r in records), key=lambda k: k.created_at)

    async def revoke(self, name: str) -> ApiKey:
        key_id = await self.redis.hget(keys.API_KEY_NAMES, name)  # type: ignore[misc]
        if key_id is None:
            raise KeyStoreError(f"no key named {name!r} (see `memfleet keys list`)")
        key_id = key_id.decode() if isinstance(key_id, bytes) else key_id
        raw = await self.redis.hget(keys.API_KEYS, key_id)  # type: ignore[misc]
        async with self.redis.client() as conn:  # one connection: WAIT counts this connection's writes
            async with conn.pipeline(transaction=True) as pipe:
                pipe.hdel(keys.API_KEYS, key_id)
                pipe.hdel(keys.API_KEY_NAMES, name)
                await pipe.execute()
            if self.wait_replicas:
                replicas = int(await conn.wait(self.wait_replicas, int(self.wait_timeout * 1000)))
                if replicas < self.wait_replicas:
                    raise WriteNotReplicated(
                        f"key {name!r} is revoked on the primary, but only {replicas} of the {self.wait_replicas} "
                        f"replica(s) asked for (MEMFLEET_REDIS_WAIT_REPLICAS) confirmed it within "
                        f"{self.wait_timeout:g}s: a failover now could bring the key back. Check the replicas "
                        "(INFO replication), then `memfleet keys list`: a key listed again is revoked again"
                    )
        if raw is None:
            raise KeyStoreError(f"key {name!r} had no record; its name is released")
        return ApiKey.model_validate_json(raw)
