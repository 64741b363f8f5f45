"""Shared fixtures: a tiny random BERT, a synthetic labelled table, and configs around them.

The tiny model (hidden 32, 2 layers) uses the packaged MiniLM tokenizer, so real text works;
with it most tests run in well under a second.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest

from lorafed.config import RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
CLOTHING_CSV = SHARED_DATA / "womens-clothing-reviews" / "womens_clothing_ecommerce_reviews.csv"
INTENTS_CSV = SHARED_DATA / "bitext-retail-intents" / "bitext_customer_service_intents.csv"

_WORDS = {
    "good": ["love", "great", "perfect", "beautiful", "comfortable", "soft", "flattering"],
    "bad": ["awful", "cheap", "returned", "itchy", "tight", "ripped", "disappointed"],
    "meh": ["okay", "fine", "average", "plain", "ordinary", "decent", "alright"],
}


def save_tiny_bert(out: Path) -> Path:
    """Save a random BertModel (hidden 32, 2 layers, seed 1234) with the packaged tokenizer to ``out``."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from lorafed.config import PACKAGED_BACKBONE
    from lorafed.model.backbone import resolve_backbone

    tok = AutoTokenizer.from_pretrained(resolve_backbone(PACKAGED_BACKBONE))
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(1234)
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def tiny_overrides(csv_path: Path, model_dir: Path) -> list[str]:
    """Overrides of configs/tiny.yaml: a synthetic CSV, the tiny model, fp32, 1 thread, no autocast."""
    return [
        f"data.path={csv_path}",
        "data.text_column=review",
        "data.label_column=label",
        "data.max_rows=null",
        f"model.name_or_path={model_dir}",
        "model.precision=fp32",
        "train.num_threads=1",
        "train.autocast=none",  # the same numbers on every CPU (auto is bf16 only where it is native)
    ]


#: The clothing DP recipe's shape on the tiny BERT: record-level DP-SGD (seeded noise) of the head
#: on mean-pooled token states. Engines must give the simulator's adapter with it too.
DP_MEAN_HEAD: list[str] = [
    "model.pooling=mean",
    "federation.aggregation=head",
    "train.length_bucketing=false",
    "train.class_weighting=none",
    "train.record_dp.enabled=true",
    "train.record_dp.noise_multiplier=1.0",
    "train.record_dp.noise_seed=3",
]


def whitened(recipe: list[str], model_dir: Path, out: Path) -> list[str]:
    """``recipe`` plus ``model.whitening`` (fitted on synthetic reviews) when it pools the mean."""
    if "model.pooling=mean" not in recipe:
        return list(recipe)
    from lorafed.config import LoraSettings, ModelConfig
    from lorafed.model.whitening import fit_from_texts

    texts = [f"{a} {b} dress" for a in _WORDS["good"] for b in _WORDS["bad"] + _WORDS["meh"]]
    cfg = ModelConfig(str(model_dir), "fp32", LoraSettings(), pooling="mean")
    fit_from_texts(cfg, texts, None, "pair", 32, out, progress=False)
    return [*recipe, f"model.whitening={out}"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random BertModel (hidden 32, 2 layers) saved with the packaged tokenizer."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def write_synthetic_csv(path: Path, n: int = 240, seed: int = 0, with_group: bool = True) -> Path:
    """Three-class reviews whose label is signalled by keywords, with a 'shop' group column."""
    rng = random.Random(seed)
    labels = list(_WORDS)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["review", "title", "label", "shop"] if with_group else ["review", "title", "label"])
        for i in range(n):
            lab = labels[i % 3]
            words = rng.sample(_WORDS[lab], 3) + rng.sample(["dress", "top", "size", "color", "fabric"], 2)
            rng.shuffle(words)
            row = [" ".join(words), f"title {i}", lab]
            if with_group:
                row.append(["north", "south", "east"][rng.randrange(3)])
            w.writerow(row)
    return path


@pytest.fixture
def synthetic_csv(tmp_path: Path) -> Path:
    """A 240-row synthetic CSV (columns review, title, label, shop)."""
    return write_synthetic_csv(tmp_path / "reviews.csv")


@pytest.fixture
def tiny_config(tmp_path: Path, tiny_model_dir: Path, synthetic_csv: Path):
    """Factory of tiny RunConfigs on the synthetic CSV and the tiny model, with overrides."""

    def make(*overrides: str) -> RunConfig:
        base = [*tiny_overrides(synthetic_csv, tiny_model_dir), f"output_dir={tmp_path / 'results'}"]
        return load_config(ROOT / "configs" / "tiny.yaml", [*base, *overrides])

    return make


def require_shared_data() -> None:
    """Skip when ../shared/data is absent (it is present on every machine of this project and in CI)."""
    if not CLOTHING_CSV.is_file() or not INTENTS_CSV.is_file():
        pytest.skip(f"real data not found under {SHARED_DATA}")
