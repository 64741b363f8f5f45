"""`compare`: federated, centralized and local-only models on the same test rows."""

from __future__ import annotations

import json
from pathlib import Path

from lorafed.engine.compare import compare, format_compare
from lorafed.engine.record import read_metrics


def test_compare_scores_every_method_on_the_same_rows(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config("partition.num_clients=3", "federation.rounds=2", "train.max_steps=3")
    result = compare(cfg, tmp_path / "cmp", progress=False)
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert saved["federated"]["macro_f1"] == result["federated"]["macro_f1"]
    assert set(result["local"]) == {"client0", "client1", "client2"}
    # Checkpoint 0 is the same untrained adapter for the federation and the pooled model, on the same rows.
    assert result["federated"]["curve"][0]["val_macro_f1"] == result["centralized"]["curve"][0]["val_macro_f1"]
    # The pooled model gets the samples of a federated round per checkpoint: 3 clients x 3 steps.
    assert result["centralized_steps_per_checkpoint"] == 9
    # The federated curve is the run's own record, round by round.
    rows = read_metrics(tmp_path / "cmp" / "federated" / "metrics.jsonl")
    assert [c["macro_f1"] for c in result["federated"]["curve"]] == [r["macro_f1"] for r in rows]
    # Early stopping: the reported test score is the one at the best validation checkpoint.
    for m in (result["federated"], result["centralized"], *result["local"].values()):
        best = max(m["curve"], key=lambda c: (c["val_macro_f1"], -c["checkpoint"]))
        assert m["macro_f1"] == best["macro_f1"] and m["best_checkpoint"] == best["checkpoint"]
    mean = sum(v["macro_f1"] for v in result["local"].values()) / 3
    assert abs(result["local_mean"]["macro_f1"] - mean) < 1e-12
    assert "centralized (pooled rows)" in format_compare(result)
