"""The tiny random BERT and synthetic reviews the tests use, built for the reliability scripts."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_tiny(folder: Path, rows: int = 600) -> tuple[Path, Path]:
    """Write a hidden-32 random BERT (packaged MiniLM tokenizer) and a synthetic 3-class CSV; return both paths."""

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import save_tiny_bert, write_synthetic_csv

    model_dir = folder / "tiny-bert"
    if not (model_dir / "config.json").is_file():
        save_tiny_bert(model_dir)  # the same weights as the tests' fixture
    return model_dir, write_synthetic_csv(folder / "reviews.csv", n=rows)


def tiny_overrides(model_dir: Path, csv: Path) -> list[str]:
    """Overrides of configs/tiny.yaml that point it at the tiny model and the synthetic CSV."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_overrides as overrides

    return overrides(csv, model_dir)
