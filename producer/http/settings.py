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
    # Connections and their timeouts (uvicorn's, and ours where uvicorn has none); docs/security.md.
    api_body_timeout: float = Field(default=15.0, gt=0, description="seconds a request body may take to arrive (408)")
    api_header_timeout: float = Field(default=10.0, gt=0,
                                      description="seconds a request's headers may take to arrive (then closed)")
    api_keep_alive: int = Field(default=5, ge=1, description="seconds an idle keep-alive connection stays open")
    api_max_connections: int = Field(default=1_000, ge=1,
                                     description="connections and requests at once, per process (503 above)")
    api_max_header_bytes: int = Field(default=16_384, ge=1024, description="largest request head (400 above)")
