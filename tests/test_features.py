"""Head-only rounds on kept features (lorafed.model.features) give what the full model gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DP_MEAN_HEAD

HEAD_ONLY = ["model.pooling=mean", "federation.aggregation=head", "train.max_steps=3", "train.batch_size=8"]


def _two_rounds(cfg, monkeypatch, cached: bool):
    """Client 0's updates of rounds 1 and 2 and the global test logits after each, on a fresh cohort."""
    from lorafed.engine.cohort import prepare_cohort
    from lorafed.metrics import predict_logits

    if not cached:  # the reference: every step runs the whole model, as before the cache
        monkeypatch.setattr("lorafed.client.train.trainable_head", lambda model, dropout: None)
    fed = prepare_cohort(cfg)
    state, out = fed.initial_state, []
    through = [0]  # rows the backbone ran while training
    embeddings = fed.client.model.get_base_model().bert.embeddings
    embeddings.register_forward_hook(lambda _m, _a, output: through.__setitem__(0, through[0] + output.shape[0]))
    for round_ in (1, 2):
        update = fed.client_update(state, 0, round_, progress=False)
        state = {**state, **update.tensors}
        from lorafed.wire.adapter import set_adapter_state

        set_adapter_state(fed.client.model, state)
        before = through[0]
        logits = predict_logits(fed.client.model, fed.rows, fed.test_positions, 16, cfg.train.autocast)
        through[0] = before
        out.append((update.tensors, logits))
    monkeypatch.undo()
    return fed, out, through[0]


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "record-dp"])
def test_head_rounds_on_kept_features_equal_the_full_model(tiny_config, monkeypatch, dp: bool) -> None:
    """Same head tensors and test logits with and without the cache; features computed once per row."""
    from lorafed.model.features import feature_cache

    cfg = tiny_config(*(DP_MEAN_HEAD if dp else HEAD_ONLY), "train.max_steps=3", "train.batch_size=8")
    fed, cached, ran_cached = _two_rounds(cfg, monkeypatch, cached=True)
    _, full, ran_full = _two_rounds(cfg, monkeypatch, cached=False)
    for (t_c, l_c), (t_f, l_f) in zip(cached, full, strict=True):
        assert t_c.keys() == t_f.keys() and t_c
        for k in t_c:
            np.testing.assert_allclose(t_c[k].numpy(), t_f[k].numpy(), atol=1e-5, err_msg=k)
        np.testing.assert_allclose(l_c, l_f, atol=1e-5)
    assert not torch.equal(cached[0][0][next(iter(cached[0][0]))], fed.initial_state[next(iter(cached[0][0]))])
    cache = feature_cache(fed.client.model)
    assert cache is not None and cache.reused > 0
    # Training ran no more rows through the backbone than without the cache, and no row twice.
    assert 0 < ran_cached <= ran_full + 1  # + the one row that learns whether the head input can be kept
    train_rows = len(fed.splits[0].train)
    assert cache.computed <= train_rows + len(np.setdiff1d(fed.test_positions, fed.splits[0].train))


def test_kept_features_follow_the_lora_tensors(tiny_config) -> None:
    """New LoRA values below the head: the cache runs the rows again and scores what the model computes."""
    from lorafed.engine.cohort import prepare_cohort
    from lorafed.metrics import predict_logits
    from lorafed.model.features import enable_feature_cache
    from lorafed.wire.adapter import set_adapter_state

    fed = prepare_cohort(tiny_config(*HEAD_ONLY))
    model, pos = fed.client.model, fed.test_positions[:10]
    cache = enable_feature_cache(model)
    first = predict_logits(model, fed.rows, pos, 4)
    assert cache.computed == len(pos)
    gen = torch.Generator().manual_seed(0)
    moved = {k: torch.randn(v.shape, generator=gen) for k, v in fed.initial_state.items() if "lora_B" in k}
    set_adapter_state(model, {**fed.initial_state, **moved})
    second = predict_logits(model, fed.rows, pos, 4)
    assert cache.computed == 2 * len(pos)
    batch = fed.rows.batch(pos)
    batch.pop("labels")
    with torch.no_grad():
        oracle = model(**batch).logits.numpy()
    np.testing.assert_allclose(second, oracle, atol=1e-5)
    assert np.abs(second - first).max() > 1e-3
    # Back to the first LoRA values: that entry is still kept, nothing runs again.
    set_adapter_state(model, fed.initial_state)
    np.testing.assert_array_equal(predict_logits(model, fed.rows, pos, 4), first)
    assert cache.computed == 2 * len(pos)
