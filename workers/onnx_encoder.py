"""MiniLM on ONNX Runtime: the model's own weights, exported at start-up, run without PyTorch's overhead.

On a CPU without native bf16 (AMD EPYC with AVX2 only), stock sentence-transformers encodes the
LoCoMo turns at ~115 texts/s in fp32. The same graph on ONNX Runtime, one thread per call and two
calls at a time, gave 140-170 texts/s there, and one search query took 6.4-7.5 ms instead of
12.6-15 ms through the frozen TorchScript trace. Both are the same arithmetic in fp32: embeddings
agree with the model's to 1 - cos < 1e-6 (tests/test_onnx_encoder.py, bench/encode.py).

The graph is exported from the verified model in memory, never written to disk: a worker keeps
no local files, and an exported file would be one more thing that could differ from the weights.
The export goes through torch's TorchScript exporter (`dynamo=False`), which torch marks
deprecated; `EXPORT_TESTED_WITH` names the torch it was checked on, and a failed export leaves the
worker on PyTorch (`workers.model.encoder_runtime`).
"""

from __future__ import annotations

import copy
import io
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from producer.errors import MemfleetError

if TYPE_CHECKING:
    import onnxruntime
    from sentence_transformers import SentenceTransformer

EXPORT_TESTED_WITH = "2.13"
_INPUTS = ("input_ids", "attention_mask")


class ExportFailed(MemfleetError, RuntimeError):
    """The model could not be exported to ONNX, or is not the shape this encoder computes."""


class OnnxEncoder:
    """`encode(texts)` like a SentenceTransformer's, for MiniLM's Transformer → mean pooling → normalize.

    The session is shared: ONNX Runtime runs concurrent calls of one session safely, each on its
    calling thread when the session has one intra-op thread. The tokenizer is not shared: a Hugging
    Face fast tokenizer is mutated by every call's padding settings, so each thread gets a `twin()`.
    """

    def __init__(self, session: onnxruntime.InferenceSession, tokenizer: Any, max_length: int) -> None:
        self._session = session
        self._tokenizer = tokenizer
        self._max_length = max_length

    def twin(self) -> OnnxEncoder:
        """The same session behind a tokenizer of its own, for another thread."""
        return OnnxEncoder(self._session, copy.deepcopy(self._tokenizer), self._max_length)

    def encode(self, texts: list[str], **_: Any) -> np.ndarray:
        features = self._tokenizer(texts, padding=True, truncation=True, max_length=self._max_length,
                                   return_tensors="np")
        feed = {name: np.asarray(features[name], dtype=np.int64) for name in _INPUTS}
        (hidden,) = self._session.run(None, feed)
        mask = feed["attention_mask"][..., None].astype(np.float32)
        pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        return np.asarray(pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12), dtype=np.float32)


def onnx_encoder(model: SentenceTransformer, threads: int = 1) -> OnnxEncoder:
    """An encoder for `model`'s weights on ONNX Runtime, `threads` intra-op threads per call."""
    import onnxruntime

    _check_shape(model)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # warnings about the exporter's unused initializers are noise here
    session = onnxruntime.InferenceSession(export(model), options, providers=["CPUExecutionProvider"])
    transformer: Any = model[0]
    return OnnxEncoder(session, copy.deepcopy(transformer.tokenizer), int(transformer.max_seq_length))


def export(model: SentenceTransformer) -> bytes:
    """The transformer of `model` as an ONNX graph, batch and sequence length left dynamic."""
    import torch

    transformer: Any = model[0]

    class LastHiddenState(torch.nn.Module):
        # transformers 5 reordered BertModel.forward's positional parameters: name every argument.
        def __init__(self, bert: torch.nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # type: ignore[no-any-return]

    sample = transformer.tokenizer(["a short one", "and a somewhat longer sample text"], padding=True,
                                   return_tensors="pt")
    buffer = io.BytesIO()
    axes = {name: {0: "batch", 1: "tokens"} for name in (*_INPUTS, "last_hidden_state")}
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The exporter warns that it is deprecated and that shape branches are traced as taken.
            warnings.simplefilter("ignore")
            torch.onnx.export(LastHiddenState(transformer.auto_model).eval(),
                              tuple(sample[name] for name in _INPUTS), buffer,  # type: ignore[arg-type]  # a file object is fine
                              input_names=list(_INPUTS),
                              output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=17,
                              dynamo=False)
    except Exception as exc:
        raise ExportFailed(f"exporting the model to ONNX failed: {type(exc).__name__}: {exc}") from exc
    return buffer.getvalue()


def _check_shape(model: SentenceTransformer) -> None:
    """Refuse a pipeline other than Transformer → mean pooling (→ normalize): `encode` computes only that."""
    names = [type(module).__name__ for module in model]
    pooling: Any = model[1] if len(names) > 1 else None
    config = pooling.get_config_dict() if pooling is not None else {}
    # sentence-transformers 6 names the mode; older releases set one flag per mode.
    mode = config.get("pooling_mode", "mean" if config.get("pooling_mode_mean_tokens") else None)
    if names[:2] != ["Transformer", "Pooling"] or names[2:] not in ([], ["Normalize"]) or mode != "mean":
        raise ExportFailed(f"the ONNX encoder computes Transformer → mean pooling → Normalize, not {names}")
