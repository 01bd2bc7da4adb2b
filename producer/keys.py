"""Names of everything memfleet keeps in Redis, and how long each lives, in one place so that
producer, worker and forget agree.

arq's own keys (a job's body, result, tries) are named and removed by `producer.arq_adapter`; the
fields of the counters hash `STATS` are built and read by `producer.counters`. TTLs are seconds.
"""

from __future__ import annotations

# -- queues ------------------------------------------------------------------------------------------

# Two arq queues: interactive reads never wait behind bulk writes, because each worker process
# runs a separate arq Worker (its own job slots) for each queue.
BULK_QUEUE = "arq:memfleet:bulk"
INTERACTIVE_QUEUE = "arq:memfleet:interactive"
QUEUES = (BULK_QUEUE, INTERACTIVE_QUEUE)
# One token per queued read: read workers block on this list between polls instead of sleeping
# (`producer.doorbell`).
INTERACTIVE_DOORBELL = "memfleet:interactive:doorbell"
# Tokens left by reads that no worker was there to take are capped: a worker that comes up later
# drains at most this many before it sleeps again.
DOORBELL_TOKENS = 64

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

# -- the fleet ---------------------------------------------------------------------------------------

# Counters of the whole fleet, a hash whose fields `producer.counters` names.
STATS = "memfleet:stats"
# Each worker process keeps arq's health-check key here, one per queue: `<host>:<pid>:writes|reads`
# (arq sets its TTL: the check interval, plus one second).
WORKER_HEALTH = "arq:memfleet:health:"
# Each worker process's encoder counters (`producer.fleet_stats.EncoderUse` as JSON), `<host>:<pid>`,
# refreshed every few seconds (`workers.observability`) ...
ENCODER_USE = "memfleet:encoder:"
# ... and gone three missed refreshes after its worker: a busy worker may miss one, a dead one must
# not linger in the metrics for long.
ENCODER_USE_TTL = 7

# Writes that could not be applied, and jobs refused unread: a list, bounded in count and age
# (`producer.dead_letters`); these are the defaults of MEMFLEET_DEAD_LETTER_MAX and _MAX_AGE.
DEAD_LETTERS = "memfleet:dlq"
DEAD_LETTERS_MAX = 1_000
DEAD_LETTERS_MAX_AGE = 7 * 24 * 3600

# -- writes --------------------------------------------------------------------------------------------

# The users whose write log holds writes: added to in the same Lua step as a write's push, removed
# from in the step that pops a log's last write. The stranded-write check reads this set, not the
# keyspace, so its cost is the writes in flight, not every key of every user.
PENDING_USERS = "memfleet:pending-users"
# Held by the one worker that looks for stranded writes this round (`workers.stranded`), for one
# interval: one worker a round is enough.
STRANDED_CHECK = "memfleet:stranded-check"


def write_log(user_id: str) -> str:
    """The user's writes in enqueue order; only the holder of `write_lease` applies them."""
    return f"memfleet:writes:{{{user_id}}}"


def write_lease(user_id: str) -> str:
    """Who applies the user's writes now; it lapses a little after the job timeout
    (`workers.write_log.WriteLog.lease_ms`), so a dead holder's lease goes by itself."""
    return f"memfleet:lease:{{{user_id}}}"


def write_fence(user_id: str) -> str:
    """The user's last lease token (workers.write_log, rule 9): the next one is greater."""
    return f"memfleet:fence:{{{user_id}}}"


# Tokens are times, so they grow without the fence; it only guards against a clock that steps back.
FENCE_TTL = 24 * 3600


def write_outcome(op_id: str) -> str:
    """What a write did (ids and counts, or why it failed), for whoever waits for it."""
    return f"memfleet:outcome:{op_id}"


# Longer than anyone waits for a write, and the span of `GET /api/ops`.
OUTCOME_TTL = 24 * 3600


def user_jobs(user_id: str) -> str:
    """Ids of the user's writes, so that forget can remove their jobs' arguments and results: a
    sorted set by enqueue time (ms), the newest `USER_JOBS_MAX` of the last `USER_JOBS_TTL`."""
    return f"memfleet:jobs:{{{user_id}}}"


# Longer than any job lives (for forget's clean-up), and what `GET /api/ops` lists; at most the
# newest `USER_JOBS_MAX`, so that the set stays bounded however long the user writes.
USER_JOBS_TTL = 7 * 24 * 3600
USER_JOBS_MAX = 10_000


def refusal(job_id: str) -> str:
    """Marks a refused job as recorded, so that a retry of it (its worker died meanwhile) is not
    dead-lettered and counted twice."""
    return f"memfleet:refused:{job_id}"


# arq retries a job within minutes.
REFUSAL_TTL = 24 * 3600

# -- reads ---------------------------------------------------------------------------------------------


def reply(job_id: str) -> str:
    """Where a worker pushes a read's answer; the reader pops it, so it does not outlive the read."""
    return f"memfleet:reply:{job_id}"


# An answer nobody popped (its reader gave up) expires.
REPLY_TTL = 60


def user_reads(user_id: str) -> str:
    """Ids of the user's recent reads (they live seconds), so that forget can remove them too."""
    return f"memfleet:reads:{{{user_id}}}"


USER_READS_TTL = 600

# -- the network front door (`memfleet serve`) ------------------------------------------------------

# API keys: key id -> the key's record (`producer.http.apikeys.ApiKey` as JSON) ...
API_KEYS = "memfleet:apikeys"
# ... and key name -> key id, so that names are unique.
API_KEY_NAMES = "memfleet:apikey-names"


def rate_counter(key_id: str, window: int) -> str:
    """Requests of an API key in one second (`window`, Unix time), shared by every API process."""
    return f"memfleet:rate:{key_id}:{window}"


# The window's second and the next: a counter outlives its window only until no request can count in it.
RATE_COUNTER_TTL = 2
