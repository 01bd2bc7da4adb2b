"""Everything memfleet knows about mem0's insides, in one place, checked against the pinned version.

memfleet stores, indexes and ranks memories itself (`workers.backends.pg_store`) and runs fact
extraction (`infer=True`) itself (`workers.backends.inference`), so that a write's extraction is
recorded before anything is stored and is never asked for twice. From mem0 it takes:
- the extraction prompt (`conversation`, `extraction_prompt`), its reading of the LLM's answer
  (`extracted`) and the sampling parameters its OpenAI LLM sends (`sampling`);
- the layout of the SQLite history file an older memfleet kept through mem0 (`sqlite_history`,
  `session_user`), imported into PostgreSQL at start-up;
- for the hosted backend, what the platform SDK's exceptions carry (`sdk_error_details`).
If mem0 moves, the tests in tests/test_mem0_adapter.py say what broke.
"""

from __future__ import annotations

import builtins
import contextlib
from importlib.metadata import version
from pathlib import Path
from typing import Any

MEM0_VERSION = "2.2.1"
if version("mem0ai") != MEM0_VERSION:  # pragma: no cover - a deployment with another mem0
    raise ImportError(f"memfleet adapts mem0ai {MEM0_VERSION}; found {version('mem0ai')}: pin it back or re-check "
                      "workers/mem0_adapter.py against the new version")


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


def sdk_error_details(exc: BaseException) -> tuple[BaseException | None, dict[str, Any]]:
    """What caused an error of mem0's platform SDK, and the `debug_info` it attached.

    The SDK's `api_error_handler` raises its own exceptions inside `except httpx...:`, so the
    original httpx error (with the response and its headers) is their implicit `__context__`.
    """
    import httpx

    cause = exc if isinstance(exc, httpx.HTTPError) else exc.__context__
    return cause, dict(getattr(exc, "debug_info", None) or {})
