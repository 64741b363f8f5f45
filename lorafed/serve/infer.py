"""Batch inference and evaluation with an exported (merged) model directory.

The model is loaded with plain transformers; ``lorafed_export.json`` (written by
``lorafed export``) supplies the default text columns and tokenization, so predictions see the
text exactly as training did (e.g. a title put in front of the review).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from lorafed.errors import DataError, ModelError
from lorafed.metrics import classification_scores
from lorafed.serve.export import EXPORT_INFO


@dataclass
class ServingModel:
    """A merged classifier ready for inference.

    Attributes:
        model: The transformers model (fp32, eval mode).
        tokenizer: Its tokenizer.
        labels: Label names in id order.
        text: Defaults from the export: text_column, text_pair_column, pair_mode, label_column, max_length.
    """

    model: Any
    tokenizer: Any
    labels: tuple[str, ...]
    text: dict[str, Any]


def load_serving_model(model_dir: str | Path) -> ServingModel:
    """Load a merged model directory (as written by ``lorafed export``, or any HF sequence classifier).

    Raises:
        ModelError: Not a model directory, a peft adapter directory, or unloadable.
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
    return ServingModel(model, tokenizer, labels, text)


@torch.no_grad()
def predict_proba(
    sm: ServingModel,
    texts: Sequence[str],
    pairs: Sequence[str] | None = None,
    batch_size: int = 64,
    max_length: int | None = None,
) -> np.ndarray:
    """Class probabilities (rows x labels) for ``texts`` (and second texts ``pairs``)."""
    pair_mode = sm.text.get("pair_mode", "pair")
    length = max_length or int(sm.text.get("max_length") or 128)
    first, second = list(texts), list(pairs) if pairs is not None else None
    if second is not None and pair_mode == "prefix":
        first = [f"{p}. {t}" if p else t for t, p in zip(first, second, strict=True)]
        second = None
    out = []
    for start in range(0, len(first), batch_size):
        a = first[start : start + batch_size]
        b = second[start : start + batch_size] if second is not None else None
        enc = sm.tokenizer(a, b, truncation=True, max_length=length, padding=True, return_tensors="pt")
        out.append(torch.softmax(sm.model(**enc).logits.float(), dim=-1).numpy())
    return np.concatenate(out) if out else np.zeros((0, len(sm.labels)), dtype=np.float32)


def read_texts(
    source: str,
    sm: ServingModel,
    text_column: str | None = None,
    pair_column: str | None = None,
    stdin: TextIO | None = None,
) -> tuple[Any, list[str], list[str] | None]:
    """Read the rows to classify: a CSV/JSONL/Parquet file, or ``-`` for one text per line on stdin.

    The text column is ``text_column``, else the export's, else ``text``, else the only column.

    Returns:
        The table (``None`` for stdin), the texts, and the second texts (or ``None``).

    Raises:
        DataError: A missing column or an empty text (naming the row).
    """
    from lorafed.data.read import read_table

    if source == "-":
        lines = [ln.rstrip("\n") for ln in (stdin or sys.stdin)]
        return None, [ln for ln in lines if ln.strip()], None
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
    texts = []
    for i, v in enumerate(frame[col].tolist(), start=1):
        if v is None or (isinstance(v, float) and np.isnan(v)) or not str(v).strip():
            raise DataError("empty or missing text", path=source, row=i, field=col)
        texts.append(str(v))
    pairs = None
    if pcol and pcol in frame.columns:
        pairs = ["" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in frame[pcol].tolist()]
    return frame, texts, pairs


def prediction_records(probs: np.ndarray, labels: Sequence[str]) -> Iterator[dict[str, Any]]:
    """One JSON-ready record per row: 1-based row, top label, its probability, all probabilities."""
    for i, p in enumerate(probs):
        top = int(np.argmax(p))
        yield {
            "row": i + 1,
            "label": labels[top],
            "score": float(p[top]),
            "probabilities": {lab: float(x) for lab, x in zip(labels, p, strict=True)},
        }


@dataclass
class Scores:
    """Evaluation of a model on a labelled file."""

    n: int
    accuracy: float
    macro_f1: float
    per_class: dict[str, dict[str, float]]
    confusion: list[list[int]]
    labels: tuple[str, ...]


def score_labels(probs: np.ndarray, gold: Sequence[str], labels: Sequence[str], path: str, column: str) -> Scores:
    """Accuracy, macro-F1, per-class report and confusion matrix of predictions against gold labels.

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
    acc, macro, report, cm = classification_scores(np.array(y_true), probs.argmax(axis=1), tuple(labels))
    return Scores(len(y_true), acc, macro, report, cm, tuple(labels))


def format_report(s: Scores) -> str:
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
