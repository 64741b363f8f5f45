"""ONNX export of a merged classifier and inference through onnxruntime.

:func:`export_onnx` traces the merged fp32 model with the TorchScript exporter
(``torch.onnx.export(..., dynamo=False)``: it needs neither ``onnxscript`` nor a ``torch.export``-able
model, and handles transformers' mask code), with dynamic batch and sequence axes and opset 17.
The graph's inputs are the tokenizer's (``input_ids``, ``attention_mask`` and, for BERT,
``token_type_ids``), its one output ``logits`` (batch x labels). The written file is then loaded
back in onnxruntime and its logits compared with torch's on fixed batches of two shapes (so a trace
that froze the batch or sequence size fails), within ``tolerance``.

:class:`OnnxClassifier` runs such a file: ``clf(encoding) -> logits`` (numpy), for
:func:`lorafed.serve.infer.predict_proba` when a model is served with ``backend="onnx"``.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorafed.errors import LorafedError, ModelError

#: File name of the ONNX graph inside an export folder.
ONNX_FILE = "model.onnx"
#: Opset written (>= 17: LayerNormalization is one op).
ONNX_OPSET = 17
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
#: What an ONNX export needs: ``onnx`` (the exporter writes through it) and ``onnxruntime`` (the parity check).
ONNX_PACKAGES = ("onnx", "onnxruntime")
#: How to get them (they are core dependencies; the extra exists for installs that left them out).
ONNX_INSTALL = "pip install 'lorafed[onnx]'"


class OnnxError(LorafedError):
    """The ONNX export fails, or its logits differ from torch's, or onnxruntime is missing."""


def onnxruntime_available() -> bool:
    """Whether ``onnxruntime`` imports (the ``onnx`` extra: ``pip install 'lorafed[onnx]'``)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def missing_onnx_packages() -> list[str]:
    """The packages of :data:`ONNX_PACKAGES` that do not import (empty: an ONNX export can be written)."""
    missing = []
    for name in ONNX_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def _require_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise OnnxError("onnxruntime is not installed; pip install 'lorafed[onnx]' (onnx, onnxruntime)") from exc
    return onnxruntime


class _LogitsOnly(torch.nn.Module):
    """Positional inputs in, logits out (what the tracer needs)."""

    def __init__(self, model: Any, names: Sequence[str]) -> None:
        super().__init__()
        self.model, self.names = model, tuple(names)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, inputs, strict=True))).logits


def input_names(tokenizer: Any) -> list[str]:
    """The model inputs the tokenizer produces, in a fixed order (``input_ids`` first)."""
    produced = set(getattr(tokenizer, "model_input_names", None) or ("input_ids", "attention_mask"))
    return [n for n in _INPUTS if n in produced or n == "input_ids"]


def export_onnx(
    model: Any,
    tokenizer: Any,
    path: str | Path,
    batches: Sequence[Mapping[str, torch.Tensor]],
    tolerance: float = 1e-4,
    opset: int = ONNX_OPSET,
) -> float:
    """Write ``model`` (a fp32 sequence classifier) as ONNX to ``path`` and check it under onnxruntime.

    Args:
        model: The merged transformers model (fp32; put in eval mode here).
        tokenizer: Its tokenizer (decides the graph's inputs).
        path: The ``.onnx`` file to write.
        batches: Token batches (``input_ids``, ``attention_mask``, ...); the first is traced, every
            one is compared. Give two of different batch and sequence sizes.
        tolerance: Largest accepted |onnxruntime - torch| logit difference.
        opset: ONNX opset (>= 17).

    Returns:
        The largest |logit| difference seen.

    Raises:
        OnnxError: onnxruntime missing, the export fails, or the logits differ by more than ``tolerance``.
    """
    if not batches:
        raise OnnxError("export_onnx needs at least one sample batch")
    ort = _require_onnxruntime()
    names = input_names(tokenizer)
    wrapper = _LogitsOnly(model, names).eval()  # eval(): no dropout in the traced graph
    axes = {n: {0: "batch", 1: "sequence"} for n in names} | {"logits": {0: "batch"}}
    first = batches[0]
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice and tracer notes
            torch.onnx.export(
                wrapper,
                tuple(first[n] for n in names),
                str(path),
                input_names=names,
                output_names=["logits"],
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    except Exception as exc:  # the exporter raises many types; name the step
        raise OnnxError(f"torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch in batches:
        with torch.no_grad():
            ref = model(**{n: batch[n] for n in names}).logits.float().numpy()
        got = session.run(["logits"], {n: batch[n].numpy().astype(np.int64) for n in names})[0]
        if got.shape != ref.shape:
            raise OnnxError(f"ONNX logits have shape {got.shape}, torch's {ref.shape}")
        worst = max(worst, float(np.abs(got - ref).max()))
    if not worst <= tolerance:
        raise OnnxError(f"parity check failed: onnxruntime logits differ from torch's by {worst:.3g} > {tolerance:g}")
    return worst


class OnnxClassifier:
    """An ONNX classifier under onnxruntime (CPU): tokenizer output in, logits out.

    Args:
        path: The ``model.onnx`` file.
        threads: Intra-op threads (``None``: onnxruntime's default, one per core).

    Raises:
        OnnxError: onnxruntime is not installed.
        ModelError: The file cannot be loaded.
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        ort = _require_onnxruntime()
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(f"{path}: onnxruntime cannot load it: {exc}") from exc
        self.path = Path(path)
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, encoding: Mapping[str, Any]) -> np.ndarray:
        """fp32 logits (batch x labels) for a tokenizer encoding (numpy or torch arrays)."""
        feed = {}
        for name in self.inputs:
            value = encoding.get(name)
            if value is None and name == "token_type_ids":
                value = np.zeros_like(np.asarray(encoding["input_ids"]))
            if value is None:
                raise ModelError(f"{self.path}: the graph needs input {name!r}, which the tokenizer did not give")
            feed[name] = np.asarray(value, dtype=np.int64)
        return self.session.run(["logits"], feed)[0].astype(np.float32, copy=False)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32 (numerically stable)."""
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32, copy=False)
