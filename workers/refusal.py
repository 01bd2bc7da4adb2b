"""Jobs a worker refuses unread: dead-lettered and counted, and their function never runs.

`producer.arq_adapter.screening_deserializer` turns a job body that does not decode as JSON (a
pickle, say: design invariant 7), that is not arq's job record, or whose call does not fit one of
the worker's functions (`JobScreen`) into a call of `refuse`. `refuse` records the job in the
dead-letter list with the reason and no content (the body came from Redis and may be anything),
and counts it as `<kind>:refused`.

Arguments that fit a function's parameters but not the request contract (a bad user id, a bad
filter) still reach the function, which refuses them before it touches anything, counts them
`invalid` and, for a read, tells the reader why.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterable
from typing import Any

import structlog
from arq.worker import Function

from producer import keys
from producer.contract import DeadLetter
from workers.replies import reject

log = structlog.get_logger("memfleet.worker")

# A refused job is counted under the kind its function would have counted it as (`observed`).
KINDS = {keys.APPLY_WRITE: "write", keys.SEARCH: "search", keys.LIST: "list"}
READS = {keys.SEARCH, keys.LIST}
UNKNOWN_USER = "?"  # not a valid user id, so no user's forget or retry ever takes the letter


class JobScreen:
    """The calls a Worker accepts: one of its functions, with arguments that bind to its parameters."""

    def __init__(self, functions: Iterable[Function]) -> None:
        self._signatures = {f.name: _parameters(f) for f in functions}

    def __call__(self, function: str, args: list[Any], kwargs: dict[str, Any]) -> None:
        signature = self._signatures.get(function)
        if signature is None:
            # The name is not repeated: it came from Redis.
            raise ValueError("it names no function of this worker")
        try:
            signature.bind(*args, **kwargs)
        except TypeError:
            # Not the TypeError's text either: it quotes unexpected keyword names from the body.
            raise ValueError(
                f"{len(args)} positional and {len(kwargs)} keyword argument(s) do not fit "
                f"{function}({', '.join(signature.parameters)})"
            ) from None


def _parameters(function: Function) -> inspect.Signature:
    """The parameters a job passes: the function's own (through its decorators) after `ctx`."""
    signature = inspect.signature(function.coroutine)
    return signature.replace(parameters=list(signature.parameters.values())[1:])


async def refuse(ctx: dict[str, Any], refusal: dict[str, Any]) -> None:
    """Stand in for a job that must not run: dead-letter it, count it, and answer its reader."""
    function = refusal.get("function")
    kind = KINDS.get(function, "unknown") if isinstance(function, str) else "unknown"
    reason = f"refused {kind} job: {refusal.get('reason')}"
    letter = DeadLetter(job_id=ctx["job_id"], user_id=UNKNOWN_USER, reason=reason, tries=ctx["job_try"],
                        failed_at=time.time(), op="")
    async with ctx["redis"].pipeline(transaction=True) as pipe:
        pipe.rpush(keys.DEAD_LETTERS, letter.model_dump_json())
        pipe.hincrby(keys.STATS, f"{kind}:refused", 1)
        await pipe.execute()
    log.error("job_refused", job_id=ctx["job_id"], kind=kind, reason=reason)
    if function in READS:
        # A reader of a version that sends other arguments hears why, rather than waiting out its timeout.
        await reject(ctx, reason)
