"""Plots people would rather look at than read: metrics per round, confusion matrices."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorafed.files import atomic_write_bytes


def figure(*args: Any, **kwargs: Any) -> Any:
    """A new figure and its axes on the file-only Agg backend (``plt.subplots``'s arguments).

    Returns:
        ``(fig, axes)`` as :func:`matplotlib.pyplot.subplots` gives them.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig: Any, path: str | Path) -> Path:
    """Lay out ``fig``, write it to ``path`` as a PNG (atomically) and close it.

    Returns:
        The path written.
    """
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def plot_rounds(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Global accuracy, macro-F1 and test loss against the round."""
    fig, (ax1, ax2) = figure(1, 2, figsize=(9, 3.4))
    rounds = [r["round"] for r in rows]
    ax1.plot(rounds, [r["macro_f1"] for r in rows], marker="o", label="macro-F1")
    ax1.plot(rounds, [r["accuracy"] for r in rows], marker="s", label="accuracy")
    ax1.set_xlabel("round")
    ax1.set_ylim(0, 1)
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(rounds, [r["test_loss"] for r in rows], marker="o", color="tab:red")
    ax2.set_xlabel("round")
    ax2.set_ylabel("test loss")
    ax2.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_confusion(confusion: Sequence[Sequence[int]], labels: Sequence[str], path: str | Path) -> Path:
    """A confusion matrix with counts in the cells (rows: true label, columns: predicted)."""
    import numpy as np

    cm = np.asarray(confusion)
    size = max(4.0, 0.45 * len(labels) + 2)
    fig, ax = figure(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels=list(labels), rotation=90)
    ax.set_yticks(range(len(labels)), labels=list(labels))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = cm.max() if cm.size else 0
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(
                j,
                i,
                str(cm[i, j]),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if cm[i, j] > top / 2 else "black",
            )
    return save_figure(fig, path)
