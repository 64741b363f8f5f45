"""Client training: the loss falls, the base stays frozen, a round is reproducible."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorafed.client.train import planned_steps, train_local
from lorafed.engine.cohort import prepare_cohort
from lorafed.metrics import evaluate
from lorafed.wire.adapter import get_adapter_state, set_adapter_state


def test_training_learns_and_leaves_the_base_untouched(tiny_config) -> None:
    cfg = tiny_config("train.max_steps=40", "train.learning_rate=3e-2")
    fed = prepare_cohort(cfg)
    model = fed.client.model
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train_pos = np.concatenate([s.train for s in fed.splits])
    before = evaluate(model, fed.rows, fed.test_positions, 64, fed.data.label_names)
    res = train_local(model, fed.rows, train_pos, cfg.train, seed=1, progress=False)
    after = evaluate(model, fed.rows, fed.test_positions, 64, fed.data.label_names)
    assert res.steps == 40 and res.num_examples == len(train_pos)
    assert after.loss < before.loss and after.accuracy > before.accuracy
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_same_seed_same_update(tiny_config) -> None:
    cfg = tiny_config("train.max_steps=5", "model.lora.dropout=0.1")
    fed = prepare_cohort(cfg)
    outs = []
    for _ in range(2):
        set_adapter_state(fed.client.model, fed.initial_state)
        train_local(fed.client.model, fed.rows, fed.splits[0].train, cfg.train, seed=3, progress=False)
        outs.append(get_adapter_state(fed.client.model))
    for k in outs[0]:
        torch.testing.assert_close(outs[0][k], outs[1][k], rtol=0, atol=0)


def test_planned_steps(tiny_config) -> None:
    cfg = tiny_config("train.max_steps=null", "train.epochs=2", "train.batch_size=8")
    assert planned_steps(17, cfg.train) == 2 * 3


def test_balanced_class_weights_match_sklearn() -> None:
    from types import SimpleNamespace

    from sklearn.utils.class_weight import compute_class_weight

    from lorafed.client.train import balanced_class_weights

    labels = torch.tensor([0, 0, 0, 0, 0, 0, 2, 2, 3])
    model = SimpleNamespace(config=SimpleNamespace(num_labels=5))
    got = balanced_class_weights(labels, model)
    expected = compute_class_weight("balanced", classes=np.array([0, 2, 3]), y=labels.numpy())
    np.testing.assert_allclose(got[[0, 2, 3]].numpy(), expected, rtol=1e-6)
    assert got[1] == 0 and got[4] == 0


def test_weighted_loss_is_the_weighted_mean_of_per_row_cross_entropy() -> None:
    from lorafed.client.train import client_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3, generator=g)
    labels = torch.tensor([0, 0, 0, 0, 1, 2])
    w = torch.tensor([0.5, 2.0, 2.0])
    log_p = torch.log_softmax(logits, dim=1).numpy()
    per_row = -log_p[np.arange(6), labels.numpy()]
    expected = (w.numpy()[labels.numpy()] * per_row).sum() / w.numpy()[labels.numpy()].sum()
    assert float(client_loss(logits, labels, w)) == pytest.approx(expected, rel=1e-6)
    assert float(client_loss(logits, labels, None)) == pytest.approx(per_row.mean(), rel=1e-6)
