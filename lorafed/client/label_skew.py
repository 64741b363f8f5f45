"""Head fixes for label skew, applied to the logits in the client's training loss only.

When a client holds a few of the labels (Dirichlet skew, or one client per category so every
client sees only its own 1-4 intents), plain cross-entropy on all labels teaches each client
to push the labels it never sees down, and the average of those heads under-rates every
label on most clients. Two fixes change only what the client's loss sees (``train.label_skew``);
prediction and evaluation still take the plain argmax of the unchanged logits:

* ``fedrs`` (Li & Zhan, KDD 2021, "FedRS: Federated Learning with Restricted Softmax for Label
  Distribution Non-IID Data"): the logits of the labels absent from the client's training rows
  are scaled by ``alpha`` in [0, 1] (``train.fedrs_alpha``, default 0.5, the paper's choice), so
  their softmax share, and the push that lowers them, shrink. Present labels are unchanged.
* ``fedlc`` (Zhang et al., ICML 2022, "Federated Learning with Label Distribution Skew via
  Logits Calibration"): the logit of label y becomes ``logit_y - tau * n_y ** (-1/4)``
  (``train.fedlc_tau``, default 1.0), n_y being the client's training rows of label y, so rare
  labels must earn a larger margin. A label the client does not hold (n_y = 0) is the limit
  n_y -> 0 of that formula: its calibrated logit is -inf, it leaves the client's softmax and
  gets no gradient (the reference implementations reach the same with a count of 1e-8:
  ``tau * 100`` below every other logit).

Both are an elementwise ``logits * scale + offset`` with per-label vectors built once per
round from the client's own label counts (:class:`LogitAdjustment`); no count leaves the client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

#: ``train.label_skew`` values.
LabelSkew = Literal["none", "fedrs", "fedlc"]


@dataclass(frozen=True)
class LogitAdjustment:
    """Per-label ``scale`` and ``offset`` (both of shape ``[num_labels]``): logits * scale + offset.

    Attributes:
        scale: Multiplies each label's logit (FedRS: ``alpha`` for absent labels, else 1).
        offset: Added after scaling (FedLC: ``-tau * n_y^(-1/4)``, -inf for absent labels).
    """

    scale: torch.Tensor
    offset: torch.Tensor

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The adjusted logits (same shape as ``logits``, fp32)."""
        return logits.float() * self.scale.to(logits.device) + self.offset.to(logits.device)


def label_counts(labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """How many rows of each label ``labels`` holds, as a float vector of length ``num_labels``."""
    return torch.bincount(labels.long(), minlength=num_labels).float()


def fedrs_adjustment(counts: torch.Tensor, alpha: float) -> LogitAdjustment:
    """FedRS's restricted softmax: logits of labels with a count of 0 are scaled by ``alpha``."""
    scale = torch.where(counts > 0, torch.ones_like(counts), torch.full_like(counts, alpha))
    return LogitAdjustment(scale, torch.zeros_like(counts))


def fedlc_adjustment(counts: torch.Tensor, tau: float) -> LogitAdjustment:
    """FedLC's calibration: ``-tau * n_y^(-1/4)`` added to each logit; -inf where n_y = 0."""
    present = counts > 0
    offset = torch.full_like(counts, -torch.inf)
    offset[present] = -tau * counts[present].pow(-0.25)
    return LogitAdjustment(torch.ones_like(counts), offset)


def label_skew_adjustment(
    method: LabelSkew, labels: torch.Tensor, num_labels: int, fedrs_alpha: float, fedlc_tau: float
) -> LogitAdjustment | None:
    """The adjustment for ``method`` from a client's training labels; ``None`` for ``none``.

    Args:
        method: ``none``, ``fedrs`` or ``fedlc``.
        labels: The label of every training row of the client (not only a batch's).
        num_labels: Labels of the federation (the head's outputs).
        fedrs_alpha: FedRS's scale of absent labels' logits.
        fedlc_tau: FedLC's calibration strength.
    """
    if method == "none":
        return None
    counts = label_counts(labels, num_labels)
    if method == "fedrs":
        return fedrs_adjustment(counts, fedrs_alpha)
    if method == "fedlc":
        return fedlc_adjustment(counts, fedlc_tau)
    raise ValueError(f"train.label_skew: unknown method {method!r} (expected none, fedrs or fedlc)")
