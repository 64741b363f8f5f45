"""The default policy against weight inflation: implausible claims refused, claims pinned across rounds.

Oracles: numpy's ``np.average`` over the honest updates with the weights worked out by hand.
Covers :mod:`lorafed.server.claims`, the server step (:func:`fold_updates`,
:class:`RoundPolicy`), the in-process engine with resume, ``lorafed aggregate`` and the file
drop's header hand-over.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lorafed.config import FederationConfig, load_config
from lorafed.errors import AggregationError, ConfigError, LorafedError
from lorafed.server.claims import Lowered, above_typical, check_claims, load_claims, save_claims, unearned_weights
from lorafed.server.fold import Incoming, fold_updates
from lorafed.server.step import RoundPolicy
from lorafed.server.validate import UpdateSpec
from lorafed.wire.adapter import adapter_spec
from lorafed.wire.payload import ModelIdentity, payload_to_bytes
from lorafed.wire.reader import header_from_bytes, load_payload

IDENT = ModelIdentity("fp", {"r": 8}, ("a", "b"))
REF = {"w": torch.zeros(4)}


def spec(round_: int = 1) -> UpdateSpec:
    return UpdateSpec("fp", {"r": 8}, ("a", "b"), adapter_spec(REF), round=round_)


def update(cid: str, value: float, n: int, round_: int = 1) -> Incoming:
    return Incoming(f"{cid}.safetensors", payload_to_bytes({"w": torch.full((4,), value)}, IDENT.meta(cid, round_, n)))


def average(values: list[float], weights: list[float]) -> np.ndarray:
    return np.full(4, np.average(values, weights=weights))


def test_an_implausible_claim_is_refused_and_the_honest_are_averaged() -> None:
    """Claims 10, 20, 30, 10^6: the others' median of the last is 20, so its bound is 10 x 20 = 200."""
    ups = [update("c0", 1.0, 10), update("c1", 2.0, 20), update("c2", 3.0, 30), update("evil", 9.0, 10**6)]
    out = fold_updates(ups, spec(), max_examples_ratio=10.0)
    assert [m.client_id for _, m in out.accepted] == ["c0", "c1", "c2"]
    (source, reason), *more = out.rejected
    assert not more and source == "evil.safetensors"
    assert reason.startswith("update from client 'evil' (evil.safetensors) rejected: num_examples: expected at most")
    assert "max_examples_ratio 10 x 20, the median claim of the 3 other clients), received 1e+06" in reason
    assert "over_ratio: refuse" in reason
    np.testing.assert_allclose(out.state["w"].numpy(), average([1, 2, 3], [10, 20, 30]), rtol=1e-6)
    assert out.shares == pytest.approx({"c0": 10 / 60, "c1": 20 / 60, "c2": 30 / 60})
    assert out.claims == {"c0": 10.0, "c1": 20.0, "c2": 30.0}
    assert out.bytes_in == sum(len(u.data or b"") for u in ups[:3])


@pytest.mark.parametrize("claim, refused", [(200, False), (199, False), (201, True)])
def test_a_claim_up_to_the_bound_keeps_its_full_weight(claim: int, refused: bool) -> None:
    ups = [update("c0", 1.0, 10), update("c1", 2.0, 20), update("c2", 3.0, 30), update("big", 4.0, claim)]
    out = fold_updates(ups, spec(), max_examples_ratio=10.0)
    assert bool(out.rejected) == refused
    if refused:
        np.testing.assert_allclose(out.state["w"].numpy(), average([1, 2, 3], [10, 20, 30]), rtol=1e-6)
    else:
        assert not out.weight_clipped
        want = average([1, 2, 3, 4], [10, 20, 30, claim])
        np.testing.assert_allclose(out.state["w"].numpy(), want, rtol=1e-6)
        assert out.shares["big"] == pytest.approx(claim / (60 + claim))


def test_cap_averages_an_implausible_claim_at_the_bound() -> None:
    ups = [update("c0", 1.0, 10), update("c1", 2.0, 20), update("c2", 3.0, 30), update("big", 4.0, 10**6)]
    out = fold_updates(ups, spec(), max_examples_ratio=10.0, over_ratio="cap")
    assert not out.rejected and out.weight_clipped == {"big": 200.0}
    np.testing.assert_allclose(out.state["w"].numpy(), average([1, 2, 3, 4], [10, 20, 30, 200]), rtol=1e-6)
    assert out.shares["big"] == pytest.approx(200 / 260)


def test_the_claimant_is_left_out_of_its_own_median() -> None:
    """Two inflated of four: each is compared with the median of the three others (20), so both go.

    A median over all four (510) would have let 1000 through at full weight.
    """
    ups = [update("c0", 1.0, 10), update("c1", 2.0, 20), update("x", 7.0, 1000), update("y", 9.0, 10**6)]
    out = fold_updates(ups, spec(), max_examples_ratio=10.0)
    assert sorted(s for s, _ in out.rejected) == ["x.safetensors", "y.safetensors"]
    np.testing.assert_allclose(out.state["w"].numpy(), average([1, 2], [10, 20]), rtol=1e-6)


# The clothing departments' rows (lorafed partition --config configs/clothing_recommend.yaml).
CLOTHING = {"Tops": 10048, "Dresses": 6145, "Bottoms": 3662, "Intimate": 1653, "Jackets": 1002, "Trend": 118}


@pytest.mark.parametrize(
    "claims",
    [
        CLOTHING,  # Tops / median of the other five = 6.1
        {"dept0": 400, "dept1": 150, "dept2": 150, "dept3": 150, "dept4": 150},  # one department holds 40%
    ],
)
def test_honest_skewed_federations_keep_every_full_weight(claims: dict[str, int]) -> None:
    ups = [update(cid, float(i), n) for i, (cid, n) in enumerate(claims.items())]
    out = fold_updates(ups, spec(), max_examples_ratio=10.0)
    assert not out.rejected and not out.weight_clipped
    want = average([float(i) for i in range(len(claims))], list(claims.values()))
    np.testing.assert_allclose(out.state["w"].numpy(), want, rtol=1e-6)


def test_clients_seen_earlier_count_among_the_others() -> None:
    """A sampled round of Tops, Intimate and Trend: alone, Trend and Intimate make Tops look implausible
    (10 x 885.5 < 10048); with the other departments' pinned claims the median of Tops' others is 1653."""
    round_ = {k: CLOTHING[k] for k in ("Tops", "Intimate", "Trend")}
    ups = [update(cid, float(i), n) for i, (cid, n) in enumerate(round_.items())]
    alone = fold_updates(ups, spec(), max_examples_ratio=10.0)
    assert [s for s, _ in alone.rejected] == ["Tops.safetensors"]
    known = {k: float(v) for k, v in CLOTHING.items()}
    out = fold_updates(ups, spec(), max_examples_ratio=10.0, known_claims=known)
    assert not out.rejected
    np.testing.assert_allclose(out.state["w"].numpy(), average([0, 1, 2], list(round_.values())), rtol=1e-6)


def test_a_claim_grown_past_its_pin_is_capped() -> None:
    """c0 was first accepted with 10; claiming 50 now it weighs 2 x 10 = 20."""
    ups = [update("c0", 1.0, 50, 2), update("c1", 2.0, 20, 2), update("c2", 3.0, 30, 2)]
    known = {"c0": 10.0, "c1": 20.0, "c2": 30.0}
    out = fold_updates(ups, spec(2), max_examples_ratio=10.0, max_examples_growth=2.0, known_claims=known)
    assert not out.rejected and out.weight_clipped == {"c0": 20.0}
    np.testing.assert_allclose(out.state["w"].numpy(), average([1, 2, 3], [20, 20, 30]), rtol=1e-6)
    assert out.claims["c0"] == 20.0


def test_check_claims_by_hand() -> None:
    check = check_claims({"a": 100.0, "b": 20.0, "c": 30.0}, {"a": 10.0, "d": 40.0}, 3.0, 2.0, "refuse")
    # a: pinned to 2 x 10 = 20; others 20, 30 and the absent d's 40: median 30, bound 90.
    assert check.pinned == ["a"] and not check.refused
    assert check.weights == {"a": 20.0, "b": 20.0, "c": 30.0}
    check = check_claims({"a": 1000.0, "b": 20.0, "c": 30.0}, {}, 3.0, None, "refuse")
    assert list(check.refused) == ["a"] and check.weights == {"b": 20.0, "c": 30.0}
    # Two claims: nobody has two others to be compared with.
    assert check_claims({"a": 1000.0, "b": 1.0}, {}, 3.0, None).weights == {"a": 1000.0, "b": 1.0}


def test_uniform_weighting_ignores_the_claims() -> None:
    ups = [update("c0", 1.0, 10), update("c1", 2.0, 20), update("big", 4.0, 10**6)]
    out = fold_updates(ups, spec(), weighting="uniform", max_examples_ratio=10.0)
    assert not out.rejected
    np.testing.assert_allclose(out.state["w"].numpy(), average([1, 2, 4], [1, 1, 1]), rtol=1e-6)


def test_an_unknown_over_ratio_is_refused() -> None:
    with pytest.raises(AggregationError, match=r"over_ratio: expected one of \('refuse', 'cap'\), got 'drop'"):
        fold_updates([], spec(), over_ratio="drop")  # type: ignore[arg-type]


def test_config_checks(tmp_path: Path) -> None:
    assert (FederationConfig().over_ratio, FederationConfig().max_examples_growth) == ("refuse", 2.0)
    with pytest.raises(ConfigError) as err:
        load_config(None, ["federation.over_ratio=drop", "federation.max_examples_growth=0.5"])
    assert "federation.over_ratio: 'drop' is not one of 'refuse', 'cap'" in str(err.value)
    assert "federation.max_examples_growth: must be >= 1 or null, got 0.5" in str(err.value)


def test_the_policy_pins_claims_only_in_rounds_that_publish() -> None:
    policy = RoundPolicy(FederationConfig(min_clients=3), num_clients=3, seed=0)
    short = policy.try_aggregate([update("c0", 1.0, 10), update("c1", 2.0, 20)], spec(1), REF, 1)
    assert short.state is None and policy.claims == {}
    ups = [update("c0", 1.0, 10), update("c1", 2.0, 20), update("c2", 3.0, 30)]
    assert policy.try_aggregate(ups, spec(1), REF, 1).state is not None
    assert policy.claims == {"c0": 10.0, "c1": 20.0, "c2": 30.0}
    # Round 2: c0 claims 35 (under 10 x 25, the others' median) but more than 2 x its pinned 10.
    ups = [update("c0", 1.0, 35, 2), update("c1", 2.0, 20, 2), update("c2", 3.0, 30, 2)]
    result = policy.try_aggregate(ups, spec(2), REF, 2)
    assert result.outcome.weight_clipped == {"c0": 20.0}
    np.testing.assert_allclose(result.state["w"].numpy(), average([1, 2, 3], [20, 20, 30]), rtol=1e-6)
    assert policy.claims["c0"] == 10.0  # the pin never moves


def test_claims_files(tmp_path: Path) -> None:
    assert load_claims(tmp_path / "none.json") == {}
    save_claims(tmp_path / "c.json", {"b": 2, "a": 1.5})
    assert load_claims(tmp_path / "c.json") == {"a": 1.5, "b": 2.0}
    for bad, match in [("[1]", "expected a JSON object"), ('{"a": -1}', "client 'a': expected a number > 0")]:
        (tmp_path / "bad.json").write_text(bad)
        with pytest.raises(LorafedError, match=match):
            load_claims(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(LorafedError, match="unreadable claims file"):
        load_claims(tmp_path / "bad.json")


def test_a_header_handed_over_is_used_only_for_its_own_bytes() -> None:
    """The file drop hands the header it parsed to the server step; one of other bytes is parsed again."""
    a, b = update("a", 1.0, 10), update("b", 2.0, 20)
    assert a.data is not None and b.data is not None
    head_a = header_from_bytes(a.data)
    same = fold_updates([Incoming("a", a.data, header=head_a)], spec())
    assert [m.client_id for _, m in same.accepted] == ["a"]
    other = fold_updates([Incoming("b", b.data, header=head_a)], spec())
    assert [m.client_id for _, m in other.accepted] == ["b"]
    np.testing.assert_allclose(other.state["w"].numpy(), np.full(4, 2.0))


# --- engines -------------------------------------------------------------------------------------


def _inflate_in_round(cid: str, round_: int, factor: int):
    """A client wrapper: ``cid`` claims ``factor`` x its rows in ``round_``."""

    def wrap(inner):
        def client(fed, state, k, r):
            tensors, result = inner(fed, state, k, r)
            if fed.partition.client_ids[k] == cid and r == round_:
                result = dataclasses.replace(result, num_examples=factor * result.num_examples)
            return tensors, result

        return client

    return wrap


def test_simulate_pins_claims_across_a_resume(tiny_config, tmp_path: Path) -> None:
    """client0 claims 3x its rows in round 2: it weighs 2x, in a run resumed after round 1 as in one that was not."""
    from lorafed.engine.inprocess import simulate
    from lorafed.engine.record import read_metrics

    run = ("train.max_steps=3", "federation.min_clients=2")
    attack = _inflate_in_round("client0", 2, 3)
    simulate(tiny_config(*run, "federation.rounds=2"), tmp_path / "whole", progress=False, client_fn=attack)
    simulate(tiny_config(*run, "federation.rounds=1"), tmp_path / "split", progress=False, client_fn=attack)
    assert json.loads((tmp_path / "split" / "rounds" / "claims_r1.json").read_text()).keys() == {"client0", "client1"}
    two = tiny_config(*run, "federation.rounds=2")
    simulate(two, tmp_path / "split", progress=False, client_fn=attack, resume=True)
    rows = read_metrics(tmp_path / "split" / "metrics.jsonl")
    r1 = tmp_path / "split" / "rounds" / "r1"
    n = {cid: load_payload(r1 / f"{cid}.safetensors").meta.num_examples for cid in ("client0", "client1")}
    want = 2 * n["client0"] / (2 * n["client0"] + n["client1"])
    assert rows[2]["shares"]["client0"] == pytest.approx(want, abs=1e-6)
    assert read_metrics(tmp_path / "whole" / "metrics.jsonl")[2]["shares"] == rows[2]["shares"]
    a = load_payload(tmp_path / "whole" / "rounds" / "global_r2.safetensors").decoded()
    b = load_payload(tmp_path / "split" / "rounds" / "global_r2.safetensors").decoded()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_aggregate_refuses_an_inflated_claim_and_pins_across_invocations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lorafed.cli import main

    g0 = tmp_path / "g0.safetensors"
    g0.write_bytes(payload_to_bytes(REF, IDENT.meta("server", 0, 1, kind="global")))

    def write(folder: str, claims: dict[str, tuple[float, int]], round_: int) -> list[str]:
        paths = []
        for cid, (value, n) in claims.items():
            p = tmp_path / folder / f"{cid}.safetensors"
            p.parent.mkdir(exist_ok=True)
            p.write_bytes(update(cid, value, n, round_).data or b"")
            paths.append(str(p))
        return paths

    r1 = write("r1", {"c0": (1.0, 10), "c1": (2.0, 20), "c2": (3.0, 30), "evil": (9.0, 10**6)}, 1)
    assert main(["aggregate", *r1, "--global", str(g0), "--out", str(tmp_path / "g1.safetensors")]) == 0
    printed = capsys.readouterr().out
    assert f"rejected {r1[3]}: update from client 'evil'" in printed
    assert "num_examples: expected at most 200" in printed
    g1 = load_payload(tmp_path / "g1.safetensors").decoded()["w"]
    np.testing.assert_allclose(g1.numpy(), average([1, 2, 3], [10, 20, 30]), rtol=1e-6)
    assert load_claims(tmp_path / "g1.claims.json") == {"c0": 10.0, "c1": 20.0, "c2": 30.0}

    r2 = write("r2", {"c0": (1.0, 50), "c1": (2.0, 20), "c2": (3.0, 30)}, 2)
    g1_path, g2_path = tmp_path / "g1.safetensors", tmp_path / "g2.safetensors"
    assert main(["aggregate", *r2, "--global", str(g1_path), "--out", str(g2_path)]) == 0
    assert "client 'c0' averaged with weight 20, below its claimed num_examples" in capsys.readouterr().out
    g2 = load_payload(tmp_path / "g2.safetensors").decoded()["w"]
    np.testing.assert_allclose(g2.numpy(), average([1, 2, 3], [20, 20, 30]), rtol=1e-6)


# --- weight above the typical must be earned by agreement (federation.trust_weight_above) -------------

VREF = {"w": torch.zeros(50)}


def vspec() -> UpdateSpec:
    return UpdateSpec("fp", {"r": 8}, ("a", "b"), adapter_spec(VREF), round=1)


def vupdate(cid: str, vec: np.ndarray, n: int) -> Incoming:
    tensors = {"w": torch.from_numpy(np.asarray(vec, dtype=np.float32))}
    return Incoming(f"{cid}.safetensors", payload_to_bytes(tensors, IDENT.meta(cid, 1, n)))


def honest_round(claims: list[int]) -> tuple[np.ndarray, list[np.ndarray]]:
    """A shared direction d and one honest delta near it per claim (the reference is zero)."""
    rng = np.random.default_rng(0)
    d = rng.normal(size=50)
    return d, [d + 0.3 * rng.normal(size=50) for _ in claims]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


HONEST = [10, 12, 14, 16]  # the attacker's others: median 13, ratio bound 10 x 13 = 130


def test_an_adaptive_sign_flip_just_under_the_ratio_bound_weighs_the_median() -> None:
    d, vecs = honest_round(HONEST)
    ups = [vupdate(f"c{i}", v, n) for i, (v, n) in enumerate(zip(vecs, HONEST, strict=True))]
    ups.append(vupdate("evil", -d, 129))
    out = fold_updates(ups, vspec(), reference=VREF, max_examples_ratio=10.0, trust_weight_above=2.0)
    assert not out.rejected and len(out.accepted) == 5
    want = np.average([*vecs, -d], axis=0, weights=[*HONEST, 13])
    np.testing.assert_allclose(out.state["w"].numpy(), want, rtol=1e-5, atol=1e-6)
    assert out.shares["evil"] == pytest.approx(13 / 65) and out.weight_clipped == {"evil": 13.0}
    # The others' mean counts each at most as typical: 10, 12, 13, 13.
    others = np.average(vecs, axis=0, weights=[10, 12, 13, 13])
    (low,) = out.lowered.values()
    assert list(out.lowered) == ["evil"] and (low.claimed, low.weight) == (129.0, 13.0)
    assert low.cosine == pytest.approx(cosine(-d, others), abs=1e-6) and low.cosine < -0.9
    assert out.claims["evil"] == 129.0  # what is pinned is the claim, not the lowered weight
    # Without the check the flip holds 129 / 181 = 0.71 of the average.
    off = fold_updates(ups, vspec(), reference=VREF, max_examples_ratio=10.0)
    assert off.shares["evil"] == pytest.approx(129 / 181) and not off.lowered


def test_a_heavy_honest_client_agreeing_with_the_others_keeps_its_full_weight() -> None:
    claims = [*HONEST, 100]
    _, vecs = honest_round(claims)
    ups = [vupdate(f"c{i}", v, n) for i, (v, n) in enumerate(zip(vecs, claims, strict=True))]
    out = fold_updates(ups, vspec(), reference=VREF, max_examples_ratio=10.0, trust_weight_above=2.0)
    assert not out.rejected and not out.lowered and not out.weight_clipped
    want = np.average(vecs, axis=0, weights=claims)
    np.testing.assert_allclose(out.state["w"].numpy(), want, rtol=1e-5, atol=1e-6)
    assert out.shares["c4"] == pytest.approx(100 / 152)


def skewed_heavy(vecs: list[np.ndarray], weights: list[int], cos: float) -> np.ndarray:
    """A delta with cosine ``cos`` to the others' weighted mean (built by hand: the mean's unit vector and a
    unit vector orthogonal to it), as an honest client with other labels can send."""
    mean = np.average(vecs, axis=0, weights=weights)
    u = mean / np.linalg.norm(mean)
    o = np.random.default_rng(1).normal(size=mean.size)
    o -= (o @ u) * u
    o /= np.linalg.norm(o)
    return np.linalg.norm(vecs[0]) * (cos * u + np.sqrt(1 - cos**2) * o)


def test_an_honest_heavy_client_under_label_skew_weighs_the_median_and_is_not_refused() -> None:
    """Cosine -0.36 with the others' mean (as seen under Dirichlet label skew): counted as one typical client."""
    _, vecs = honest_round(HONEST)
    skew = skewed_heavy(vecs, [10, 12, 13, 13], -0.36)
    ups = [vupdate(f"c{i}", v, n) for i, (v, n) in enumerate(zip(vecs, HONEST, strict=True))]
    ups.append(vupdate("big", skew, 60))
    out = fold_updates(ups, vspec(), reference=VREF, max_examples_ratio=10.0, trust_weight_above=2.0)
    assert not out.rejected and "big" in [m.client_id for _, m in out.accepted]
    assert out.lowered["big"].cosine == pytest.approx(-0.36, abs=1e-5)
    assert (out.lowered["big"].claimed, out.lowered["big"].weight) == (60.0, 13.0)
    want = np.average([*vecs, skew], axis=0, weights=[*HONEST, 13])
    np.testing.assert_allclose(out.state["w"].numpy(), want, rtol=1e-5, atol=1e-6)
    # A lower threshold lets it keep its claim.
    kept = fold_updates(ups, vspec(), reference=VREF, trust_weight_above=2.0, trust_min_cosine=-0.5)
    assert not kept.lowered
    want = np.average([*vecs, skew], axis=0, weights=[*HONEST, 60])
    np.testing.assert_allclose(kept.state["w"].numpy(), want, rtol=1e-5, atol=1e-6)


def test_two_clients_a_heavy_flip_weighs_the_other_one() -> None:
    """K=2: the typical claim is the one other's; the ratio bound needs two others, so it does not apply."""
    d, (v,) = honest_round([10])
    ups = [vupdate("a", v, 10), vupdate("b", -d, 1000)]
    out = fold_updates(ups, vspec(), reference=VREF, max_examples_ratio=10.0, trust_weight_above=2.0)
    assert not out.rejected and out.shares == pytest.approx({"a": 0.5, "b": 0.5})
    assert out.lowered["b"].weight == 10.0 and "a" not in out.lowered
    np.testing.assert_allclose(out.state["w"].numpy(), np.average([v, -d], axis=0, weights=[10, 10]), atol=1e-6)


def test_equal_claims_leave_nothing_to_earn() -> None:
    """Every claim 10: nobody is above 2 x the others' median, so a sign flip stays a plain 1/5 sign flip."""
    d, vecs = honest_round([10] * 4)
    ups = [vupdate(f"c{i}", v, 10) for i, v in enumerate(vecs)] + [vupdate("evil", -d, 10)]
    out = fold_updates(ups, vspec(), reference=VREF, trust_weight_above=2.0)
    assert not out.lowered and not out.weight_clipped and out.shares["evil"] == pytest.approx(0.2)
    np.testing.assert_allclose(out.state["w"].numpy(), np.mean([*vecs, -d], axis=0), rtol=1e-5, atol=1e-6)


def test_two_colluding_heavy_flips_cannot_vouch_for_each_other() -> None:
    """3 honest (10 each) and 2 flips claiming 90: each flip's others count at most the typical 10, so their sum
    is 3 x 10 d - 10 d, and both flips are lowered. Counted at their claims, 30 d - 90 d would have vouched."""
    d, vecs = honest_round([10] * 3)
    ups = [vupdate(f"c{i}", v, 10) for i, v in enumerate(vecs)]
    ups += [vupdate("x", -d, 90), vupdate("y", -d, 90)]
    out = fold_updates(ups, vspec(), reference=VREF, max_examples_ratio=10.0, trust_weight_above=2.0)
    assert sorted(out.lowered) == ["x", "y"] and {low.weight for low in out.lowered.values()} == {10.0}
    want = np.average([*vecs, -d, -d], axis=0, weights=[10] * 5)
    np.testing.assert_allclose(out.state["w"].numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("off", [None, 0, 0.0])
def test_trust_weight_above_off(off: float | None) -> None:
    d, vecs = honest_round(HONEST)
    ups = [vupdate(f"c{i}", v, n) for i, (v, n) in enumerate(zip(vecs, HONEST, strict=True))]
    ups.append(vupdate("evil", -d, 129))
    out = fold_updates(ups, vspec(), reference=VREF, max_examples_ratio=10.0, trust_weight_above=off)
    assert not out.lowered and out.shares["evil"] == pytest.approx(129 / 181)


def test_unearned_weights_by_hand() -> None:
    # c: 5 > 2 x median(1, 1); the others' sum is (1, 1); cos((-1, 0), (1, 1)) = -1/sqrt(2).
    deltas = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 1.0]), "c": torch.tensor([-1.0, 0.0])}
    weights = {"a": 1.0, "b": 1.0, "c": 5.0}
    assert above_typical(weights, 2.0) == {"c": 1.0}
    (low,) = unearned_weights(weights, deltas, 2.0).values()
    assert low == Lowered(pytest.approx(-1 / np.sqrt(2)), 5.0, 1.0)
    # (1, -0.5): cos = 0.5 / (sqrt(1.25) sqrt(2)) = 0.316 >= 0: earned.
    deltas["c"] = torch.tensor([1.0, -0.5])
    assert unearned_weights(weights, deltas, 2.0) == {}
    assert unearned_weights(weights, deltas, 2.0, min_cosine=0.5)["c"].cosine == pytest.approx(0.5 / np.sqrt(2.5))
    # The others did not move: nothing to agree with, the weight is kept.
    assert unearned_weights(weights, {**deltas, "a": torch.zeros(2), "b": torch.zeros(2)}, 2.0) == {}
    assert above_typical({"a": 3.0}, 2.0) == {}


def test_bad_trust_settings_are_refused() -> None:
    with pytest.raises(AggregationError, match=r"trust_weight_above: expected 0, None or a number >= 1, got 0.5"):
        fold_updates([], vspec(), trust_weight_above=0.5)
    with pytest.raises(AggregationError, match=r"trust_min_cosine: expected a number in \[-1, 1\], got 2"):
        fold_updates([], vspec(), trust_min_cosine=2)
    assert (FederationConfig().trust_weight_above, FederationConfig().trust_min_cosine) == (2.0, 0.0)
    with pytest.raises(ConfigError) as err:
        load_config(None, ["federation.trust_weight_above=0.5", "federation.trust_min_cosine=-2"])
    assert "federation.trust_weight_above: must be >= 1, or 0 or null (off), got 0.5" in str(err.value)
    assert "federation.trust_min_cosine: must be in [-1, 1], got -2" in str(err.value)
    for off in ("0", "null"):
        cfg = load_config(None, ["data.path=rows.csv", f"federation.trust_weight_above={off}"])
        assert not cfg.federation.trust_weight_above


def test_the_default_policy_lowers_the_adaptive_flip() -> None:
    """The server step every engine runs (RoundPolicy, config defaults) applies the check."""
    d, vecs = honest_round(HONEST)
    ups = [vupdate(f"c{i}", v, n) for i, (v, n) in enumerate(zip(vecs, HONEST, strict=True))]
    ups.append(vupdate("evil", -d, 129))
    policy = RoundPolicy(FederationConfig(min_clients=2), num_clients=5, seed=0)
    result = policy.try_aggregate(ups, vspec(), VREF, 1)
    assert list(result.outcome.lowered) == ["evil"]
    want = np.average([*vecs, -d], axis=0, weights=[*HONEST, 13])
    np.testing.assert_allclose(result.state["w"].numpy(), want, rtol=1e-5, atol=1e-6)
    assert policy.claims["evil"] == 129.0


def test_aggregate_names_a_lowered_weight(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lorafed.cli import main

    g0 = tmp_path / "g0.safetensors"
    g0.write_bytes(payload_to_bytes(VREF, IDENT.meta("server", 0, 1, kind="global")))
    d, vecs = honest_round(HONEST)
    paths = []
    for cid, v, n in [*((f"c{i}", v, n) for i, (v, n) in enumerate(zip(vecs, HONEST, strict=True))), ("evil", -d, 129)]:
        p = tmp_path / f"{cid}.safetensors"
        p.write_bytes(vupdate(cid, v, n).data or b"")
        paths.append(str(p))
    out = tmp_path / "g1.safetensors"
    assert main(["aggregate", *paths, "--global", str(g0), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (
        "client 'evil' averaged with weight 13 (the others' median claim), not its claimed 129: cosine -0." in printed
    )
    assert "below its claimed num_examples" not in printed  # named once
    g1 = load_payload(out)
    assert g1.meta.metrics["weight_lowered"]["evil"]["weight"] == 13.0
    want = np.average([*vecs, -d], axis=0, weights=[*HONEST, 13])
    np.testing.assert_allclose(g1.decoded()["w"].numpy(), want, rtol=1e-5, atol=1e-6)
