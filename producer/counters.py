"""The fleet's counters: the fields of the Redis hash `keys.STATS`, built and read here only.

Workers add to them; `Memfleet.stats` and `GET /metrics` read them. The fields:
- `<kind>:<outcome>` (`JobCount`): runs of a job kind (write, search, list, ...) by how they ended;
- `foreign_dropped` (`FOREIGN_DROPPED`): results of another user that a worker dropped;
- `llm_*` (`LLMCounts`): what the LLM of fact extraction was asked and answered;
- `op-failures:<op id>` and `op-failures:<op id>:llm` (`op_failures`, `op_llm_waits`): a pending
  write's failed tries and its waits for the LLM, which the write log keeps while it retries the
  write; they are the write's, not the fleet's, and never reported.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

# How a job run ends (`workers.observability.observed`, and `refused` for `workers.refusal`).
OUTCOMES = ("ok", "retry", "cancelled", "not_found", "invalid", "failed", "refused")
FAILED = frozenset({"failed", "invalid", "refused"})
FOREIGN_DROPPED = "foreign_dropped"
_PER_OP = "op-failures:"


@dataclass(frozen=True, order=True)
class JobCount:
    """The field counting runs of job `kind` that ended with `outcome`."""

    kind: str
    outcome: str

    def field(self) -> str:
        return f"{self.kind}:{self.outcome}"

    @classmethod
    def parse(cls, name: str) -> JobCount | None:
        """The job count a field is, or None if it is another counter."""
        kind, sep, outcome = name.partition(":")
        return cls(kind, outcome) if sep and not name.startswith(_PER_OP) else None


def op_failures(op_id: str) -> str:
    """The field counting a pending write's failed tries."""
    return f"{_PER_OP}{op_id}"


def op_llm_waits(op_id: str) -> str:
    """The field counting a pending write's waits for the LLM (not failures: they cost no tries)."""
    return f"{_PER_OP}{op_id}:llm"


def reported(fields: Mapping[bytes, bytes]) -> dict[str, int]:
    """The fleet's counters from the hash as Redis answers it: every field but the writes' own."""
    return {k.decode(): int(v) for k, v in fields.items() if not k.startswith(_PER_OP.encode())}


def jobs(counters: Mapping[str, int]) -> dict[JobCount, int]:
    found = {JobCount.parse(name): value for name, value in counters.items()}
    return {count: value for count, value in found.items() if count is not None}


def completed(counters: Mapping[str, int]) -> int:
    return sum(v for count, v in jobs(counters).items() if count.outcome == "ok")


def failed(counters: Mapping[str, int]) -> int:
    return sum(v for count, v in jobs(counters).items() if count.outcome in FAILED)


# -- the LLM of fact extraction ----------------------------------------------------------------------

LLM_ERROR_REASONS = ("unreachable", "timeout", "rate_limited", "server_error", "rejected", "bad_response", "unparsed")
LLM_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)  # seconds
_LLM_ERRORS = "llm_errors_"
_LLM_LATENCY = "llm_latency_le_"


def latency_bucket(seconds: float) -> str:
    """The histogram bucket of a call that took `seconds`: its bound as `f"{bound:g}"`, or "inf"."""
    return next((f"{b:g}" for b in LLM_LATENCY_BUCKETS if seconds <= b), "inf")


@dataclass
class LLMCounts:
    """LLM calls, their summed latency, tokens, errors by reason (`LLM_ERROR_REASONS`) and calls per
    latency bucket (`latency_bucket`; not cumulative). Fields: `llm_calls`, `llm_latency_ms`,
    `llm_prompt_tokens`, `llm_completion_tokens`, `llm_errors_<reason>`, `llm_latency_le_<bound>`."""

    calls: int = 0
    latency_ms: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latency: Counter[str] = field(default_factory=Counter)

    def fields(self) -> dict[str, int]:
        """The counts as fields of `keys.STATS`, those that are not zero."""
        found = {"llm_calls": self.calls, "llm_latency_ms": self.latency_ms,
                 "llm_prompt_tokens": self.prompt_tokens, "llm_completion_tokens": self.completion_tokens,
                 **{f"{_LLM_ERRORS}{reason}": n for reason, n in self.errors.items()},
                 **{f"{_LLM_LATENCY}{bound}": n for bound, n in self.latency.items()}}
        return {name: n for name, n in found.items() if n}

    @classmethod
    def parse(cls, counters: Mapping[str, int]) -> LLMCounts:
        """The LLM's counts among `counters` (other fields are left alone)."""
        return cls(
            calls=counters.get("llm_calls", 0), latency_ms=counters.get("llm_latency_ms", 0),
            prompt_tokens=counters.get("llm_prompt_tokens", 0),
            completion_tokens=counters.get("llm_completion_tokens", 0),
            errors=Counter({k.removeprefix(_LLM_ERRORS): n for k, n in counters.items() if k.startswith(_LLM_ERRORS)}),
            latency=Counter({k.removeprefix(_LLM_LATENCY): n for k, n in counters.items()
                             if k.startswith(_LLM_LATENCY)}),
        )

    def add(self, other: LLMCounts) -> None:
        self.calls += other.calls
        self.latency_ms += other.latency_ms
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.errors.update(other.errors)
        self.latency.update(other.latency)
