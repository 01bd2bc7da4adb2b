"""`memfleet get|update|delete|history|export|import`: one memory at a time, and a user's whole record.

A memory id that is not the user's is "no such memory" (exit 1), exactly as an unknown id is.
`export` streams JSON lines in bounded memory; `import` checks the whole file first, so that a
bad line stores nothing, then restores it in writes of up to 100 memories with their ids.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.table import Table

from producer.cli_support import AsJson, User, err, fail, json_option, memories_table, out, with_fleet
from producer.client import Memfleet, WriteHandle
from producer.contract import MAX_IDS_PER_WRITE, ExportedMemory, describe

MemoryIdArg = Annotated[str, typer.Argument(help="the memory's id, as add, search or list gave it")]
Wait = Annotated[bool, typer.Option(help="wait until the write has taken effect")]
# Writes an import keeps in flight before it waits for them: its memory stays bounded.
IMPORT_WINDOW = 20


def get(user: User, memory_id: MemoryIdArg, as_json: AsJson = False) -> None:
    """Show one of a user's memories."""
    record = with_fleet(lambda fleet: fleet.get(user, memory_id))
    if as_json:
        out.print_json(data=record.model_dump())
    else:
        out.print(memories_table(f"{user}: {record.id}", [record]))


def update(
    user: User,
    memory_id: MemoryIdArg,
    text: Annotated[str | None, typer.Option(help="the new text (embedded and indexed again)")] = None,
    metadata: Annotated[str | None, typer.Option(help="JSON object that replaces the memory's metadata")] = None,
    timestamp: Annotated[str | None, typer.Option(help="when it was said, ISO 8601")] = None,
    expires_at: Annotated[str | None, typer.Option(help="when it expires, ISO 8601 (UTC if no zone)")] = None,
    no_expiry: Annotated[bool, typer.Option("--no-expiry", help="it no longer expires")] = False,
    wait: Wait = True,
) -> None:
    """Change one memory; what is not given stays as it is."""
    meta = None if metadata is None else json_option(metadata, "--metadata")

    async def main(fleet: Memfleet) -> None:
        handle = await fleet.update(user, memory_id, text=text, metadata=meta, timestamp=timestamp,
                                    expires_at=expires_at, clear_expiry=no_expiry)
        await _finish(handle, wait, f"updated {memory_id}")

    with_fleet(main)


def delete(user: User, memory_id: MemoryIdArg, wait: Wait = True) -> None:
    """Delete one memory: its text is kept nowhere, not even in its history."""

    async def main(fleet: Memfleet) -> None:
        await _finish(await fleet.delete(user, memory_id), wait, f"deleted {memory_id}")

    with_fleet(main)


async def _finish(handle: WriteHandle, wait: bool, done: str) -> None:
    if not wait:
        out.print(f"queued {handle.op_id}")
        return
    await handle.outcome()  # MemoryNotFound: exit 1, one line
    out.print(f"{done} ({handle.op_id})")


def history(user: User, memory_id: MemoryIdArg, as_json: AsJson = False) -> None:
    """A memory's ADD, UPDATE and DELETE events; a deleted memory's carry no text."""
    events = with_fleet(lambda fleet: fleet.history(user, memory_id))
    if as_json:
        out.print_json(data=[e.model_dump() for e in events])
        return
    table = Table(title=f"{user}: {memory_id}")
    for column in ("at", "event", "old text", "new text"):
        table.add_column(column, overflow="fold")
    for e in events:
        table.add_row(e.at or "", e.event, e.old_text or "", e.new_text or "")
    out.print(table)


def export(
    user: User,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="file to write (default: stdout)")] = None,
) -> None:
    """Write every memory of the user, with its history, as JSON lines (`memfleet import` reads them)."""

    async def main(fleet: Memfleet) -> int:
        count = 0
        sink_cm = output.open("w", encoding="utf-8") if output else contextlib.nullcontext(sys.stdout)
        with sink_cm as sink:
            async for memory in fleet.export(user):
                sink.write(memory.model_dump_json() + "\n")
                count += 1
        return count

    count = with_fleet(main)
    err.print(f"exported {count} memories of {user}" + (f" to {output}" if output else ""))


def import_(
    path: Annotated[Path, typer.Argument(help="a file `memfleet export` wrote (JSON lines)")],
    user: Annotated[str | None, typer.Option("--user", "-u", help="import into this user instead of the one "
                                             "each line names")] = None,
    wait: Wait = True,
) -> None:
    """Restore exported memories with their ids and history; importing twice stores each once."""
    if not path.is_file():
        raise fail(f"no such file: {path}")
    lines = sum(1 for _ in _memories(path, user))  # a bad line fails here, before anything is stored

    async def main(fleet: Memfleet) -> tuple[int, int]:
        stored = duplicates = 0
        pending: list[WriteHandle] = []
        for chunk in _chunks(_memories(path, user)):
            pending.append(await fleet.restore(chunk[0].user_id, chunk))
            if wait and len(pending) >= IMPORT_WINDOW:
                for outcome in await fleet.wait(pending):
                    stored, duplicates = stored + outcome.stored, duplicates + outcome.duplicates
                pending = []
        if wait:
            for handle in pending:
                outcome = await handle.outcome()
                stored, duplicates = stored + outcome.stored, duplicates + outcome.duplicates
        return stored, duplicates

    stored, duplicates = with_fleet(main)
    if wait:
        out.print(f"imported {stored} memories, {duplicates} already there ({lines} lines)")
    else:
        out.print(f"queued {lines} memories")


def _memories(path: Path, user: str | None) -> Iterator[ExportedMemory]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                if user is not None and isinstance(raw, dict):
                    raw["user_id"] = user
                yield ExportedMemory.model_validate(raw)
            except json.JSONDecodeError as exc:
                raise fail(f"{path}:{number}: not JSON ({exc.msg}); nothing was imported") from None
            except ValidationError as exc:
                raise fail(f"{path}:{number}: {describe(exc)}; nothing was imported") from None


def _chunks(memories: Iterator[ExportedMemory]) -> Iterator[list[ExportedMemory]]:
    """Runs of consecutive memories of one user, each at most one write long."""
    chunk: list[ExportedMemory] = []
    for memory in memories:
        if chunk and (memory.user_id != chunk[0].user_id or len(chunk) == MAX_IDS_PER_WRITE):
            yield chunk
            chunk = []
        chunk.append(memory)
    if chunk:
        yield chunk


def register(app: typer.Typer) -> None:
    for command in (get, update, delete, history, export):
        app.command()(command)
    app.command("import")(import_)
