"""Grouping messages into add requests: each user's messages, in order, in batches, with at most
a window of messages buffered across users whatever the input's size."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import TypeVar

from producer.contract import MAX_MESSAGES_PER_JOB, MAX_WRITE_METADATA_BYTES, AddRequest, metadata_bytes
from producer.ingest.inputs import Entry

T = TypeVar("T")
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
