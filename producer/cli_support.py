"""What every `memfleet` command shares: the consoles, the common options, and turning errors into
one line and an exit code (0 done, 2 the input was wrong, 1 the service could not do it)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import anyio
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from producer.client import Memfleet
from producer.contract import MemoryRecord, describe
from producer.errors import InvalidRequest, MemfleetError
from producer.logs import quiet_libraries
from producer.settings import ProducerSettings

out = Console()
err = Console(stderr=True)
T = TypeVar("T")

User = Annotated[str, typer.Option("--user", "-u", help="the user id the job is for")]
AsJson = Annotated[bool, typer.Option("--json", help="print JSON")]


def fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", markup=True, highlight=False)
    return typer.Exit(code)


def settings_from_env() -> ProducerSettings:
    """The settings from the environment, or one line naming the bad one (exit 2)."""
    try:
        return ProducerSettings()
    except ValidationError as exc:
        raise fail(f"bad setting in the environment: {describe(exc)}") from None


def with_fleet(main: Callable[[Memfleet], Awaitable[T]], settings: ProducerSettings | None = None) -> T:
    """Connect, run `main`, and turn our errors into one line on stderr instead of a traceback."""
    settings = settings or settings_from_env()
    quiet_libraries()

    async def go() -> T:
        async with await Memfleet.connect(settings) as fleet:
            return await main(fleet)

    try:
        return anyio.run(go)
    except ValidationError as exc:
        raise fail(describe(exc)) from None
    except (InvalidRequest, ValueError) as exc:
        raise fail(str(exc)) from None  # the input was wrong: 2
    except MemfleetError as exc:
        raise fail(str(exc), 1) from None  # the service could not do it (or found no such memory): 1


def json_option(value: str, option: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise fail(f"{option} is not JSON: {exc.msg}") from None


def memories_table(title: str, records: list[MemoryRecord]) -> Table:
    table = Table(title=title)
    for column in ("id", "memory", "score", "metadata", "expires"):
        table.add_column(column, overflow="fold")
    for r in records:
        table.add_row(r.id, r.text, "" if r.score is None else f"{r.score:.3f}", json.dumps(r.metadata),
                      r.expires_at or "")
    return table
