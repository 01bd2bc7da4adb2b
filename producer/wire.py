"""Job bodies and results on the wire: JSON, never pickle (design invariant 7).

arq pickles by default, so whoever can write to Redis could run code in a worker. With these as
arq's `job_serializer`/`job_deserializer` on both sides, nothing read from Redis is ever
executed. In a worker, `loads` runs inside `workers.arq_worker.screening_deserializer`: a body
that is not JSON, or not a call that fits one of the worker's functions, is dead-lettered and
counted without running (workers.refusal).
"""

from __future__ import annotations

import json
from typing import Any


def dumps(value: Any) -> bytes:
    return _ENCODER.encode(value).encode()


def loads(raw: bytes) -> Any:
    return json.loads(raw)


def _exception_text(value: object) -> str:
    # arq puts the exception of a failed job in its result record; only its class and message travel.
    if isinstance(value, BaseException):
        return f"{value.__class__.__name__}: {value}"
    raise TypeError(f"{value.__class__.__name__} is not JSON serializable")


# One encoder for the process: `json.dumps` with options builds a new one per call, which was half
# the cost of a job body in a bulk enqueue.
_ENCODER = json.JSONEncoder(separators=(",", ":"), default=_exception_text)
