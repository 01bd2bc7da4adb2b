"""What the encoder tests compare: LoCoMo texts of every kind an encoder meets, and 1 - cos."""

from __future__ import annotations

import json

import numpy as np

from producer.ingest import read_messages
from tests.support import locomo_file
from workers.embedder import unit_rows


def encoder_texts(turns: int = 300) -> list[str]:
    """Chat turns, questions (as searches send them), a one-word text and one the model truncates."""
    said = [e.message.content for e in read_messages([locomo_file()], "locomo")][:turns]
    questions = [q["question"] for q in json.loads(locomo_file().read_text())["qa"][:40]]
    return [*said, *questions, "ok", "a long message that the model must truncate " * 60]


def drift(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 - cos between each row of `a` and the same row of `b`."""
    return np.asarray(1 - np.sum(unit_rows(a) * unit_rows(b), axis=1))
