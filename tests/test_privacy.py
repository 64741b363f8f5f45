"""Client-level DP: clipping math, noise scale, the RDP accountant against independent oracles."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lorafed.engine.inprocess import simulate
from lorafed.errors import AggregationError, ConfigError
from lorafed.server.privacy import (
    DPSum,
    calibrate_noise,
    clip_delta,
    compute_epsilon,
    epsilon_from_rdp,
    poisson_sample,
    rdp_sampled_gaussian,
)
from lorafed.wire.reader import load_payload


def _state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(4, 3, generator=g) * scale, "b": torch.randn(5, generator=g) * scale}


def _np_flat(d: dict[str, torch.Tensor]) -> np.ndarray:
    return np.concatenate([d[k].numpy().ravel() for k in sorted(d)]).astype(np.float64)


@pytest.mark.parametrize("scale", [0.01, 10.0])
def test_clip_delta_matches_numpy(scale: float) -> None:
    ref, upd = _state(0), _state(1)
    upd = {k: ref[k] + (upd[k] - ref[k]) * scale for k in ref}
    clipped, norm = clip_delta(upd, ref, clip_norm=1.5)
    delta = _np_flat(upd) - _np_flat(ref)
    assert norm == pytest.approx(np.linalg.norm(delta), rel=1e-6)
    expected = delta * min(1.0, 1.5 / np.linalg.norm(delta))
    np.testing.assert_allclose(_np_flat(clipped), expected, rtol=1e-5, atol=1e-7)
    assert np.linalg.norm(_np_flat(clipped)) == pytest.approx(min(norm, 1.5), rel=1e-5)


def test_dpsum_without_noise_is_reference_plus_sum_of_clipped_deltas_over_expected() -> None:
    ref = _state(0)
    ups = [{k: ref[k] + s * (v - ref[k]) for k, v in _state(i).items()} for i, s in ((1, 0.1), (2, 5.0), (3, 1.0))]
    acc = DPSum(ref, clip_norm=1.0, noise_multiplier=0.0, expected_clients=4.0)
    for u in ups:
        acc.add(u)
    out = acc.result()
    deltas = []
    for u in ups:
        d = _np_flat(u) - _np_flat(ref)
        deltas.append(d * min(1.0, 1.0 / np.linalg.norm(d)))
    np.testing.assert_allclose(_np_flat(out), _np_flat(ref) + np.sum(deltas, axis=0) / 4.0, rtol=1e-5, atol=1e-6)
    assert acc.stats()["clipped_fraction"] == pytest.approx(
        np.mean([np.linalg.norm(_np_flat(u) - _np_flat(ref)) > 1 for u in ups])
    )


def test_dpsum_noise_std_is_z_times_c_over_expected() -> None:
    ref = {"w": torch.zeros(200_000)}
    acc = DPSum(
        ref, clip_norm=0.5, noise_multiplier=1.3, expected_clients=5.0, generator=torch.Generator().manual_seed(7)
    )
    acc.add({"w": torch.zeros(200_000)})  # zero delta: the output is pure noise / expected
    noise = acc.result()["w"].numpy() * 5.0
    assert noise.std() == pytest.approx(1.3 * 0.5, rel=0.01)
    assert abs(noise.mean()) < 4 * 0.65 / math.sqrt(200_000)


def test_dpsum_refuses_weights_and_foreign_tensors() -> None:
    acc = DPSum(_state(0), 1.0, 1.0, 2.0)
    with pytest.raises(AggregationError, match=r"\(uniform\), got weight 3.0"):
        acc.add(_state(1), 3.0)
    with pytest.raises(AggregationError, match="different tensors than the global adapter"):
        acc.add({"a": torch.zeros(4, 3)})
    with pytest.raises(AggregationError, match="clip_norm > 0"):
        DPSum(_state(0), 0.0, 1.0, 2.0)


def test_rdp_without_sampling_is_the_gaussian_closed_form() -> None:
    orders = [1.5, 2, 7.25, 32]
    np.testing.assert_allclose(rdp_sampled_gaussian(1.0, 0.8, orders), [a / (2 * 0.64) for a in orders])


@pytest.mark.parametrize(("q", "z", "alpha"), [(0.1, 1.0, 2), (0.3, 0.9, 5), (0.5, 2.0, 16), (0.05, 0.7, 8)])
def test_rdp_of_sampled_gaussian_matches_numerical_integration(q: float, z: float, alpha: int) -> None:
    # D_alpha(mu || mu0) with mu0 = N(0, z^2), mu = (1-q) N(0, z^2) + q N(1, z^2), integrated on a grid.
    x = np.linspace(-40 * z, 40 * z + 1, 400_001)
    log_mu0 = -(x**2) / (2 * z * z) - math.log(z * math.sqrt(2 * math.pi))
    log_ratio = np.logaddexp(math.log1p(-q), math.log(q) + (2 * x - 1) / (2 * z * z))
    integrand = np.exp(log_mu0 + alpha * log_ratio - (alpha * log_ratio).max())
    log_a = math.log(np.trapezoid(integrand, x)) + (alpha * log_ratio).max()
    expected = log_a / (alpha - 1)
    assert rdp_sampled_gaussian(q, z, [alpha])[0] == pytest.approx(expected, rel=1e-6)


def _exact_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Balle & Wang 2018 (Thm. 8): the exact epsilon of the Gaussian mechanism, sensitivity 1."""

    def phi(t: float) -> float:
        return 0.5 * math.erfc(-t / math.sqrt(2))

    def d(eps: float) -> float:
        return phi(1 / (2 * sigma) - eps * sigma) - math.exp(eps) * phi(-1 / (2 * sigma) - eps * sigma)

    lo, hi = 0.0, 500.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if d(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize(("z", "rounds", "delta"), [(1.0, 3, 1e-5), (3.0, 10, 1e-5), (0.7, 1, 1e-3)])
def test_accountant_is_sound_and_tight_against_the_exact_gaussian(z: float, rounds: int, delta: float) -> None:
    # q = 1: T rounds compose to one Gaussian mechanism with sigma = z / sqrt(T).
    exact = _exact_gaussian_epsilon(z / math.sqrt(rounds), delta)
    eps = compute_epsilon(1.0, z, rounds, delta)
    assert exact <= eps <= 1.25 * exact


def test_subsampling_amplifies_and_epsilon_grows_with_rounds() -> None:
    assert compute_epsilon(0.1, 1.0, 10, 1e-5) < compute_epsilon(1.0, 1.0, 10, 1e-5)
    assert compute_epsilon(0.1, 1.0, 10, 1e-5) < compute_epsilon(0.1, 1.0, 20, 1e-5)
    assert compute_epsilon(0.5, 1.0, 0, 1e-5) == 0.0


def test_epsilon_from_rdp_picks_the_best_order() -> None:
    orders = [2.0, 10.0]
    rdp = np.array([1.0, 1.0])
    eps, order = epsilon_from_rdp(rdp, orders, 1e-5)
    by_hand = [1 + math.log(a / a - 1 / a) - (math.log(1e-5) + math.log(a)) / (a - 1) for a in orders]
    assert eps == pytest.approx(min(by_hand)) and order == 10.0


@pytest.mark.parametrize(("target", "q", "rounds"), [(8.0, 1.0, 3), (3.0, 1.0, 3), (2.0, 0.2, 50)])
def test_calibrate_noise_reaches_the_target_with_the_smallest_noise(target: float, q: float, rounds: int) -> None:
    z = calibrate_noise(target, q, rounds, 1e-5)
    assert compute_epsilon(q, z, rounds, 1e-5) <= target < compute_epsilon(q, z / 1.002, rounds, 1e-5)


def test_accountant_input_errors() -> None:
    with pytest.raises(ConfigError, match=r"sampling rate q must be in \(0, 1\], got 1.5"):
        rdp_sampled_gaussian(1.5, 1.0, [2])
    with pytest.raises(ConfigError, match="noise_multiplier must be > 0"):
        compute_epsilon(1.0, 0.0, 3, 1e-5)
    with pytest.raises(ConfigError, match="unreachable"):
        calibrate_noise(1e-9, 1.0, 3, 1e-12)


def test_poisson_sample_rate() -> None:
    rng = np.random.default_rng(0)
    counts = [len(poisson_sample(100, 0.2, rng)) for _ in range(200)]
    assert np.mean(counts) == pytest.approx(20, abs=1.0)


def test_dp_config_errors(tiny_config) -> None:
    with pytest.raises(ConfigError, match=r"must be uniform with federation\.dp\.enabled"):
        tiny_config("federation.dp.enabled=true", "federation.dp.noise_multiplier=1.0")
    with pytest.raises(ConfigError, match="exactly one of noise_multiplier and target_epsilon"):
        tiny_config("federation.dp.enabled=true", "federation.weighting=uniform")
    with pytest.raises(ConfigError, match=r"federation\.dp\.clip_norm: must be > 0"):
        tiny_config(
            "federation.dp.enabled=true",
            "federation.weighting=uniform",
            "federation.dp.target_epsilon=3",
            "federation.dp.clip_norm=0",
        )


def test_simulation_with_dp_applies_clipped_uniform_mean_and_reports_epsilon(tiny_config, tmp_path) -> None:
    cfg = tiny_config(
        "partition.num_clients=3",
        "federation.rounds=2",
        "federation.weighting=uniform",
        "federation.dp.enabled=true",
        "federation.dp.noise_multiplier=1e-9",  # negligible noise: the oracle is the clipped mean
        "federation.dp.clip_norm=0.05",
        "federation.dp.noise_seed=3",
    )
    out = tmp_path / "dp"
    simulate(cfg, out, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    eps = [r["privacy"]["epsilon"] for r in rows[1:]]
    assert eps[0] < eps[1] and eps[1] == pytest.approx(compute_epsilon(1.0, 1e-9, 2, 1e-5))
    prev = load_payload(out / "rounds" / "global_r1.safetensors").tensors
    updates = [load_payload(p).tensors for p in sorted((out / "rounds" / "r2").glob("*.safetensors"))]
    clipped = [clip_delta(u, prev, 0.05)[0] for u in updates]
    glob = load_payload(out / "rounds" / "global_r2.safetensors").tensors
    for k in prev:
        torch.testing.assert_close(glob[k], prev[k] + sum(c[k] for c in clipped) / 3, rtol=0, atol=1e-6)


def test_dp_composes_with_ffa_and_leaves_the_frozen_tensors_alone(tiny_config, tmp_path) -> None:
    cfg = tiny_config(
        "partition.num_clients=3",
        "federation.rounds=1",
        "federation.aggregation=ffa",
        "federation.weighting=uniform",
        "federation.dp.enabled=true",
        "federation.dp.noise_multiplier=1e-9",
        "federation.dp.clip_norm=0.05",
        "federation.dp.noise_seed=3",
    )
    out = tmp_path / "dp_ffa"
    simulate(cfg, out, progress=False)
    prev = load_payload(out / "rounds" / "global_r0.safetensors").tensors
    updates = [load_payload(p).tensors for p in sorted((out / "rounds" / "r1").glob("*.safetensors"))]
    assert updates and all(not any("lora_A" in k for k in u) for u in updates)  # FFA sends B and the head only
    sent = {k: prev[k] for k in updates[0]}
    clipped = [clip_delta(u, sent, 0.05)[0] for u in updates]
    glob = load_payload(out / "rounds" / "global_r1.safetensors").tensors
    for k in prev:
        expected = prev[k] + sum(c[k] for c in clipped) / 3 if k in sent else prev[k]
        torch.testing.assert_close(glob[k], expected, rtol=0, atol=1e-6)


def test_dp_refuses_robust_rules_and_a_second_clip(tiny_config) -> None:
    dp = ("federation.dp.enabled=true", "federation.weighting=uniform", "federation.dp.target_epsilon=3")
    with pytest.raises(ConfigError, match=r"federation\.robust: must be none with federation\.dp\.enabled"):
        tiny_config(*dp, "federation.robust=median")
    with pytest.raises(ConfigError, match=r"federation\.clip_update_norm: must be null with federation\.dp"):
        tiny_config(*dp, "federation.clip_update_norm=1.0")
