"""Names of everything memfleet keeps in Redis, in one place so producer, worker and forget agree.

arq's own keys (a job's body, result, tries) are named and removed by `producer.arq_adapter`.
"""

from __future__ import annotations

# Two arq queues: interactive reads never wait behind bulk writes, because each worker process
# runs a separate arq Worker (its own job slots) for each queue.
BULK_QUEUE = "arq:memfleet:bulk"
INTERACTIVE_QUEUE = "arq:memfleet:interactive"
QUEUES = (BULK_QUEUE, INTERACTIVE_QUEUE)
# One token per queued read: read workers block on this list between polls instead of sleeping.
INTERACTIVE_DOORBELL = "memfleet:interactive:doorbell"

STATS = "memfleet:stats"
# Fields of STATS for the LLM of fact extraction (workers.llm adds to them, /metrics reads them):
# llm_calls, llm_latency_ms (their sum), llm_prompt_tokens, llm_completion_tokens,
# llm_errors_<reason> and llm_latency_le_<bound> (calls up to that many seconds, not cumulative).
LLM_ERROR_REASONS = ("unreachable", "timeout", "rate_limited", "server_error", "rejected", "bad_response", "unparsed")
LLM_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Each worker process keeps arq's health-check key here, one per queue: `<host>:<pid>:writes|reads`.
WORKER_HEALTH = "arq:memfleet:health:"
# Each worker process's encoder counters (`producer.client.EncoderUse` as JSON), `<host>:<pid>`,
# refreshed every few seconds with a short TTL so that a dead worker's counters vanish with it.
ENCODER_USE = "memfleet:encoder:"
DEAD_LETTERS = "memfleet:dlq"

# Job function names: the contract between `Memfleet` (producer) and `worker_settings` (workers.worker).
APPLY_WRITE = "apply_write"
SEARCH = "search"
LIST = "list_memories"
GET = "get_memory"
HISTORY = "memory_history"
EXPORT = "export_memories"
OWNERS = "memory_owners"
# Run in place of a job whose body a worker refuses (workers.refusal); never enqueued by anyone.
REFUSED = "refused_job"


def write_log(user_id: str) -> str:
    """The user's writes in enqueue order; only the holder of `write_lease` applies them."""
    return f"memfleet:writes:{{{user_id}}}"


def write_lease(user_id: str) -> str:
    return f"memfleet:lease:{{{user_id}}}"


def write_fence(user_id: str) -> str:
    """The user's last lease token (workers.write_log, rule 9): the next one is greater."""
    return f"memfleet:fence:{{{user_id}}}"


def write_outcome(op_id: str) -> str:
    return f"memfleet:outcome:{op_id}"


def refusal(job_id: str) -> str:
    """Marks a refused job as recorded, so that a retry of it (its worker died meanwhile) is not
    dead-lettered and counted twice."""
    return f"memfleet:refused:{job_id}"


def reply(job_id: str) -> str:
    """Where a worker pushes a read's answer; the reader pops it, so it does not outlive the read."""
    return f"memfleet:reply:{job_id}"


def user_jobs(user_id: str) -> str:
    """Ids of the user's writes, so that forget can remove their jobs' arguments and results: a
    sorted set by enqueue time (ms), the newest `producer.client.USER_JOBS_MAX` of the last week."""
    return f"memfleet:jobs:{{{user_id}}}"


def user_reads(user_id: str) -> str:
    """Ids of the user's recent reads (they live seconds), so that forget can remove them too."""
    return f"memfleet:reads:{{{user_id}}}"
