"""FedProx: the proximal term and its effect on client training; the new config options."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from lorafed.client.train import proximal_term
from lorafed.engine.cohort import prepare_cohort, train_client
from lorafed.errors import ConfigError
from lorafed.wire.adapter import get_adapter_state


def test_proximal_term_value_and_gradient_match_the_formula() -> None:
    rng = np.random.default_rng(0)
    w_np = [rng.normal(size=(3, 4)), rng.normal(size=5)]
    a_np = [rng.normal(size=(3, 4)), rng.normal(size=5)]
    mu = 0.37
    w = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in w_np]
    a = [torch.tensor(x, dtype=torch.float64) for x in a_np]
    value = proximal_term(w, a, mu)
    expected = mu / 2 * sum(((x - y) ** 2).sum() for x, y in zip(w_np, a_np, strict=True))
    assert value.item() == pytest.approx(expected, rel=1e-12)
    value.backward()
    for wi, x, y in zip(w, w_np, a_np, strict=True):
        np.testing.assert_allclose(wi.grad.numpy(), mu * (x - y), rtol=1e-12)


def _drift(fed, state) -> float:
    sent, _ = train_client(fed, state, 0, 1, progress=False)
    return sum(float(((sent[k] - state[k]) ** 2).sum()) for k in sent)


def test_a_strong_proximal_term_keeps_the_client_near_the_global_adapter(tiny_config) -> None:
    fed = prepare_cohort(tiny_config("train.max_steps=6"))
    state = get_adapter_state(fed.client.model)
    free = _drift(fed, state)
    prox = dataclasses.replace(
        fed, config=dataclasses.replace(fed.config, train=dataclasses.replace(fed.config.train, prox_mu=1000.0))
    )
    held = _drift(prox, state)
    assert 0 < held < 0.5 * free


def test_new_options_are_range_checked(tiny_config) -> None:
    with pytest.raises(ConfigError, match=r"train.prox_mu: must be >= 0, got -1.0"):
        tiny_config("train.prox_mu=-1")
    with pytest.raises(ConfigError, match=r"federation.server_lr: must be > 0"):
        tiny_config("federation.server_lr=0")
    with pytest.raises(ConfigError, match=r"federation.server_beta2: must be in \[0, 1\), got 1.0"):
        tiny_config("federation.server_beta2=1")
    with pytest.raises(ConfigError, match=r"federation.server_tau: must be > 0"):
        tiny_config("federation.server_tau=0")
    with pytest.raises(ConfigError, match=r"federation.aggregation: 'flora' is not one of 'fedavg', 'ffa', 'rolora'"):
        tiny_config("federation.aggregation=flora")
    with pytest.raises(ConfigError, match=r"federation.server_optimizer: 'fedadagrad' is not one of"):
        tiny_config("federation.server_optimizer=fedadagrad")
