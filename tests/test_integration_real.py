"""End to end on the real packaged MiniLM in int8 and a slice of the real retail-intents data."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import INTENTS_CSV, ROOT, require_shared_data

from lorafed.config import load_config
from lorafed.engine.inprocess import simulate


@pytest.mark.slow
def test_two_rounds_two_clients_int8_improve_macro_f1(tmp_path: Path) -> None:
    require_shared_data()
    cfg = load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            f"data.path={INTENTS_CSV}",
            "data.text_column=utterance",
            "data.label_column=category",
            "data.max_rows=700",
            "model.name_or_path=packaged:all-MiniLM-L6-v2",
            "model.precision=int8",
            "model.lora.r=8",
            "model.lora.alpha=16",
            "train.batch_size=16",
            "train.max_steps=12",
            "train.learning_rate=3e-3",
            "federation.rounds=2",
            "partition.num_clients=2",
            f"output_dir={tmp_path}",
        ],
    )
    summary = simulate(cfg, tmp_path / "run", progress=False)
    assert summary["precision"] == "int8"
    assert summary["final"]["macro_f1"] > summary["round0"]["macro_f1"] + 0.05, summary
