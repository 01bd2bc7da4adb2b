"""`memfleet demo`: Alice and Bob, end to end through the queue, with every isolation check shown."""

from __future__ import annotations

from dataclasses import dataclass

import anyio
from rich.console import Console
from rich.table import Table

from producer.client import Memfleet
from producer.services import local_redis, local_workers
from producer.settings import ProducerSettings

ALICE, BOB = "demo-alice", "demo-bob"
ALICE_SAYS = "I am vegetarian and I avoid dairy."
BOB_SAYS = "I always want a window seat when I fly."


@dataclass
class Check:
    step: str
    user: str
    seen: str
    ok: bool


async def _walkthrough(fleet: Memfleet) -> list[Check]:
    checks: list[Check] = []

    def check(step: str, user: str, seen: list[str], ok: bool) -> None:
        checks.append(Check(step, user, "; ".join(seen) or "(nothing)", ok))

    # Start clean, so the demo can run again against the same data.
    for user in (ALICE, BOB):
        await (await fleet.forget(user)).outcome()
    for user, text in ((ALICE, ALICE_SAYS), (BOB, BOB_SAYS)):
        outcome = await (await fleet.add(user, [text])).outcome()
        check("add", user, [f"{outcome.stored} stored"], outcome.stored == 1)

    for user, own, other in ((ALICE, ALICE_SAYS, BOB_SAYS), (BOB, BOB_SAYS, ALICE_SAYS)):
        found = [r.text for r in await fleet.search(user, "food preferences", limit=5)]
        check('search "food preferences"', user, found, other not in found and all(t == own for t in found))
    for user, own in ((ALICE, ALICE_SAYS), (BOB, BOB_SAYS)):
        listed = [r.text for r in (await fleet.list(user)).memories]
        check("list", user, listed, listed == [own])

    bob_before = [r.id for r in (await fleet.list(BOB)).memories]
    outcome = await (await fleet.forget(ALICE)).outcome()
    check("forget", ALICE, [f"{outcome.deleted} deleted"], outcome.deleted == 1)
    alice_after = [r.text for r in (await fleet.list(ALICE)).memories]
    alice_found = [r.text for r in await fleet.search(ALICE, "food preferences")]
    check("list after forget", ALICE, alice_after, alice_after == [])
    check("search after forget", ALICE, alice_found, alice_found == [])
    bob_after = (await fleet.list(BOB)).memories
    check("list after Alice's forget", BOB, [r.text for r in bob_after], [r.id for r in bob_after] == bob_before)
    return checks


def run_demo(console: Console, settings: ProducerSettings | None = None) -> bool:
    settings = settings or ProducerSettings()
    with local_redis(settings, console) as live:

        async def main() -> list[Check]:
            async with await Memfleet.connect(live) as fleet, local_workers(fleet, console):
                return await _walkthrough(fleet)

        checks = anyio.run(main)
    table = Table(title="memfleet demo: one memory per user, nothing shared")
    for column in ("step", "user", "what came back", "isolation"):
        table.add_column(column, overflow="fold")
    for c in checks:
        table.add_row(c.step, c.user, c.seen, "[green]ok[/green]" if c.ok else "[red]FAILED[/red]")
    console.print(table)
    ok = all(c.ok for c in checks)
    console.print("[green]all isolation checks passed[/green]" if ok else "[red]isolation checks failed[/red]")
    return ok
