"""The query encoder: MiniLM for one search query at a time, through a frozen TorchScript trace.

A query is a dozen tokens. Eager PyTorch spends much of such a forward pass dispatching ~200 small
ops and preparing each matmul's weights; a frozen trace, optimized for inference, prepacks the
weights for oneDNN and fuses ops. On this machine's CPU that took a query from ~7.9 to ~5.9 ms
on one core in bf16 (11.6 to 9.1 ms in fp32); embeddings stay within 1 - cos 1e-4 of the model's
(tests/test_embedder.py). Tokenizing, pooling and normalizing stay the model's own modules, and
the trace shares nothing mutable with the bulk encoder, so the two run on separate threads.

torch 2.13 marks torch.jit deprecated in favour of torch.compile, which on a CPU compiles C++ at
start-up and per input shape. torch is pinned; re-measure torch.compile when moving it.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

# Queries of a few lengths, run once at start-up: the TorchScript executor specialises the graph on
# its first calls, which would otherwise land on the first users' searches.
_WARM_UP = ["hi", "when did she move to a new city?", "what did the two of them talk about " * 6]


class TracedQueryEncoder:
    """`encode(texts)` like a SentenceTransformer's: one text through the trace, several through
    the model in one batch."""

    def __init__(self, model: SentenceTransformer) -> None:
        import torch

        from workers.model import query_twin

        self._model = query_twin(model)  # its own tokenizer: the bulk thread tokenizes meanwhile
        # sentence-transformers 6 renamed tokenize to preprocess, and warns on the old name.
        self._tokenize: Callable[[list[str]], dict[str, Any]] = getattr(self._model, "preprocess", self._model.tokenize)
        sample = self._tokenize([_WARM_UP[1]])
        with torch.no_grad(), _quiet_tracing():
            inputs = (sample["input_ids"], sample["attention_mask"])
            traced = torch.jit.trace(self._model[0].auto_model, inputs, strict=False)  # type: ignore[no-untyped-call]
            self._traced = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
        for text in _WARM_UP * 2:
            self.encode([text])

    def encode(self, texts: list[str], **_: Any) -> np.ndarray:
        import torch

        if len(texts) > 1:
            # Queries that queued up together (a busy worker): one padded batch through the model
            # costs less per query than the trace one by one (16 queries: 3.1 vs 6.7 ms each here).
            return np.asarray(self._model.encode(texts, batch_size=len(texts), show_progress_bar=False))
        rows = []
        with torch.no_grad():
            for text in texts:  # one: the trace was made unpadded, and a batch would be padded
                features = self._tokenize([text])
                output = self._traced(features["input_ids"], features["attention_mask"])
                features["token_embeddings"] = output["last_hidden_state"]
                for module in list(self._model)[1:]:  # the model's own pooling and normalization
                    features = module(features)
                rows.append(features["sentence_embedding"].float())
        return torch.cat(rows).numpy()


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    """Tracing touches every attribute of the model, and each deprecated one says so once."""
    from torch.jit._trace import TracerWarning

    transformers_log = logging.getLogger("transformers.modeling_utils")
    level = transformers_log.level
    with warnings.catch_warnings():
        # transformers' mask code branches on shapes in Python, and the tracer warns that the branch
        # taken is fixed in the graph: unpadded single texts always take the same one.
        warnings.simplefilter("ignore", TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit itself; see the module's docstring
        warnings.simplefilter("ignore", FutureWarning)  # transformers' renamed attributes
        transformers_log.setLevel(logging.ERROR)  # "loss_type=None ... unrecognized": no loss here
        try:
            yield
        finally:
            transformers_log.setLevel(level)
