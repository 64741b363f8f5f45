"""Backbone loading: fingerprints, frozen base, trainable LoRA + head, seeded init, precisions."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lorafed.config import PACKAGED_BACKBONE, ModelConfig
from lorafed.errors import ModelError
from lorafed.model.backbone import base_fingerprint, load_client_model, resolve_backbone


def test_packaged_backbone_is_found_without_network() -> None:
    path = resolve_backbone(PACKAGED_BACKBONE)
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def test_fingerprint_tracks_the_weights_not_the_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert base_fingerprint(copy) == base_fingerprint(tiny_model_dir)
    weights = load_file(copy / "model.safetensors")
    save_file(dict(reversed(list(weights.items()))), copy / "model.safetensors", metadata={"format": "pt", "x": "1"})
    assert base_fingerprint(copy) == base_fingerprint(tiny_model_dir)  # same tensors, other layout
    key = next(k for k in weights if "encoder.layer.0" in k)
    weights[key] = weights[key] + 1e-3
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    assert base_fingerprint(copy) != base_fingerprint(tiny_model_dir)


def test_only_lora_and_head_train_and_init_is_seeded(tiny_model_dir: Path) -> None:
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), precision="fp32")
    a = load_client_model(cfg, ("x", "y", "z"), seed=11)
    trainable = [n for n, p in a.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n or "classifier" in n for n in trainable)
    assert any("classifier" in n for n in trainable)
    assert a.model.config.id2label == {0: "x", 1: "y", 2: "z"}
    b = load_client_model(cfg, ("x", "y", "z"), seed=11)
    c = load_client_model(cfg, ("x", "y", "z"), seed=12)
    sa, sb, sc = (dict(m.model.named_parameters()) for m in (a, b, c))
    for n in trainable:
        torch.testing.assert_close(sa[n], sb[n], rtol=0, atol=0)
    assert any(not torch.equal(sa[n], sc[n]) for n in trainable)


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_low_precision_backbones_run_forward_and_backward(tiny_model_dir: Path, precision: str) -> None:
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), precision=precision)
    cm = load_client_model(cfg, ("x", "y"), seed=0)
    assert cm.fingerprint == base_fingerprint(tiny_model_dir)  # fingerprint ignores the load precision
    if precision == "int8":
        q = cm.model.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer
        assert q.weight.dtype == torch.int8
    ids = torch.randint(5, 1000, (2, 7))
    out = cm.model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1]))
    out.loss.backward()
    grads = [p.grad for p in cm.model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_missing_model_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="model directory not found"):
        resolve_backbone(str(tmp_path / "nope" / "model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a transformers model directory"):
        resolve_backbone(str(tmp_path / "empty"))
