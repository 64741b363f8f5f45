"""Evaluation: loss, accuracy, macro-F1, a per-class report and the confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lorafed.autocast import autocast_context
from lorafed.data.tokens import TokenizedRows
from lorafed.model.features import feature_cache, head_logits


@dataclass(frozen=True)
class EvalResult:
    """Scores of a model on labelled rows.

    Attributes:
        loss: Mean cross-entropy.
        accuracy: Share of rows predicted right.
        macro_f1: Unweighted mean F1 over the labels present in the truth or the predictions
            (scikit-learn's ``f1_score(average="macro")``).
        per_class: Label -> precision, recall, f1, support.
        confusion: ``confusion[i][j]`` = rows of true label i predicted as j.
        n: Rows scored.
        labels: The label names, in id order.
    """

    loss: float
    accuracy: float
    macro_f1: float
    per_class: dict[str, dict[str, float]]
    confusion: list[list[int]]
    n: int
    labels: tuple[str, ...] = ()

    def summary(self) -> dict[str, float]:
        """The headline numbers."""
        return {"loss": self.loss, "accuracy": self.accuracy, "macro_f1": self.macro_f1}


def classification_scores(
    y_true: np.ndarray, y_pred: np.ndarray, label_names: tuple[str, ...]
) -> tuple[float, float, dict[str, dict[str, float]], list[list[int]]]:
    """Accuracy, macro-F1, per-class report and confusion matrix from label ids."""
    k = len(label_names)
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    tp = np.diag(cm).astype(float)
    pred_count = cm.sum(axis=0).astype(float)
    true_count = cm.sum(axis=1).astype(float)
    precision = np.divide(tp, pred_count, out=np.zeros(k), where=pred_count > 0)
    recall = np.divide(tp, true_count, out=np.zeros(k), where=true_count > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)
    present = (pred_count + true_count) > 0
    macro = float(f1[present].mean()) if present.any() else 0.0
    accuracy = float(tp.sum() / max(len(y_true), 1))
    report = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(true_count[i]),
        }
        for i, name in enumerate(label_names)
    }
    return accuracy, macro, report, cm.tolist()


@torch.no_grad()
def predict_logits(
    model: Any, rows: TokenizedRows, positions: np.ndarray, batch_size: int, autocast: str = "none"
) -> np.ndarray:
    """Logits (fp32) of the model for ``rows[positions]``, in order.

    ``autocast: bf16`` runs the matmuls in bfloat16 as training does with ``train.autocast: bf16``
    (the logits are returned in fp32); ``auto`` resolves as in training (:mod:`lorafed.autocast`).

    The rows are run shortest first and the logits put back in the order of ``positions``: a
    batch is padded to its longest row, so sorted batches carry few pad tokens (800 clothing
    reviews in batches of 64: mean padded width about 82 tokens instead of about 130).

    A model with a feature cache (:mod:`lorafed.model.features`) scores its head on the kept
    input of each row, computed the same way (sorted, in batches of ``batch_size``) when missing.
    """
    model.eval()
    pos = np.asarray(positions, dtype=np.int64)
    cache = feature_cache(model)
    if cache is not None:  # a model whose head trained on kept features: score the head on them
        feats = cache.features(model, rows, pos, batch_size, autocast)
        if feats is not None:
            with torch.no_grad():
                return head_logits(model, feats, autocast).float().cpu().numpy()
    order = np.argsort(rows.lengths(pos), kind="stable")
    chunks = []
    for batch in rows.batches(pos[order], batch_size):
        batch = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad(), autocast_context(model, autocast):
            chunks.append(model(**batch).logits.float().cpu().numpy())
    if not chunks:
        return np.zeros((0, 0), dtype=np.float32)
    logits = np.empty_like(np.concatenate(chunks))
    logits[order] = np.concatenate(chunks)
    return logits


def evaluate(
    model: Any,
    rows: TokenizedRows,
    positions: np.ndarray,
    batch_size: int,
    label_names: tuple[str, ...],
    autocast: str = "none",
) -> EvalResult:
    """Score the model on ``rows[positions]`` (``autocast``: ``train.autocast``, resolved as in training)."""
    logits = predict_logits(model, rows, positions, batch_size, autocast)
    y_true = rows.labels[np.asarray(positions, dtype=np.int64)].numpy()
    loss = float(torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y_true)))
    acc, macro, report, cm = classification_scores(y_true, logits.argmax(axis=1), label_names)
    return EvalResult(loss, acc, macro, report, cm, len(y_true), tuple(label_names))
