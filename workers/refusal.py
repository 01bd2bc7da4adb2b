"""Jobs a worker refuses unread: dead-lettered and counted, and their function never runs.

`workers.arq_worker.screening_deserializer` turns a job body that does not decode as JSON (a
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
from producer.counters import JobCount
from producer.dead_letters import PRUNE_LUA, DeadLetterLimits
from workers.replies import reject
from workers.state import WorkerState

log = structlog.get_logger("memfleet.worker")

# A refused job is counted under the kind its function would have counted it as (`observed`).
KINDS = {keys.APPLY_WRITE: "write", keys.SEARCH: "search", keys.LIST: "list", keys.GET: "get",
         keys.HISTORY: "history", keys.EXPORT: "export", keys.OWNERS: "owners"}
READS = set(KINDS) - {keys.APPLY_WRITE}
UNKNOWN_USER = "?"  # not a valid user id, so no user's forget or retry ever takes the letter

# Dead-letter and count a refused job once: arq runs a job again if its worker died before it
# marked the job done, and the second run must not add a second letter. The list is bounded as
# every push to it is (`producer.dead_letters`): ARGV[4..6] are now, max count, max age.
_RECORD_ONCE = PRUNE_LUA + """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[3]) then
    push_dead_letter(KEYS[2], ARGV[1], tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]))
    redis.call('HINCRBY', KEYS[3], ARGV[2], 1)
    return 1
end
return 0
"""


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
    state = WorkerState.find(ctx)
    limits = state.config.dead_letter_limits if state is not None else DeadLetterLimits()
    recorded = await ctx["redis"].eval(_RECORD_ONCE, 3, keys.refusal(ctx["job_id"]), keys.DEAD_LETTERS, keys.STATS,
                                       letter.model_dump_json(), JobCount(kind, "refused").field(),
                                       keys.REFUSAL_TTL, letter.failed_at,
                                       limits.max_count, limits.max_age)
    if recorded:
        log.error("job_refused", job_id=ctx["job_id"], kind=kind, reason=reason)
    if function in READS:
        # A reader of a version that sends other arguments hears why, rather than waiting out its timeout.
        await reject(ctx, reason)
