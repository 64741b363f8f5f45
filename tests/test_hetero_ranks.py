"""Heterogeneous LoRA ranks in a federation: validation, the server step, the simulator and cross-silo clients.

Every expected global is computed with numpy: ``residual`` (the default), the global change plus
the weighted mean of each client's ``(alpha_i / r_i) B_i A_i`` minus the change it started from
(the global's, cut to the client's rank by ``np.linalg.svd`` when that is below the global's);
``products``, the weighted mean of the ``(alpha_i / r_i) B_i A_i``; either truncated to the
global rank by ``np.linalg.svd``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from lorafed.config import FederationConfig
from lorafed.engine.inprocess import simulate
from lorafed.engine.record import read_metrics
from lorafed.errors import ConfigError, PayloadError, PayloadValidationError
from lorafed.server.fold import Incoming
from lorafed.server.hetero import densify, factorize, revive, start_dense, start_for_client
from lorafed.server.specs import spec_for
from lorafed.server.step import RoundPolicy
from lorafed.server.validate import validate_update
from lorafed.wire.payload import ModelIdentity, payload_to_bytes
from lorafed.wire.reader import load_payload, payload_from_bytes

MODULES = {"m.layer.0.query": (24, 20), "m.layer.1.value": (24, 20)}
HEAD = "m.classifier.modules_to_save.default.weight"
LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["query", "value"]}


def _adapter(rng: np.random.Generator, r: int) -> dict[str, np.ndarray]:
    out = {}
    for prefix, (o, i) in MODULES.items():
        out[f"{prefix}.lora_A.default.weight"] = rng.normal(size=(r, i))
        out[f"{prefix}.lora_B.default.weight"] = rng.normal(size=(o, r))
    out[HEAD] = rng.normal(size=(3, 24))
    return out


def _torch(a: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v).float() for k, v in a.items()}


def _delta(t: dict, prefix: str, r: int, alpha: float) -> np.ndarray:
    """numpy: (alpha / r) B @ A of one module."""
    b = np.asarray(t[f"{prefix}.lora_B.default.weight"], dtype=np.float64)
    a = np.asarray(t[f"{prefix}.lora_A.default.weight"], dtype=np.float64)
    return alpha / r * b @ a


def _svd_cut(d: np.ndarray, k: int) -> np.ndarray:
    u, s, vh = np.linalg.svd(d, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def _identity(r: int, alpha: float = 16) -> ModelIdentity:
    return ModelIdentity("sha256:base", {**LORA, "r": r, "alpha": alpha}, ("a", "b", "c"))


def _update(rng: np.random.Generator, cid: str, r: int, alpha: float, n: int) -> tuple[Incoming, dict]:
    tensors = _adapter(rng, r)
    meta = _identity(r, alpha).meta(cid, 1, n, "update")
    return Incoming(cid, payload_to_bytes(_torch(tensors), meta)), tensors


def _spec(hetero: bool):
    glob = _torch(_adapter(np.random.default_rng(0), 8))
    spec = spec_for(_identity(8), glob, 1)
    return dataclasses.replace(spec, hetero_ranks=hetero), glob


def test_validation_accepts_another_rank_only_in_a_hetero_federation() -> None:
    rng = np.random.default_rng(1)
    up, _ = _update(rng, "shop-4", 4, 8, 50)
    payload = payload_from_bytes(up.data or b"", "shop-4")
    strict, _ = _spec(False)
    with pytest.raises(PayloadValidationError, match=r"lora config alpha, r: expected \{'alpha': 16, 'r': 8\}"):
        validate_update(payload, strict)
    hetero, _ = _spec(True)
    validate_update(payload, hetero)
    # another base or other target modules are still refused, with the reason
    other = _identity(4, 8)
    for ident, match in (
        (dataclasses.replace(other, base_fingerprint="sha256:other"), "base_fingerprint"),
        (dataclasses.replace(other, lora={**other.lora, "target_modules": ["query"]}), "lora config target_modules"),
        (dataclasses.replace(other, lora={**other.lora, "dropout": 0.1}), "lora config dropout"),
    ):
        p = payload_from_bytes(payload_to_bytes(payload.decoded(), ident.meta("shop-4", 1, 50, "update")), "x")
        with pytest.raises(PayloadValidationError, match=match):
            validate_update(p, hetero)
    # the factors must have the rank the header states, and the rank must be sane
    for lora, match in (
        ({"r": 2}, r"tensor .*lora_A.* shape: expected \(2, 20\)"),
        ({"r": 21}, r"lora config r: expected an integer in \[1, 20\]"),
        ({"r": True}, "lora config r"),
        ({"alpha": float("nan")}, "lora config alpha"),
    ):
        ident = dataclasses.replace(other, lora={**other.lora, **lora})
        p = payload_from_bytes(payload_to_bytes(payload.decoded(), ident.meta("shop-4", 1, 50, "update")), "x")
        with pytest.raises(PayloadValidationError, match=match):
            validate_update(p, hetero)


def test_server_step_is_the_svd_cut_weighted_mean_of_dense_changes() -> None:
    """``products``: numpy's weighted mean of (alpha_i / r_i) B_i A_i, cut to the global rank."""
    rng = np.random.default_rng(2)
    clients = [("a", 4, 8.0, 120), ("b", 8, 16.0, 30), ("c", 16, 16.0, 50)]
    made = [_update(rng, cid, r, alpha, n) for cid, r, alpha, n in clients]
    spec, glob = _spec(True)
    fcfg = FederationConfig(hetero_ranks=True, hetero_mode="products", max_update_ratio=None, max_examples_ratio=None)
    result = RoundPolicy(fcfg, 3, 0).try_aggregate([u for u, _ in made], spec, glob, 1)
    assert result.state is not None and set(result.state) == set(glob)
    w = np.array([n for *_, n in clients], float) / sum(n for *_, n in clients)
    for prefix, (_, i) in MODULES.items():
        mean = sum(wi * _delta(t, prefix, r, a) for wi, (_, t), (_, r, a, _) in zip(w, made, clients, strict=True))
        got = _delta({k: v.numpy() for k, v in result.state.items()}, prefix, 8, 16)
        np.testing.assert_allclose(got, _svd_cut(mean, 8), rtol=0, atol=1e-5 * np.abs(mean).max())
        assert result.state[f"{prefix}.lora_A.default.weight"].shape == (8, i)
        s = np.linalg.svd(mean, compute_uv=False)
        assert result.truncation[prefix] == pytest.approx(np.linalg.norm(s[8:]) / np.linalg.norm(s), abs=1e-6)
    head = sum(wi * t[HEAD] for wi, (_, t) in zip(w, made, strict=True))
    np.testing.assert_allclose(result.state[HEAD].numpy(), head, rtol=0, atol=1e-5)
    # without hetero_ranks the same round refuses the rank-4 and rank-16 updates
    strict = RoundPolicy(FederationConfig(max_update_ratio=None), 3, 0).try_aggregate(
        [u for u, _ in made], dataclasses.replace(spec, hetero_ranks=False), glob, 1
    )
    assert [m.client_id for _, m in strict.outcome.accepted] == ["b"]
    assert all("lora config" in reason for _, reason in strict.outcome.rejected)


def _np(t: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.double().numpy() for k, v in t.items()}


def test_residual_step_adds_each_clients_change_from_its_own_start() -> None:
    """``residual``: delta_g + sum_i w_i (delta_i - start_i), start_i the global cut to r_i (r_i < 8) or the global."""
    rng = np.random.default_rng(7)
    clients = [("a", 4, 8.0, 120), ("b", 8, 16.0, 30), ("c", 16, 16.0, 50), ("d", 8, 8.0, 40)]
    made = [_update(rng, cid, r, alpha, n) for cid, r, alpha, n in clients]
    spec, glob = _spec(True)
    fcfg = FederationConfig(hetero_ranks=True, max_update_ratio=None, max_examples_ratio=None)
    assert fcfg.hetero_mode == "residual"  # the default
    result = RoundPolicy(fcfg, 4, 0).try_aggregate([u for u, _ in made], spec, glob, 1)
    assert result.state is not None and not result.outcome.rejected
    w = np.array([n for *_, n in clients], float) / sum(n for *_, n in clients)
    g = _np(glob)
    for prefix in MODULES:
        dg = _delta(g, prefix, 8, 16)
        starts = {
            4: _svd_cut(dg, 4),  # rank 4 < 8: the global change cut to 4 by numpy's SVD
            8: _svd_cut(dg, 8),  # rank 8, alpha 8 != 16: the rank-8 cut of a rank-8 change is itself
            16: dg,  # above the global rank: nothing is lost
        }
        np.testing.assert_allclose(starts[8], dg, rtol=0, atol=1e-9 * np.abs(dg).max())
        want = dg + sum(
            wi * (_delta(t, prefix, r, a) - (dg if (r, a) == (8, 16.0) else starts[r]))
            for wi, (_, t), (_, r, a, _) in zip(w, made, clients, strict=True)
        )
        got = _delta(_np(result.state), prefix, 8, 16)
        np.testing.assert_allclose(got, _svd_cut(want, 8), rtol=0, atol=1e-5 * np.abs(want).max())
        s = np.linalg.svd(want, compute_uv=False)
        assert result.truncation[prefix] == pytest.approx(np.linalg.norm(s[8:]) / np.linalg.norm(s), abs=1e-6)
        # the products mean differs: client a's cut of the global is not what it started from there
        products = sum(wi * _delta(t, prefix, r, a) for wi, (_, t), (_, r, a, _) in zip(w, made, clients, strict=True))
        assert np.abs(_svd_cut(products, 8) - got).max() > 1e-2 * np.abs(want).max()
    head = sum(wi * t[HEAD] for wi, (_, t) in zip(w, made, strict=True))
    np.testing.assert_allclose(result.state[HEAD].numpy(), head, rtol=0, atol=1e-5)
    # the norm bound sees client a's own change: ||delta_a - start_a|| (+ its head's change)
    want_a = np.sqrt(
        sum(np.sum((_delta(made[0][1], p, 4, 8.0) - _svd_cut(_delta(g, p, 8, 16), 4)) ** 2) for p in MODULES)
        + np.sum((made[0][1][HEAD] - g[HEAD]) ** 2)
    )
    assert result.outcome.norms["a"] == pytest.approx(want_a, rel=1e-5)


def test_residual_and_products_are_plain_fedavg_when_every_client_has_the_global_rank() -> None:
    rng = np.random.default_rng(8)
    clients = [("a", 8, 16.0, 70), ("b", 8, 16.0, 20), ("c", 8, 16.0, 10)]
    made = [_update(rng, cid, r, alpha, n) for cid, r, alpha, n in clients]
    spec, glob = _spec(True)
    w = np.array([0.7, 0.2, 0.1])
    states = {}
    for mode in ("residual", "products"):
        fcfg = FederationConfig(hetero_ranks=True, hetero_mode=mode, max_update_ratio=None, max_examples_ratio=None)
        states[mode] = RoundPolicy(fcfg, 3, 0).try_aggregate([u for u, _ in made], spec, glob, 1).state
        assert states[mode] is not None
        for prefix in MODULES:  # FedAvg of the dense products, cut to rank 8 (numpy)
            mean = sum(wi * _delta(t, prefix, 8, 16.0) for wi, (_, t) in zip(w, made, strict=True))
            got = _delta(_np(states[mode]), prefix, 8, 16)
            np.testing.assert_allclose(got, _svd_cut(mean, 8), rtol=0, atol=1e-5 * np.abs(mean).max())
    assert all(torch.equal(states["residual"][k], states["products"][k]) for k in glob)


def test_start_dense_is_what_the_client_starts_from() -> None:
    rng = np.random.default_rng(9)
    glob = _torch(_adapter(rng, 8))
    fresh = _torch(_adapter(rng, 4))
    g = _np(glob)
    for lora in ({"r": 4, "alpha": 8}, {"r": 8, "alpha": 16}):
        r, alpha = lora["r"], lora["alpha"]
        start = start_for_client(glob, {"r": 8, "alpha": 16}, lora, fresh if r == 4 else glob)
        dense = start_dense(glob, {"r": 8, "alpha": 16}, lora)
        for prefix in MODULES:
            key = f"{prefix}.lora_delta.default.weight"
            np.testing.assert_allclose(dense[key].numpy(), _delta(_np(start), prefix, r, alpha), rtol=0, atol=1e-12)
            want = _svd_cut(_delta(g, prefix, 8, 16), r)
            np.testing.assert_allclose(dense[key].numpy(), want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_config_hetero_mode(tiny_config) -> None:
    assert tiny_config("federation.hetero_ranks=true").federation.hetero_mode == "residual"
    cfg = tiny_config("federation.hetero_ranks=true", "federation.hetero_mode=products")
    assert cfg.federation.hetero_mode == "products"
    with pytest.raises(ConfigError, match=r"federation.hetero_mode: 'sum' is not one of 'residual', 'products'"):
        tiny_config("federation.hetero_mode=sum")


def test_client_start_is_the_truncated_global_with_dead_components_revived() -> None:
    rng = np.random.default_rng(3)
    glob = _torch(_adapter(rng, 4))  # a rank-4 global (alpha 8)
    fresh = _torch(_adapter(rng, 8))
    for t in fresh.values():
        if t.shape[0] == 24 and t.shape[1] == 8:
            t.zero_()  # a fresh B is zero
    start = start_for_client(glob, {"r": 4, "alpha": 8}, {"r": 8, "alpha": 16}, fresh)
    for prefix in MODULES:
        want = _delta({k: v.numpy() for k, v in glob.items()}, prefix, 4, 8)  # rank 4 <= 8: nothing lost
        got = _delta({k: v.numpy() for k, v in start.items()}, prefix, 8, 16)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
        a = start[f"{prefix}.lora_A.default.weight"]
        b = start[f"{prefix}.lora_B.default.weight"]
        # components 4..7 have no singular value: B's columns are zero, A's rows the client's own fresh ones
        assert torch.equal(b[:, 4:], torch.zeros(24, 4))
        assert torch.equal(a[4:], fresh[f"{prefix}.lora_A.default.weight"][4:])
        assert bool((a[:4].abs().sum(1) > 0).all())
    # round 1: the global delta is zero, so the client starts from its own fresh adapter exactly
    zero_b = {k: (torch.zeros_like(v) if ".lora_B." in k else v) for k, v in glob.items()}
    first = start_for_client(zero_b, {"r": 4, "alpha": 8}, {"r": 8, "alpha": 16}, fresh)
    assert all(torch.equal(first[k], fresh[k]) for k in fresh if k != HEAD)
    assert torch.equal(first[HEAD], glob[HEAD])
    same = start_for_client(glob, {"r": 4, "alpha": 8}, {"r": 4, "alpha": 8}, _torch(_adapter(rng, 4)))
    assert all(torch.equal(same[k], glob[k]) for k in glob)  # same rank and alpha: the global itself
    assert revive(glob, fresh) == glob  # nothing dead: nothing changes
    cut = factorize(densify(glob, 4, 8), 2, 4)
    assert cut.tensors[f"{next(iter(MODULES))}.lora_A.default.weight"].shape == (2, 20)


def test_config_needs_hetero_ranks_for_client_ranks(tiny_config) -> None:
    with pytest.raises(ConfigError, match=r"clients of other ranks need federation.hetero_ranks=true"):
        tiny_config("model.lora.client_ranks={client0: 8}")
    with pytest.raises(ConfigError, match=r"federation.hetero_ranks: needs aggregation fedavg"):
        tiny_config("federation.hetero_ranks=true", "federation.aggregation=ffa")
    with pytest.raises(ConfigError, match=r"model.lora.client_ranks.client0: expected an integer"):
        tiny_config("federation.hetero_ranks=true", "model.lora.client_ranks={client0: big}")
    cfg = tiny_config("federation.hetero_ranks=true", "model.lora.client_ranks={nobody: 8}")
    with pytest.raises(ConfigError, match="no client 'nobody' in the partition"):
        simulate(cfg, cfg.output_dir, progress=False)


def _oracle_round(run: Path, r: int, global_rank: int, global_alpha: float) -> float:
    """The run's global after round ``r`` against numpy on the updates it recorded as received (``residual``).

    A client below the global rank started from numpy's SVD cut of the previous global's change
    (``rounds/global_r{r-1}``) to its rank, any other from that change itself.
    """
    updates = [load_payload(p) for p in sorted((run / "rounds" / f"r{r}").glob("*.safetensors"))]
    glob = load_payload(run / "rounds" / f"global_r{r}.safetensors").decoded()
    prev = load_payload(run / "rounds" / f"global_r{r - 1}.safetensors").decoded()
    n = np.array([u.meta.num_examples for u in updates], float)
    w = n / n.sum()
    prefixes = sorted({k.partition(".lora_A.")[0] for k in glob if ".lora_A." in k})
    assert prefixes
    lowered = 0.0  # how far the low-rank clients' starts were from the global change (0 in round 1)
    for prefix in prefixes:
        a_key = next(k for k in glob if k.startswith(prefix + ".lora_A."))
        b_key = a_key.replace(".lora_A.", ".lora_B.")
        dg = global_alpha / global_rank * prev[b_key].double().numpy() @ prev[a_key].double().numpy()

        mean = dg.copy()
        for wi, u in zip(w, updates, strict=True):
            t, ri = u.decoded(), u.meta.lora["r"]
            final = u.meta.lora["alpha"] / ri * t[b_key].double().numpy() @ t[a_key].double().numpy()
            begin = _svd_cut(dg, ri) if ri < global_rank else dg
            mean += wi * (final - begin)
            lowered = max(lowered, float(np.abs(begin - dg).max()))
        got = global_alpha / global_rank * glob[b_key].double().numpy() @ glob[a_key].double().numpy()
        np.testing.assert_allclose(got, _svd_cut(mean, global_rank), rtol=0, atol=2e-5 * np.abs(mean).max() + 1e-9)
    for key in (k for k in glob if ".lora_" not in k):
        head = sum(wi * u.decoded()[key].double().numpy() for wi, u in zip(w, updates, strict=True))
        np.testing.assert_allclose(glob[key].double().numpy(), head, rtol=0, atol=1e-6)
    return lowered


def test_mixed_rank_simulation_matches_the_numpy_oracle(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config(
        "partition.num_clients=3",
        "federation.rounds=2",
        "federation.hetero_ranks=true",
        "model.lora.client_ranks={client0: 2, client2: 8}",
    )
    run = tmp_path / "run"
    summary = simulate(cfg, run, progress=False)
    rows = read_metrics(run / "metrics.jsonl")
    assert [len(r["clients"]) for r in rows] == [0, 3, 3] and not any(r["rejected"] for r in rows)
    ranks = {p.stem: load_payload(p).meta.lora["r"] for p in (run / "rounds" / "r1").glob("*.safetensors")}
    assert ranks == {"client0": 2, "client1": 4, "client2": 8}
    assert (
        load_payload(run / "rounds" / "r1" / "client0.safetensors")
        .tensors[
            next(k for k in load_payload(run / "rounds" / "r1" / "client0.safetensors").tensors if ".lora_A." in k)
        ]
        .shape[0]
        == 2
    )
    g2 = load_payload(run / "rounds" / "global_r2.safetensors")
    assert g2.meta.lora["r"] == 4 and g2.meta.metrics["parent_round"] == 1
    assert _oracle_round(run, 1, 4, 8.0) == 0  # round 1: the global change is zero, every start too
    # round 2: client0 (rank 2) started from a cut that lost part of the global change
    assert _oracle_round(run, 2, 4, 8.0) > 1e-4
    assert 0 <= summary["final"]["macro_f1"] <= 1


def test_cross_silo_clients_of_other_ranks(tiny_config, tmp_path: Path) -> None:
    from conftest import write_synthetic_csv

    from lorafed.client.local import LocalClient, run_client_round, write_update
    from lorafed.server.by_hand import aggregate_by_hand, start_from_config, start_from_global, write_global

    labels = ["bad", "good", "meh"]
    common = ["federation.hetero_ranks=true", f"data.labels={labels}", "federation.min_clients=2"]
    files = {cid: write_synthetic_csv(tmp_path / f"{cid}.csv", n=60, seed=i) for i, cid in enumerate(["s4", "s8"])}
    ranks = {"s4": 4, "s8": 8}
    paths = []
    for cid, path in files.items():
        cfg = tiny_config(*common, f"data.path={path}", f"model.lora.r={ranks[cid]}")
        up = run_client_round(cfg, cid, None, progress=False)
        paths.append(write_update(cfg, cid, up, tmp_path / "r1" / f"{cid}.safetensors")[0])
    server = tiny_config(*common)  # the global rank is the server's model.lora.r (4)
    result, policy = aggregate_by_hand(paths, server, start_from_config(server))
    assert len(result.outcome.accepted) == 2 and result.state is not None
    g1, _, _ = write_global(tmp_path / "global_r1.safetensors", result, policy, start_from_config(server))
    # the rank-8 client starts round 2 from the rank-4 global: the same delta, 4 components revived
    cfg8 = tiny_config(*common, f"data.path={files['s8']}", "model.lora.r=8")
    local = LocalClient.from_file(cfg8, "s8", str(files["s8"]), tuple(labels))
    glob = load_payload(g1)
    start = local.check_global(glob, str(g1))
    a_key = next(k for k in start if ".lora_A." in k)
    b_key = a_key.replace(".lora_A.", ".lora_B.")
    g = glob.decoded()
    want = 8 / 4 * g[b_key].double() @ g[a_key].double()
    got = 8 / 8 * start[b_key].double() @ start[a_key].double()
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-5 * float(want.abs().max()))
    assert torch.equal(start[a_key][4:], local.fresh[a_key][4:]) and start[a_key].shape[0] == 8
    # round 2 aggregates from the global; a federation without hetero_ranks refuses the rank-8 client
    up = local.step(start, 2, progress=False)
    p2 = write_update(cfg8, "s8", up, tmp_path / "r2" / "s8.safetensors")[0]
    one = tiny_config("federation.hetero_ranks=true", f"data.labels={labels}", "federation.min_clients=1")
    res2, _ = aggregate_by_hand([p2], one, start_from_global(g1, one))
    assert res2.state is not None and res2.state[a_key].shape[0] == 4
    strict = tiny_config(f"data.labels={labels}", "federation.min_clients=1")
    res3, _ = aggregate_by_hand([p2], strict, start_from_global(g1, strict))
    assert res3.state is None and "lora config" in res3.outcome.rejected[0][1]
    plain = LocalClient.from_file(
        tiny_config(f"data.labels={labels}", "model.lora.r=8"), "s8", str(files["s8"]), labels
    )
    with pytest.raises(PayloadError, match=r"does not fit this client's config: .*lora config r"):
        plain.check_global(glob, str(g1))


def test_a_partition_client_outside_the_simulator_trains_at_its_own_rank(tiny_config) -> None:
    """What a Flower node or a file-drop poller of the partition builds (it used to be model.lora.r for all)."""
    from lorafed.client.local import LocalClient

    ranks = "model.lora.client_ranks={client0: 2, client2: 8}"
    cfg = tiny_config("partition.num_clients=3", "federation.hetero_ranks=true", ranks)
    for k, r in enumerate((2, 4, 8)):
        local = LocalClient.from_partition(cfg, k)
        assert local.identity.lora["r"] == r and local.identity.lora["alpha"] == 8
        assert {v.shape[0] for key, v in local.fresh.items() if ".lora_A." in key} == {r}
        assert local.config is cfg  # training settings stay the federation's


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_mixed_ranks_over_flower_match_the_simulation_and_numpy(
    tiny_config, synthetic_csv, tiny_model_dir, tmp_path: Path
) -> None:
    """Ranks 2, 4 (the global's) and 8 over a Flower deployment (3 SuperNodes on 127.0.0.1, warm executors).

    Each node is client k of the partition and trains at its ``model.lora.client_ranks`` rank, as the
    simulator's client k does; the globals equal the simulator's, and numpy's weighted mean of the
    received updates' ``(alpha_i / r_i) B_i A_i`` cut back to rank 4 by SVD.
    """
    import os
    import subprocess
    import sys

    from conftest import ROOT, tiny_overrides

    pytest.importorskip("flwr")
    over = [
        *tiny_overrides(synthetic_csv, tiny_model_dir),
        "partition.num_clients=3",
        "federation.rounds=2",
        "federation.min_clients=3",
        "train.max_steps=3",
        "federation.hetero_ranks=true",
        "model.lora.client_ranks={client0: 2, client2: 8}",
    ]
    out = tmp_path / "flower"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "lorafed", "flower", "run", "--config", str(ROOT / "configs" / "tiny.yaml"),
           "--nodes", "3", "--out", str(out), "--timeout", "150", "federation.client_timeout_s=60",
           "--isolation", "process", "--insecure", *over]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_metrics(out / "metrics.jsonl")
    assert [len(r["clients"]) for r in rows] == [0, 3, 3] and not any(r["rejected"] for r in rows)
    ranks = {p.stem: load_payload(p).meta.lora["r"] for p in (out / "rounds" / "r2").glob("*.safetensors")}
    assert ranks == {"client0": 2, "client1": 4, "client2": 8}
    for r in (1, 2):
        _oracle_round(out, r, 4, 8.0)
    sim = tmp_path / "sim"
    simulate(tiny_config(*over), sim, progress=False)
    for r in (1, 2):
        a = load_payload(out / "rounds" / f"global_r{r}.safetensors")
        b = load_payload(sim / "rounds" / f"global_r{r}.safetensors")
        assert a.meta.lora["r"] == b.meta.lora["r"] == 4 and a.tensors.keys() == b.tensors.keys()
        for k in a.tensors:
            torch.testing.assert_close(a.tensors[k], b.tensors[k], rtol=0, atol=1e-6)
