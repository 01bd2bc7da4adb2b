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
from typing import Any

#: messages before a memory, in the same write, whose words join its keywords
CONTEXT_MESSAGES = 2


@dataclass(frozen=True)
class Said:
    """One message as the indexer sees it."""

    content: str
    name: str | None = None
    timestamp: str | None = None  # ISO 8601 (the contract checked it)


def said_in(payload: dict[str, Any]) -> Said:
    """The message a stored memory's payload holds (mem0's keys: `data`, `actor_id`)."""
    return Said(str(payload.get("data", "")), payload.get("actor_id"), payload.get("timestamp"))


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


def keyword_text(message: Said, context: Sequence[Said] = ()) -> str:
    """What BM25 ranks a memory by: the message and the ones before it, with speakers and date."""
    lines = [spoken(m) for m in context[-CONTEXT_MESSAGES:]] if CONTEXT_MESSAGES else []
    return dated("\n".join([*lines, spoken(message)]), message.timestamp)


def in_context(messages: Sequence[Said]) -> list[tuple[str, str]]:
    """(dense text, keyword text) of each message of one write, each with the ones before it."""
    return [(dense_text(m), keyword_text(m, messages[max(0, i - CONTEXT_MESSAGES) : i]))
            for i, m in enumerate(messages)]
