"""One `memfleet ingest` run (`Ingest`): read, group and submit in chunks as the lines come, and,
with `wait`, keep only a bounded window of outstanding writes."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from producer.client import Memfleet, WriteHandle
from producer.contract import EncodedMessage, encode_message, metadata_bytes
from producer.errors import WriteTimeout
from producer.ingest.batching import JOB_SIZE, WINDOW_MESSAGES, batches
from producer.ingest.inputs import Format, Input, LineError, read_jsonl, read_locomo

#: requests per `submit` call, capped in messages too so that a chunk of full jobs stays small
CHUNK_JOBS = 500
CHUNK_MESSAGES = 4_096
#: requests read between turns of the event loop, which sends the chunk in flight and reads its reply
YIELD_EVERY = 32
#: writes waited for at once with `wait`; only their ids are held
WAIT_WINDOW = 4_096
#: young objects between garbage collections during a run. With the default (700) the collector
#: ran every thousand lines or so, walking the window's batches and everything imported: 6% of the
#: run's time (30% when the window held message models).
GC_THRESHOLD = 50_000


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
