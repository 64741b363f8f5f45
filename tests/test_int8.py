"""lorafed's int8 layers: rounding against numpy, exact forward/backward, peft on top, config, wiring."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lorafed.model.int8 as int8
from lorafed.config import ConfigError, LoraSettings, ModelConfig, TrainConfig, load_config
from lorafed.model.backbone import base_fingerprint, load_client_model
from lorafed.model.int8 import Int8Embedding, Int8Linear, quantize_model_int8, quantize_rowwise_absmax
from lorafed.wire.adapter import get_adapter_state

LABELS = ("x", "y", "z")
LORA = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=("query", "value"))


def _numpy_absmax(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scale = (np.abs(w).max(axis=1).clip(min=1e-12) / np.float32(127)).astype(np.float32)
    return np.clip(np.round(w / scale[:, None]), -127, 127).astype(np.int8), scale


def test_rowwise_quantization_matches_numpy_and_errs_at_most_half_a_step(monkeypatch) -> None:
    monkeypatch.setattr(int8, "_CHUNK_ROWS", 3)  # several chunks, the last one short
    g = torch.Generator().manual_seed(0)
    w = torch.randn(11, 40, generator=g) * torch.logspace(-3, 1, 11)[:, None]
    w[4] = 0.0
    q, scale = quantize_rowwise_absmax(w)
    q_np, scale_np = _numpy_absmax(w.numpy())
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    np.testing.assert_array_equal(q.numpy(), q_np)
    np.testing.assert_allclose(scale.numpy(), scale_np, rtol=1e-7)
    err = (int8.dequantize_rowwise(q, scale) - w).abs()
    assert bool((err <= scale[:, None] / 2 * (1 + 1e-5) + 1e-12).all())
    assert int(q.abs().max(dim=1).values[0]) == 127  # every non-zero row uses the full range
    assert not q[4].any()


def test_rowwise_quantization_refuses_non_matrices() -> None:
    with pytest.raises(ValueError, match=r"2-D float weight, got shape \(3,\)"):
        quantize_rowwise_absmax(torch.ones(3))
    with pytest.raises(ValueError, match=r"dtype torch\.int64"):
        quantize_rowwise_absmax(torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="one scale per row"):
        Int8Linear(torch.zeros(2, 3, dtype=torch.int8), torch.ones(3))


def test_int8_linear_forward_and_input_grad_equal_the_dequantized_reference() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 10)
    layer = Int8Linear.from_float(lin)
    w_ref = layer.dequantize()  # a constant: the oracle is plain F.linear on it
    x = torch.randn(3, 5, 24, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = layer(x), F.linear(x_ref, w_ref, lin.bias.detach())
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-6)
    assert layer.weight.grad is None and not layer.weight.requires_grad
    assert float((y - lin(x)).detach().abs().max()) < 0.02  # and the weight rounding is small


def test_int8_linear_under_bf16_autocast_dequantizes_to_bf16() -> None:
    torch.manual_seed(6)
    layer = Int8Linear.from_float(torch.nn.Linear(16, 8))
    x = torch.randn(5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    ref = F.linear(x.detach().bfloat16(), layer.dequantize(torch.bfloat16), layer.bias.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


def test_int8_linear_bias_gradient_when_the_bias_trains() -> None:
    torch.manual_seed(1)
    layer = Int8Linear.from_float(torch.nn.Linear(6, 4))
    layer.bias.requires_grad_(True)
    x = torch.randn(7, 6)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.bias.grad, torch.full((4,), 7.0))


def test_int8_linear_saves_no_float_weight_for_backward() -> None:
    layer = Int8Linear.from_float(torch.nn.Linear(32, 16))
    x = torch.randn(4, 32, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    assert {t.data_ptr() for t in saved} == {layer.weight.data_ptr(), layer.weight_scale.data_ptr()}
    assert all(t.dtype == torch.int8 or t.numel() == 16 for t in saved)


def test_conversion_from_bitsandbytes_reuses_its_codes() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    torch.manual_seed(2)
    lin = torch.nn.Linear(64, 32)
    stock = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False, threshold=0.0)
    stock.load_state_dict(lin.state_dict())
    stock = stock.to("cpu")
    layer = Int8Linear.from_bnb(stock)
    assert torch.equal(layer.weight, stock.weight.CB)
    torch.testing.assert_close(layer.weight_scale, stock.weight.SCB / 127)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), stock(x).float(), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="holds no int8 weight"):
        Int8Linear.from_bnb(lin)


def test_int8_embedding_looks_up_dequantized_rows() -> None:
    torch.manual_seed(3)
    emb = torch.nn.Embedding(50, 8, padding_idx=0)
    q = Int8Embedding(emb)
    ids = torch.tensor([[0, 5, 49], [7, 7, 1]])
    torch.testing.assert_close(q(ids), q.dequantize()[ids], rtol=0, atol=0)
    assert q.weight.dtype == torch.int8 and q.padding_idx == 0 and not q(ids)[0, 0].any()
    assert float((q(ids) - emb(ids)).detach().abs().max()) < 0.02
    with pytest.raises(ValueError, match=r"max_norm \(got 1.0\)"):
        Int8Embedding(torch.nn.Embedding(4, 2, max_norm=1.0))


def test_peft_wraps_int8_linears_and_trains_only_lora_and_head() -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(4)
    net = torch.nn.Sequential()
    net.add_module("query", torch.nn.Linear(16, 16))
    net.add_module("classifier", torch.nn.Linear(16, 2))
    quantize_model_int8(net)
    assert isinstance(net.query, Int8Linear) and type(net.classifier) is torch.nn.Linear
    model = get_peft_model(net, LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    model(torch.randn(5, 16)).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    assert trainable and all(".lora_" in n or "classifier" in n for n in trainable)
    lora_b = model.base_model.model.query.lora_B["default"].weight  # B starts at 0, so A's grad is 0
    assert lora_b.dtype == torch.float32 and lora_b.grad.abs().sum() > 0


@pytest.mark.parametrize("embeddings", [True, False])
def test_lorafed_int8_backbone_trains_a_step(tiny_model_dir: Path, embeddings: bool) -> None:
    cfg = ModelConfig(str(tiny_model_dir), "int8", quantize_embeddings=embeddings, lora=LORA)
    cm = load_client_model(cfg, LABELS, seed=0)
    bert = cm.model.base_model.model.bert
    assert isinstance(bert.encoder.layer[0].attention.self.query.base_layer, Int8Linear)
    assert isinstance(bert.encoder.layer[1].output.dense, Int8Linear)
    assert isinstance(bert.embeddings.word_embeddings, Int8Embedding) is embeddings
    assert type(bert.pooler.dense) is torch.nn.Linear  # INT8_SKIP_MODULES stay float
    frozen = {n: p.detach().clone() for n, p in cm.model.named_parameters() if not p.requires_grad}
    params = [p for p in cm.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(5, 1000, (4, 9))
    out = cm.model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1, 2, 0]))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in cm.model.named_parameters() if not p.requires_grad)


def test_every_backend_keeps_the_fingerprint_and_the_adapter_keys(tiny_model_dir: Path) -> None:
    pytest.importorskip("bitsandbytes")
    models = {
        name: load_client_model(ModelConfig(str(tiny_model_dir), prec, LORA, int8_backend=backend), LABELS, seed=0)
        for name, prec, backend in [
            ("fp32", "fp32", "lorafed"),
            ("lorafed", "int8", "lorafed"),
            ("bnb", "int8", "bitsandbytes"),
        ]
    }
    assert {m.fingerprint for m in models.values()} == {base_fingerprint(tiny_model_dir)}
    specs = {n: {k: tuple(v.shape) for k, v in get_adapter_state(m.model).items()} for n, m in models.items()}
    assert specs["lorafed"] == specs["fp32"] == specs["bnb"]
    ids = torch.randint(5, 1000, (3, 8))
    with torch.no_grad():
        logits = {n: m.model.eval()(input_ids=ids).logits for n, m in models.items()}
    assert float((logits["lorafed"] - logits["fp32"]).abs().max()) < 0.05


def test_an_int8_trained_adapter_exports_through_the_fp32_base(tiny_model_dir: Path, tmp_path: Path) -> None:
    from lorafed.model.backbone import lora_config_dict
    from lorafed.serve.export import export_adapter
    from lorafed.wire.payload import Payload, PayloadMeta

    cm = load_client_model(ModelConfig(str(tiny_model_dir), "int8", lora=LORA), LABELS, seed=0)
    g = torch.Generator().manual_seed(5)
    tensors = {k: 0.3 * torch.randn(v.shape, generator=g) for k, v in get_adapter_state(cm.model).items()}
    meta = PayloadMeta(cm.fingerprint, lora_config_dict(LORA), LABELS, 10, 1, "c0", kind="global")
    report = export_adapter(Payload(tensors, meta), tmp_path / "merged", str(tiny_model_dir))
    assert report.max_abs_diff <= 1e-4


def test_gradient_checkpointing_changes_memory_not_the_update(tiny_config) -> None:
    from lorafed.client.train import train_local
    from lorafed.engine.cohort import prepare_cohort
    from lorafed.wire.adapter import set_adapter_state

    config = tiny_config("model.lora.dropout=0.1", "train.max_steps=3")
    fed = prepare_cohort(config)
    states, losses = [], []
    for ckpt in (False, True):
        set_adapter_state(fed.client.model, fed.initial_state)
        train = dataclasses.replace(config.train, gradient_checkpointing=ckpt)
        result = train_local(fed.client.model, fed.rows, fed.splits[0].train, train, seed=3, progress=False)
        states.append(get_adapter_state(fed.client.model))
        losses.append(result.mean_loss)
    encoder = fed.client.model.get_base_model().bert.encoder
    assert all(layer.gradient_checkpointing for layer in encoder.layer)
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)  # dropout masks are replayed, not redrawn
    for key, value in states[0].items():
        torch.testing.assert_close(states[1][key], value, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_training_stays_close_to_fp32_and_keeps_fp32_adapters(tiny_config) -> None:
    from lorafed.client.train import train_local
    from lorafed.engine.cohort import prepare_cohort
    from lorafed.wire.adapter import set_adapter_state

    # Calibrated with the frozen dropout on: without it the tiny model's gradients are near zero on many
    # coordinates, where bf16 rounding flips Adam's sign-like first steps (relative deviation 0.26).
    config = tiny_config("model.precision=int8", "train.max_steps=3", "train.backbone_dropout=true")
    fed = prepare_cohort(config)
    states, losses = [], []
    for mode in ("none", "bf16"):
        set_adapter_state(fed.client.model, fed.initial_state)
        train = dataclasses.replace(config.train, autocast=mode)
        result = train_local(fed.client.model, fed.rows, fed.splits[0].train, train, seed=3, progress=False)
        states.append(get_adapter_state(fed.client.model))
        losses.append(result.mean_loss)
    assert all(p.dtype == torch.float32 for p in fed.client.model.parameters() if p.requires_grad)
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)  # bf16 rounds; it does not change the math
    # Adam turns tiny gradient differences into full steps element-wise: compare whole updates.
    deltas = [torch.cat([(st[k] - fed.initial_state[k]).flatten() for k in sorted(st)]) for st in states]
    assert float((deltas[1] - deltas[0]).norm() / deltas[0].norm()) < 0.1


def test_config_validates_the_int8_options() -> None:
    assert ModelConfig().int8_backend == "lorafed" and ModelConfig().quantize_embeddings
    assert not TrainConfig().gradient_checkpointing and TrainConfig().autocast == "auto"
    with pytest.raises(ConfigError) as err:
        load_config(
            None,
            [
                "data.path=x.csv",
                "model.int8_backend=bnb",
                "model.quantize_embeddings=maybe",
                "train.gradient_checkpointing=1",
                "train.autocast=fp16",
            ],
        )
    text = str(err.value)
    assert "model.int8_backend: 'bnb' is not one of 'lorafed', 'bitsandbytes'" in text
    assert "model.quantize_embeddings: expected true or false, got 'maybe'" in text
    assert "train.gradient_checkpointing: expected true or false, got 1" in text
    assert "train.autocast: 'fp16' is not one of 'auto', 'none', 'bf16'" in text
    ok = load_config(None, ["data.path=x.csv", "model.int8_backend=bitsandbytes", "train.gradient_checkpointing=true"])
    assert ok.model.int8_backend == "bitsandbytes" and ok.train.gradient_checkpointing
