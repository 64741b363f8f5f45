"""Whitening of the mean-pooled feature, written into BERT's pooler so the model stays plain.

With ``model.pooling: mean`` the classifier reads ``tanh(W_p z + b_p)``, where ``z`` is the
LayerNorm'd mean of the token states (:mod:`lorafed.model.pooling`) and the pooler ``W_p`` is
``0.05 x`` identity. Frozen sentence-encoder features are far from isotropic: on clothing reviews
(int8 MiniLM, mean after layer 4, 128 tokens) the training rows' mean is 2.2x longer than their
spread, and the covariance's largest eigenvalue is 370x its median. Gradient descent on a linear
head then moves slowly along the directions that separate the classes, and under DP-SGD the
same isotropic noise drowns them first.

A *whitening* file holds a mean ``mu`` and a symmetric transform ``T = s (C + lambda I)^(-1/2)``
(``C`` the covariance of ``z`` on some rows, ``lambda`` = ``shrinkage`` x its largest eigenvalue,
``s`` so that the whitened rows have mean norm 1, like the 0.05 x identity pooler's output).
:func:`apply_whitening` sets the pooler to ``W_p = T``, ``b_p = -T mu``: the head reads
``tanh(T (z - mu))``, an invertible affine map of the same feature. A linear head can represent
the same functions as before; only the geometry of its training changes. The pooler is saved with
the model, so an export is still a plain ``BertForSequenceClassification``.

The rows a whitening is fitted on are read by whoever fits it, not by the clients' DP accounting:
use public or server-held text (a catalogue, public reviews, the server's own validation rows),
never a client's training rows when their privacy matters. ``lorafed whiten`` fits one from a
CSV, JSONL or Parquet file; every client of a federation loads the same file
(``model.whitening``), and its digest travels in every payload header (``lora.whitening``), so a
client with another whitening is refused.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorafed.errors import ModelError
from lorafed.model.pooling import bert_parts

logger = logging.getLogger(__name__)

#: ``format`` in the file's metadata.
FORMAT = "lorafed-whitening"
#: The default ridge: lambda = shrinkage x the covariance's largest eigenvalue.
DEFAULT_SHRINKAGE = 0.01
#: Fewer rows than this per feature dimension fit a poor covariance: a warning says so.
ROWS_PER_DIM_WARNING = 2.0


@dataclass(frozen=True)
class Whitening:
    """A fitted whitening: the pooler's weight is ``transform``, its bias ``-transform @ mean``.

    Attributes:
        mean: The mean feature ``mu`` (float32, ``[hidden]``).
        transform: ``T`` (float32, ``[hidden, hidden]``, symmetric).
        meta: The file's metadata (strings): base fingerprint, layers, max length, rows, shrinkage.
    """

    mean: torch.Tensor
    transform: torch.Tensor
    meta: dict[str, str]

    @functools.cached_property
    def digest(self) -> str:
        """``sha256:`` over the two tensors' float32 bytes (what identifies the whitening in headers)."""
        return tensor_digest(self.mean, self.transform)


def tensor_digest(mean: torch.Tensor, transform: torch.Tensor) -> str:
    """``sha256:`` over ``mean`` and ``transform`` as contiguous float32 bytes."""
    h = hashlib.sha256()
    for name, t in (("mean", mean), ("transform", transform)):
        t = t.detach().to(torch.float32).contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return "sha256:" + h.hexdigest()


def fit_whitening(features: np.ndarray, shrinkage: float = DEFAULT_SHRINKAGE) -> tuple[np.ndarray, np.ndarray]:
    """The mean and the scaled ridge-whitening transform of ``features`` (rows x dims), in float64.

    Args:
        features: The pooler's input for each row.
        shrinkage: lambda as a share of the covariance's largest eigenvalue (> 0).

    Returns:
        ``(mu, T)``: ``T = s (C + lambda I)^(-1/2)`` with ``s`` such that the mean of ``|T (x - mu)|``
        over the rows is 1.

    Raises:
        ModelError: Fewer than 2 rows, a non-finite feature, or a shrinkage <= 0.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ModelError(f"whitening: needs at least 2 rows of features, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ModelError("whitening: the features hold NaN or infinite values")
    if not shrinkage > 0:
        raise ModelError(f"whitening: shrinkage must be > 0, got {shrinkage}")
    if x.shape[0] < ROWS_PER_DIM_WARNING * x.shape[1]:
        logger.warning(
            "whitening: %d rows for %d dimensions; the covariance is poorly estimated below %d rows "
            "(the shrinkage keeps it invertible)",
            x.shape[0],
            x.shape[1],
            int(ROWS_PER_DIM_WARNING * x.shape[1]),
        )
    mu = x.mean(axis=0)
    centred = x - mu
    cov = centred.T @ centred / (x.shape[0] - 1)
    eigval, eigvec = np.linalg.eigh(cov)
    eigval = np.clip(eigval, 0.0, None)
    ridge = shrinkage * float(eigval.max())
    if ridge <= 0:
        raise ModelError("whitening: every row has the same feature (zero covariance)")
    transform = (eigvec / np.sqrt(eigval + ridge)) @ eigvec.T
    scale = 1.0 / float(np.linalg.norm(centred @ transform, axis=1).mean())
    return mu, transform * scale


def _pooler(model: Any) -> Any:
    """BERT's [CLS] pooler of ``model`` (a peft wrapper or the plain classifier); see :func:`bert_parts`."""
    return bert_parts(model.get_base_model() if hasattr(model, "get_base_model") else model)[1]


def pooled_features(model: Any, batches: Iterator[dict[str, torch.Tensor]]) -> np.ndarray:
    """The pooler's input (the feature the whitening transforms) for every row of ``batches``, in order."""
    dense = _pooler(model).dense
    captured: list[np.ndarray] = []

    def keep(_module: Any, args: tuple[torch.Tensor, ...]) -> None:
        captured.append(args[0].detach().to(torch.float32).cpu().numpy())

    handle = dense.register_forward_pre_hook(keep)
    model.eval()
    try:
        with torch.inference_mode():
            for batch in batches:
                model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        handle.remove()
    if not captured:
        raise ModelError("whitening: no rows to compute features of")
    return np.concatenate(captured, axis=0)


def save_whitening(path: str | Path, mean: np.ndarray, transform: np.ndarray, meta: dict[str, Any]) -> Whitening:
    """Write ``mean`` and ``transform`` (float32) with ``meta`` to a safetensors file; return what a load reads."""
    from safetensors.torch import save_file

    tensors = {
        "mean": torch.as_tensor(mean, dtype=torch.float32).contiguous(),
        "transform": torch.as_tensor(transform, dtype=torch.float32).contiguous(),
    }
    header = {"format": FORMAT, **{k: str(v) for k, v in meta.items()}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=header)
    tmp.replace(path)
    return Whitening(tensors["mean"], tensors["transform"], header)


def load_whitening(path: str | Path) -> Whitening:
    """Read a whitening file written by :func:`save_whitening` (cached by path, size and mtime).

    Raises:
        ModelError: The file is missing, not safetensors, not a lorafed whitening, or its tensors
            have the wrong shapes, dtype or non-finite values.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelError(f"model.whitening: {p}: no such file (fit one with 'lorafed whiten')")
    st = p.stat()
    return _load_cached(str(p.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, _size: int, _mtime_ns: int) -> Whitening:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt") as fh:
            meta = dict(fh.metadata() or {})
            keys = set(fh.keys())
            tensors = {k: fh.get_tensor(k) for k in keys & {"mean", "transform"}}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"model.whitening: {path}: not a safetensors file ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise ModelError(f"model.whitening: {path}: metadata format {meta.get('format')!r}, expected {FORMAT!r}")
    if keys != {"mean", "transform"}:
        raise ModelError(f"model.whitening: {path}: tensors {sorted(keys)}, expected ['mean', 'transform']")
    mean, transform = tensors["mean"], tensors["transform"]
    h = mean.shape[0] if mean.dim() == 1 else -1
    if mean.dim() != 1 or tuple(transform.shape) != (h, h):
        raise ModelError(
            f"model.whitening: {path}: shapes mean {tuple(mean.shape)}, transform {tuple(transform.shape)}; "
            "expected [H] and [H, H]"
        )
    if mean.dtype != torch.float32 or transform.dtype != torch.float32:
        raise ModelError(f"model.whitening: {path}: dtypes {mean.dtype}, {transform.dtype}; expected float32")
    if not (torch.isfinite(mean).all() and torch.isfinite(transform).all()):
        raise ModelError(f"model.whitening: {path}: NaN or infinite values")
    return Whitening(mean, transform, meta)


def check_whitening(w: Whitening, source: str, fingerprint: str, num_layers: int | None, hidden: int) -> None:
    """Refuse a whitening fitted on another base, another layer or another hidden size.

    Raises:
        ModelError: Naming the field that differs.
    """
    if w.mean.shape[0] != hidden:
        raise ModelError(f"model.whitening: {source}: fitted for hidden size {w.mean.shape[0]}, the model has {hidden}")
    fitted = w.meta.get("base_fingerprint")
    if fitted != fingerprint:
        raise ModelError(
            f"model.whitening: {source}: fitted on base {str(fitted)[:23]}..., "
            f"the model's base is {fingerprint[:23]}..."
        )
    layers = w.meta.get("num_layers", "None")
    if layers != str(num_layers):
        raise ModelError(
            f"model.whitening: {source}: fitted on the features of model.num_layers {layers}, "
            f"the model has model.num_layers {num_layers}"
        )


def apply_whitening(model: Any, w: Whitening) -> None:
    """Set the pooler to ``T`` and ``-T mu`` (see the module docstring); call on fp32 weights, before LoRA."""
    dense = _pooler(model).dense
    if tuple(dense.weight.shape) != tuple(w.transform.shape):
        raise ModelError(
            f"model.whitening: transform {tuple(w.transform.shape)} does not fit the pooler {tuple(dense.weight.shape)}"
        )
    with torch.no_grad():
        dense.weight.copy_(w.transform.to(dense.weight.dtype))
        dense.bias.copy_((-(w.transform.double() @ w.mean.double())).to(dense.bias.dtype))
    logger.debug("whitening %s written into the pooler", w.digest[:23])


def whitening_digest(path: str | None) -> str | None:
    """The digest of the whitening file at ``path`` (``None`` for none)."""
    return None if path is None else load_whitening(path).digest


def fit_on_batches(
    client: Any,
    batches: Iterator[dict[str, torch.Tensor]],
    out: str | Path,
    num_layers: int | None,
    max_length: int,
    shrinkage: float = DEFAULT_SHRINKAGE,
    source: str = "",
) -> Whitening:
    """Fit a whitening on the features ``client``'s model (without whitening) computes for ``batches``; save it.

    Args:
        client: A :class:`~lorafed.model.backbone.ClientModel` with ``pooling: mean`` and no whitening.
        batches: Model inputs (``labels`` ignored).
        out: The whitening file to write.
        num_layers: The model's ``model.num_layers`` (kept in the file, checked when loaded).
        max_length: The ``data.max_length`` the batches were tokenized with (kept in the file).
        shrinkage: See :func:`fit_whitening`.
        source: Where the rows came from, kept in the file.
    """
    feats = pooled_features(client.model, batches)
    mu, transform = fit_whitening(feats, shrinkage)
    meta = {
        "base_fingerprint": client.fingerprint,
        "num_layers": str(num_layers),
        "max_length": str(max_length),
        "rows": str(len(feats)),
        "shrinkage": repr(float(shrinkage)),
        "precision": client.precision,
        "source": source,
    }
    w = save_whitening(out, mu, transform, meta)
    logger.info("whitening fitted on %d rows (shrinkage %g): %s, %s", len(feats), shrinkage, out, w.digest[:23])
    return w


def fit_from_texts(
    model_cfg: Any,
    texts: Sequence[str],
    pairs: Sequence[str] | None,
    pair_mode: str,
    max_length: int,
    out: str | Path,
    shrinkage: float = DEFAULT_SHRINKAGE,
    batch_size: int = 64,
    progress: bool = True,
    source: str = "",
) -> Whitening:
    """Run the frozen backbone of ``model_cfg`` (without any whitening) on the texts, fit and save.

    Args:
        model_cfg: The run's ``model`` section (``pooling: mean``); its ``whitening`` is ignored.
        texts: The first texts; ``pairs`` the second ones (or ``None``), joined by ``pair_mode``.
        pair_mode: ``pair`` or ``prefix`` (:func:`lorafed.data.tokens.model_inputs`).
        max_length: Tokens per row, as the federation's ``data.max_length``.
        out: The whitening file to write.
        shrinkage: See :func:`fit_whitening`.
        batch_size: Rows per forward pass.
        progress: Show a progress bar (on a terminal).
        source: Where the texts came from, kept in the metadata.

    Raises:
        ModelError: ``model.pooling`` is not ``mean``, no texts, or see :func:`fit_whitening`.
    """
    import dataclasses

    from lorafed.data.tokens import model_inputs
    from lorafed.model.backbone import load_client_model
    from lorafed.progress import progress_bar

    if model_cfg.pooling != "mean":
        raise ModelError(f"whitening: needs model.pooling mean (the pooler it replaces), got {model_cfg.pooling}")
    if not texts:
        raise ModelError("whitening: no texts to fit on")
    client = load_client_model(dataclasses.replace(model_cfg, whitening=None), ["0", "1"], 0, with_lora=False)
    first, second = model_inputs(texts, pairs, pair_mode)
    starts = range(0, len(first), batch_size)

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        for i in progress_bar(starts, enabled=progress, desc="whitening features", unit="batch"):
            b = None if second is None else second[i : i + batch_size]
            yield client.tokenizer(
                first[i : i + batch_size], b, truncation=True, max_length=max_length, padding=True, return_tensors="pt"
            )

    return fit_on_batches(client, batches(), out, model_cfg.num_layers, max_length, shrinkage, source)
