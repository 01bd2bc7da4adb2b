"""Everything memfleet knows about mem0's insides, in one place, checked against the pinned version.

memfleet stores, indexes and ranks memories itself (`workers.backends.pg_store`) and runs fact
extraction (`infer=True`) itself (`workers.backends.inference`), so that a write's extraction is
recorded before anything is stored and is never asked for twice. From mem0 it takes:
- the extraction prompt (`conversation`, `extraction_prompt`), its reading of the LLM's answer
  (`extracted`) and the sampling parameters its OpenAI LLM sends (`sampling`);
- the payload a memory is stored with (`new_payload`, `read_payload` and the functions beside
  them), which memfleet's table keeps in mem0's format;
- the layout of the SQLite history file an older memfleet kept through mem0 (`sqlite_history`,
  `session_user`), imported into PostgreSQL at start-up;
- for the hosted backend, what the platform SDK's exceptions carry (`platform_error`) and how its
  client is closed (`close_platform_client`).
If mem0 moves, the tests in tests/test_mem0_adapter.py say what broke.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, NamedTuple

from producer.contract import RESERVED_PAYLOAD_KEYS

MEM0_VERSION = "2.2.1"


def check_version(installed: str) -> None:
    """Refuse a mem0 other than the one this adapter was written against (at import)."""
    if installed != MEM0_VERSION:
        raise ImportError(f"memfleet adapts mem0ai {MEM0_VERSION}; found {installed}: pin it back or re-check "
                          "workers/mem0_adapter.py against the new version")


check_version(version("mem0ai"))


def session_user(session_scope: str) -> str | None:
    """The user of mem0's session scope (`_build_session_scope`: `user_id=<id>` first, `&` between parts)."""
    first = session_scope.split("&", 1)[0]
    return first.removeprefix("user_id=") if first.startswith("user_id=") else None


# -- fact extraction (workers.backends.inference runs it; mem0 writes the prompt, reads the answer) --


def conversation(messages: builtins.list[dict[str, str]]) -> str:
    """New messages as mem0 puts them into the prompt, and embeds them to find the nearest memories:
    `role: content` lines."""
    from mem0.memory.utils import parse_messages

    return str(parse_messages(messages))


def extraction_prompt(existing: builtins.list[str], new_messages: str, last_messages: builtins.list[dict[str, Any]],
                      observed: str | None) -> tuple[str, str]:
    """mem0's (system, user) prompt of additive extraction (`AsyncMemory._add_to_vector_store`):
    the existing memories numbered as mem0 numbers them, the new messages (`conversation`) and
    the session's last messages. `observed` is the date the messages were said (mem0: today)."""
    from mem0.configs.prompts import ADDITIVE_EXTRACTION_PROMPT, generate_additive_extraction_prompt

    user = generate_additive_extraction_prompt(
        existing_memories=[{"id": str(i), "text": text} for i, text in enumerate(existing)],
        new_messages=new_messages, last_k_messages=last_messages, timestamp=observed)
    return str(ADDITIVE_EXTRACTION_PROMPT), str(user)


def extracted(answer: str | None) -> builtins.list[dict[str, Any]] | None:
    """The facts in an extraction answer, read as mem0 reads it (code fences, `<think>` and text
    around the JSON are dropped); None if it does not parse as `{"memory": [...]}`."""
    import json

    from mem0.memory.utils import extract_json, remove_code_blocks

    text = remove_code_blocks(answer or "")
    if not text:
        return []  # mem0: an empty answer extracts nothing
    try:
        parsed = json.loads(text, strict=False)
    except json.JSONDecodeError:
        try:
            parsed = json.loads(extract_json(text), strict=False)
        except json.JSONDecodeError:
            return None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("memory"), list):
        return None
    return [fact for fact in parsed["memory"] if isinstance(fact, dict)]


def sampling(model: str) -> dict[str, Any]:
    """The parameters mem0's OpenAI LLM sends with `model` (temperature, top_p, max_tokens; none
    for reasoning models, which refuse them)."""
    from mem0.llms.openai import OpenAILLM

    params = OpenAILLM({"model": model, "api_key": "unused", "openai_base_url": "http://127.0.0.1:9/unused"}
                       )._get_supported_params(messages=[])
    return {k: v for k, v in params.items() if k != "messages"}


def sqlite_history(path: Path) -> tuple[builtins.list[dict[str, Any]], builtins.list[dict[str, Any]]]:
    """The history and messages rows of a `history.db` that mem0's SQLiteManager wrote."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(path)) as db:
        db.row_factory = sqlite3.Row
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        history = [dict(r) for r in db.execute("SELECT * FROM history")] if "history" in tables else []
        messages = [dict(r) for r in db.execute("SELECT * FROM messages")] if "messages" in tables else []
    return history, messages


# -- a stored memory's payload: mem0's format (`AsyncMemory._create_memory`) -------------------------
# memfleet's table keeps each memory's payload as mem0 writes it, so that rows of mem0's older table
# move into it as they are (`workers.backends.migrations`): the caller's metadata, then `user_id`,
# `role`, `actor_id` (the speaker), `timestamp` (when it was said), `data` (the text), `hash` (its
# MD5), `created_at`, `updated_at`, and `attributed_to` for a fact an LLM extracted. The contract
# keeps callers' metadata off these keys (`producer.contract.RESERVED_PAYLOAD_KEYS`).

#: what mem0 adds that memfleet does not keep (its own BM25 text; memfleet indexes in context)
_NOT_KEPT = frozenset({"text_lemmatized"})


class PayloadFields(NamedTuple):
    """What a stored payload says of its memory, beside its user and the caller's metadata. As
    stored: values are whatever JSON the row holds (the contract checked them on the way in)."""

    data: Any  # the text
    text_hash: Any
    name: Any
    role: Any
    timestamp: Any
    created_at: Any
    updated_at: Any

    @property
    def text(self) -> str:
        return "" if self.data is None else str(self.data)


def text_hash(text: str) -> str:
    """The `hash` mem0 keeps of a memory's text (and drops an extracted fact by, when it is known)."""
    return hashlib.md5(text.encode()).hexdigest()


def new_payload(user_id: str, text: str, *, metadata: dict[str, Any], created_at: str, updated_at: str | None = None,
                role: str | None = None, name: str | None = None, timestamp: str | None = None,
                attributed_to: str | None = None) -> dict[str, Any]:
    """A memory's payload as mem0 writes it; `updated_at` defaults to `created_at`."""
    payload: dict[str, Any] = {**metadata, "user_id": user_id}
    if role is not None:
        payload["role"] = role
    if name:
        payload["actor_id"] = name
    if timestamp:
        payload["timestamp"] = timestamp
    if attributed_to:
        payload["attributed_to"] = attributed_to
    payload["data"] = text
    payload["hash"] = text_hash(text)
    payload["created_at"] = created_at
    payload["updated_at"] = updated_at or created_at
    return payload


def read_payload(payload: dict[str, Any]) -> PayloadFields:
    return PayloadFields(payload.get("data"), payload.get("hash"),
                         payload.get("actor_id"), payload.get("role"), payload.get("timestamp"),
                         payload.get("created_at"), payload.get("updated_at"))


def payload_user(payload: dict[str, Any], default: Any = None) -> Any:
    """The user a payload names, as stored (`default` if it names none)."""
    return payload.get("user_id", default)


def caller_metadata(payload: dict[str, Any]) -> dict[str, Any]:
    """The caller's own keys of a payload."""
    return {k: v for k, v in payload.items() if k not in RESERVED_PAYLOAD_KEYS}


def changed_payload(payload: dict[str, Any], updated_at: str, *, text: str | None = None,
                    metadata: dict[str, Any] | None = None, timestamp: str | None = None) -> dict[str, Any]:
    """`payload` with a new text, caller metadata (replacing the old; the memory's own keys stay)
    or time said, where given, updated at `updated_at`."""
    new = dict(payload)
    if metadata is not None:
        new = {**{k: v for k, v in new.items() if k in RESERVED_PAYLOAD_KEYS}, **metadata}
    if text is not None:
        new["data"] = text
        new["hash"] = text_hash(text)
    if timestamp is not None:
        new["timestamp"] = timestamp
    new["updated_at"] = updated_at
    return new


def kept_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """A payload of mem0's older table as memfleet keeps it."""
    return {k: v for k, v in payload.items() if k not in _NOT_KEPT}


# -- the platform SDK (`mem0.AsyncMemoryClient`), for the hosted backend ----------------------------


@dataclass(frozen=True)
class PlatformError:
    """What an error of mem0's platform SDK, or of httpx under it, says."""

    cause: BaseException | None  # the httpx error under it, if any
    status: Any  # the HTTP status the SDK recorded (`debug_info`), if any
    retry_after: Any  # the Retry-After the SDK recorded, if any
    network: str | None  # the SDK's reason for a network error (`NetworkError`); None: not one
    code: str | None  # the SDK's `error_code`, if any


def platform_error(exc: BaseException) -> PlatformError | None:
    """What `exc` says, if it is an error of the platform SDK or of httpx (else None).

    The SDK's `api_error_handler` raises its own exceptions inside `except httpx...:`, so the
    original httpx error (with the response and its headers) is their implicit `__context__`.
    """
    import httpx
    from mem0.exceptions import MemoryError as SdkError
    from mem0.exceptions import NetworkError

    if not isinstance(exc, SdkError | httpx.HTTPError):
        return None
    cause = exc if isinstance(exc, httpx.HTTPError) else exc.__context__
    debug = dict(getattr(exc, "debug_info", None) or {})
    network = str(debug.get("error_type", "network error")) if isinstance(exc, NetworkError) else None
    return PlatformError(cause, debug.get("status_code"), debug.get("retry_after"), network,
                         getattr(exc, "error_code", None))


async def close_platform_client(client: Any) -> None:
    """Close a `mem0.AsyncMemoryClient`'s HTTP client (the SDK has no close of its own)."""
    await client.async_client.aclose()
