"""Every error memfleet raises, in one tree. Catch `MemfleetError` for all of them.

MemfleetError
├── InvalidRequest (ValueError) ............ bad input: the message names the field and why
│   ├── InvalidUserId ...................... a user id that breaks the user-id rule
│   ├── JobRejected ........................ a worker refused a job's input
│   ├── InvalidCursor ...................... (workers.backends.base) a list cursor never handed out
│   ├── BadRequest ......................... (producer.http.auth) an HTTP request to change (422)
│   └── KeyStoreError ...................... (producer.http.apikeys) a key cannot be created or revoked
├── ScopeRefused (PermissionError) ......... (producer.http.auth) a user key named another user (403)
├── MemoryNotFound (LookupError) .......... no such memory of this user (`memory_ids` names them)
├── RedisUnavailable (ConnectionError) ..... Redis cannot be reached
│   └── WriteNotReplicated ................. Redis took writes, but too few replicas confirmed them
├── NoWorkerError (TimeoutError) ........... a read was queued, but no worker answered in time
├── WriteTimeout (TimeoutError) ............ writes were accepted, but did not take effect in time
├── JobFailed .............................. a worker could not complete a job
│   └── WriteDeadLettered .................. the write went to the dead-letter list
├── ServiceError (RuntimeError) ............ a local redis-server or worker could not be started
├── ModelIntegrityError (RuntimeError) ..... the model file is not the official all-MiniLM-L6-v2
├── ExportFailed (RuntimeError) ............ (workers.onnx_encoder) no ONNX model: the worker uses torch
├── LeaseLost .............................. (workers.write_log) internal: a paused holder stops
└── BackendError ........................... (workers.backends.base) the memory store failed
    ├── BackendUnavailable ................. the store cannot be reached now: retry later
    │   ├── ForgetIncomplete ............... memories remained after a forget: retrying finishes it
    │   └── LLMUnavailable ................. the LLM of fact extraction cannot answer now: retried
    ├── BackendRejected .................... the store refused the request itself: not retried
    └── FencedOut .......................... a write under a lease that has passed on: refused

Bad input is an `InvalidRequest`, also a `ValueError`, wherever it is found: by the producer
before anything is queued, or by a worker on a job put on the queue by hand.
"""

from __future__ import annotations


class MemfleetError(Exception):
    """Base class of the errors memfleet raises."""


class InvalidRequest(MemfleetError, ValueError):
    """Input that breaks the contract; nothing of it was stored. The message names the problem."""


class InvalidUserId(InvalidRequest):
    """A user id that breaks the user-id rule (`producer.contract.USER_ID_RULE`)."""


class JobRejected(InvalidRequest):
    """A worker refused the job's input (it names the problem)."""


class MemoryNotFound(MemfleetError, LookupError):
    """The user has no memory with this id: it never existed, is another user's (answered alike,
    so that nothing tells them apart), has expired or was deleted. A write naming it did nothing."""

    def __init__(self, memory_ids: list[str]) -> None:
        super().__init__(f"no such memory: {', '.join(memory_ids)}")
        self.memory_ids = memory_ids


class RedisUnavailable(MemfleetError, ConnectionError):
    """Redis cannot be reached."""


class WriteNotReplicated(RedisUnavailable):
    """Redis took the writes, but fewer replicas than asked (MEMFLEET_REDIS_WAIT_REPLICAS) confirmed
    them in time: they are not acknowledged, since a failover now could lose them. They may still
    take effect; submitting them again with the same message ids stores nothing twice."""


class NoWorkerError(MemfleetError, TimeoutError):
    """A read was queued, but no worker answered in time: is one running?"""


class WriteTimeout(MemfleetError, TimeoutError):
    """Writes were accepted but did not take effect in time; they stay queued and still will."""


class JobFailed(MemfleetError):
    """A worker could not complete the job."""


class WriteDeadLettered(JobFailed):
    """The write could not be applied and is in the dead-letter list, with the reason."""


class ServiceError(MemfleetError, RuntimeError):
    """A local service could not be started; the message says what to install or set."""


class ModelIntegrityError(MemfleetError, RuntimeError):
    """The model file on disk is not the official all-MiniLM-L6-v2."""


class BackendError(MemfleetError):
    """The memory store behind a worker failed."""
