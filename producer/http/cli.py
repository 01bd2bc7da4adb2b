"""`memfleet serve` and `memfleet keys ...` (registered on the main CLI in producer.cli)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import anyio
import typer
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from rich.console import Console
from rich.table import Table

from producer.contract import InvalidUserId, describe
from producer.errors import WriteNotReplicated
from producer.http.apikeys import ApiKey, KeyStore, KeyStoreError
from producer.http.settings import ApiSettings
from producer.logs import configure_logging
from producer.redis_pool import redis_pool

keys_app = typer.Typer(help="API keys for `memfleet serve`: create, list, revoke.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)
T = TypeVar("T")


def _settings() -> ApiSettings:
    """The settings from the environment, or one line naming the bad one (exit 2)."""
    try:
        return ApiSettings()
    except ValidationError as exc:
        err.print(f"[red]error:[/red] bad setting in the environment: {describe(exc)}")
        raise typer.Exit(2) from None


def _with_keys(settings: ApiSettings, main: Callable[[KeyStore], Awaitable[T]]) -> T:
    async def go() -> T:
        redis = redis_pool(settings, fail_fast=True)
        try:
            return await main(KeyStore(redis, wait_replicas=settings.wait_replicas,
                                       wait_timeout=settings.redis_wait_timeout))
        finally:
            await redis.aclose()

    try:
        return anyio.run(go)
    except (KeyStoreError, InvalidUserId) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    except WriteNotReplicated as exc:  # before OSError, which it also is
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    except (RedisConnectionError, OSError) as exc:
        err.print(f"[red]error:[/red] cannot reach Redis at {settings.redis_location}: {exc.__class__.__name__}")
        raise typer.Exit(1) from None


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="a name to list and revoke the key by")],
    user: Annotated[str | None, typer.Option("--user", "-u", help="make a user key, bound to this user id")] = None,
    ttl: Annotated[int | None, typer.Option(min=1, help="seconds a user key lives (default 30 days)")] = None,
    rate: Annotated[int | None, typer.Option(min=1, help="requests per second (default MEMFLEET_API_RATE_LIMIT)")]
    = None,
) -> None:
    """Create a key and print it as the last line: it is shown once and stored only as a hash."""
    settings = _settings()
    lifetime = (ttl or settings.api_user_key_ttl) if user is not None else ttl
    record, key = _with_keys(settings, lambda store: store.create(name, user_id=user, ttl=lifetime, rate_limit=rate))
    scope = f"user key for {record.user_id}, expires {_when(record.expires_at)}" if user else "app key: any user"
    err.print(f"created {record.name} ({scope}); keep it secret, it is not shown again")
    print(key)


@keys_app.command("list")
def keys_list(as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Keys by name, kind, user and expiry (never the key itself)."""
    records = _with_keys(_settings(), lambda store: store.list())
    rows = [r.model_dump(exclude={"secret_sha256"}) for r in records]
    if as_json:
        out.print_json(data=rows)
        return
    table = Table(title=f"{len(rows)} key(s)")
    for column in ("name", "kind", "user_id", "expires", "rate_limit", "created"):
        table.add_column(column)
    for r in records:
        table.add_row(r.name, r.kind, r.user_id or "", _when(r.expires_at), str(r.rate_limit or "default"),
                      _when(r.created_at))
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(name: str) -> None:
    """Revoke a key: its next request is refused."""
    record: ApiKey = _with_keys(_settings(), lambda store: store.revoke(name))
    out.print(f"revoked {record.name}")


def serve(
    host: Annotated[str | None, typer.Option(help="address to listen on (default MEMFLEET_API_HOST, 127.0.0.1)")]
    = None,
    port: Annotated[int | None, typer.Option(help="port (default MEMFLEET_API_PORT, 8080)")] = None,
) -> None:
    """Serve the HTTP API: mem0-compatible routes, memfleet's API (/docs), MCP (/mcp), /metrics."""
    import uvicorn

    from producer.http.app import create_app
    from producer.http.uvicorn_adapter import HeadDeadline

    updates = {k: v for k, v in {"api_host": host, "api_port": port}.items() if v is not None}
    settings = _settings().model_copy(update=updates)
    configure_logging(settings.log_format, settings.log_level)
    _with_keys(settings, lambda store: store.redis.ping())  # fail with one line, not a traceback
    # Every limit explicit (docs/security.md): what a client may hold open, and for how long.
    uvicorn.run(
        create_app(settings), host=settings.api_host, port=settings.api_port, log_level="warning",
        http=HeadDeadline.with_timeout(settings.api_header_timeout),  # uvicorn's h11, plus a deadline for heads
        limit_concurrency=settings.api_max_connections,  # 503 above: connections and requests at once
        timeout_keep_alive=settings.api_keep_alive,
        h11_max_incomplete_event_size=settings.api_max_header_bytes,  # a longer head is answered 400
        timeout_graceful_shutdown=30,  # on SIGTERM, running requests get this long
        server_header=False,
    )


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "never"
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


