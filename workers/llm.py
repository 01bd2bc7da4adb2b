"""The LLM of fact extraction (`infer=True`), on the OpenAI chat-completions wire, and its counters.

One call per inferred write, through `openai.AsyncOpenAI` (the SDK that mem0's own OpenAI LLM
uses; any server that speaks the wire works: OpenAI, vLLM, llama.cpp's server, Ollama). Async
rather than mem0's client in a thread: 64 writes waiting half a second each on an LLM hold no
thread, and the answer's token usage and status code are at hand. The SDK's own retries are off:
a write is retried by its user's write log, in order, with backoff, where an outage shows
(workers.write_log). What a failure becomes:
- down, too slow (`MEMFLEET_LLM_TIMEOUT`), 408/409/429, 5xx, a reply that is no completion:
  `LLMUnavailable`, retried without spending the write's tries;
- any other 4xx (a wrong model name or key, a prompt the server refuses): `BackendRejected`, the
  write is dead-lettered with the status, for `memfleet dlq retry` once the setting is fixed.
Errors carry status codes only, never what the server answered (it may quote the prompt).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import openai
import structlog

from producer.counters import LLMCounts, latency_bucket
from workers import mem0_adapter
from workers.backends.base import BackendRejected, LLMUnavailable

log = structlog.get_logger("memfleet.llm")


@dataclass
class LLMCounters(LLMCounts):
    """What the LLM was asked and answered since the last `take()`: the worker adds these to
    `keys.STATS` every few seconds (workers.observability.publish_llm_use)."""

    def observe(self, seconds: float) -> None:
        self.calls += 1
        self.latency_ms += round(seconds * 1000)
        self.latency[latency_bucket(seconds)] += 1

    def give_back(self, fields: dict[str, int]) -> None:
        """Counts that `take` gave but could not be stored: they are counted again next time."""
        self.add(LLMCounts.parse(fields))

    def take(self) -> dict[str, int]:
        """The counts as `keys.STATS` fields, and start again from zero."""
        fields = self.fields()
        self.calls = self.latency_ms = self.prompt_tokens = self.completion_tokens = 0
        self.errors.clear()
        self.latency.clear()
        return fields


class ExtractionLLM:
    def __init__(self, base_url: str | None, api_key: str | None, model: str, timeout: float) -> None:
        # No key is fine for a local server (Ollama, vLLM, llama.cpp); the SDK insists on one.
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "none", timeout=timeout,
                                         max_retries=0)
        self.model = model
        self.sampling = mem0_adapter.sampling(model)
        self.counters = LLMCounters()

    async def complete(self, system: str, user: str) -> str | None:
        """The text of the LLM's answer to one extraction prompt (None: it answered no text)."""
        started = time.perf_counter()
        try:
            response = await self.client.chat.completions.create(
                model=self.model, messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
                response_format={"type": "json_object"}, **self.sampling)
        except openai.APIError as exc:
            self.counters.observe(time.perf_counter() - started)
            raise self._failure(exc) from None
        self.counters.observe(time.perf_counter() - started)
        if response.usage is not None:
            self.counters.prompt_tokens += response.usage.prompt_tokens or 0
            self.counters.completion_tokens += response.usage.completion_tokens or 0
        if not response.choices:
            return None
        content = response.choices[0].message.content
        return content if isinstance(content, str) else None

    def _failure(self, exc: openai.APIError) -> LLMUnavailable | BackendRejected:
        reason, status, retry_after = "bad_response", None, None
        if isinstance(exc, openai.APITimeoutError):
            reason = "timeout"
        elif isinstance(exc, openai.APIConnectionError):
            reason = "unreachable"
        elif isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            reason = "rate_limited" if status == 429 else "server_error" if status >= 500 or status in (408, 409) \
                else "rejected"
            retry_after = _retry_after(exc.response.headers.get("retry-after"))
        self.counters.errors[reason] += 1
        log.warning("llm_failed", reason=reason, status=status)
        what = f"the LLM failed ({reason}{f', HTTP {status}' if status else ''})"
        if reason == "rejected":
            return BackendRejected(f"{what}: check MEMFLEET_LLM_MODEL, the key and the server", status=status)
        return LLMUnavailable(what, retry_after=retry_after)

    async def close(self) -> None:
        await self.client.close()


def _retry_after(value: Any) -> float | None:
    """A Retry-After header in seconds (the HTTP-date form is rare from LLM servers: ignored)."""
    try:
        return min(max(float(value), 0.0), 300.0) if value is not None else None
    except ValueError:
        return None
