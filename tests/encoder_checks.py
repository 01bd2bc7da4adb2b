"""What the encoder tests compare: LoCoMo texts of every kind an encoder meets, and 1 - cos.

bf16 follows the production rule (`workers.model.bf16_native`): where the CPU computes it natively
a bf16 test encodes as many texts as an fp32 one; where it is emulated, a handful of every kind,
so that the test still runs the code path and ends in seconds (docs/contributing.md).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from producer.ingest import read_messages
from tests.support import locomo_file
from workers.embedder import unit_rows
from workers.model import BF16_EMULATED, Precision, bf16_native

needs_native_bf16 = pytest.mark.skipif(not bf16_native(), reason=BF16_EMULATED)


def encoder_texts(turns: int = 120) -> list[str]:
    """Chat turns, questions (as searches send them), a one-word text and one the model truncates."""
    said = [e.message.content for e in read_messages([locomo_file()], "locomo")][:turns]
    questions = [q["question"] for q in json.loads(locomo_file().read_text())["qa"][:40]]
    return [*said, *questions, "ok", "a long message that the model must truncate " * 60]


def texts_for(precision: Precision, turns: int = 120) -> list[str]:
    """`encoder_texts` for a test in `precision`: all of them, or a few where bf16 is emulated."""
    texts = encoder_texts(turns)
    if precision == "bf16" and not bf16_native():
        # Two turns, two questions and the one-word text. Not the truncated one: padded to the
        # model's 256 tokens, a batch of six took 13 s through the trace in emulated bf16, and
        # truncation is the tokenizer's, which the fp32 run checks on the same trace code.
        return [*texts[:2], *texts[-4:-1]]
    return texts


def drift(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 - cos between each row of `a` and the same row of `b`."""
    return np.asarray(1 - np.sum(unit_rows(a) * unit_rows(b), axis=1))
