"""Reading what `memfleet ingest` is given: files, gzip files (recognized by their first bytes,
whatever their name) or `-` for standard input, in JSONL or LoCoMo format, one validated message
(`Entry`) or one error naming its file and line (`LineError`) at a time."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Literal, NamedTuple

import pydantic_core
from pydantic import ValidationError

from producer.contract import Message, check_user_id
from producer.errors import InvalidUserId

Format = Literal["jsonl", "locomo"]
STDIN = Path("-")
#: longer lines are reported and skipped unread (a message is at most 16,000 characters)
MAX_LINE_BYTES = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"


class Entry(NamedTuple):
    """One validated message for one user."""

    user_id: str
    message: Message


@dataclass(frozen=True)
class LineError:
    source: str  # "file:line" (JSONL) or "file:dia_id" (LoCoMo)
    kind: str  # bad_json, line_too_long, missing_field, bad_user_id, oversize_content, invalid_field
    detail: str


class Input:
    """A file to read, plain or gzip, or standard input (`-`), and how far it has been read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.is_stdin = path == STDIN
        self.label = "stdin" if self.is_stdin else str(path)
        #: bytes on disk (compressed, for gzip); None for standard input
        self.size = None if self.is_stdin else path.stat().st_size
        self._raw: IO[bytes] | None = None

    @property
    def id_name(self) -> str:
        """The name message ids are derived from: the same data keeps its ids when compressed."""
        return "stdin" if self.is_stdin else self.path.name.removesuffix(".gz")

    def position(self) -> int:
        """Bytes of the file read so far (compressed bytes, for gzip)."""
        if self.is_stdin or self._raw is None or self._raw.closed:
            return 0
        return self._raw.tell()

    @contextlib.contextmanager
    def open(self) -> Iterator[IO[bytes]]:
        raw = sys.stdin.buffer if self.is_stdin else self.path.open("rb")
        self._raw = raw
        try:
            peek = getattr(raw, "peek", None)
            head = peek(len(GZIP_MAGIC))[: len(GZIP_MAGIC)] if peek else b""
            if head == GZIP_MAGIC:
                with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
                    yield unzipped  # type: ignore[misc]
            else:
                yield raw
        finally:
            if not self.is_stdin:
                raw.close()


def read_jsonl(source: Input) -> Iterator[Entry | LineError]:
    """`{user_id, role, content, name?, timestamp?, metadata?, id?}` per line; blank lines are skipped."""
    id_name, label = source.id_name, source.label
    from_json, sha256 = pydantic_core.from_json, hashlib.sha256  # looked up once, not per line
    with source.open() as stream:
        readline = stream.readline
        number = 0
        while line := readline(MAX_LINE_BYTES):
            number += 1
            if len(line) == MAX_LINE_BYTES and not line.endswith(b"\n"):
                while (rest := readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                    pass
                yield LineError(f"{label}:{number}", "line_too_long", f"over {MAX_LINE_BYTES:,} bytes")
                continue
            if line.isspace():
                continue
            try:
                record = from_json(line)  # twice as fast as json.loads, same errors
            except ValueError as exc:
                yield LineError(f"{label}:{number}", "bad_json", str(exc))
                continue
            if not isinstance(record, dict):
                yield LineError(f"{label}:{number}", "bad_json", "a line must be a JSON object")
                continue
            content = record.get("content")
            if isinstance(content, str) and "id" not in record:
                # Re-running the same file must store nothing new: key each line by file, line, content.
                digest = sha256(content.encode()).hexdigest()[:16]
                record["id"] = f"{id_name}:{number}:{digest}"
            yield _entry(record, label, number)


_MISSING = object()


def _entry(record: dict[str, Any], label: str, where: object) -> Entry | LineError:
    user_id = record.pop("user_id", _MISSING)
    if user_id is _MISSING or "content" not in record:
        missing = "user_id" if user_id is _MISSING else "content"
        return LineError(f"{label}:{where}", "missing_field", f"{missing} is missing")
    try:
        return Entry(check_user_id(user_id), Message.model_validate(record))
    except InvalidUserId as exc:
        return LineError(f"{label}:{where}", "bad_user_id", str(exc))
    except ValidationError as exc:
        first = exc.errors()[0]
        at = ".".join(str(p) for p in first["loc"])
        kind = "oversize_content" if at == "content" and first["type"] == "string_too_long" else "invalid_field"
        return LineError(f"{label}:{where}", kind, f"{at}: {first['msg']}")


def read_locomo(source: Input) -> Iterator[Entry | LineError]:
    """One LoCoMo conversation file → user `locomo-<stem>`; each turn a message with its `dia_id`.

    A conversation is one JSON document (a few hundred KB), so it is read whole.
    """
    with source.open() as stream:
        document = stream.read()
    try:
        conversation = json.loads(document)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        line = exc.lineno if isinstance(exc, json.JSONDecodeError) else 1
        yield LineError(f"{source.label}:{line}", "bad_json", getattr(exc, "msg", "the file is not UTF-8"))
        return
    if not isinstance(conversation, dict):
        yield LineError(f"{source.label}:1", "bad_json", "a LoCoMo file must be a JSON object")
        return
    user_id = f"locomo-{Path(source.id_name).stem}"
    sessions = sorted(
        (int(k.removeprefix("session_")) for k, v in conversation.items()
         if k.startswith("session_") and k.removeprefix("session_").isdigit() and isinstance(v, list)),
    )
    for number in sessions:
        date_time = conversation.get(f"session_{number}_date_time")
        timestamp = locomo_timestamp(date_time)
        for turn in conversation[f"session_{number}"]:
            text = turn.get("text", "")
            if turn.get("blip_caption"):
                # An image shared in the chat: keep its caption, which the questions refer to.
                text = f"{text} [shares an image: {turn['blip_caption']}]".strip()
            metadata: dict[str, Any] = {"dia_id": turn.get("dia_id"), "session": number, "date_time": date_time}
            yield _entry(
                {"user_id": user_id, "role": "user", "name": turn.get("speaker"), "content": text,
                 "timestamp": timestamp, "id": f"{user_id}:{turn.get('dia_id')}", "metadata": metadata},
                source.label, turn.get("dia_id", "?"),
            )


def locomo_timestamp(date_time: object) -> str | None:
    """LoCoMo's session time ("1:47 pm on 18 May, 2023") in ISO 8601; None if absent or unreadable."""
    if not isinstance(date_time, str):
        return None
    try:
        return datetime.strptime(date_time.strip(), "%I:%M %p on %d %B, %Y").isoformat()
    except ValueError:
        return None


def read_entries(inputs: Iterable[Input | Path], fmt: Format) -> Iterator[Entry | LineError]:
    """Every message (or error) of the inputs, in order, one at a time."""
    reader = read_jsonl if fmt == "jsonl" else read_locomo
    for source in inputs:
        yield from reader(source if isinstance(source, Input) else Input(source))


def read_messages(inputs: Iterable[Input | Path], fmt: Format) -> Iterator[Entry]:
    """The good messages of the inputs, in order; bad lines are skipped (`read_entries` names them)."""
    return (item for item in read_entries(inputs, fmt) if isinstance(item, Entry))
