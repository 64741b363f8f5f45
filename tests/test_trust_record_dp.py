"""The trust check (weight above the typical earned by agreement) on updates that declare record-DP noise.

Oracles: numpy (random unit vectors for the chance spread of a cosine, ``np.average`` over the
updates with the weights worked out by hand, cosines built by hand).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorafed.server.claims import CHANCE_SIGMAS, chance_band, declares_noise
from lorafed.server.fold import Incoming, fold_updates
from lorafed.server.validate import UpdateSpec
from lorafed.wire.adapter import adapter_spec
from lorafed.wire.payload import ModelIdentity, payload_to_bytes

DIM = 2500  # chance band 3 / 50 = 0.06
REF = {"w": torch.zeros(DIM)}
IDENT = ModelIdentity("fp", {"r": 8}, ("a", "b"))
CLAIMS = [1000, 1200, 1400, 1600]  # the heavy client's others: median 1300
DP = {"epsilon": 7.9, "delta": 1e-5, "noise_multiplier": 0.6, "sample_rate": 0.01, "dp_steps": 36}


def spec() -> UpdateSpec:
    return UpdateSpec("fp", {"r": 8}, ("a", "b"), adapter_spec(REF), round=1)


def update(cid: str, vec: np.ndarray, n: int, metrics: dict[str, float] | None) -> Incoming:
    tensors = {"w": torch.from_numpy(np.asarray(vec, dtype=np.float32))}
    return Incoming(f"{cid}.safetensors", payload_to_bytes(tensors, IDENT.meta(cid, 1, n, metrics=metrics)))


def noisy_round() -> list[np.ndarray]:
    """Four DP-like deltas: a small shared direction under much larger independent noise."""
    rng = np.random.default_rng(0)
    signal = rng.normal(size=DIM)
    return [0.2 * signal + rng.normal(size=DIM) for _ in CLAIMS]


def with_cosine(others: list[np.ndarray], cos: float) -> np.ndarray:
    """A delta with cosine ``cos`` to the others' mean, each counted at most as the typical 1300 (by hand)."""
    mean = np.average(others, axis=0, weights=[1000, 1200, 1300, 1300])
    u = mean / np.linalg.norm(mean)
    o = np.random.default_rng(1).normal(size=DIM)
    o -= (o @ u) * u
    o /= np.linalg.norm(o)
    return np.linalg.norm(others[0]) * (cos * u + np.sqrt(1 - cos**2) * o)


def test_chance_band_is_three_sigmas_of_the_cosine_of_unrelated_vectors() -> None:
    assert chance_band(DIM) == pytest.approx(CHANCE_SIGMAS / np.sqrt(DIM)) and CHANCE_SIGMAS == 3.0
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(2, 4000, DIM))
    cos = np.einsum("ij,ij->i", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert np.std(cos) == pytest.approx(1 / np.sqrt(DIM), rel=0.05)
    assert np.mean(cos < 0) == pytest.approx(0.5, abs=0.03)  # the check without the band: a coin flip
    assert np.mean(cos < -chance_band(DIM)) < 0.005  # with it: ~0.13 %


@pytest.mark.parametrize(
    ("metrics", "want"),
    [
        (DP, True),
        ({"noise_multiplier": 0.0}, False),
        ({}, False),
        ({"noise_multiplier": True}, False),
        ({"noise_multiplier": "1"}, False),
        ({"noise_multiplier": float("nan")}, False),
    ],
)
def test_declares_noise(metrics: dict[str, object], want: bool) -> None:
    assert declares_noise(metrics) is want


def test_a_heavy_noisy_update_within_chance_keeps_its_weight() -> None:
    """Cosine -0.5 x band with the others: lowered if it declares no noise, kept at its claim if it does."""
    vecs = noisy_round()
    heavy = with_cosine(vecs, -0.5 * chance_band(DIM))
    for metrics, weight in ((DP, 7000), (None, 1300)):
        ups = [update(f"c{i}", v, n, DP) for i, (v, n) in enumerate(zip(vecs, CLAIMS, strict=True))]
        ups.append(update("tops", heavy, 7000, metrics))
        out = fold_updates(ups, spec(), reference=REF, trust_weight_above=2.0)
        want = np.average([*vecs, heavy], axis=0, weights=[*CLAIMS, weight])
        np.testing.assert_allclose(out.state["w"].numpy(), want, rtol=1e-4, atol=1e-6)
        assert ("tops" in out.lowered) == (weight == 1300)
        if weight == 1300:
            assert out.lowered["tops"].cosine == pytest.approx(-0.03, abs=1e-5)


@pytest.mark.parametrize("cos", [-1.5 * chance_band(DIM), -0.9])
def test_a_heavy_noisy_update_against_the_others_beyond_chance_is_lowered(cos: float) -> None:
    vecs = noisy_round()
    heavy = with_cosine(vecs, cos)
    ups = [update(f"c{i}", v, n, DP) for i, (v, n) in enumerate(zip(vecs, CLAIMS, strict=True))]
    ups.append(update("tops", heavy, 7000, DP))
    out = fold_updates(ups, spec(), reference=REF, trust_weight_above=2.0)
    assert out.lowered["tops"].cosine == pytest.approx(cos, abs=1e-5) and out.lowered["tops"].weight == 1300
    want = np.average([*vecs, heavy], axis=0, weights=[*CLAIMS, 1300])
    np.testing.assert_allclose(out.state["w"].numpy(), want, rtol=1e-4, atol=1e-6)
