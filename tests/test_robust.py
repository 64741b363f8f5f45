"""Robust aggregation: numpy/scipy oracles, the server path, and a poisoning experiment."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_synthetic_csv
from scipy.stats import trim_mean

from lorafed.engine.faults import scale_update
from lorafed.engine.inprocess import simulate
from lorafed.engine.record import read_metrics
from lorafed.errors import AggregationError
from lorafed.server.fold import aggregate_files
from lorafed.server.robust import clip_update, coordinate_median, delta_norm, trimmed_mean
from lorafed.server.validate import UpdateSpec
from lorafed.wire.adapter import adapter_spec
from lorafed.wire.payload import PayloadMeta, save_payload


def states(k: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)} for _ in range(k)]


@pytest.mark.parametrize("k", [1, 2, 4, 5, 7])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.2, 0.3, 0.49])
def test_trimmed_mean_matches_scipy(k: int, ratio: float) -> None:
    ups = states(k, seed=k)
    got = trimmed_mean(ups, ratio)
    for name in ups[0]:
        oracle = trim_mean(np.stack([u[name].numpy() for u in ups]), ratio, axis=0)
        np.testing.assert_allclose(got[name].numpy(), oracle, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 3, 6, 7])
def test_median_matches_numpy(k: int) -> None:
    ups = states(k, seed=10 + k)
    got = coordinate_median(ups)
    for name in ups[0]:
        np.testing.assert_allclose(got[name].numpy(), np.median(np.stack([u[name].numpy() for u in ups]), axis=0))


def test_clip_update_bounds_the_delta_norm() -> None:
    ref, up = states(2, seed=3)
    d = np.concatenate([(up[n] - ref[n]).numpy().ravel() for n in ref])
    norm = float(np.linalg.norm(d))
    assert delta_norm(up, ref) == pytest.approx(norm, rel=1e-6)
    clipped, got = clip_update(up, ref, norm / 4)
    assert got == pytest.approx(norm, rel=1e-6)
    assert delta_norm(clipped, ref) == pytest.approx(norm / 4, rel=1e-5)
    for n in ref:  # same direction, a quarter of the length
        np.testing.assert_allclose((clipped[n] - ref[n]).numpy(), (up[n] - ref[n]).numpy() / 4, rtol=1e-5, atol=1e-6)
    same, _ = clip_update(up, ref, norm * 2)
    assert all(torch.equal(same[n], up[n]) for n in up)


def test_robust_errors() -> None:
    ups = states(3)
    with pytest.raises(AggregationError, match=r"trim_ratio must be in \[0, 0.5\), got 0.5"):
        trimmed_mean(ups, 0.5)
    with pytest.raises(AggregationError, match="no updates to aggregate"):
        coordinate_median([])
    with pytest.raises(AggregationError, match=r"update 1 has different tensors than the first: \['b'\]"):
        coordinate_median([ups[0], {"a": ups[1]["a"]}])
    with pytest.raises(AggregationError, match=r"tensor a: the updates' shapes differ"):
        trimmed_mean([ups[0], {"a": torch.zeros(2), "b": ups[1]["b"]}], 0.1)
    with pytest.raises(AggregationError, match="clip_update_norm must be > 0, got 0"):
        clip_update(ups[0], ups[1], 0)
    with pytest.raises(AggregationError, match=r"not in the global adapter: \['b'\]"):
        clip_update(ups[0], {"a": ups[1]["a"]}, 1.0)


def _files(tmp_path: Path, ups: list[dict[str, torch.Tensor]], ns: list[int]) -> tuple[list[Path], UpdateSpec]:
    spec = UpdateSpec("fp", {"r": 1}, ("x", "y"), adapter_spec(ups[0]), round=1)
    paths = [
        save_payload(tmp_path / f"c{i}.safetensors", u, PayloadMeta("fp", {"r": 1}, ("x", "y"), n, 1, f"c{i}"))
        for i, (u, n) in enumerate(zip(ups, ns, strict=True))
    ]
    return paths, spec


def test_server_robust_paths_match_the_oracles(tmp_path: Path) -> None:
    ref, *ups = states(6, seed=7)
    ups[0] = {n: ref[n] + 100 * (v - ref[n]) for n, v in ups[0].items()}  # one boosted update
    paths, spec = _files(tmp_path, ups, [10, 20, 30, 40, 50])
    stack = {n: np.stack([u[n].numpy() for u in ups]) for n in ref}
    med = aggregate_files(paths, spec, robust="median")
    tm = aggregate_files(paths, spec, robust="trimmed_mean", trim_ratio=0.2)
    for n in ref:
        np.testing.assert_allclose(med.state[n].numpy(), np.median(stack[n], axis=0), rtol=1e-6)
        np.testing.assert_allclose(tm.state[n].numpy(), trim_mean(stack[n], 0.2, axis=0), rtol=1e-5, atol=1e-6)
    # Clipping then sample-weighted FedAvg, computed by hand.
    c = 1.0
    clipped = aggregate_files(paths, spec, reference=ref, clip_update_norm=c)
    norms = [np.sqrt(sum(float(((u[n] - ref[n]) ** 2).sum()) for n in ref)) for u in ups]
    assert clipped.norms == pytest.approx(dict(zip([f"c{i}" for i in range(5)], norms, strict=True)), rel=1e-5)
    assert clipped.clipped == [f"c{i}" for i, v in enumerate(norms) if v > c]
    for n in ref:
        deltas = [(u[n] - ref[n]).numpy() * min(1.0, c / v) for u, v in zip(ups, norms, strict=True)]
        oracle = ref[n].numpy() + np.average(np.stack(deltas), axis=0, weights=[10, 20, 30, 40, 50])
        np.testing.assert_allclose(clipped.state[n].numpy(), oracle, rtol=1e-5, atol=1e-6)
    with pytest.raises(AggregationError, match="clip_update_norm needs the reference"):
        aggregate_files(paths, spec, clip_update_norm=1.0)
    with pytest.raises(AggregationError, match=r"robust: expected one of .*, got 'trimmed'"):
        aggregate_files(paths, spec, robust="trimmed")  # type: ignore[arg-type]


# The poisoning experiment: 5 clients, client0 attacks every round. Settings chosen so that the
# clean tiny run converges (test accuracy 1.0 by round 6 on 120 test rows, ~8 s a run).
# The default norm bound (federation.max_update_ratio) is switched off here to show what each rule does alone.
POISON = (
    "partition.num_clients=5",
    "federation.min_clients=5",
    "federation.rounds=6",
    "federation.max_update_ratio=null",
)
POISON_TRAIN = ("train.max_steps=40", "train.learning_rate=0.01")


def test_poisoning_one_of_five_clients(tiny_config, tmp_path: Path) -> None:
    csv = write_synthetic_csv(tmp_path / "poison.csv", n=600)

    def run(name: str, *overrides: str, attack=None) -> float:
        cfg = tiny_config(f"data.path={csv}", *POISON, *POISON_TRAIN, *overrides)
        summary = simulate(cfg, tmp_path / name, progress=False, client_fn=attack)
        rows = read_metrics(tmp_path / name / "metrics.jsonl")
        assert [r["round"] for r in rows] == list(range(7))
        return 100 * summary["final"]["accuracy"]

    clean = run("clean")
    boosted = scale_update(["client0"], 100.0)
    assert run("x100_fedavg", attack=boosted) < clean - 10  # the attack is real
    assert abs(run("x100_median", "federation.robust=median", attack=boosted) - clean) <= 1.0
    # The default policy: a delta 10x the global's own norm is refused, the 4 honest clients are averaged.
    bounded = run("x100_default", "federation.max_update_ratio=10", "federation.min_clients=4", attack=boosted)
    assert abs(bounded - clean) <= 1.0
    rows = read_metrics(tmp_path / "x100_default" / "metrics.jsonl")[1:]
    assert all(len(r["clients"]) == 4 and "client0" not in r["clients"] for r in rows)
    assert all(any("max_update_norm" in reason for reason in r["rejected"]) for r in rows)
    # The sign flip and the other defences are measured by scripts/robustness.py (results/robustness.md).


def test_a_sign_flipped_update_is_refused_by_direction() -> None:
    """Hand-made deltas: 4 honest clients near d, one sends -d; the median is ~d, the flip scores ~-1."""
    from lorafed.server.fold import Incoming, fold_updates
    from lorafed.server.validate import UpdateSpec
    from lorafed.wire.adapter import adapter_spec
    from lorafed.wire.payload import ModelIdentity, payload_to_bytes

    rng = np.random.default_rng(0)
    ref = {"w": torch.zeros(50)}
    d = torch.from_numpy(rng.normal(size=50)).float()
    ident = ModelIdentity("fp", {"r": 8}, ("a", "b"))
    spec = UpdateSpec("fp", {"r": 8}, ("a", "b"), adapter_spec(ref), round=1)
    ups = []
    honest = []
    for i in range(4):
        t = {"w": d + 0.3 * torch.from_numpy(rng.normal(size=50)).float()}
        honest.append(t["w"].numpy())
        ups.append(Incoming(f"c{i}", payload_to_bytes(t, ident.meta(f"c{i}", 1, 10))))
    ups.append(Incoming("evil", payload_to_bytes({"w": -d}, ident.meta("evil", 1, 10))))
    out = fold_updates(ups, spec, reference=ref, min_cosine=-0.2)
    assert [m.client_id for _, m in out.accepted] == ["c0", "c1", "c2", "c3"]
    (reason,) = [r for _, r in out.rejected]
    assert "direction: expected a cosine with the round's median update >= -0.2" in reason
    np.testing.assert_allclose(out.state["w"].numpy(), np.mean(honest, axis=0), rtol=1e-5, atol=1e-6)
    # Off, the flip is averaged in.
    assert len(fold_updates(ups, spec, reference=ref).accepted) == 5


def test_an_inflated_weight_is_capped_at_ratio_times_the_others_median() -> None:
    """``over_ratio: cap``, claims 10, 20, 30, 10^6: the others' median is 20, so the inflated client weighs 200.

    (The default, ``refuse``, is tested in tests/test_claims.py.)
    """
    from lorafed.server.fold import Incoming, fold_updates
    from lorafed.server.validate import UpdateSpec
    from lorafed.wire.adapter import adapter_spec
    from lorafed.wire.payload import ModelIdentity, payload_to_bytes

    ref = {"w": torch.zeros(4)}
    ident = ModelIdentity("fp", {"r": 8}, ("a", "b"))
    spec = UpdateSpec("fp", {"r": 8}, ("a", "b"), adapter_spec(ref), round=1)
    values = [1.0, 2.0, 3.0, 4.0]
    claims = [10, 20, 30, 10**6]
    ups = [
        Incoming(f"c{i}", payload_to_bytes({"w": torch.full((4,), v)}, ident.meta(f"c{i}", 1, n)))
        for i, (v, n) in enumerate(zip(values, claims, strict=True))
    ]
    out = fold_updates(ups, spec, reference=ref, max_examples_ratio=10.0, over_ratio="cap")
    weights = [10, 20, 30, 200]
    want = np.average(values, weights=weights)
    np.testing.assert_allclose(out.state["w"].numpy(), np.full(4, want), rtol=1e-6)
    assert out.weight_clipped == {"c3": 200.0}
    assert abs(out.shares["c3"] - 200 / 260) < 1e-9
