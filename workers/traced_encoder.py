"""MiniLM through a frozen TorchScript trace: what the worker encodes with on PyTorch.

Eager PyTorch spends much of a MiniLM forward pass on LoCoMo turns (30 tokens or so) dispatching
~200 small ops and preparing each matmul's weights; a frozen trace, optimized for inference,
prepacks the weights for oneDNN and fuses ops. The trace is made with eager attention: on such
short sequences the explicit matmuls beat the fused SDPA kernel, which took 15% of a bf16 forward
pass (torch.profiler, one thread). bf16 EPYC, two streams of one thread, LoCoMo turns: 340-350
texts/s against 323-338 through the model; a query on one thread 7.0 against 9.7 ms (p50).

Tokenizing, pooling and normalizing stay the model's own modules; only the transformer is traced.
It is traced on a padded batch, so the graph always applies the attention mask: transformers skips
the mask in Python when no row is padded, and a trace of that branch would ignore padding.
Embeddings stay within 1 - cos 1e-5 of the model's in fp32 (tests/test_traced_encoder.py).

torch 2.13 marks torch.jit deprecated in favour of torch.compile, which on a CPU compiles C++ at
start-up and per input shape, and gave no gain here (bf16 EPYC: 316-319 texts/s, 33 s to compile).
torch is pinned; re-measure torch.compile when moving it.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from sentence_transformers import SentenceTransformer

# Traced on: two rows of different lengths, so one is padded (module docstring).
_SAMPLE = ["when did she move to a new city?", "hi"]
# Run once at start-up: the TorchScript executor specialises the graph on its first calls, which
# would otherwise land on the first users' writes and searches.
_WARM_UP = [["hi"], ["what did the two of them talk about " * 6], _SAMPLE * 8]


class TracedEncoder:
    """`encode(texts)` like a SentenceTransformer's, through the trace; `twin()` for another thread."""

    def __init__(self, model: SentenceTransformer, *, _trace: torch.jit.ScriptModule | None = None) -> None:
        from workers.model import query_twin

        self._model = query_twin(model)  # its own tokenizer: other threads tokenize meanwhile
        # sentence-transformers 6 renamed tokenize to preprocess, and warns on the old name.
        self._tokenize: Callable[[list[str]], dict[str, Any]] = getattr(self._model, "preprocess", self._model.tokenize)
        self._pool_and_normalize = list(self._model)[1:]  # the model's own modules after the transformer
        self._trace = _trace if _trace is not None else self._traced()

    def twin(self) -> TracedEncoder:
        """The same trace (weights are shared, read-only) behind a tokenizer of its own."""
        return TracedEncoder(self._model, _trace=self._trace)

    def encode(self, texts: list[str], **_: Any) -> np.ndarray:
        import torch

        features = self._tokenize(texts)
        with torch.no_grad():
            output = self._trace(features["input_ids"], features["attention_mask"])
            features["token_embeddings"] = output["last_hidden_state"]
            for module in self._pool_and_normalize:
                features = module(features)
        return features["sentence_embedding"].float().numpy()  # type: ignore[no-any-return]

    def _traced(self) -> torch.jit.ScriptModule:
        import torch

        transformer = self._model[0].auto_model
        sample = self._tokenize(_SAMPLE)
        with torch.no_grad(), _quiet_tracing(), _eager_attention(transformer):
            inputs = (sample["input_ids"], sample["attention_mask"])
            traced = torch.jit.trace(transformer, inputs, strict=False)  # type: ignore[no-untyped-call]
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
        for texts in _WARM_UP * 2:
            frozen(*(self._tokenize(texts)[k] for k in ("input_ids", "attention_mask")))
        return frozen


@contextlib.contextmanager
def _eager_attention(transformer: Any) -> Iterator[None]:
    """The transformer with transformers' eager attention while it is traced; its own afterwards."""
    before = getattr(transformer.config, "_attn_implementation", None)
    try:
        transformer.set_attn_implementation("eager")
    except (AttributeError, ValueError):  # an older transformers, or a model without the choice: as it is
        before = None
    try:
        yield
    finally:
        if before is not None:
            transformer.set_attn_implementation(before)


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    """Tracing touches every attribute of the model, and each deprecated one says so once."""
    from torch.jit._trace import TracerWarning

    transformers_log = logging.getLogger("transformers.modeling_utils")
    level = transformers_log.level
    with warnings.catch_warnings():
        # transformers' mask code branches on shapes in Python, and the tracer warns that the branch
        # taken is fixed in the graph: a padded sample takes the one that applies the mask.
        warnings.simplefilter("ignore", TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit itself; see the module's docstring
        warnings.simplefilter("ignore", FutureWarning)  # transformers' renamed attributes
        transformers_log.setLevel(logging.ERROR)  # "loss_type=None ... unrecognized": no loss here
        try:
            yield
        finally:
            transformers_log.setLevel(level)
