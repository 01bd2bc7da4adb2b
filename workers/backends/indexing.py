"""What a memory is indexed with: its text in context. Plain functions, data in and data out.

A chat turn alone rarely answers a question about it: "I went to a LGBTQ support group yesterday"
does not say who went or when, and the question names both ("When did Caroline go to the LGBTQ
support group?"). So a memory is embedded with its speaker, and its keywords hold its speaker and
date and the messages just before it in the same write (the question that the turn answers, most
often). What a caller reads back stays the message as written; these texts are only indexed.

The date stays out of the embedded text: it made the encoder's input 24% longer on LoCoMo (the
speaker alone: 6%), which the ingest rate pays for, and it moved recall@10 by under 0.01 in a
prototype on the seven shared conversations (0.731 with it, 0.723 without; dense over raw turns:
0.35). bench/recall.py measures the built system.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

#: messages before a memory, in the same write, whose words join its keywords
CONTEXT_MESSAGES = 2


@dataclass(frozen=True)
class Said:
    """One message as the indexer sees it."""

    content: str
    name: str | None = None
    timestamp: str | None = None  # ISO 8601 (the contract checked it)


def spoken(message: Said) -> str:
    return f"{message.name}: {message.content}" if message.name else message.content


def dated(text: str, timestamp: str | None) -> str:
    """`[18 May 2023] text`: a date as people write it, which a question's words can meet."""
    if not timestamp:
        return text
    when = datetime.fromisoformat(timestamp)
    return f"[{when.day} {when:%B %Y}] {text}"


def dense_text(message: Said) -> str:
    """What the embedding model encodes for a memory."""
    return spoken(message)


def keyword_line(message: Said) -> str:
    """A message's own keywords: `[18 May 2023] Speaker: text`."""
    return dated(spoken(message), message.timestamp)


def keyword_text(message: Said, context: Sequence[Said] = ()) -> str:
    """What BM25 ranks a memory by: its own line after the lines of the messages before it."""
    return "\n".join(keyword_line(m) for m in [*context[-CONTEXT_MESSAGES:], message])


@dataclass(frozen=True)
class Indexed:
    """How one message of a write is indexed.

    Its BM25 text is `context` then `own`, but only `own` is stored as postings: the lines before it
    are the messages before it in the write, whose own postings count for it too at search time
    (`pg_store`), as its own count for the messages at `followers`. Storing each line once rather
    than in every memory whose context holds it made a LoCoMo memory's postings a third of the size.
    """

    dense: str
    own: str
    context: str
    followers: tuple[int, ...]  # positions of the later messages whose context holds this one


def in_context(messages: Sequence[Said]) -> list[Indexed]:
    """How each message of one write is indexed, each with the ones before it as context."""
    lines = [keyword_line(m) for m in messages]
    return [Indexed(dense_text(m), lines[i], "\n".join(lines[max(0, i - CONTEXT_MESSAGES) : i]),
                    tuple(range(i + 1, min(len(messages), i + 1 + CONTEXT_MESSAGES))))
            for i, m in enumerate(messages)]
