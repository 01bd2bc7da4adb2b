"""Settings of the producer side, read from the environment (docs/configuration.md has the full table)."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from arq.connections import RedisSettings
from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer.dead_letters import DEFAULT_MAX_AGE, DEFAULT_MAX_COUNT, DeadLetterLimits

# Ride out a Redis restart of up to about three minutes: every command is retried on a broken
# connection, on a new one. Re-sent writes are safe, because every write is idempotent.
REDIS_RETRIES = 40


class ProducerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MEMFLEET_", extra="ignore")

    # None means "not configured": `memfleet demo` then starts a private redis-server.
    redis_url: str | None = Field(default=None, validation_alias=AliasChoices("REDIS_URL"))
    search_timeout: float = Field(default=10.0, gt=0, description="seconds a search or list waits")
    write_timeout: float = Field(default=60.0, gt=0, description="seconds a waited-for write waits")
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: str = "INFO"
    dead_letter_max: int = Field(default=DEFAULT_MAX_COUNT, ge=1, description="dead letters kept (the newest)")
    dead_letter_max_age: int = Field(default=DEFAULT_MAX_AGE, ge=60, description="seconds a dead letter is kept")

    @property
    def dead_letter_limits(self) -> DeadLetterLimits:
        return DeadLetterLimits(self.dead_letter_max, self.dead_letter_max_age)

    @property
    def effective_redis_url(self) -> str:
        return self.redis_url or "redis://127.0.0.1:6379/0"

    @property
    def shown_redis_url(self) -> str:
        """The Redis URL as an error message may print it: without its password."""
        parts = urlsplit(self.effective_redis_url)
        if parts.password is None:
            return self.effective_redis_url
        host = parts.hostname or ""
        netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))

    def arq_redis_settings(self) -> RedisSettings:
        settings = RedisSettings.from_dsn(self.effective_redis_url)
        # OSError: while Redis is down, opening a connection fails with ConnectionRefusedError.
        settings.retry_on_error = [RedisConnectionError, RedisTimeoutError, OSError]
        settings.retry = Retry(ExponentialBackoff(cap=5.0, base=0.05), REDIS_RETRIES)
        return settings
