"""Exact LoRA aggregation modes: which tensors travel per round, and that their average is exact."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lorafed.engine.cohort import prepare_cohort, train_client
from lorafed.engine.inprocess import simulate
from lorafed.errors import AggregationError, PayloadValidationError
from lorafed.server.aggregate import fedavg
from lorafed.server.validate import validate_update
from lorafed.wire.adapter import get_adapter_state
from lorafed.wire.reader import load_payload
from lorafed.wire.roles import apply_round, round_keys, round_roles, tensor_role, trainable_roles

KEYS = [
    "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight",
    "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight",
    "base_model.model.classifier.weight",
    "base_model.model.classifier.bias",
]


def test_roles_of_keys_and_parameter_names() -> None:
    assert [tensor_role(k) for k in KEYS] == ["lora_A", "lora_B", "head", "head"]
    assert tensor_role("base_model.model.bert.x.query.lora_A.default.weight") == "lora_A"
    assert tensor_role("base_model.model.classifier.modules_to_save.default.weight") == "head"


@pytest.mark.parametrize(
    ("aggregation", "round_", "expected"),
    [
        ("fedavg", 1, KEYS),
        ("fedavg", 2, KEYS),
        ("ffa", 1, KEYS[1:]),
        ("ffa", 4, KEYS[1:]),
        ("rolora", 1, KEYS[1:]),
        ("rolora", 2, [KEYS[0], *KEYS[2:]]),
        ("rolora", 3, KEYS[1:]),
        ("ffa", None, KEYS),
        ("rolora", None, KEYS),
        ("head", 1, KEYS[2:]),
        ("head", 2, KEYS[2:]),
        ("head", None, KEYS),
    ],
)
def test_round_keys(aggregation: str, round_: int | None, expected: list[str]) -> None:
    assert round_keys(aggregation, round_, KEYS) == expected  # type: ignore[arg-type]


def _products(weights: list[float], bs: list[torch.Tensor], as_: list[torch.Tensor]) -> torch.Tensor:
    w = torch.tensor(weights, dtype=torch.float64)
    prods = torch.stack([b.double() @ a.double() for b, a in zip(bs, as_, strict=True)])
    return (prods * (w / w.sum())[:, None, None]).sum(0)


def test_ffa_average_is_the_mean_of_the_products() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 16, generator=g)  # shared, frozen A (r=4)
    bs = [torch.randn(12, 4, generator=g) for _ in range(3)]
    weights = [10.0, 3.0, 1.0]
    avg = fedavg(({"B": b}, w) for b, w in zip(bs, weights, strict=True))
    oracle = _products(weights, bs, [a] * 3)
    torch.testing.assert_close(avg["B"].double() @ a.double(), oracle, rtol=1e-6, atol=1e-6)


def test_rolora_a_round_is_exact_and_plain_fedavg_is_not() -> None:
    g = torch.Generator().manual_seed(1)
    b = torch.randn(12, 4, generator=g)  # shared B in an A round
    as_ = [torch.randn(4, 16, generator=g) for _ in range(3)]
    bs = [torch.randn(12, 4, generator=g) for _ in range(3)]
    w = [1.0, 2.0, 5.0]
    avg_a = fedavg(({"A": a}, wi) for a, wi in zip(as_, w, strict=True))["A"]
    torch.testing.assert_close(b.double() @ avg_a.double(), _products(w, [b] * 3, as_), rtol=1e-6, atol=1e-6)
    # Averaging both factors separately (fedavg with A and B varying) misses the mean of B_i A_i.
    both = fedavg(({"A": a, "B": bi}, wi) for a, bi, wi in zip(as_, bs, w, strict=True))
    gap = (both["B"].double() @ both["A"].double() - _products(w, bs, as_)).abs().max()
    assert gap > 0.1


def test_merge_round_keeps_unsent_tensors_and_refuses_unknown() -> None:
    g = {"a": torch.zeros(2), "b": torch.ones(2)}
    out = apply_round(g, {"b": torch.full((2,), 3.0)})
    assert out["a"] is g["a"] and out["b"].tolist() == [3.0, 3.0]
    with pytest.raises(AggregationError, match="not in the global adapter: \\['c'\\]"):
        apply_round(g, {"c": torch.zeros(2)})


def test_trainable_roles_freezes_and_restores(tiny_config) -> None:
    fed = prepare_cohort(tiny_config())
    model = fed.client.model
    before = {n for n, p in model.named_parameters() if p.requires_grad}
    with trainable_roles(model, frozenset({"lora_B", "head"})) as names:
        assert names and all(".lora_A." not in n for n in names)
        assert {n for n, p in model.named_parameters() if p.requires_grad} == set(names)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == before


@pytest.mark.parametrize("aggregation", ["ffa", "rolora", "head"])
def test_clients_send_exactly_the_round_tensors(tiny_config, aggregation: str, tmp_path) -> None:
    fed = prepare_cohort(tiny_config(f"federation.aggregation={aggregation}"))
    start = fed.initial_state
    for r in (1, 2):  # round 2 starts from round 1's result (with B = 0, A's gradient is zero)
        sent, _ = train_client(fed, start, 0, r, progress=False)
        roles = round_roles(aggregation, r)  # type: ignore[arg-type]
        assert set(sent) == {k for k in start if tensor_role(k) in roles}
        assert set(sent) == set(fed.spec(r).tensors)
        after = get_adapter_state(fed.client.model)
        for k in start:  # the tensors not sent were not trained either
            if tensor_role(k) not in roles:
                torch.testing.assert_close(after[k], start[k], rtol=0, atol=0)
        assert any(
            not torch.equal(sent[k], start[k]) for k in sent if tensor_role(k) != "head" or aggregation == "head"
        )
        start = apply_round(start, sent)


def test_spec_refuses_an_update_with_the_other_factor(tiny_config, tmp_path) -> None:
    from lorafed.wire.payload import payload_to_bytes
    from lorafed.wire.reader import payload_from_bytes

    fed = prepare_cohort(tiny_config("federation.aggregation=ffa"))
    full = payload_from_bytes(payload_to_bytes(fed.initial_state, fed.identity.meta("c0", 1, 5)))
    with pytest.raises(PayloadValidationError, match=r"lora_A.*absent \(not part of the adapter\)"):
        validate_update(full, fed.spec(1), "c0.safetensors")


def test_ffa_simulation_keeps_a_at_its_init_and_halves_uploads(tiny_config, tmp_path) -> None:
    runs = {}
    for agg in ("fedavg", "ffa"):
        cfg = tiny_config(f"federation.aggregation={agg}")
        cfg = dataclasses.replace(cfg, name=agg)
        out = tmp_path / agg
        simulate(cfg, out, progress=False)
        runs[agg] = out
    g0 = load_payload(runs["ffa"] / "rounds" / "global_r0.safetensors").tensors
    g2 = load_payload(runs["ffa"] / "rounds" / "global_r2.safetensors").tensors
    assert set(g2) == set(g0)
    for k in g0:
        if tensor_role(k) == "lora_A":
            torch.testing.assert_close(g2[k], g0[k], rtol=0, atol=0)
        elif tensor_role(k) == "lora_B":
            assert not torch.equal(g2[k], g0[k])
    size = {a: sum(p.stat().st_size for p in (runs[a] / "rounds" / "r1").iterdir()) for a in runs}
    n_a = sum(g0[k].numel() for k in g0 if tensor_role(k) == "lora_A")
    assert size["fedavg"] - size["ffa"] >= 2 * 4 * n_a  # two clients, fp32, all A tensors left out
