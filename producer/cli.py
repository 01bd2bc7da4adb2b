"""The `memfleet` command line."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from producer import memory_cli
from producer.cli_support import (
    AsJson,
    User,
    err,
    fail,
    json_option,
    memories_table,
    out,
    settings_from_env,
    with_fleet,
)
from producer.client import Memfleet
from producer.contract import MemoryRecord
from producer.errors import MemfleetError, ServiceError
from producer.http.cli import keys_app, serve
from producer.ingest import STDIN, Format, Ingest, Input, LineError
from producer.services import start_workers, stop_workers
from producer.settings import KILL_GRACE

app = typer.Typer(help="memfleet: per-user AI agent memory through a Redis job queue.", no_args_is_help=True)


@app.command()
def add(
    user: User,
    text: Annotated[list[str], typer.Argument(help="one message per argument")],
    role: Annotated[str, typer.Option(help="user or assistant")] = "user",
    name: Annotated[str | None, typer.Option(help="who said it (indexed with the text)")] = None,
    timestamp: Annotated[str | None, typer.Option(help="when it was said, ISO 8601 (indexed with the text)")] = None,
    metadata: Annotated[str, typer.Option(help="JSON object stored with each message")] = "{}",
    infer: Annotated[bool, typer.Option(help="extract facts with the configured LLM")] = False,
    expires_at: Annotated[str | None, typer.Option(help="when the memories expire, ISO 8601 (UTC if no zone)")]
    = None,
    wait: Annotated[bool, typer.Option(help="wait until the write has taken effect")] = True,
) -> None:
    """Add messages to a user's memory."""
    meta = json_option(metadata, "--metadata")

    async def main(fleet: Memfleet) -> None:
        said = {"role": role, "name": name, "timestamp": timestamp}
        handle = await fleet.add(user, [{**said, "content": t} for t in text], metadata=meta, infer=infer,
                                 expires_at=expires_at)
        if not wait:
            out.print(f"queued {handle.op_id}")
            return
        outcome = await handle.outcome()
        out.print(f"stored {outcome.stored}, already stored {outcome.duplicates} ({handle.op_id})")

    with_fleet(main)


@app.command()
def search(
    user: User,
    query: str,
    limit: Annotated[int, typer.Option(help="most results")] = 10,
    filters: Annotated[str, typer.Option(help="JSON metadata filter, e.g. '{\"session\": 3}'")] = "{}",
    as_json: AsJson = False,
) -> None:
    """Search a user's memories."""
    parsed = json_option(filters, "--filters")
    records = with_fleet(lambda fleet: fleet.search(user, query, limit=limit, filters=parsed))
    if as_json:
        out.print_json(data=[r.model_dump() for r in records])
    else:
        out.print(memories_table(f"{user}: {len(records)} result(s)", records))


@app.command("list")
def list_(
    user: User,
    limit: Annotated[int, typer.Option(help="page size")] = 100,
    cursor: Annotated[str | None, typer.Option(help="next_cursor of the previous page")] = None,
    all_pages: Annotated[bool, typer.Option("--all", help="follow every page")] = False,
    as_json: AsJson = False,
) -> None:
    """List a user's memories, a page at a time."""

    async def main(fleet: Memfleet) -> tuple[list[MemoryRecord], str | None]:
        records: list[MemoryRecord] = []
        next_cursor = cursor
        while True:
            page = await fleet.list(user, limit=limit, cursor=next_cursor)
            records.extend(page.memories)
            next_cursor = page.next_cursor
            if not all_pages or next_cursor is None:
                return records, next_cursor

    records, next_cursor = with_fleet(main)
    if as_json:
        out.print_json(data={"memories": [r.model_dump() for r in records], "next_cursor": next_cursor})
    else:
        out.print(memories_table(f"{user}: {len(records)} memories", records))
        if next_cursor:
            out.print(f"more: --cursor {next_cursor}")


@app.command()
def forget(user: User, wait: Annotated[bool, typer.Option(help="wait until it has taken effect")] = True) -> None:
    """Delete everything memfleet keeps for a user."""

    async def main(fleet: Memfleet) -> None:
        handle = await fleet.forget(user)
        if wait:
            outcome = await handle.outcome()
            out.print(f"forgot {user}: {outcome.deleted} memories deleted")
        else:
            out.print(f"queued {handle.op_id}")

    with_fleet(main)


@app.command()
def ingest(
    paths: Annotated[list[Path], typer.Argument(help="files to ingest (.jsonl, .jsonl.gz), or - for stdin")],
    fmt: Annotated[str, typer.Option("--format", help="jsonl or locomo")] = "jsonl",
    wait: Annotated[bool, typer.Option("--wait", help="wait until every job has taken effect")] = False,
    as_json: AsJson = False,
) -> None:
    """Bulk-ingest chat logs as a stream. Bad lines are reported and skipped; the exit code is 1 if any failed."""
    if fmt not in ("jsonl", "locomo"):
        raise fail(f"--format must be jsonl or locomo, not {fmt!r}")
    if paths.count(STDIN) > 1:
        raise fail("- (stdin) can be given only once")
    if missing := [str(p) for p in paths if p != STDIN and not p.is_file()]:
        raise fail(f"no such file: {', '.join(missing)}")
    fmt_: Format = "jsonl" if fmt == "jsonl" else "locomo"
    started = time.perf_counter()
    progress = ingest_progress(err, disable=as_json or not err.is_terminal)

    def report(error: LineError) -> None:
        err.print(f"{error.source}: {error.kind}: {error.detail}", markup=False, highlight=False)

    async def main(fleet: Memfleet) -> Ingest:
        run = Ingest(fleet, [Input(p) for p in paths], fmt_, wait=wait, on_error=report)
        with progress:
            task = progress.add_task("ingest", total=run.total_bytes, messages=0, jobs=0, stored="")
            run.on_progress = lambda r: progress.update(
                task, completed=r.bytes_read, messages=r.tally.messages, jobs=r.tally.jobs,
                stored=f"stored {r.tally.stored:,}" if wait else "")
            await run.run()
        return run

    run = with_fleet(main)
    tally = run.tally
    elapsed = time.perf_counter() - started
    summary: dict[str, Any] = {"messages": tally.messages, "users": len(tally.user_hashes), "jobs": tally.jobs}
    if wait:
        summary.update(stored=tally.stored, duplicates=tally.duplicates, failed_jobs=tally.failed_jobs)
    summary.update(
        errors=tally.errors, errors_by_kind=dict(tally.errors_by_kind), seconds=round(elapsed, 3),
        first_enqueued_seconds=None if run.first_enqueued is None else round(run.first_enqueued - started, 3),
        rate_per_second=round(tally.messages / elapsed, 1) if elapsed else None,
        measured="stored" if wait else "enqueued",
    )
    if as_json:
        out.print_json(data=summary)
    else:
        table = Table(title="ingest")
        table.add_column("")
        table.add_column("value")
        for key, value in summary.items():
            table.add_row(key, json.dumps(value) if isinstance(value, dict) else str(value))
        out.print(table)
    if tally.errors or tally.failed_jobs:
        raise typer.Exit(1)


def ingest_progress(console: Console, *, disable: bool) -> Progress:
    """Bytes read against the inputs' size (the ETA); messages and their rate beside it."""
    return Progress(
        TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
        TextColumn("{task.fields[messages]:,} messages, {task.fields[jobs]:,} jobs"),
        MessageRateColumn(), TextColumn("{task.fields[stored]}"), TimeElapsedColumn(), TextColumn("ETA"),
        TimeRemainingColumn(), console=console, disable=disable,
    )


class MessageRateColumn(ProgressColumn):
    """Messages per second since the start (rich's own speed column is for the bytes)."""

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0
        rate = task.fields["messages"] / elapsed if elapsed > 0 else 0
        return Text(f"{rate:,.0f}/s", style="progress.data.speed")


@app.command()
def stats(as_json: AsJson = False) -> None:
    """Queue depth, jobs in progress, completed, failed, dead letters and live workers.

    Exits 1 when no worker is alive, so it can serve as a health check.
    """
    result = with_fleet(lambda fleet: fleet.stats())
    if as_json:
        out.print_json(data=result.model_dump())
    else:
        table = Table(title="memfleet")
        table.add_column("")
        table.add_column("value")
        for key, value in result.model_dump(exclude={"counters"}).items():
            table.add_row(key, json.dumps(value))
        out.print(table)
    if not result.workers:
        err.print("no worker is alive: start one with `memfleet worker`")
        raise typer.Exit(1)


@app.command()
def loadtest(
    users: Annotated[int, typer.Option(min=1, help="users, each with unique canary facts")] = 100,
    messages: Annotated[int, typer.Option(min=1, max=64, help="canary messages per user")] = 3,
    processes: Annotated[
        int, typer.Option(min=0, help="worker processes to start for the run (0: the running ones, or one)")
    ] = 0,
    http: Annotated[
        bool, typer.Option("--http", help="go through `memfleet serve` (started for the run), one user key per user")
    ] = False,
    as_json: AsJson = False,
) -> None:
    """Ingest canaries for many users through the queue, then hunt for leaks. Exits 1 on any leak."""
    from producer.loadtest import run_loadtest
    from producer.services import local_redis, local_workers

    async def main(fleet: Memfleet) -> dict[str, Any]:
        async with local_workers(fleet, err, processes):
            if not http:
                return await run_loadtest(fleet, users, messages)
            from producer.http.loadtest import HttpVia

            async with HttpVia.serving(fleet) as via:
                return await run_loadtest(fleet, users, messages, via=via)

    try:
        with local_redis(settings_from_env(), err) as live:
            report = with_fleet(main, live)
    except ServiceError as exc:
        raise fail(str(exc), 1) from None
    if as_json:
        out.print_json(data=report)
    else:
        table = Table(title=f"loadtest ({report['via']}): {users} users x {messages} messages")
        table.add_column("")
        table.add_column("value")
        for key, value in report.items():
            table.add_row(key, json.dumps(value))
        out.print(table)
    if report["leaks"] or report["own_canaries_missing"] or report["failed_jobs"]:
        err.print("[red]isolation or completeness failed[/red]")
        raise typer.Exit(1)


dlq = typer.Typer(help="Writes that could not be applied, and refused jobs: list, retry or purge them.",
                  no_args_is_help=True)
app.add_typer(dlq, name="dlq")
JobIds = Annotated[list[str] | None, typer.Argument(help="job ids (default: all)")]


@dlq.command("list")
def dlq_list(as_json: AsJson = False) -> None:
    """Dead letters: job id, user, reason, tries, when (never the content)."""
    letters = with_fleet(lambda fleet: fleet.dead_letters())
    rows = [letter.model_dump(exclude={"op"}) for letter in letters]
    if as_json:
        out.print_json(data=rows)
        return
    table = Table(title=f"{len(rows)} dead letter(s)")
    for column in ("job_id", "user_id", "reason", "tries", "failed_at"):
        table.add_column(column, overflow="fold")
    for row in rows:
        failed_at = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(row["failed_at"]))
        table.add_row(row["job_id"], row["user_id"], row["reason"], str(row["tries"]), failed_at)
    out.print(table)


@dlq.command("retry")
def dlq_retry(job_ids: JobIds = None) -> None:
    """Put dead-lettered writes back in their users' logs (after anything written since)."""
    count = with_fleet(lambda fleet: fleet.retry_dead_letters(job_ids))
    out.print(f"retried {count}")


@dlq.command("purge")
def dlq_purge(job_ids: JobIds = None) -> None:
    """Delete dead letters for good."""
    count = with_fleet(lambda fleet: fleet.purge_dead_letters(job_ids))
    out.print(f"purged {count}")


@app.command()
def worker(
    concurrency: Annotated[int | None, typer.Option(min=1, help="bulk jobs at a time per process")] = None,
    processes: Annotated[int, typer.Option(min=1, help="worker processes")] = 1,
) -> None:
    """Run worker processes until interrupted (SIGINT/SIGTERM finish running jobs first)."""
    env = {"MEMFLEET_CONCURRENCY": str(concurrency)} if concurrency else {}
    settings = settings_from_env()
    try:
        procs = start_workers(processes, env)
    except ServiceError as exc:
        raise fail(str(exc), 1) from None
    # Forward SIGTERM (docker stop, systemd) to the workers, which finish their running jobs first.
    def forward(*_: object) -> None:
        for p in procs:
            p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        codes = [stop_workers(procs, settings.shutdown_wait + KILL_GRACE)]
    raise typer.Exit(max(abs(c) for c in codes))


@app.command()
def demo() -> None:
    """The tutorial walkthrough through the queue, starting Redis and a worker if none is running."""
    from producer.demo import run_demo

    try:
        ok = run_demo(out, settings_from_env())
    except (MemfleetError, subprocess.SubprocessError) as exc:
        raise fail(str(exc), 1) from None
    raise typer.Exit(0 if ok else 1)


app.command()(serve)
app.add_typer(keys_app, name="keys")
memory_cli.register(app)


if __name__ == "__main__":  # `python -m producer.cli`, as the tests run it
    app()
