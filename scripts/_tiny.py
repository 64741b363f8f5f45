"""The tiny random BERT and synthetic reviews the tests use, built for the reliability scripts."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_tiny(folder: Path, rows: int = 600) -> tuple[Path, Path]:
    """Write a hidden-32 random BERT (packaged MiniLM tokenizer) and a synthetic 3-class CSV; return both paths."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from lorafed.config import PACKAGED_BACKBONE
    from lorafed.model import resolve_backbone

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import write_synthetic_csv

    model_dir = folder / "tiny-bert"
    if not (model_dir / "config.json").is_file():
        tok = AutoTokenizer.from_pretrained(resolve_backbone(PACKAGED_BACKBONE))
        cfg = BertConfig(
            vocab_size=tok.vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
        )
        torch.manual_seed(1234)  # the same weights as the tests' fixture
        BertModel(cfg).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    return model_dir, write_synthetic_csv(folder / "reviews.csv", n=rows)


def tiny_overrides(model_dir: Path, csv: Path) -> list[str]:
    """Overrides of configs/tiny.yaml that point it at the tiny model and the synthetic CSV."""
    return [
        f"data.path={csv}",
        "data.text_column=review",
        "data.label_column=label",
        "data.max_rows=null",
        f"model.name_or_path={model_dir}",
        "model.precision=fp32",
        "train.num_threads=1",
    ]
