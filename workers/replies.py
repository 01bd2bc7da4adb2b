"""The read-reply protocol: a read's answer goes to a list only its reader pops.

The answer is not kept as an arq result: it holds memory text, and the reader's BLPOP removes it
from Redis the moment it is read (`producer.client.reads.Reads._read` is the other side).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable
from typing import Any

from arq import Retry

from producer import keys
from producer.errors import InvalidRequest, MemoryNotFound

Read = Callable[[dict[str, Any], dict[str, Any]], Awaitable[Any]]


def replying(fn: Read) -> Callable[[dict[str, Any], dict[str, Any]], Awaitable[None]]:
    """Push a read's answer, or why there is none, to the list its reader is blocked on.

    Put it outside `observed`, which counts and logs the read however it ends."""

    @functools.wraps(fn)
    async def run(ctx: dict[str, Any], request: dict[str, Any]) -> None:
        try:
            result = await fn(ctx, request)
        except Retry:
            raise
        except MemoryNotFound as exc:
            # An answer, not a failure: the reader raises MemoryNotFound with the same ids.
            await _reply(ctx, {"error": str(exc), "not_found": exc.memory_ids})
            return
        except InvalidRequest as exc:
            # The reader's mistake, and the reader is told: nothing for arq to log a traceback of
            # (`observed`, inside this, has counted and logged it as invalid).
            await reject(ctx, str(exc))
            return
        except Exception:
            # Words of ours only: the exception's message may quote the read (a database's does).
            await _reply(ctx, {"error": f"the worker could not answer this read; its log has job {ctx['job_id']}"})
            raise
        await _reply(ctx, {"ok": result})

    return run


async def reject(ctx: dict[str, Any], error: str) -> None:
    """Tell the reader that its read was refused, and why (`error` must hold no memory text)."""
    await _reply(ctx, {"error": error, "rejected": True})


async def _reply(ctx: dict[str, Any], body: dict[str, Any]) -> None:
    key = keys.reply(ctx["job_id"])
    async with ctx["redis"].pipeline(transaction=True) as pipe:
        pipe.rpush(key, json.dumps(body))
        pipe.expire(key, keys.REPLY_TTL)
        await pipe.execute()
