"""Readers for bulk ingestion: JSONL chat logs and LoCoMo conversations, as validated add requests.

Each input line (JSONL) or turn (LoCoMo) becomes one message. Bad lines are reported with their
file and line number and the kind of error, and the good lines are still ingested.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from producer.contract import MAX_MESSAGES_PER_JOB, AddRequest, InvalidUserId, Message, check_user_id

Format = Literal["jsonl", "locomo"]
#: messages per add job: enough for the encoder to sort a large window by length even when few
#: users ingest at once (LoCoMo: one per file), small enough to retry cheaply
JOB_SIZE = 256


@dataclass(frozen=True)
class Entry:
    """One message for one user, and where it came from."""

    user_id: str
    message: Message
    source: str  # "file:line" (JSONL) or "file:dia_id" (LoCoMo)


@dataclass(frozen=True)
class LineError:
    source: str
    kind: str  # bad_json, missing_field, bad_user_id, oversize_content, invalid_field
    detail: str


@dataclass
class IngestPlan:
    requests: list[AddRequest] = field(default_factory=list)
    errors: list[LineError] = field(default_factory=list)
    users: set[str] = field(default_factory=set)
    messages: int = 0

    def errors_by_kind(self) -> dict[str, int]:
        return dict(Counter(e.kind for e in self.errors))


def read_jsonl(path: Path) -> Iterator[Entry | LineError]:
    """`{user_id, role, content, name?, timestamp?, metadata?, id?}` per line; blank lines are skipped."""
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            source = f"{path}:{number}"
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                yield LineError(source, "bad_json", exc.msg)
                continue
            if not isinstance(record, dict):
                yield LineError(source, "bad_json", "a line must be a JSON object")
                continue
            if isinstance(record.get("content"), str) and "id" not in record:
                # Re-running the same file must store nothing new: key each line by file, line, content.
                digest = hashlib.sha256(record["content"].encode()).hexdigest()[:16]
                record = {**record, "id": f"{path.name}:{number}:{digest}"}
            yield _entry(record, source)


def _entry(record: dict[str, Any], source: str) -> Entry | LineError:
    for required in ("user_id", "content"):
        if required not in record:
            return LineError(source, "missing_field", f"{required} is missing")
    try:
        user_id = check_user_id(record["user_id"])
    except InvalidUserId as exc:
        return LineError(source, "bad_user_id", str(exc))
    fields = {k: v for k, v in record.items() if k != "user_id"}
    try:
        return Entry(user_id, Message.model_validate(fields), source)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        kind = "oversize_content" if where == "content" and first["type"] == "string_too_long" else "invalid_field"
        return LineError(source, kind, f"{where}: {first['msg']}")


def read_locomo(path: Path) -> Iterator[Entry | LineError]:
    """One LoCoMo conversation file → user `locomo-<stem>`; each turn a message with its `dia_id`."""
    try:
        conversation = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        yield LineError(f"{path}:{exc.lineno}", "bad_json", exc.msg)
        return
    user_id = f"locomo-{path.stem}"
    sessions = sorted(
        (int(k.removeprefix("session_")) for k, v in conversation.items()
         if k.startswith("session_") and k.removeprefix("session_").isdigit() and isinstance(v, list)),
    )
    for number in sessions:
        date_time = conversation.get(f"session_{number}_date_time")
        timestamp = locomo_timestamp(date_time)
        for turn in conversation[f"session_{number}"]:
            source = f"{path}:{turn.get('dia_id', '?')}"
            text = turn.get("text", "")
            if turn.get("blip_caption"):
                # An image shared in the chat: keep its caption, which the questions refer to.
                text = f"{text} [shares an image: {turn['blip_caption']}]".strip()
            metadata: dict[str, Any] = {"dia_id": turn.get("dia_id"), "session": number, "date_time": date_time}
            yield _entry(
                {"user_id": user_id, "role": "user", "name": turn.get("speaker"), "content": text,
                 "timestamp": timestamp, "id": f"{user_id}:{turn.get('dia_id')}", "metadata": metadata},
                source,
            )


def locomo_timestamp(date_time: object) -> str | None:
    """LoCoMo's session time ("1:47 pm on 18 May, 2023") in ISO 8601; None if absent or unreadable."""
    if not isinstance(date_time, str):
        return None
    try:
        return datetime.strptime(date_time.strip(), "%I:%M %p on %d %B, %Y").isoformat()
    except ValueError:
        return None


def plan(paths: Iterable[Path], fmt: Format, job_size: int = JOB_SIZE) -> IngestPlan:
    """Read every file and group each user's messages, in order, into add requests."""
    reader = read_jsonl if fmt == "jsonl" else read_locomo
    result = IngestPlan()
    pending: dict[str, list[Message]] = {}
    for path in paths:
        for item in reader(path):
            if isinstance(item, LineError):
                result.errors.append(item)
                continue
            result.messages += 1
            result.users.add(item.user_id)
            batch = pending.setdefault(item.user_id, [])
            batch.append(item.message)
            if len(batch) >= min(job_size, MAX_MESSAGES_PER_JOB):
                result.requests.append(AddRequest(user_id=item.user_id, messages=batch))
                pending[item.user_id] = []
    result.requests.extend(AddRequest(user_id=u, messages=m) for u, m in pending.items() if m)
    return result
