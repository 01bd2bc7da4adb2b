"""An agent loop on memfleet: search before each turn, add the turn after it, without waiting.

Reads never wait for writes. A search answers from what has taken effect when it runs; the turn
just added lands a moment later (its write is queued behind the user's earlier writes), in time
for the turns after it. Waiting for each write would put the store's latency into every reply.

Run it against a running Redis and worker (two shells):

    REDIS_URL=redis://127.0.0.1:6379/0 memfleet worker
    REDIS_URL=redis://127.0.0.1:6379/0 python examples/agent_loop.py
"""

from __future__ import annotations

import asyncio
import uuid

from producer.client import Memfleet, WriteHandle

CONVERSATION = [
    "Hi! I just moved to Lisbon for a new job.",
    "I'm a marine biologist, I study octopuses.",
    "Can you suggest a weekend trip?",
]


def respond(user_says: str, memories: list[str]) -> str:
    """Stands in for the LLM call: a real agent puts `memories` into its prompt."""
    return f"Noted, with {len(memories)} earlier memories in mind."


async def turn(fleet: Memfleet, user_id: str, user_says: str) -> tuple[str, WriteHandle]:
    memories = [r.text for r in await fleet.search(user_id, user_says, limit=5)]
    print(f"  (memories found for this turn: {memories})")
    answer = respond(user_says, memories)
    # Queued, not awaited: the reply goes out now, the memory lands behind it.
    handle = await fleet.add(user_id, [{"role": "user", "content": user_says},
                                       {"role": "assistant", "content": answer}])
    return answer, handle


async def main() -> None:
    user_id = f"agent-example-{uuid.uuid4().hex[:8]}"  # in an app: the signed-in user's id
    async with await Memfleet.connect() as fleet:
        writes = []
        for user_says in CONVERSATION:
            answer, handle = await turn(fleet, user_id, user_says)
            print(f"user: {user_says}\nagent: {answer}")
            writes.append(handle)
        # Only a script that is about to exit waits for its writes.
        await fleet.wait(writes)
        found = await fleet.search(user_id, "Which city do I live in?", limit=1)
        print(f"remembered: {found[0].text if found else '(nothing)'}")
        await (await fleet.forget(user_id)).outcome()


if __name__ == "__main__":
    asyncio.run(main())
