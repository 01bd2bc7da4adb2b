"""Settings of the producer side, read from the environment (docs/configuration.md has the full table)."""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from producer import keys
from producer.dead_letters import DeadLetterLimits

# Ride out a Redis restart or failover of up to about three minutes: every command is retried on a
# broken connection, on a new one. Re-sent writes are safe, because every write is idempotent.
REDIS_RETRIES = 40
# What `memfleet worker` adds to the workers' shutdown wait before it kills one that overran it.
KILL_GRACE = 5.0


class ProducerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MEMFLEET_", extra="ignore")

    # None means "not configured": `memfleet demo` then starts a private redis-server.
    redis_url: str | None = Field(default=None, validation_alias=AliasChoices("REDIS_URL"))
    # Sentinel: the primary is whichever Redis these name for `redis_sentinel_master`; REDIS_URL then
    # gives only the database number and credentials.
    redis_sentinels: Annotated[list[tuple[str, int]], NoDecode] = Field(
        default_factory=list, description="Redis Sentinels, host:port,host:port"
    )
    redis_sentinel_master: str | None = Field(default=None, description="the master name the Sentinels monitor")
    # An enqueue is acknowledged once this many replicas have it too (Redis WAIT), so that it survives
    # a failover. None: 1 under Sentinel, 0 (no wait) with a plain REDIS_URL.
    redis_wait_replicas: int | None = Field(default=None, ge=0, description="replicas an enqueue waits for")
    redis_wait_timeout: float = Field(default=1.0, gt=0, description="seconds an enqueue waits for its replicas")
    search_timeout: float = Field(default=10.0, gt=0, description="seconds a search or list waits")
    write_timeout: float = Field(default=60.0, gt=0, description="seconds a waited-for write waits")
    # Read by the workers and by `memfleet worker`, which kills a worker KILL_GRACE seconds past it.
    shutdown_wait: float = Field(default=40.0, ge=5, description="seconds a worker takes at most to exit on SIGTERM")
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: str = "INFO"
    dead_letter_max: int = Field(default=keys.DEAD_LETTERS_MAX, ge=1, description="dead letters kept (the newest)")
    dead_letter_max_age: int = Field(default=keys.DEAD_LETTERS_MAX_AGE, ge=60,
                                     description="seconds a dead letter is kept")

    @property
    def dead_letter_limits(self) -> DeadLetterLimits:
        return DeadLetterLimits(self.dead_letter_max, self.dead_letter_max_age)

    @field_validator("redis_sentinels", mode="before")
    @classmethod
    def _host_port_pairs(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        pairs = []
        for item in filter(None, (part.strip() for part in value.split(","))):
            host, _, port = item.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"MEMFLEET_REDIS_SENTINELS takes host:port pairs separated by commas, "
                                 f"e.g. 10.0.0.1:26379,10.0.0.2:26379; got {item!r}")
            pairs.append((host, int(port)))
        return pairs

    @model_validator(mode="after")
    def _sentinel_needs_master(self) -> ProducerSettings:
        if bool(self.redis_sentinels) != bool(self.redis_sentinel_master):
            raise ValueError("set MEMFLEET_REDIS_SENTINELS and MEMFLEET_REDIS_SENTINEL_MASTER together "
                             "(the Sentinels, and the master name they monitor), or neither")
        return self

    @property
    def effective_redis_url(self) -> str:
        return self.redis_url or "redis://127.0.0.1:6379/0"

    @property
    def redis_configured(self) -> bool:
        """A Redis was named (REDIS_URL or Sentinel), rather than the local default."""
        return bool(self.redis_url or self.redis_sentinels)

    @property
    def redis_location(self) -> str:
        """Where Redis is, for messages: the URL without its password, or the Sentinels."""
        if self.redis_sentinels:
            sentinels = ",".join(f"{host}:{port}" for host, port in self.redis_sentinels)
            return f"the primary of {self.redis_sentinel_master!r} (Sentinels {sentinels})"
        url = urlsplit(self.effective_redis_url)
        if url.password is None:
            return self.effective_redis_url
        return url._replace(netloc=f"{url.username or ''}:***@{url.netloc.rpartition('@')[2]}").geturl()

    @property
    def wait_replicas(self) -> int:
        if self.redis_wait_replicas is not None:
            return self.redis_wait_replicas
        return 1 if self.redis_sentinels else 0
