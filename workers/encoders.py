"""Which encoders a worker runs: the runtime, the precision and how many bulk streams.

- **runtime** `auto`: PyTorch in bf16 where the CPU computes bf16 natively (AVX512-BF16, AMX), which
  no fp32 runtime matches there, through a frozen trace (`workers.traced_encoder`); elsewhere ONNX
  Runtime in fp32 (`workers.onnx_encoder`), which on an AVX2 EPYC encoded bulk texts 1.1-1.25x and
  single queries 1.8x as fast as PyTorch, with the same embeddings. If ONNX Runtime is missing or
  the export fails, `auto` stays on PyTorch and says so.
- **streams**: one bulk stream per core the process may use (`MEMFLEET_EMBED_THREADS` caps it),
  each encoding its own batch on one thread (`workers.embedder`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import structlog

from producer.cores import usable_cores
from workers.embedder import Encoder
from workers.model import BF16_EMULATED, Precision, bf16_native, resolve_precision, set_precision
from workers.onnx_encoder import ExportFailed, OnnxEncoder, onnx_encoder

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

Runtime = Literal["torch", "onnx"]
log = structlog.get_logger("memfleet.encoders")


@dataclass(frozen=True)
class Encoders:
    runtime: Runtime
    precision: Precision
    bulk: Sequence[Encoder]  # one per stream, each with a tokenizer of its own
    query: Encoder


def build_encoders(model: SentenceTransformer, *, runtime: str = "auto", precision: str = "auto",
                   streams: int | None = None) -> Encoders:
    """The bulk and query encoders for `model` (which this may move to bf16)."""
    from workers.traced_encoder import TracedEncoder

    count = max(1, streams or usable_cores())
    chosen_precision = resolve_precision(precision)
    if chosen_precision == "bf16" and not bf16_native():
        log.warning("bf16_emulated", reason=BF16_EMULATED, advice="set MEMFLEET_EMBED_PRECISION to auto or fp32")
    if runtime == "onnx" or (runtime == "auto" and chosen_precision == "fp32"):
        onnx = _onnx(model, required=runtime == "onnx")
        if onnx is not None:
            return Encoders("onnx", "fp32", [onnx, *(onnx.twin() for _ in range(count - 1))], onnx.twin())
    set_precision(model, chosen_precision)
    traced = TracedEncoder(model)
    return Encoders("torch", chosen_precision, [traced, *(traced.twin() for _ in range(count - 1))], traced.twin())


def _onnx(model: SentenceTransformer, *, required: bool) -> OnnxEncoder | None:
    try:
        return onnx_encoder(model, threads=1)
    except (ImportError, ExportFailed) as exc:
        if required:
            raise
        log.warning("onnx_runtime_unavailable", reason=f"{type(exc).__name__}: {exc}", fallback="torch")
        return None
