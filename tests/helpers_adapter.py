"""Build adapter payloads with random non-zero LoRA factors on the tiny model (no training needed)."""

from __future__ import annotations

from pathlib import Path

import torch

from lorafed.config import LoraSettings, ModelConfig
from lorafed.model.backbone import load_client_model, lora_config_dict
from lorafed.wire.adapter import get_adapter_state
from lorafed.wire.payload import Payload, PayloadMeta

LABELS = ("bad", "good", "meh")


def random_adapter(model_dir: Path, seed: int, r: int = 4, alpha: int = 8, num_examples: int = 10) -> Payload:
    """An adapter of the tiny model whose every tensor is random (B is not zero, so merging matters)."""
    lora = LoraSettings(r=r, alpha=alpha, dropout=0.0, target_modules=("query", "value"))
    client = load_client_model(ModelConfig(str(model_dir), "fp32", lora), LABELS, seed=0)
    g = torch.Generator().manual_seed(seed)
    tensors = {k: 0.3 * torch.randn(v.shape, generator=g) for k, v in get_adapter_state(client.model).items()}
    meta = PayloadMeta(client.fingerprint, lora_config_dict(lora), LABELS, num_examples, 3, f"c{seed}", kind="global")
    return Payload(tensors, meta)
