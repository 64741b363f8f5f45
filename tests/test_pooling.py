"""model.pooling: mean: the appended layer computes the masked mean (numpy oracle), end to end."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from lorafed.config import ConfigError, LoraSettings, ModelConfig
from lorafed.model.backbone import load_client_model, lora_config_dict
from lorafed.model.pooling import POOLER_GAIN, append_mean_pooling_layer
from lorafed.wire.adapter import get_adapter_state
from lorafed.wire.payload import Payload, PayloadMeta

LABELS = ("bad", "good", "meh")


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 1100, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # padded rows: the mean must leave the padding out
    mask[2, 2:] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def _pooled_oracle(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """tanh(gain * LayerNorm(masked mean of the token states)), in numpy."""
    m = mask[..., None].astype(np.float64)
    mean = (hidden * m).sum(1) / m.sum(1)
    ln = (mean - mean.mean(1, keepdims=True)) / np.sqrt(mean.var(1, keepdims=True) + 1e-12)
    return np.tanh(POOLER_GAIN * ln)


def _base_hidden(model_dir: Path, batch: dict[str, torch.Tensor]) -> np.ndarray:
    from transformers import AutoModel

    base = AutoModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return base(**batch).last_hidden_state.double().numpy()


def test_appended_layer_is_the_masked_mean_and_reloads_in_plain_transformers(tiny_model_dir, tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification

    batch = _batch()
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3).eval()
    layers = model.config.num_hidden_layers
    expected = _pooled_oracle(_base_hidden(tiny_model_dir, batch), batch["attention_mask"].numpy())
    assert append_mean_pooling_layer(model) == layers
    with torch.no_grad():
        pooled = model.bert(**batch).pooler_output.double().numpy()
    # [CLS]'s own state enters with weight 1/1000 against the mean: a few thousandths of a LayerNorm unit.
    assert np.abs(pooled - expected).max() < 2e-4
    assert np.abs(pooled - _pooled_oracle(_base_hidden(tiny_model_dir, batch), np.ones((3, 9)))).max() > 1e-2
    model.save_pretrained(tmp_path / "m")
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    assert again.config.num_hidden_layers == layers + 1
    with torch.no_grad():
        assert torch.allclose(again(**batch).logits, model(**batch).logits, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_client_model_reads_the_mean_and_leaves_the_pooling_layer_without_lora(tiny_model_dir, precision) -> None:
    lora = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=("query", "value"))
    cm = load_client_model(ModelConfig(str(tiny_model_dir), precision, lora, pooling="mean"), LABELS, seed=0)
    names = [n for n, _ in cm.model.named_modules() if n.endswith("lora_A.default")]
    assert names and all(".layer.2." not in n for n in names)  # layers 0-1 are the base's, 2 the pooling layer
    assert {".layer.0.", ".layer.1."} <= {f".layer.{n.split('.layer.')[1].split('.')[0]}." for n in names}
    batch = _batch()
    cm.model.eval()
    with torch.no_grad():
        logits = cm.model(**batch).logits.double().numpy()
    head = {
        k.rsplit(".", 1)[-1]: v.double().numpy() for k, v in get_adapter_state(cm.model).items() if "classifier" in k
    }
    pooled = _pooled_oracle(_base_hidden(tiny_model_dir, batch), batch["attention_mask"].numpy())
    tol = 2e-3 if precision == "fp32" else 5e-2  # int8 weights of the base layers
    assert np.abs(logits - (pooled @ head["weight"].T + head["bias"])).max() < tol
    assert lora_config_dict(lora, "mean")["pooling"] == "mean" and "pooling" not in lora_config_dict(lora)


def test_mean_pooled_adapter_exports_to_a_plain_model(tiny_model_dir, tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification

    from lorafed.serve.export import export_adapter, load_adapter_model

    lora = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=("query", "value"))
    cm = load_client_model(ModelConfig(str(tiny_model_dir), "fp32", lora, pooling="mean"), LABELS, seed=0)
    g = torch.Generator().manual_seed(1)
    tensors = {k: 0.3 * torch.randn(v.shape, generator=g) for k, v in get_adapter_state(cm.model).items()}
    meta = PayloadMeta(cm.fingerprint, lora_config_dict(lora, "mean"), LABELS, 10, 3, "c1", kind="global")
    payload = Payload(tensors, meta)
    report = export_adapter(payload, tmp_path / "out", str(tiny_model_dir), with_onnx=False)
    assert report.max_abs_diff <= 1e-4
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert plain.config.num_hidden_layers == 3
    batch = _batch()
    with torch.no_grad():
        expected = load_adapter_model(payload, str(tiny_model_dir)).model(**batch).logits
        assert torch.allclose(plain(**batch).logits, expected, atol=1e-4)
    # The same tensors under a [CLS] header are another model: not the mean-pooled logits.
    cls_payload = Payload(tensors, dataclasses.replace(meta, lora=lora_config_dict(lora)))
    with torch.no_grad():
        assert not torch.allclose(load_adapter_model(cls_payload, str(tiny_model_dir)).model(**batch).logits, expected)


def test_server_refuses_an_update_of_the_other_pooling(tiny_model_dir) -> None:
    from lorafed.errors import PayloadValidationError
    from lorafed.server.validate import UpdateSpec, validate_update
    from lorafed.wire.adapter import adapter_spec

    lora = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=("query", "value"))
    cm = load_client_model(ModelConfig(str(tiny_model_dir), "fp32", lora, pooling="mean"), LABELS, seed=0)
    state = get_adapter_state(cm.model)
    spec = UpdateSpec(cm.fingerprint, lora_config_dict(lora, "mean"), LABELS, adapter_spec(state), round=1)
    ok = PayloadMeta(cm.fingerprint, lora_config_dict(lora, "mean"), LABELS, 10, 1, "c0")
    validate_update(Payload(state, ok), spec)
    cls_meta = dataclasses.replace(ok, lora=lora_config_dict(lora))  # the same tensors, a [CLS] model's header
    with pytest.raises(PayloadValidationError, match="pooling"):
        validate_update(Payload(state, cls_meta), spec)


def test_config_refuses_mean_pooling_on_bitsandbytes(tiny_config) -> None:
    with pytest.raises(ConfigError, match=r"model\.pooling: mean .* int8_backend lorafed"):
        tiny_config("model.pooling=mean", "model.precision=int8", "model.int8_backend=bitsandbytes")
    with pytest.raises(ConfigError, match=r"model\.pooling"):
        tiny_config("model.pooling=max")


def test_record_dp_head_on_mean_pooling_runs_and_exports(tiny_config, tmp_path) -> None:
    """The clothing DP recipe's model on the tiny BERT: every header says mean; the global exports plainly."""
    from transformers import AutoModelForSequenceClassification

    from lorafed.engine.inprocess import simulate
    from lorafed.serve.export import export_adapter
    from lorafed.wire.reader import load_payload

    dp = ["train.record_dp.enabled=true", "train.record_dp.noise_multiplier=1.0", "train.record_dp.noise_seed=3"]
    cfg = tiny_config(
        "model.pooling=mean", "federation.aggregation=head", "federation.rounds=2", "train.max_steps=2",
        "train.length_bucketing=false", "train.class_weighting=none", *dp,
    )  # fmt: skip
    out = tmp_path / "run"
    simulate(cfg, out, progress=False)
    updates = sorted((out / "rounds" / "r2").glob("*.safetensors"))
    assert updates and all(load_payload(p).meta.lora["pooling"] == "mean" for p in updates)
    glob = load_payload(out / "rounds" / "global_r2.safetensors")
    assert glob.meta.lora["pooling"] == "mean"
    assert all(float(load_payload(p).meta.metrics["epsilon"]) > 0 for p in updates)
    report = export_adapter(glob, tmp_path / "export", cfg.model.name_or_path, with_onnx=False)
    assert report.max_abs_diff <= 1e-4
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export")
    assert plain.config.num_hidden_layers == 3


def test_num_layers_pools_an_earlier_layer_and_exports_plainly(tiny_model_dir, tmp_path) -> None:
    """model.num_layers 1 of 2: the head reads the mean after layer 1 (oracle: the full base's hidden_states[1])."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    from lorafed.serve.export import export_adapter

    lora = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=("query", "value"))
    cm = load_client_model(ModelConfig(str(tiny_model_dir), "fp32", lora, pooling="mean", num_layers=1), LABELS, 0)
    names = {n.split(".layer.")[1].split(".")[0] for n, _ in cm.model.named_modules() if n.endswith("lora_A.default")}
    assert names == {"0"}  # layer 0 kept with LoRA, layer 1 is now the pooling layer
    g = torch.Generator().manual_seed(1)
    tensors = {k: 0.3 * torch.randn(v.shape, generator=g) for k, v in get_adapter_state(cm.model).items()}
    for k, v in tensors.items():
        if "lora_B" in k:
            v.zero_()  # LoRA off: the oracle is the plain base's layer-1 states
    head = {k.rsplit(".", 1)[-1]: v.double().numpy() for k, v in tensors.items() if "classifier" in k}
    meta = PayloadMeta(cm.fingerprint, lora_config_dict(lora, "mean", 1), LABELS, 10, 3, "c1", kind="global")
    assert meta.lora["num_layers"] == 1 and "num_layers" not in lora_config_dict(lora, "mean")
    export_adapter(Payload(tensors, meta), tmp_path / "out", str(tiny_model_dir), with_onnx=False)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert plain.config.num_hidden_layers == 2
    batch = _batch()
    base = AutoModel.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        hidden = base(**batch, output_hidden_states=True).hidden_states[1].double().numpy()
        logits = plain(**batch).logits.double().numpy()
        feature = plain.bert(**batch).pooler_output.double().numpy()
    pooled = _pooled_oracle(hidden, batch["attention_mask"].numpy())
    here = np.abs(feature - pooled).max()
    assert here < 2e-4
    assert np.abs(logits - (pooled @ head["weight"].T + head["bias"])).max() < 2e-3
    pooled_last = _pooled_oracle(_base_hidden(tiny_model_dir, batch), batch["attention_mask"].numpy())
    assert np.abs(feature - pooled_last).max() > 5 * here  # not the last layer's mean


def test_num_layers_is_checked(tiny_config, tiny_model_dir) -> None:
    from lorafed.errors import ModelError

    with pytest.raises(ConfigError, match=r"model\.num_layers: must be null or >= 1"):
        tiny_config("model.num_layers=0")
    with pytest.raises(ConfigError, match=r"model.lora.layers \[1\]: with model.num_layers 1 the layers are 0-0"):
        tiny_config("model.num_layers=1", "model.lora.layers=[1]")
    with pytest.raises(ModelError, match=r"model\.num_layers 5: the backbone has 2 layers"):
        load_client_model(ModelConfig(str(tiny_model_dir), "fp32", num_layers=5), LABELS, 0)
