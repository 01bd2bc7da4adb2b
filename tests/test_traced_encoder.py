"""MiniLM through the frozen trace: the model's own embeddings, for batches, queries and threads."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from structlog.testing import capture_logs

from tests.encoder_checks import drift, encoder_texts, texts_for
from workers.encoders import build_encoders
from workers.model import Precision, bf16_native, load_model, set_precision
from workers.traced_encoder import TracedEncoder

# Measured on the bf16 EPYC: ~1e-7 in fp32; in bf16 2e-4 at most against the model in bf16 (the trace
# rounds in other places), as far as bf16 itself is from fp32.
BOUND = {"fp32": 1e-5, "bf16": 1e-3}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_trace_encodes_as_the_model_does(precision: Precision) -> None:
    """bf16 runs on every CPU, the worker's rule deciding how much: where bf16 is emulated, on a
    handful of texts (the trace in emulated bf16 took 250 s for all of them)."""
    model = load_model()
    set_precision(model, precision)
    texts = texts_for(precision)
    expected = model.encode(texts, batch_size=32)
    encoder = TracedEncoder(model)

    # Batches of other sizes and lengths than the two padded rows it was traced on, as the bulk
    # streams send them (length-sorted), and as they come (mixed lengths, the longest truncated).
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    by_length = np.zeros_like(expected)
    for start in range(0, len(order), 32):
        rows = order[start : start + 32]
        by_length[rows] = encoder.encode([texts[i] for i in rows])
    mixed = np.concatenate([encoder.encode(texts[i : i + 7]) for i in range(0, len(texts), 7)])
    singles = min(len(texts), 42)
    alone = np.concatenate([encoder.encode([t]) for t in texts[-singles:]])  # queries come one at a time
    assert by_length.shape == (len(texts), 384) and by_length.dtype == np.float32
    for got, want in ((by_length, expected), (mixed, expected), (alone, expected[-singles:])):
        assert drift(got, want).max() < BOUND[precision]
    # The model's padding changes nothing: a text batched with longer ones encodes as it does alone.
    assert drift(mixed[-singles:], alone).max() < BOUND[precision]


def test_twins_share_the_trace_and_encode_at_once() -> None:
    """Two bulk streams and the query thread call one trace, each with its own tokenizer."""
    encoder = TracedEncoder(load_model())
    twin = encoder.twin()
    assert twin._trace is encoder._trace and twin._tokenize is not encoder._tokenize
    texts = encoder_texts()[:64]
    expected = encoder.encode(texts)
    halves = [texts[:32], texts[32:]]
    with ThreadPoolExecutor(2) as pool:
        for _ in range(3):
            got = list(pool.map(lambda pair: pair[0].encode(pair[1]), zip((encoder, twin), halves, strict=True)))
            assert drift(np.concatenate(got), expected).max() < 1e-5


def test_bf16_chosen_where_it_is_emulated_is_logged() -> None:
    """Asking for bf16 on a CPU that emulates it is allowed, and slow: the worker says so at start."""
    with capture_logs() as logs:
        encoders = build_encoders(load_model(), runtime="torch", precision="bf16", streams=1)
    assert encoders.precision == "bf16"
    warned = [e for e in logs if e["event"] == "bf16_emulated"]
    assert len(warned) == (0 if bf16_native() else 1)
