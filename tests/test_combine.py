"""Adapter merging: oracle tests of the three merge modes, on state dicts and through the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lorafed.cli import main
from lorafed.serve.combine import combine_payloads
from lorafed.wire.factors import LoraFactors, MergeError, delta_weights, lora_modules, merge_adapters
from lorafed.wire.payload import Payload, save_payload
from lorafed.wire.reader import load_payload
from tests.helpers_adapter import random_adapter

PREFIX = "base_model.model.layer.q"
A, B, HEAD = f"{PREFIX}.lora_A.weight", f"{PREFIX}.lora_B.weight", "base_model.model.classifier.weight"


def _adapter(seed: int, r: int, alpha: float, d_in: int = 7, d_out: int = 5) -> LoraFactors:
    g = torch.Generator().manual_seed(seed)
    t = {
        A: torch.randn(r, d_in, generator=g),
        B: torch.randn(d_out, r, generator=g),
        HEAD: torch.randn(3, d_out, generator=g),
    }
    return LoraFactors(t, r, alpha)


def _oracle_delta(adapters: list[LoraFactors], weights: list[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    return sum(
        wi * (a.alpha / a.r) * a.tensors[B].double().numpy() @ a.tensors[A].double().numpy()
        for wi, a in zip(w, adapters, strict=True)
    )


def test_fedavg_mode_averages_a_and_b_separately() -> None:
    ads, ws = [_adapter(1, 4, 8), _adapter(2, 4, 8), _adapter(3, 4, 8)], [1.0, 2.0, 5.0]
    res = merge_adapters(ads, ws, "fedavg")
    for key in (A, B, HEAD):
        expected = np.average([a.tensors[key].numpy() for a in ads], axis=0, weights=ws)
        assert np.allclose(res.tensors[key].numpy(), expected, atol=1e-6)
    assert (res.r, res.alpha) == (4, 8)
    # And it is not the exact mean of the deltas (the reason the other modes exist).
    merged = 2.0 * (res.tensors[B].double() @ res.tensors[A].double()).numpy()
    assert np.abs(merged - _oracle_delta(ads, ws)).max() > 1e-2


def test_cat_mode_is_the_exact_weighted_sum_of_deltas_with_mixed_ranks_and_scalings() -> None:
    ads, ws = [_adapter(1, 4, 8), _adapter(2, 2, 16), _adapter(3, 3, 3)], [0.2, 0.5, 0.3]
    res = merge_adapters(ads, ws, "cat")
    assert res.r == 9 and res.alpha == 9.0  # scaling alpha / r = 1: the scalings are folded into B
    assert res.tensors[A].shape == (9, 7) and res.tensors[B].shape == (5, 9)
    got = delta_weights(LoraFactors(res.tensors, res.r, res.alpha))[PREFIX].numpy()
    assert np.abs(got - _oracle_delta(ads, ws)).max() <= 1e-5
    expected_head = np.average([a.tensors[HEAD].numpy() for a in ads], axis=0, weights=ws)
    assert np.allclose(res.tensors[HEAD].numpy(), expected_head, atol=1e-6)


def test_svd_mode_is_exact_at_full_rank_and_reports_the_truncation_error() -> None:
    ads, ws = [_adapter(1, 2, 4), _adapter(2, 2, 2)], [3.0, 1.0]
    oracle = _oracle_delta(ads, ws)
    full = merge_adapters(ads, ws, "svd", rank=4)
    got = delta_weights(LoraFactors(full.tensors, full.r, full.alpha))[PREFIX].numpy()
    assert np.abs(got - oracle).max() <= 1e-5
    assert full.truncation[PREFIX] <= 1e-6
    cut = merge_adapters(ads, ws, "svd", rank=1)
    s = np.linalg.svd(oracle, compute_uv=False)
    assert cut.truncation[PREFIX] == pytest.approx(np.linalg.norm(s[1:]) / np.linalg.norm(s), rel=1e-6)
    approx = delta_weights(LoraFactors(cut.tensors, cut.r, cut.alpha))[PREFIX].numpy()
    assert np.linalg.norm(oracle - approx) / np.linalg.norm(oracle) == pytest.approx(cut.truncation[PREFIX], rel=1e-4)


def test_merge_errors() -> None:
    with pytest.raises(MergeError, match="fedavg needs one LoRA scaling"):
        merge_adapters([_adapter(1, 4, 8), _adapter(2, 4, 4)], [1, 1], "fedavg")
    with pytest.raises(MergeError, match=r"tensor .*lora_A.weight has shape \(2, 7\), adapter 0 has \(4, 7\)"):
        merge_adapters([_adapter(1, 4, 8), _adapter(2, 2, 4)], [1, 1], "fedavg")
    with pytest.raises(MergeError, match="must be finite and >= 0"):
        merge_adapters([_adapter(1, 4, 8)], [-1.0], "cat")
    with pytest.raises(MergeError, match="sum to a positive number"):
        merge_adapters([_adapter(1, 4, 8)], [0.0], "cat")
    with pytest.raises(MergeError, match="2 adapters but 1 weights"):
        merge_adapters([_adapter(1, 4, 8), _adapter(2, 4, 8)], [1.0], "cat")
    with pytest.raises(MergeError, match=r"svd rank must be in \[1, 5\]"):
        merge_adapters([_adapter(1, 4, 8)], [1.0], "svd", rank=6)
    with pytest.raises(MergeError, match="no adapters"):
        merge_adapters([], [], "cat")
    odd = _adapter(2, 4, 8)
    with pytest.raises(MergeError, match="tensors differ from adapter 0"):
        merge_adapters([_adapter(1, 4, 8), LoraFactors({A: odd.tensors[A], B: odd.tensors[B]}, 4, 8)], [1, 1], "cat")
    with pytest.raises(MergeError, match="has no matching"):
        lora_modules({A: torch.zeros(1, 1)})


def test_merge_cli_on_real_adapters_and_header(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    p1, p2 = random_adapter(tiny_model_dir, 1, num_examples=30), random_adapter(tiny_model_dir, 2, num_examples=10)
    f1 = save_payload(tmp_path / "a.safetensors", p1.tensors, p1.meta)
    f2 = save_payload(tmp_path / "b.safetensors", p2.tensors, p2.meta)
    out = tmp_path / "cat.safetensors"
    assert main(["combine", str(f1), str(f2), "--mode", "cat", "--out", str(out)]) == 0
    merged = load_payload(out)
    assert merged.meta.lora["r"] == 8 and merged.meta.lora["alpha"] == 8 and merged.meta.kind == "merged"
    assert merged.meta.metrics["weights"] == [0.75, 0.25]  # num_examples 30 : 10
    ads = [LoraFactors(p.tensors, 4, 8) for p in (p1, p2)]
    for prefix in lora_modules(p1.tensors):
        exact = 0.75 * delta_weights(ads[0])[prefix] + 0.25 * delta_weights(ads[1])[prefix]
        got = delta_weights(LoraFactors(merged.tensors, 8, 8))[prefix]
        assert float((got - exact).abs().max()) <= 1e-5
    assert (
        main(["combine", str(f1), str(f2), "--mode", "svd", "--rank", "2", "--weights", "1,1", "--out", str(out)]) == 0
    )
    assert "relative Frobenius error max" in capsys.readouterr().out
    assert load_payload(out).meta.lora["r"] == 2
    assert main(["combine", str(f1), "--mode", "fedavg", "--rank", "2", "--out", str(out)]) == 2
    assert "--rank applies to --mode svd" in capsys.readouterr().err
    assert main(["combine", str(f1), str(f2), "--mode", "cat", "--weights", "1,x", "--out", str(out)]) == 2
    assert "expected comma-separated numbers" in capsys.readouterr().err
    from dataclasses import replace

    other = Payload(p2.tensors, replace(p2.meta, labels=("x", "y", "z")))
    with pytest.raises(MergeError, match="labels"):
        combine_payloads([p1, other], ["a", "b"], "cat")
