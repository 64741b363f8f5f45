"""Batch inference and evaluation with an exported (merged) model directory.

The model is loaded with plain transformers; ``lorafed_export.json`` (written by
``lorafed export``) supplies the default text columns and tokenization, so predictions see the
text exactly as training did (e.g. a title put in front of the review).

Backends: ``torch`` runs the transformers model; ``onnx`` runs the export's ``model.onnx``
(written by ``lorafed export`` in fp32 unless ``--no-onnx``) through onnxruntime, with the same
tokenization and the same probabilities within 1e-4. ``auto`` picks ``onnx`` when the folder has
``model.onnx`` and onnxruntime imports, else ``torch``: onnxruntime served 1.55x-1.8x the torch
backend's texts/s at concurrency 8 (``results/serve.md``). The choice and its reason are logged. The
torch model is loaded in both cases (its config gives the labels, and attributions need it).

Why one module of ~300 lines: reading inputs, both backends and scoring share the export's
input rule and labels; split, each piece would re-read the export folder.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

import numpy as np
import torch

from lorafed.data.tokens import model_inputs
from lorafed.errors import DataError, ModelError
from lorafed.metrics import EvalResult, classification_scores
from lorafed.serve.export import EXPORT_INFO
from lorafed.serve.onnx import ONNX_FILE, ONNX_INSTALL, OnnxClassifier, onnxruntime_available, softmax

logger = logging.getLogger(__name__)

Backend = Literal["auto", "torch", "onnx"]
BACKENDS = ("auto", "torch", "onnx")


@dataclass
class ServingModel:
    """A merged classifier ready for inference.

    Attributes:
        model: The transformers model (fp32, eval mode).
        tokenizer: Its tokenizer.
        labels: Label names in id order.
        text: Defaults from the export: text_column, text_pair_column, pair_mode, label_column, max_length.
        backend: ``torch`` or ``onnx`` (what :func:`predict_proba` runs).
        onnx: The onnxruntime classifier when ``backend`` is ``onnx``.
        backend_reason: Why ``backend`` was chosen (logged, and shown by ``GET /metadata``).
    """

    model: Any
    tokenizer: Any
    labels: tuple[str, ...]
    text: dict[str, Any]
    backend: str = "torch"
    onnx: OnnxClassifier | None = None
    backend_reason: str = ""


def resolve_backend(model_dir: str | Path, backend: str = "auto") -> str:
    """The backend to serve ``model_dir`` with: ``auto`` is ``onnx`` when ``model.onnx`` exists and
    onnxruntime imports, else ``torch`` (see :func:`choose_backend` for the reason too).

    Raises:
        ModelError: An unknown backend, or ``onnx`` for a folder without ``model.onnx``.
        OnnxError: ``onnx`` without onnxruntime installed.
    """
    return choose_backend(model_dir, backend)[0]


def choose_backend(model_dir: str | Path, backend: str = "auto") -> tuple[str, str]:
    """The backend to serve ``model_dir`` with, and why (one phrase, for the log and ``/metadata``).

    Raises:
        ModelError: An unknown backend, or ``onnx`` for a folder without ``model.onnx``.
        OnnxError: ``onnx`` without onnxruntime installed.
    """
    if backend not in BACKENDS:
        raise ModelError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    has_onnx = (Path(model_dir) / ONNX_FILE).is_file()
    if backend == "auto":
        if not has_onnx:
            return "torch", (
                f"auto: the export has no {ONNX_FILE} (re-export without --no-onnx, with onnx and "
                "onnxruntime installed, to serve through onnxruntime, ~1.5x faster)"
            )
        if not onnxruntime_available():
            return "torch", f"auto: the export has {ONNX_FILE} but onnxruntime is not installed ({ONNX_INSTALL})"
        return "onnx", f"auto: the export has {ONNX_FILE} and onnxruntime is installed (faster than torch on CPU)"
    if backend == "onnx":
        if not has_onnx:
            raise ModelError(f"{model_dir}: no {ONNX_FILE}; export again with 'lorafed export' (without --no-onnx)")
        if not onnxruntime_available():
            from lorafed.serve.onnx import OnnxError

            raise OnnxError(f"backend onnx needs onnxruntime; {ONNX_INSTALL}")
    return backend, f"--backend {backend} was asked for"


def load_serving_model(model_dir: str | Path, backend: str = "auto", threads: int | None = None) -> ServingModel:
    """Load a merged model directory (as written by ``lorafed export``, or any HF sequence classifier).

    Args:
        model_dir: The export folder.
        backend: ``auto``, ``torch`` or ``onnx`` (see :func:`resolve_backend`).
        threads: onnxruntime intra-op threads (``None``: its default).

    Raises:
        ModelError: Not a model directory, a peft adapter directory, unloadable, or no ``model.onnx`` for ``onnx``.
        OnnxError: ``onnx`` without onnxruntime.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    d = Path(model_dir)
    if (d / "adapter_config.json").is_file():
        raise ModelError(f"{d} is a peft adapter directory; export with --format merged to get a servable model")
    if not (d / "config.json").is_file():
        raise ModelError(f"{d}: not a model directory (no config.json); create one with 'lorafed export'")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(d, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(d)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{d}: cannot load as a sequence classifier: {exc}") from exc
    model.eval()
    id2label = model.config.id2label
    labels = tuple(str(id2label[i]) for i in range(len(id2label)))
    info = d / EXPORT_INFO
    text = json.loads(info.read_text(encoding="utf-8")).get("text", {}) if info.is_file() else {}
    if not text:  # a merged export copied without lorafed_export.json still carries its input rule
        text = dict((getattr(model.config, "lorafed", None) or {}).get("text", {}))
    chosen, reason = choose_backend(d, backend)
    onnx = OnnxClassifier(d / ONNX_FILE, threads) if chosen == "onnx" else None
    level = logging.WARNING if backend == "auto" and chosen == "torch" and (d / ONNX_FILE).is_file() else logging.INFO
    logger.log(level, "%s backend for %s: %s", chosen, d, reason)
    return ServingModel(model, tokenizer, labels, text, chosen, onnx, reason)


@torch.inference_mode()  # no autograd records or version counters: a cheaper forward than no_grad
def predict_proba(
    sm: ServingModel,
    texts: Sequence[str],
    pairs: Sequence[str] | None = None,
    batch_size: int = 64,
    max_length: int | None = None,
) -> np.ndarray:
    """Class probabilities (rows x labels) for ``texts`` (and second texts ``pairs``), on ``sm.backend``."""
    pair_mode = sm.text.get("pair_mode", "pair")
    length = max_length or int(sm.text.get("max_length") or 128)
    first, second = model_inputs(texts, pairs, pair_mode)
    out = []
    for start in range(0, len(first), batch_size):
        a = first[start : start + batch_size]
        b = second[start : start + batch_size] if second is not None else None
        if sm.onnx is not None:
            enc = sm.tokenizer(a, b, truncation=True, max_length=length, padding=True, return_tensors="np")
            out.append(softmax(sm.onnx(enc)))
            continue
        enc = sm.tokenizer(a, b, truncation=True, max_length=length, padding=True, return_tensors="pt")
        out.append(torch.softmax(sm.model(**enc).logits.float(), dim=-1).numpy())
    return np.concatenate(out) if out else np.zeros((0, len(sm.labels)), dtype=np.float32)


@dataclass
class InputRows:
    """The rows :func:`read_rows` found to classify.

    Attributes:
        frame: The table (``None`` for stdin).
        texts: The texts, in file order, rows without text left out.
        pairs: Their second texts (or ``None``).
        rows: The 1-based file row number of each text (stdin: its number among non-blank lines).
        skipped: 1-based row numbers left out for having no text.
        column: The text column read.
    """

    frame: Any
    texts: list[str]
    pairs: list[str] | None
    rows: list[int]
    skipped: list[int]
    column: str | None = None


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v))


def read_rows(
    source: str,
    sm: ServingModel,
    text_column: str | None = None,
    pair_column: str | None = None,
    stdin: TextIO | None = None,
    strict: bool = True,
) -> InputRows:
    """Read the rows to classify: a CSV/JSONL/Parquet file, or ``-`` for one text per line on stdin.

    The text column is ``text_column``, else the export's, else ``text``, else the only column.
    A row whose text is missing or blank is refused (``strict``) or left out and listed in ``skipped``.
    Blank stdin lines are separators, never rows.

    Raises:
        DataError: A missing column, or (``strict``) the first row with no text, named.
    """
    from lorafed.data.read import read_table

    if source == "-":
        lines = [ln.rstrip("\n") for ln in (stdin or sys.stdin)]
        texts = [ln for ln in lines if ln.strip()]
        return InputRows(None, texts, None, list(range(1, len(texts) + 1)), [])
    frame = read_table(source)
    col = text_column or sm.text.get("text_column")
    if col is None or col not in frame.columns:
        if text_column is not None:
            col = text_column
        elif "text" in frame.columns:
            col = "text"
        elif len(frame.columns) == 1:
            col = str(frame.columns[0])
    if col is None or col not in frame.columns:
        raise DataError(
            f"text column {col!r} not found (columns: {', '.join(map(str, frame.columns))}); pass --text-column",
            path=source,
        )
    pcol = pair_column if pair_column is not None else sm.text.get("text_pair_column")
    if pair_column is not None and pair_column not in frame.columns:
        raise DataError("text pair column not found", path=source, field=pair_column)
    values = frame[col].tolist()
    seconds = frame[pcol].tolist() if pcol and pcol in frame.columns else None
    texts: list[str] = []
    pairs: list[str] | None = [] if seconds is not None else None
    rows: list[int] = []
    skipped: list[int] = []
    for i, v in enumerate(values, start=1):
        if _missing(v) or not str(v).strip():
            if strict:
                more = sum(1 for w in values[i:] if _missing(w) or not str(w).strip())
                hint = f" (and {more} more such row(s))" if more else ""
                raise DataError(f"empty or missing text{hint}", path=source, row=i, field=col)
            skipped.append(i)
            continue
        texts.append(str(v))
        rows.append(i)
        if pairs is not None and seconds is not None:
            w = seconds[i - 1]
            pairs.append("" if _missing(w) else str(w))
    return InputRows(frame, texts, pairs, rows, skipped, str(col))


def read_texts(
    source: str,
    sm: ServingModel,
    text_column: str | None = None,
    pair_column: str | None = None,
    stdin: TextIO | None = None,
) -> tuple[Any, list[str], list[str] | None]:
    """Read the rows to classify, refusing any row without text (see :func:`read_rows`).

    Returns:
        The table (``None`` for stdin), the texts, and the second texts (or ``None``).

    Raises:
        DataError: A missing column or an empty text (naming the row).
    """
    got = read_rows(source, sm, text_column, pair_column, stdin, strict=True)
    return got.frame, got.texts, got.pairs


def skipped_message(skipped: Sequence[int], shown: int = 20) -> str:
    """``skipped N rows with no text: rows 3, 17, ...`` (the first ``shown`` row numbers)."""
    listed = ", ".join(map(str, skipped[:shown])) + (", ..." if len(skipped) > shown else "")
    return f"skipped {len(skipped)} row{'s' if len(skipped) != 1 else ''} with no text: rows {listed}"


def prediction_records(
    probs: np.ndarray, labels: Sequence[str], rows: Sequence[int] | None = None
) -> Iterator[dict[str, Any]]:
    """One JSON-ready record per row: 1-based row (``rows[i]``, else ``i + 1``), top label, its
    probability, all probabilities."""
    for i, p in enumerate(probs):
        top = int(np.argmax(p))
        yield {
            "row": rows[i] if rows is not None else i + 1,
            "label": labels[top],
            "score": float(p[top]),
            "probabilities": {lab: float(x) for lab, x in zip(labels, p, strict=True)},
        }


def score_labels(probs: np.ndarray, gold: Sequence[str], labels: Sequence[str], path: str, column: str) -> EvalResult:
    """Loss, accuracy, macro-F1, per-class report and confusion matrix of predictions against gold labels.

    The same :class:`~lorafed.metrics.EvalResult` that training's evaluation gives.

    Raises:
        DataError: A gold label the model does not know (naming its row).
    """
    lookup = {lab: i for i, lab in enumerate(labels)}
    y_true = []
    for row, g in enumerate(gold, start=1):
        if g not in lookup:
            raise DataError(
                f"label {g!r} is not one of the model's labels {list(labels)}", path=path, row=row, field=column
            )
        y_true.append(lookup[g])
    truth = np.array(y_true, dtype=np.int64)
    acc, macro, report, cm = classification_scores(truth, probs.argmax(axis=1), tuple(labels))
    picked = probs[np.arange(len(truth)), truth] if len(truth) else np.ones(0)
    loss = float(-np.log(np.clip(picked, 1e-12, 1.0)).mean()) if len(truth) else float("nan")
    return EvalResult(loss, acc, macro, report, cm, len(truth), tuple(labels))


def format_report(s: EvalResult) -> str:
    """A text per-class report (precision, recall, F1, support) with the headline numbers."""
    width = max(12, *(len(lab) for lab in s.labels))
    lines = [f"{'label':<{width}}  precision  recall      f1  support", "-" * (width + 36)]
    for lab in s.labels:
        r = s.per_class[lab]
        lines.append(
            f"{lab:<{width}}  {r['precision']:9.4f}  {r['recall']:6.4f}  {r['f1']:6.4f}  {int(r['support']):7d}"
        )
    lines.append(f"accuracy {s.accuracy:.4f}  macro-F1 {s.macro_f1:.4f}  ({s.n} rows)")
    return "\n".join(lines)
