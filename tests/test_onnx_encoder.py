"""MiniLM on ONNX Runtime: the model's own embeddings, and which runtime a worker picks."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from pydantic import ValidationError
from sentence_transformers import SentenceTransformer
from structlog.testing import capture_logs

from tests.encoder_checks import drift, encoder_texts
from workers.encoders import build_encoders
from workers.model import load_model, resolve_precision
from workers.onnx_encoder import ExportFailed, OnnxEncoder, onnx_encoder
from workers.settings import WorkerConfig
from workers.traced_encoder import TracedEncoder


@pytest.fixture(scope="module")
def model() -> SentenceTransformer:
    return load_model()


@pytest.fixture(scope="module")
def onnx(model: SentenceTransformer) -> OnnxEncoder:
    return onnx_encoder(model)


def test_onnx_embeddings_are_the_models(model: SentenceTransformer, onnx: OnnxEncoder) -> None:
    """The moonshot's condition is 1 - cos ≤ 1e-3; the same fp32 arithmetic gives ~1e-7."""
    texts = encoder_texts()
    reference = model.encode(texts, batch_size=32)
    batched = np.concatenate([onnx.encode(texts[i : i + 32]) for i in range(0, len(texts), 32)])
    alone = np.concatenate([onnx.encode([t]) for t in texts[-45:]])  # queries come one at a time
    assert batched.shape == (len(texts), 384) and batched.dtype == np.float32
    assert drift(batched, reference).max() < 1e-5
    assert drift(alone, reference[-45:]).max() < 1e-5
    assert np.allclose(np.linalg.norm(batched, axis=1), 1, atol=1e-5)


def test_twins_share_the_session_and_encode_at_once(onnx: OnnxEncoder) -> None:
    texts = encoder_texts()[:64]
    expected = onnx.encode(texts)
    twins = [onnx, onnx.twin()]
    halves = [texts[:32], texts[32:]]
    with ThreadPoolExecutor(2) as pool:  # two threads, as two bulk streams run
        for _ in range(3):
            got = list(pool.map(lambda pair: pair[0].encode(pair[1]), zip(twins, halves, strict=True)))
            assert drift(np.concatenate(got), expected).max() < 1e-5


def test_the_runtime_a_worker_picks(model: SentenceTransformer) -> None:
    forced = build_encoders(model, runtime="onnx", streams=3)
    assert (forced.runtime, forced.precision, len(forced.bulk)) == ("onnx", "fp32", 3)
    assert all(isinstance(e, OnnxEncoder) for e in [*forced.bulk, forced.query])
    assert len({id(e) for e in forced.bulk}) == 3  # a tokenizer per stream

    torch_encoders = build_encoders(model, runtime="torch", precision="fp32", streams=2)
    assert (torch_encoders.runtime, len(torch_encoders.bulk)) == ("torch", 2)
    assert all(isinstance(e, TracedEncoder) for e in [*torch_encoders.bulk, torch_encoders.query])

    auto = build_encoders(model, streams=1)
    # auto: bf16 on PyTorch exactly where the CPU computes bf16 natively, else ONNX Runtime.
    assert auto.runtime == ("torch" if resolve_precision("auto") == "bf16" else "onnx")


def test_a_model_it_cannot_compute_stays_on_torch(model: SentenceTransformer) -> None:
    pooling = type(model[1])(384, pooling_mode="cls")  # the model's own Pooling class, in CLS mode
    cls_pooled = SentenceTransformer(modules=[model[0], pooling], device="cpu")
    with pytest.raises(ExportFailed, match="mean pooling"):
        onnx_encoder(cls_pooled)
    with pytest.raises(ExportFailed):
        build_encoders(cls_pooled, runtime="onnx", precision="fp32", streams=1)
    with capture_logs() as logs:
        encoders = build_encoders(cls_pooled, runtime="auto", precision="fp32", streams=1)
    assert encoders.runtime == "torch"
    (warning,) = [e for e in logs if e["event"] == "onnx_runtime_unavailable"]
    assert warning["fallback"] == "torch" and "mean pooling" in warning["reason"]


def test_onnx_in_bf16_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMFLEET_EMBED_RUNTIME", "onnx")
    monkeypatch.setenv("MEMFLEET_EMBED_PRECISION", "bf16")
    with pytest.raises(ValidationError, match="MEMFLEET_EMBED_RUNTIME=onnx computes in fp32"):
        WorkerConfig()
