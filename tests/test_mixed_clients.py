"""Mixed clients: int8 (both backends), bf16 and fp32 clients in one federation; another base refused;
heterogeneous LoRA ranks aggregated exactly (numpy oracle)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from lorafed.config import ModelConfig
from lorafed.engine.cohort import prepare_cohort
from lorafed.engine.inprocess import simulate
from lorafed.engine.record import read_metrics
from lorafed.engine.scenarios import final_global, mixed_clients
from lorafed.errors import PayloadValidationError
from lorafed.model.backbone import base_fingerprint, load_client_model
from lorafed.server.fold import Incoming
from lorafed.server.hetero import aggregate_hetero_rank, aggregate_hetero_rank_report, truncate_for_client
from lorafed.server.step import RoundPolicy
from lorafed.server.validate import validate_update
from lorafed.wire.factors import MergeError
from lorafed.wire.payload import ModelIdentity, payload_to_bytes
from lorafed.wire.reader import load_payload, payload_from_bytes
from tests.conftest import save_tiny_bert

PRECISIONS = {
    "int8": {"precision": "int8", "int8_backend": "lorafed"},
    "bnb": {"precision": "int8", "int8_backend": "bitsandbytes"},
    "bf16": {"precision": "bf16"},
    "fp32": {"precision": "fp32"},
}


def _bnb() -> None:
    pytest.importorskip("bitsandbytes")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


@pytest.mark.parametrize("name", list(PRECISIONS))
def test_base_fingerprint_is_the_checkpoints_whatever_the_precision(name, tiny_model_dir) -> None:
    if name == "bnb":
        _bnb()
    cfg = dataclasses.replace(ModelConfig(str(tiny_model_dir)), **PRECISIONS[name])
    model = load_client_model(cfg, ("a", "b", "c"), seed=0)
    assert model.precision == cfg.precision
    # Oracle: the hash of the files as they lie on disk, whatever the loaded dtype.
    assert model.fingerprint == base_fingerprint(tiny_model_dir)


def test_fingerprint_tells_other_weights_apart(tiny_model_dir, tmp_path) -> None:
    other = save_tiny_bert(tmp_path / "other")  # same architecture and seed, re-saved: same weights
    assert base_fingerprint(other) == base_fingerprint(tiny_model_dir)
    from transformers import BertModel

    m = BertModel.from_pretrained(other)
    with torch.no_grad():
        m.encoder.layer[0].attention.self.query.weight[0, 0] += 1e-3  # one weight changed
    m.save_pretrained(tmp_path / "changed")
    assert base_fingerprint(tmp_path / "changed") != base_fingerprint(tiny_model_dir)


@pytest.fixture(scope="module")
def mixed_runs(tmp_path_factory, tiny_model_dir):
    """One prepared 4-client federation (1 round) run all-fp32, all-int8, all-bnb, all-bf16 and mixed."""
    _bnb()
    from lorafed.config import load_config
    from tests.conftest import ROOT, tiny_overrides, write_synthetic_csv

    tmp = tmp_path_factory.mktemp("mixed")
    csv_path = write_synthetic_csv(tmp / "reviews.csv")
    cfg = load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            *tiny_overrides(csv_path, tiny_model_dir),
            "partition.num_clients=4",
            "federation.min_clients=4",
            "federation.rounds=1",
            # The 0.25 bound was calibrated with the frozen dropout on; without it many of the tiny
            # model's gradients are near zero, where rounding flips Adam's sign-like first steps.
            "train.backbone_dropout=true",
        ],
    )
    fed = prepare_cohort(cfg)
    ids = fed.partition.client_ids
    runs = {}
    for name in ["fp32", "int8", "bnb", "bf16"]:
        models = {c: dataclasses.replace(cfg.model, **PRECISIONS[name]) for c in ids}
        simulate(cfg, tmp / name, progress=False, fed=fed, client_fn=mixed_clients(fed, models))
        runs[name] = tmp / name
    mix = dict(zip(ids, ["int8", "bnb", "bf16", "fp32"], strict=True))
    simulate(
        cfg,
        tmp / "mixed",
        progress=False,
        fed=fed,
        client_fn=mixed_clients(fed, {c: dataclasses.replace(cfg.model, **PRECISIONS[p]) for c, p in mix.items()}),
    )
    runs["mixed"] = tmp / "mixed"
    return fed, runs, mix


def _update(run: Path, cid: str) -> tuple[dict[str, torch.Tensor], int]:
    p = load_payload(run / "rounds" / "r1" / f"{cid}.safetensors")
    return p.decoded(), p.meta.num_examples


def test_mixed_federation_accepts_every_precision_and_averages_exactly(mixed_runs) -> None:
    fed, runs, mix = mixed_runs
    row = read_metrics(runs["mixed"] / "metrics.jsonl")[-1]
    assert sorted(row["clients"]) == sorted(mix) and not row["rejected"] and not row["failed"]
    _, glob = final_global(fed, runs["mixed"])
    # Oracle: in one round each client's update depends only on its own precision, so the mixed
    # global is the sample-weighted mean of the updates the same clients sent in the all-<p> runs.
    parts = [_update(runs[p], cid) for cid, p in mix.items()]
    n = sum(w for _, w in parts)
    for key, value in glob.items():
        expected = sum(t[key].double() * (w / n) for t, w in parts)
        np.testing.assert_allclose(value.double().numpy(), expected.numpy(), rtol=0, atol=1e-6)


def test_mixed_global_stays_within_what_quantization_explains(mixed_runs) -> None:
    fed, runs, mix = mixed_runs
    _, g32 = final_global(fed, runs["fp32"])
    _, gmix = final_global(fed, runs["mixed"])
    g0 = fed.initial_state
    keys = list(g32)
    diff = max(float((gmix[k] - g32[k]).abs().max()) for k in keys)
    # Per coordinate, by the triangle inequality over the weighted mean:
    # |G_mixed - G_fp32| <= sum_k w_k |U_k^{p_k} - U_k^{fp32}|, each term the client's own precision effect.
    parts = {cid: _update(runs[p], cid) for cid, p in mix.items()}
    fp32 = {cid: _update(runs["fp32"], cid)[0] for cid in mix}
    n = sum(w for _, w in parts.values())
    for k in keys:
        bound = sum((w / n) * (t[k] - fp32[cid][k]).abs() for cid, (t, w) in parts.items())
        assert torch.all((gmix[k] - g32[k]).abs() <= bound + 1e-6), k
    # Relative to the round's change: precision moves the global by a fraction of what training does.
    change = sum(float(((g32[k] - g0[k]) ** 2).sum()) for k in keys) ** 0.5
    dev = sum(float(((gmix[k] - g32[k]) ** 2).sum()) for k in keys) ** 0.5
    assert dev / change <= 0.25, (dev / change, diff)
    # And no coordinate moved by more than the Adam steps could move it: 2 x steps x lr.
    cfg = fed.config
    assert diff <= 2 * cfg.train.max_steps * cfg.train.learning_rate
    assert diff > 0  # int8 and bf16 clients really trained on other weights


def test_client_on_another_base_is_refused_with_the_reason(mixed_runs, tmp_path) -> None:
    fed, runs, _ = mixed_runs
    other_dir = tmp_path / "other-bert"
    save_tiny_bert(other_dir)
    from transformers import BertModel

    m = BertModel.from_pretrained(other_dir)
    with torch.no_grad():
        m.embeddings.word_embeddings.weight.mul_(1.01)
    m.save_pretrained(other_dir)
    ids = fed.partition.client_ids
    other_cfg = dataclasses.replace(fed.config.model, name_or_path=str(other_dir))
    # In the engine: the client fails its round, the reason is recorded, the others are averaged.
    simulate(
        dataclasses.replace(fed.config, federation=dataclasses.replace(fed.config.federation, min_clients=3)),
        tmp_path / "run",
        progress=False,
        fed=fed,
        client_fn=mixed_clients(fed, {ids[0]: other_cfg}),
    )
    row = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert ids[0] not in row["clients"] and len(row["clients"]) == 3
    assert row["failed"][0]["client"] == ids[0] and "fingerprint" in row["failed"][0]["reason"]
    # At the server: an update whose header names the other base is rejected, naming the field.
    other = load_client_model(other_cfg, fed.data.label_names, 0)
    ident = ModelIdentity(other.fingerprint, fed.identity.lora, fed.identity.labels)
    tensors, _ = _update(runs["fp32"], ids[0])
    data = payload_to_bytes(tensors, ident.meta(ids[0], 1, 10))
    with pytest.raises(PayloadValidationError, match="base_fingerprint"):
        validate_update(payload_from_bytes(data), fed.spec(1))
    good = [Incoming(c, (runs["fp32"] / "rounds" / "r1" / f"{c}.safetensors").read_bytes()) for c in ids[1:]]
    policy = RoundPolicy(fed.config.federation, len(ids), 0)
    result = policy.try_aggregate([Incoming("other", data), *good], fed.spec(1), fed.initial_state, 1)
    assert [s for s, _ in result.outcome.rejected] == ["other"]
    assert "base_fingerprint" in result.outcome.rejected[0][1]


# --- heterogeneous LoRA ranks -----------------------------------------------------------------

MODULES = {"m.layer.0.query": (48, 40), "m.layer.0.value": (48, 40), "m.layer.1.query": (36, 32)}
HEAD = {"m.classifier.modules_to_save.default.weight": (3, 24), "m.classifier.modules_to_save.default.bias": (3,)}


def _client(rng: np.random.Generator, r: int) -> dict[str, np.ndarray]:
    out = {}
    for prefix, (o, i) in MODULES.items():
        out[f"{prefix}.lora_A.default.weight"] = rng.normal(size=(r, i))
        out[f"{prefix}.lora_B.default.weight"] = rng.normal(size=(o, r))
    for k, shape in HEAD.items():
        out[k] = rng.normal(size=shape)
    return out


def _oracle(clients, weights, ranks, alphas, k):
    """numpy: sum_i w_i (alpha_i / r_i) B_i A_i per module, truncated to rank k by SVD; head weighted mean."""
    w = np.asarray(weights, float) / np.sum(weights)
    deltas, heads = {}, {}
    for prefix in MODULES:
        d = sum(
            wi * (a / r) * c[f"{prefix}.lora_B.default.weight"] @ c[f"{prefix}.lora_A.default.weight"]
            for c, wi, r, a in zip(clients, w, ranks, alphas, strict=True)
        )
        u, s, vh = np.linalg.svd(d, full_matrices=False)
        deltas[prefix] = (u[:, :k] * s[:k]) @ vh[:k], d
    for key in HEAD:
        heads[key] = sum(wi * c[key] for c, wi in zip(clients, w, strict=True))
    return deltas, heads


@pytest.mark.parametrize("global_rank, global_alpha", [(8, 16.0), (4, 4.0), (28, 56.0)])
def test_hetero_rank_aggregation_matches_numpy_svd(global_rank, global_alpha) -> None:
    rng = np.random.default_rng(7)
    ranks, alphas, weights = [4, 8, 16], [8.0, 16.0, 8.0], [120, 30, 50]
    clients = [_client(rng, r) for r in ranks]
    updates = [
        ({k: torch.from_numpy(v).float() for k, v in c.items()}, w, r, a)
        for c, w, r, a in zip(clients, weights, ranks, alphas, strict=True)
    ]
    res = aggregate_hetero_rank_report(updates, global_rank, global_alpha)
    deltas, heads = _oracle(clients, weights, ranks, alphas, global_rank)
    scale = global_alpha / global_rank
    for prefix, (truncated, full) in deltas.items():
        a = res.tensors[f"{prefix}.lora_A.default.weight"].double().numpy()
        b = res.tensors[f"{prefix}.lora_B.default.weight"].double().numpy()
        assert a.shape == (global_rank, MODULES[prefix][1]) and b.shape == (MODULES[prefix][0], global_rank)
        np.testing.assert_allclose(scale * b @ a, truncated, rtol=0, atol=1e-4 * np.abs(full).max())
        s = np.linalg.svd(full, compute_uv=False)
        assert res.truncation[prefix] == pytest.approx(np.linalg.norm(s[global_rank:]) / np.linalg.norm(s), abs=1e-6)
    for key, expected in heads.items():
        np.testing.assert_allclose(res.tensors[key].double().numpy(), expected, rtol=0, atol=1e-5)
    if global_rank >= sum(ranks):  # the sum of rank-4, 8, 16 products has rank <= 28: nothing is lost
        assert max(res.truncation.values()) < 1e-6


def test_hetero_rank_truncate_for_client_and_errors() -> None:
    rng = np.random.default_rng(3)
    glob = {k: torch.from_numpy(v).float() for k, v in _client(rng, 8).items()}
    mine = truncate_for_client(glob, 8, 16.0, 4, 8.0)
    for prefix in MODULES:
        full = 2.0 * glob[f"{prefix}.lora_B.default.weight"].double() @ glob[f"{prefix}.lora_A.default.weight"].double()
        u, s, vh = np.linalg.svd(full.numpy(), full_matrices=False)
        got = 2.0 * mine[f"{prefix}.lora_B.default.weight"].double() @ mine[f"{prefix}.lora_A.default.weight"].double()
        np.testing.assert_allclose(got.numpy(), (u[:, :4] * s[:4]) @ vh[:4], atol=1e-4 * float(full.abs().max()))
    assert set(aggregate_hetero_rank([(glob, 1.0, 8, 16.0)], 8, 16.0)) == set(glob)
    bad = {k: v for k, v in glob.items() if "value" not in k}
    with pytest.raises(MergeError, match="tensors differ"):
        aggregate_hetero_rank([(glob, 1.0, 8, 16.0), (bad, 1.0, 8, 16.0)], 8, 16.0)
    with pytest.raises(MergeError, match="rank"):
        aggregate_hetero_rank([(glob, 1.0, 8, 16.0)], 33, 16.0)
    with pytest.raises(MergeError, match="shape"):
        aggregate_hetero_rank([(glob, 1.0, 4, 16.0)], 4, 8.0)  # factors of rank 8 declared as r=4
