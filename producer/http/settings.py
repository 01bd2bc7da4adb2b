"""Settings of `memfleet serve`, read from the environment (MEMFLEET_API_*)."""

from __future__ import annotations

from pydantic import Field

from producer.settings import ProducerSettings


class ApiSettings(ProducerSettings):
    api_host: str = Field(default="127.0.0.1", description="address `memfleet serve` listens on")
    api_port: int = Field(default=8080, ge=0, le=65535)
    api_max_body_bytes: int = Field(default=1_048_576, ge=1024, description="largest request body (413 above)")
    api_rate_limit: int = Field(default=50, ge=1, description="requests per second per key, unless the key says")
    api_user_key_ttl: int = Field(default=30 * 24 * 3600, ge=1, description="seconds a user key lives by default")
