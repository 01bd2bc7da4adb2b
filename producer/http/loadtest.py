"""`memfleet loadtest --http`: the load test's users driven through `memfleet serve`, one user key each.

The server runs in this process (uvicorn, a free loopback port) for the run. Each user acts only
with its own key and names no user, as an agent would; each key is also made to name its
neighbour, and must be refused. The keys are revoked when the run ends.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import uvicorn

from producer.client import Memfleet
from producer.contract import MemoryRecord
from producer.http.apikeys import KeyStore
from producer.http.app import create_app
from producer.http.settings import ApiSettings
from producer.loadtest import Canaries
from producer.services import free_port

KEY_TTL = 6 * 3600


class HttpVia:
    name = "http"

    def __init__(self, client: httpx.AsyncClient, store: KeyStore) -> None:
        self.client = client
        self.store = store
        self.keys: dict[str, str] = {}  # user id -> key
        self.key_names: list[str] = []

    @classmethod
    @contextlib.asynccontextmanager
    async def serving(cls, fleet: Memfleet) -> AsyncIterator[HttpVia]:
        settings = ApiSettings(redis_url=fleet.settings.effective_redis_url,
                               search_timeout=fleet.settings.search_timeout)
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
        task = asyncio.create_task(server.serve())
        store = KeyStore(fleet.redis)
        via: HttpVia | None = None
        try:
            while not server.started:
                if task.done():
                    task.result()  # raises why it did not start
                    raise RuntimeError("memfleet serve stopped while starting")
                await asyncio.sleep(0.05)
            limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600, limits=limits) as client:
                via = cls(client, store)
                yield via
        finally:
            if via is not None:
                for name in via.key_names:
                    await store.revoke(name)
            server.should_exit = True
            await task

    async def _key(self, user: Canaries) -> dict[str, str]:
        if user.user_id not in self.keys:
            name = f"loadtest-{user.user_id}"
            _, self.keys[user.user_id] = await self.store.create(name, user_id=user.user_id, ttl=KEY_TTL)
            self.key_names.append(name)
        return {"Authorization": f"Token {self.keys[user.user_id]}"}

    async def ingest(self, everyone: list[Canaries], concurrency: int = 32) -> int:
        gate = asyncio.Semaphore(concurrency)

        async def add(user: Canaries) -> int:
            headers = await self._key(user)
            messages = [{"content": f, "id": f"{user.token}-{j}"} for j, f in enumerate(user.facts)]
            async with gate:
                answer = await self.client.post("/api/memories", headers=headers, json={"messages": messages})
            answer.raise_for_status()
            outcome = answer.json()["outcome"]
            return int(outcome["stored"]) + int(outcome["duplicates"])

        return sum(await asyncio.gather(*(add(u) for u in everyone)))

    async def search(self, user: Canaries, query: str, limit: int) -> list[MemoryRecord]:
        answer = await self.client.post("/api/memories/search", headers=await self._key(user),
                                        json={"query": query, "limit": limit})
        answer.raise_for_status()
        return [MemoryRecord.model_validate(r) for r in answer.json()["results"]]

    async def refused_as_neighbour(self, user: Canaries, neighbour: Canaries) -> bool:
        answer = await self.client.post("/api/memories/search", headers=await self._key(user),
                                        json={"user_id": neighbour.user_id, "query": neighbour.facts[0]})
        return answer.status_code == 403 and neighbour.token not in answer.text
