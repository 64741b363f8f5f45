"""Label-skew head fixes (FedRS, FedLC) in the client's loss: numpy oracles, wiring, config checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorafed.client.label_skew import label_counts, label_skew_adjustment
from lorafed.client.train import client_loss, train_local
from lorafed.engine.cohort import prepare_cohort
from lorafed.engine.inprocess import simulate
from lorafed.errors import ConfigError
from lorafed.wire.adapter import get_adapter_state, set_adapter_state

# A client holding labels 0 (2 rows) and 2 (3 rows) of 5; labels 1, 3, 4 are absent.
CLIENT_LABELS = torch.tensor([0, 2, 2, 0, 2])
LOGITS = np.array(
    [
        [1.0, -0.5, 0.3, 2.0, 0.0],
        [0.2, 1.5, -1.0, 0.4, -2.0],
        [-0.3, 0.1, 0.9, -0.7, 1.2],
        [0.5, 0.5, 0.5, -1.5, 3.0],
    ]
)
BATCH_LABELS = np.array([0, 2, 2, 0])


def _numpy_ce(z: np.ndarray, y: np.ndarray) -> float:
    """Mean cross-entropy over rows, by hand: logsumexp over the finite columns minus the target's logit."""
    losses = []
    for row, t in zip(z, y, strict=True):
        finite = row[np.isfinite(row)]
        lse = finite.max() + np.log(np.exp(finite - finite.max()).sum())
        losses.append(lse - row[t])
    return float(np.mean(losses))


def _loss_and_grad(method: str, alpha: float = 0.5, tau: float = 1.0) -> tuple[float, np.ndarray]:
    adj = label_skew_adjustment(method, CLIENT_LABELS, 5, alpha, tau)
    logits = torch.tensor(LOGITS, dtype=torch.float32, requires_grad=True)
    loss = client_loss(logits, torch.tensor(BATCH_LABELS), None, adj)
    loss.backward()
    return float(loss), logits.grad.numpy()


def test_label_counts_cover_every_label() -> None:
    np.testing.assert_array_equal(label_counts(CLIENT_LABELS, 5).numpy(), [2, 0, 3, 0, 0])


def test_fedrs_scales_the_absent_labels_logits() -> None:
    z = LOGITS.copy()
    z[:, [1, 3, 4]] *= 0.5
    loss, grad = _loss_and_grad("fedrs", alpha=0.5)
    assert loss == pytest.approx(_numpy_ce(z, BATCH_LABELS), rel=1e-6)
    # d loss / d logit_c = scale_c * (softmax(z)_c - [c == y]) / batch
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    onehot = np.eye(5)[BATCH_LABELS]
    scale = np.array([1.0, 0.5, 1.0, 0.5, 0.5])
    np.testing.assert_allclose(grad, scale * (p - onehot) / 4, rtol=1e-5, atol=1e-7)
    # alpha 1 is plain cross-entropy
    assert _loss_and_grad("fedrs", alpha=1.0)[0] == pytest.approx(_numpy_ce(LOGITS, BATCH_LABELS), rel=1e-6)


def test_fedlc_calibrates_present_labels_and_drops_absent_ones() -> None:
    tau = 0.7
    z = LOGITS.copy()
    z[:, 0] -= tau * 2 ** (-0.25)
    z[:, 2] -= tau * 3 ** (-0.25)
    z[:, [1, 3, 4]] = -np.inf
    loss, grad = _loss_and_grad("fedlc", tau=tau)
    assert loss == pytest.approx(_numpy_ce(z, BATCH_LABELS), rel=1e-6)
    assert np.isfinite(grad).all()
    np.testing.assert_array_equal(grad[:, [1, 3, 4]], 0.0)  # absent labels leave the softmax
    # tau 0: cross-entropy restricted to the labels present
    assert _loss_and_grad("fedlc", tau=0.0)[0] == pytest.approx(
        _numpy_ce(np.where(np.isin(np.arange(5), [0, 2]), LOGITS, -np.inf), BATCH_LABELS), rel=1e-6
    )


def test_none_is_plain_cross_entropy() -> None:
    assert label_skew_adjustment("none", CLIENT_LABELS, 5, 0.5, 1.0) is None
    assert _loss_and_grad("none")[0] == pytest.approx(_numpy_ce(LOGITS, BATCH_LABELS), rel=1e-6)


def _trained(fed, positions: np.ndarray, cfg) -> dict[str, torch.Tensor]:
    set_adapter_state(fed.client.model, fed.initial_state)
    train_local(fed.client.model, fed.rows, positions, cfg, seed=1, progress=False)
    return get_adapter_state(fed.client.model)


def test_train_local_uses_the_clients_own_label_counts(tiny_config) -> None:
    """FedRS changes nothing for a client holding every label and changes the update of one missing a label."""
    base = tiny_config("train.max_steps=3")
    fed = prepare_cohort(base)
    pos = fed.splits[0].train
    assert set(fed.rows.labels[torch.as_tensor(pos)].tolist()) == {0, 1, 2}
    rs = tiny_config("train.max_steps=3", "train.label_skew=fedrs")
    plain, fixed = _trained(fed, pos, base.train), _trained(fed, pos, rs.train)
    for k in plain:
        torch.testing.assert_close(plain[k], fixed[k], rtol=0, atol=0)
    two = pos[fed.rows.labels[torch.as_tensor(pos)].numpy() != 2]
    plain, fixed = _trained(fed, two, base.train), _trained(fed, two, rs.train)
    assert any(not torch.equal(plain[k], fixed[k]) for k in plain)


def test_fedlc_leaves_the_head_rows_of_absent_labels_untouched(tiny_config, tmp_path) -> None:
    """Under FedLC an absent label gets no gradient, so its head row and bias do not move; under FedRS they do."""
    fed = prepare_cohort(tiny_config())
    pos = fed.splits[0].train
    two = pos[fed.rows.labels[torch.as_tensor(pos)].numpy() != 2]
    head = [k for k, v in fed.initial_state.items() if "classifier" in k and v.shape[0] == 3]
    assert head
    lc = _trained(fed, two, tiny_config("train.max_steps=3", "train.label_skew=fedlc").train)
    rs = _trained(fed, two, tiny_config("train.max_steps=3", "train.label_skew=fedrs").train)
    for k in head:
        start = fed.initial_state[k]
        assert torch.equal(lc[k][2], start[2]) and not torch.equal(lc[k][:2], start[:2])
        assert not torch.equal(rs[k][2], start[2])
    # and a federation runs with it (the simulator's clients go through train_local)
    summary = simulate(tiny_config("train.label_skew=fedlc"), tmp_path / "run", progress=False)
    assert np.isfinite(summary["final"]["macro_f1"])


def test_config_checks(tiny_config) -> None:
    with pytest.raises(ConfigError, match=r"train\.fedrs_alpha: must be in \[0, 1\], got 1.5"):
        tiny_config("train.fedrs_alpha=1.5")
    with pytest.raises(ConfigError, match=r"train\.fedlc_tau: must be >= 0, got -1"):
        tiny_config("train.fedlc_tau=-1")
    with pytest.raises(ConfigError, match=r"train\.label_skew"):
        tiny_config("train.label_skew=fedavg")
    dp = ["train.record_dp.enabled=true", "train.record_dp.noise_multiplier=1.0"]
    with pytest.raises(ConfigError, match=r"label_skew: must be none with train\.record_dp\.enabled.*fedrs"):
        tiny_config(*dp, "train.label_skew=fedrs")
    assert tiny_config(*dp).train.label_skew == "none"
