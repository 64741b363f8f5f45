"""The in-process simulation end to end on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from lorafed.engine.inprocess import simulate
from lorafed.server.step import sample_clients
from lorafed.wire.reader import load_payload


def test_simulation_writes_rounds_and_aggregates_the_client_payloads(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config("federation.rounds=2", "partition.num_clients=3", "train.max_steps=4", "train.learning_rate=1e-2")
    out = tmp_path / "run"
    summary = simulate(cfg, out, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert len(r["clients"]) == 3 and r["bytes_up"] > 0 and r["bytes_down"] > 0
        for key in ("test_loss", "accuracy", "macro_f1", "train_loss"):
            assert isinstance(r[key], float)
    assert (out / "config.yaml").is_file() and (out / "metrics.png").is_file()
    assert summary["final"]["macro_f1"] == rows[-1]["macro_f1"]
    # The global adapter of round 2 is the sample-weighted mean of the round-2 client payloads.
    updates = [load_payload(p) for p in sorted((out / "rounds" / "r2").glob("*.safetensors"))]
    weights = [u.meta.num_examples for u in updates]
    glob = load_payload(out / "rounds" / "global_r2.safetensors")
    assert glob.meta.kind == "global" and glob.meta.num_examples == sum(u.meta.num_examples for u in updates)
    assert rows[2]["bytes_up"] == sum(p.stat().st_size for p in (out / "rounds" / "r2").glob("*.safetensors"))
    for k, v in glob.tensors.items():  # oracle: numpy's weighted average of the client tensors
        oracle = np.average(np.stack([u.tensors[k].numpy() for u in updates]), axis=0, weights=weights)
        np.testing.assert_allclose(v.numpy(), oracle, rtol=1e-6, atol=1e-7)


def test_same_seed_same_final_adapter(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config("federation.rounds=1", "train.max_steps=3")
    simulate(cfg, tmp_path / "a", progress=False)
    simulate(cfg, tmp_path / "b", progress=False)
    a = load_payload(tmp_path / "a" / "rounds" / "global_r1.safetensors").tensors
    b = load_payload(tmp_path / "b" / "rounds" / "global_r1.safetensors").tensors
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_client_sampling_by_fraction_is_seeded() -> None:
    picks = sample_clients(10, 0.3, 2, seed=0, round_=1)
    assert len(picks) == 3 and picks == sorted(set(picks))
    assert picks == sample_clients(10, 0.3, 2, seed=0, round_=1)
    assert len(sample_clients(10, 0.05, 2, seed=0, round_=1)) == 2  # at least min_clients
    assert sample_clients(4, 1.0, 1, seed=0, round_=3) == [0, 1, 2, 3]


def test_stop_ends_the_run_after_the_round_it_answers_true(tiny_config, tmp_path: Path) -> None:
    seen: list[int] = []

    def stop(r: int, state, scores) -> bool:
        seen.append(r)
        return r == 2

    simulate(tiny_config("federation.rounds=5"), tmp_path / "run", progress=False, stop=stop)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert seen == [1, 2] and [r["round"] for r in rows] == [0, 1, 2]
