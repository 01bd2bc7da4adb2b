"""Bulk ingestion as a stream: lines → validated entries → per-user batches → add requests.

Nothing holds a whole file. `read_entries` yields one validated message (or one error naming its
file and line) at a time; `group` buffers at most a window of messages and turns each user's run
of messages, in file order, into add requests; `Ingest.run` submits those in chunks as they come
and, with `wait`, keeps only a bounded window of outstanding writes. Memory is set by the window
and the chunk sizes below, not by the input.

Inputs are files, gzip files (recognized by their first bytes, whatever their name) or `-` for
standard input.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import gzip
import hashlib
import json
import sys
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Literal, NamedTuple, TypeVar

import pydantic_core
from pydantic import ValidationError

from producer.client import Memfleet, WriteHandle
from producer.contract import (
    MAX_MESSAGES_PER_JOB,
    MAX_WRITE_METADATA_BYTES,
    AddRequest,
    EncodedMessage,
    Message,
    check_user_id,
    encode_message,
    metadata_bytes,
)
from producer.errors import InvalidUserId, WriteTimeout

Format = Literal["jsonl", "locomo"]
T = TypeVar("T")
STDIN = Path("-")
#: messages per add job: enough for the encoder to sort a large window by length even when few
#: users ingest at once (LoCoMo: one per file), small enough to retry cheaply
JOB_SIZE = 256
#: messages, and characters of content, buffered across users while they are grouped. A message
#: held here takes about 1 KB besides its text, so the window costs at most ~50 MB.
WINDOW_MESSAGES = 16_384
WINDOW_CHARS = 32_000_000
#: the window starts this small and grows to half of what has been read, up to its size, so that
#: the first jobs are on the queue a few milliseconds into the file rather than after 16,384 lines
FIRST_WINDOW = 1_024
#: requests per `submit` call, capped in messages too so that a chunk of full jobs stays small
CHUNK_JOBS = 500
CHUNK_MESSAGES = 4_096
#: requests read between turns of the event loop, which sends the chunk in flight and reads its reply
YIELD_EVERY = 32
#: writes waited for at once with `wait`; only their ids are held
WAIT_WINDOW = 4_096
#: longer lines are reported and skipped unread (a message is at most 16,000 characters)
MAX_LINE_BYTES = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
#: young objects between garbage collections during a run. With the default (700) the collector
#: ran every thousand lines or so, walking the window's batches and everything imported: 6% of the
#: run's time (30% when the window held message models).
GC_THRESHOLD = 50_000


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


def group(entries: Iterable[Entry], job_size: int = JOB_SIZE, window: int = WINDOW_MESSAGES,
          window_chars: int = WINDOW_CHARS) -> Iterator[AddRequest]:
    """Each user's messages, in order, as add requests of up to `job_size` messages (see `batches`)."""
    sized = ((user_id, message, len(message.content), metadata_bytes(message.metadata)) for user_id, message in entries)
    for user_id, messages in batches(sized, job_size, window, window_chars):
        yield AddRequest(user_id=user_id, messages=messages)


def batches(items: Iterable[tuple[str, T, int, int]], job_size: int = JOB_SIZE, window: int = WINDOW_MESSAGES,
            window_chars: int = WINDOW_CHARS) -> Iterator[tuple[str, list[T]]]:
    """(user id, message, characters of content, bytes of metadata) in, each user's messages out in
    batches of up to `job_size`, in order.

    A user's batch goes out when it is full, or before the message whose metadata would take it
    over what one write may store (`MAX_WRITE_METADATA_BYTES`). When the window (messages or characters buffered
    across users) is full, the users whose first buffered message is oldest go out first; at the
    end, everyone. The window starts at `FIRST_WINDOW` messages and grows with what has been read.
    A user's batches come out in the order of their messages, so submitting them in this order
    keeps each user's file order.
    """
    job_size = min(job_size, MAX_MESSAGES_PER_JOB)
    pending: OrderedDict[str, _Batch[T]] = OrderedDict()  # oldest first buffered message first
    buffered = chars = 0
    limit = min(window, FIRST_WINDOW)
    grow_at = 2 * limit + 1 if limit < window else -1  # the message count at which it doubles
    for read, (user_id, message, size, metadata) in enumerate(items, start=1):
        if read == grow_at:
            limit = min(window, 2 * limit)
            grow_at = 2 * limit + 1 if limit < window else -1
        batch = pending.get(user_id)
        if batch is not None and batch.metadata + metadata > MAX_WRITE_METADATA_BYTES:
            del pending[user_id]
            buffered -= len(batch)
            chars -= batch.chars
            yield user_id, batch
            batch = None
        if batch is None:
            batch = pending[user_id] = _Batch()
        batch.append(message)
        batch.chars += size
        batch.metadata += metadata
        buffered += 1
        chars += size
        if len(batch) >= job_size:
            del pending[user_id]
            buffered -= len(batch)
            chars -= batch.chars
            yield user_id, batch
        while buffered > limit or chars > window_chars:
            oldest, batch = pending.popitem(last=False)
            buffered -= len(batch)
            chars -= batch.chars
            yield oldest, batch
    yield from pending.items()


class _Batch(list[T]):
    """One user's buffered messages, their characters and their metadata's bytes, counted as they
    come: summing them again on every flush was a tenth of a bulk ingest's time."""

    chars = 0
    metadata = 0


@dataclass
class Tally:
    """Counts only, so that a run of any size holds the same memory."""

    messages: int = 0
    jobs: int = 0
    enqueued: int = 0  # messages in jobs accepted by Redis
    errors_by_kind: Counter[str] = field(default_factory=Counter)
    stored: int = 0
    duplicates: int = 0
    failed_jobs: int = 0
    # Hashes of the user ids seen: the one thing that grows, with distinct users (about 60 bytes
    # each), not with lines.
    user_hashes: set[int] = field(default_factory=set)

    @property
    def errors(self) -> int:
        return sum(self.errors_by_kind.values())


@dataclass
class Ingest:
    """One `memfleet ingest` run: read, group and submit, reporting errors and progress as it goes."""

    fleet: Memfleet
    inputs: list[Input]
    fmt: Format
    wait: bool = False
    on_error: Callable[[LineError], None] = lambda error: None
    on_progress: Callable[[Ingest], None] = lambda run: None
    job_size: int = JOB_SIZE
    window: int = WINDOW_MESSAGES
    wait_window: int = WAIT_WINDOW
    tally: Tally = field(default_factory=Tally)
    first_enqueued: float | None = None  # time.perf_counter() when the first job was accepted
    _done_bytes: int = 0
    _current: Input | None = None
    _outstanding: deque[WriteHandle] = field(default_factory=deque)  # with `wait`: accepted, not yet done

    @property
    def total_bytes(self) -> int | None:
        """Bytes of all inputs, if known (not for standard input)."""
        sizes = [i.size for i in self.inputs]
        return None if None in sizes else sum(s for s in sizes if s is not None)

    @property
    def outstanding(self) -> int:
        """Writes accepted and not yet known to have taken effect (with `wait`)."""
        return len(self._outstanding)

    @property
    def bytes_read(self) -> int:
        return self._done_bytes + (self._current.position() if self._current else 0)

    def _messages(self) -> Iterator[tuple[str, EncodedMessage, int, int]]:
        """(user id, the message encoded, characters of content, bytes of metadata) of each good line,
        in order.

        A message is encoded the moment it is validated and only its bytes are kept: a fraction
        of the model's memory, and no cold models to dump when its job goes out.
        """
        reader = read_jsonl if self.fmt == "jsonl" else read_locomo
        tally = self.tally
        for source in self.inputs:
            self._current = source
            for item in reader(source):
                if isinstance(item, LineError):
                    tally.errors_by_kind[item.kind] += 1
                    self.on_error(item)
                    continue
                tally.messages += 1
                user_id, message = item
                yield user_id, encode_message(message), len(message.content), metadata_bytes(message.metadata)
            self._current = None
            self._done_bytes += source.size or 0

    async def run(self) -> Tally:
        """Submit every good message; with `wait`, also wait until each write has taken effect."""
        outstanding = self._outstanding
        in_flight: asyncio.Task[None] | None = None
        # Waiting, a chunk is no larger than the wait window, so that no more are ever outstanding.
        chunk_jobs = min(CHUNK_JOBS, self.wait_window) if self.wait else CHUNK_JOBS
        chunk: list[tuple[str, list[EncodedMessage]]] = []
        chunk_messages = 0

        async def submit(requests: list[tuple[str, list[EncodedMessage]]]) -> None:
            handles = await self.fleet.submit_encoded(requests)
            if self.first_enqueued is None:
                self.first_enqueued = time.perf_counter()
            self.tally.jobs += len(requests)
            self.tally.enqueued += sum(len(messages) for _, messages in requests)
            if self.wait:
                outstanding.extend(handles)
            self.on_progress(self)

        async def hand_over(requests: list[tuple[str, list[EncodedMessage]]]) -> asyncio.Task[None]:
            # One submit runs while the next chunk is read: Redis works while Python parses. A
            # chunk starts only after the one before it was accepted, which keeps users' order.
            nonlocal in_flight
            if in_flight is not None:
                await in_flight
            if self.wait and len(outstanding) + len(requests) > self.wait_window:
                await self._collect(outstanding, until=self.wait_window - len(requests))
            task = asyncio.create_task(submit(requests))
            await asyncio.sleep(0)  # let it send its transaction before this thread reads on
            return task

        thresholds = gc.get_threshold()
        gc.set_threshold(GC_THRESHOLD, *thresholds[1:])
        try:
            users = self.tally.user_hashes
            for request in batches(self._messages(), self.job_size, self.window):
                users.add(hash(request[0]))  # per job, not per message: the same set
                chunk.append(request)
                chunk_messages += len(request[1])
                # The first chunk goes at once: a user sees the queue fill from the start.
                if len(chunk) >= chunk_jobs or chunk_messages >= CHUNK_MESSAGES or in_flight is None:
                    in_flight = await hand_over(chunk)
                    chunk, chunk_messages = [], 0
                elif len(chunk) % YIELD_EVERY == 0:
                    # Reading never awaits, and a chunk is larger than the socket's buffer: without
                    # a turn of the event loop now and then, the rest of the chunk in flight would
                    # be sent only at the next hand-over, and Redis would run it while we wait.
                    await asyncio.sleep(0)
            if chunk:
                in_flight = await hand_over(chunk)
            if in_flight is not None:
                await in_flight
                in_flight = None
            self.on_progress(self)
            if self.wait:
                await self._collect(outstanding, until=0)
        finally:
            gc.set_threshold(*thresholds)
            if in_flight is not None:
                in_flight.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await in_flight
        return self.tally

    async def _collect(self, outstanding: deque[WriteHandle], until: int) -> None:
        """Wait until at most `until` writes are outstanding, keeping only their counts."""
        delay = 0.005
        last_progress = time.monotonic()
        timeout = self.fleet.settings.write_timeout
        while len(outstanding) > until:
            handles = list(outstanding)
            outcomes = await self.fleet.outcomes(handles)
            outstanding.clear()
            for handle, outcome in zip(handles, outcomes, strict=True):
                if outcome is None:
                    outstanding.append(handle)
                    continue
                self.tally.stored += outcome.stored
                self.tally.duplicates += outcome.duplicates
                self.tally.failed_jobs += outcome.error is not None
            if len(outstanding) < len(handles):
                last_progress, delay = time.monotonic(), 0.005
                self.on_progress(self)
            elif time.monotonic() - last_progress > timeout:
                raise WriteTimeout(
                    f"no write took effect in {timeout:g}s with {len(outstanding)} outstanding; is a worker "
                    "running (`memfleet worker`, `memfleet stats`)?"
                )
            if len(outstanding) > until:
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, 0.1)

