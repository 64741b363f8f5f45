"""The client-step options added for convergence and speed, checked against independent oracles.

Length bucketing (numpy), the frozen network's dropout switch, the SGD client optimizer (a hand
computed step), LoRA on chosen layers only, and FedAvgM (a numpy transcription of Hsu et al. 2019).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorafed.client.train import frozen_dropout_off, length_bucketed_batches, train_local
from lorafed.config import FederationConfig
from lorafed.engine.cohort import prepare_cohort
from lorafed.errors import ConfigError
from lorafed.server.server_opt import ServerOptSettings, ServerOptState, server_step
from lorafed.server.step import next_global
from lorafed.wire.adapter import get_adapter_state, set_adapter_state


def test_length_buckets_use_every_row_once_and_pad_less() -> None:
    rng = np.random.default_rng(0)
    positions = np.arange(1000, 1000 + 997)  # not a multiple of the batch size
    lengths = rng.integers(5, 129, size=len(positions))
    length_of = dict(zip(positions.tolist(), lengths.tolist(), strict=True))
    batches = length_bucketed_batches(positions, lengths, batch_size=16, seed=3, window=16)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == positions.tolist()  # each row exactly once
    assert all(1 <= len(b) <= 16 for b in batches)
    bucketed = np.mean([max(length_of[int(i)] for i in b) for b in batches])
    shuffled = rng.permutation(positions)
    plain = np.mean([max(length_of[int(i)] for i in shuffled[s : s + 16]) for s in range(0, len(shuffled), 16)])
    # Uniform lengths 5..128: a random batch of 16 pads to ~121; sorted windows of 256 rows to ~70.
    assert plain > 115 and bucketed < 0.7 * plain
    # Same seed, same batches; window 1 is a plain shuffle (batches not sorted).
    again = length_bucketed_batches(positions, lengths, batch_size=16, seed=3, window=16)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))


def test_frozen_dropout_off_makes_training_forward_deterministic(tiny_config) -> None:
    cfg = tiny_config("model.lora.dropout=0.0")
    fed = prepare_cohort(cfg)
    model = fed.client.model
    batch = fed.rows.batch(fed.splits[0].train[:8])
    batch.pop("labels")
    model.train()
    try:
        torch.manual_seed(0)
        a, b = model(**batch).logits, model(**batch).logits
        assert not torch.allclose(a, b)  # BERT's own dropout (0.1) is on in train mode
        with frozen_dropout_off(model) as n:
            assert n > 0
            c, d = model(**batch).logits, model(**batch).logits
        torch.testing.assert_close(c, d, rtol=0, atol=0)
        model.eval()
        torch.testing.assert_close(c, model(**batch).logits, rtol=1e-5, atol=1e-6)  # = eval-mode output
        ps = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
        assert max(ps) == pytest.approx(0.1)  # restored on exit
    finally:
        model.eval()


def test_sgd_step_is_minus_lr_times_the_gradient(tiny_config) -> None:
    """One SGD step (momentum 0, no clipping) moves every trainable tensor by -lr * grad."""
    cfg = tiny_config(
        "train.optimizer=sgd",
        "train.momentum=0",
        "train.learning_rate=0.5",
        "train.max_steps=1",
        "train.batch_size=500",
        "train.max_grad_norm=null",
        "model.lora.dropout=0.0",
        "train.backbone_dropout=false",
    )
    fed = prepare_cohort(cfg)
    model = fed.client.model
    pos = fed.splits[0].train
    # Oracle: the gradient of the mean cross-entropy on all rows (one batch), computed by hand in eval mode.
    set_adapter_state(model, fed.initial_state)
    model.eval()
    batch = fed.rows.batch(pos)
    labels = batch.pop("labels")
    loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for n, p in model.named_parameters() if p.requires_grad])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train_local(model, fed.rows, pos, cfg.train, seed=0, progress=False)
    after = dict(model.named_parameters())
    for n, g in zip(names, grads, strict=True):
        torch.testing.assert_close(after[n].detach(), before[n] - 0.5 * g, rtol=1e-4, atol=1e-6)


def test_lora_on_chosen_layers_only(tiny_config) -> None:
    cfg = tiny_config("model.lora.layers=[1]")
    fed = prepare_cohort(cfg)
    lora_keys = [k for k in get_adapter_state(fed.client.model) if ".lora_" in k]
    assert lora_keys and all(".layer.1." in k for k in lora_keys)
    from lorafed.model.backbone import lora_config_dict

    assert lora_config_dict(cfg.model.lora)["layers"] == [1]
    assert "layers" not in lora_config_dict(tiny_config().model.lora)  # unchanged header by default


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.momentum=1.0", "train.momentum"),
        ("model.lora.layers=[]", "model.lora.layers"),
        ("model.lora.layers=[-1]", "model.lora.layers"),
        ("train.optimizer=adam", "train.optimizer"),
    ],
)
def test_new_fields_are_validated(tiny_config, override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        tiny_config(override)


def test_fedavgm_matches_numpy() -> None:
    rng = np.random.default_rng(1)
    s = ServerOptSettings("fedavgm", lr=1.5, beta1=0.8)  # type: ignore[arg-type]
    x0 = rng.normal(size=(4, 3))
    targets = [x0 + rng.normal(size=x0.shape) * 0.1 for _ in range(4)]
    x, m = x0.copy(), np.zeros_like(x0)
    for t in targets:  # Hsu et al. 2019: m <- beta m + (avg - x); x <- x + lr m
        m = 0.8 * m + (t - x)
        x = x + 1.5 * m
    state, opt = {"w": torch.tensor(x0, dtype=torch.float32)}, ServerOptState()
    for t in targets:
        state, opt = server_step(state, {"w": torch.tensor(t, dtype=torch.float32)}, opt, s)
    np.testing.assert_allclose(state["w"].numpy(), x, rtol=1e-5, atol=1e-5)
    # lr 1 and momentum 0 is plain averaging.
    fcfg = FederationConfig(server_optimizer="fedavgm", server_lr=1.0, server_beta1=0.0)
    avg = {"w": torch.tensor(targets[0], dtype=torch.float32)}
    new, _ = next_global({"w": torch.tensor(x0, dtype=torch.float32)}, avg, fcfg)
    np.testing.assert_allclose(new["w"].numpy(), targets[0], rtol=1e-6, atol=1e-6)


def test_length_sorted_evaluation_returns_logits_in_the_callers_order(tiny_config) -> None:
    from lorafed.metrics import predict_logits

    fed = prepare_cohort(tiny_config())
    model = fed.client.model
    model.eval()
    pos = fed.test_positions[::-1].copy()  # any order
    got = predict_logits(model, fed.rows, pos, batch_size=7)
    with torch.no_grad():  # oracle: every row alone, no padding at all
        want = np.stack(
            [
                model(**{k: v for k, v in fed.rows.batch([int(i)]).items() if k != "labels"}).logits[0].numpy()
                for i in pos
            ]
        )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
