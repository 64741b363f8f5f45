"""FedAvg: sample-weighted mean in fp32 against numpy, and every adapter tensor included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorafed.errors import AggregationError
from lorafed.server.aggregate import WeightedMean, fedavg


def test_fedavg_matches_numpy_average_with_unequal_weights() -> None:
    rng = np.random.default_rng(0)
    shapes = {"a.lora_A.weight": (4, 16), "a.lora_B.weight": (16, 4), "classifier.weight": (3, 16), "b": (3,)}
    weights = [3.0, 50.0, 7.0, 1.0]
    clients = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in weights]
    got = fedavg(({k: torch.from_numpy(v) for k, v in c.items()}, w) for c, w in zip(clients, weights, strict=True))
    assert set(got) == set(shapes)
    for key in shapes:
        expected = np.average(np.stack([c[key] for c in clients]), axis=0, weights=weights)
        np.testing.assert_allclose(got[key].numpy(), expected, rtol=1e-6, atol=1e-6)
        assert got[key].dtype == torch.float32


def test_half_precision_inputs_are_accumulated_in_fp32() -> None:
    # 2049 in fp16 is not representable; an fp16 accumulator would lose the +1 steps.
    ups = [
        ({"w": torch.tensor([2048.0], dtype=torch.float16)}, 1.0),
        ({"w": torch.tensor([1.0], dtype=torch.float16)}, 1.0),
    ]
    assert fedavg(ups)["w"].item() == pytest.approx(1024.5)


def test_streaming_accumulator_is_order_independent() -> None:
    rng = np.random.default_rng(1)
    ups = [({"w": torch.from_numpy(rng.normal(size=5).astype(np.float32))}, float(n)) for n in (1, 9, 4)]
    a = fedavg(ups)["w"]
    b = fedavg(reversed(ups))["w"]
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_errors_name_the_problem() -> None:
    acc = WeightedMean()
    with pytest.raises(AggregationError, match="no updates"):
        acc.result()
    with pytest.raises(AggregationError, match="weight must be > 0, got 0"):
        acc.add({"w": torch.ones(1)}, 0)
    acc.add({"w": torch.ones(2)}, 1)
    with pytest.raises(AggregationError, match=r"different tensors than the first: \['v'"):
        acc.add({"v": torch.ones(2)}, 1)
    with pytest.raises(AggregationError, match=r"tensor w: shape \(3,\) != \(2,\)"):
        acc.add({"w": torch.ones(3)}, 1)


def test_head_and_every_lora_tensor_are_aggregated(tiny_config) -> None:
    """On a real peft model: each LoRA A/B and the head take the weighted mean of the clients."""
    from lorafed.model.backbone import load_client_model
    from lorafed.wire.adapter import get_adapter_state, set_adapter_state

    cfg = tiny_config()
    client = load_client_model(cfg.model, ("x", "y", "z"), seed=0)
    base = get_adapter_state(client.model)
    n_layers = 2
    lora_keys = [k for k in base if ".lora_A." in k or ".lora_B." in k]
    head_keys = [k for k in base if "classifier" in k]
    assert len(lora_keys) == n_layers * 2 * 2  # layers x (query, value) x (A, B)
    assert sorted(head_keys) == ["base_model.model.classifier.bias", "base_model.model.classifier.weight"]
    states = [{k: v + float(i + 1) for k, v in base.items()} for i in range(3)]
    weights = [1.0, 2.0, 5.0]
    avg = fedavg(zip(states, weights, strict=True))
    shift = sum((i + 1) * w for i, w in enumerate(weights)) / sum(weights)
    for key, value in base.items():
        torch.testing.assert_close(avg[key], value + shift, rtol=1e-6, atol=1e-6)
    set_adapter_state(client.model, avg)
    loaded = get_adapter_state(client.model)
    for key in base:
        torch.testing.assert_close(loaded[key], avg[key])
