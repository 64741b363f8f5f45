"""The adapter state: the LoRA A/B tensors and the head, the only tensors that leave a client.

Keys follow peft's on-disk adapter format (``base_model.model.<module>.lora_A.weight``,
``base_model.model.classifier.weight``), so a lorafed payload is also a peft adapter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lorafed.errors import PayloadValidationError


def get_adapter_state(model: Any) -> dict[str, torch.Tensor]:
    """Copy the trainable adapter tensors (LoRA A/B and head) out of a peft model, as fp32."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in state.items()}


def set_adapter_state(model: Any, state: Mapping[str, torch.Tensor], client: str = "global") -> None:
    """Load adapter tensors into a peft model (a subset of keys is allowed, unknown keys are not).

    Raises:
        PayloadValidationError: A key does not exist in the model.
    """
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, dict(state))
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise PayloadValidationError(
            client, "tensors", "keys of this model's adapter", f"unknown keys {unexpected[:3]}"
        )


def adapter_spec(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype) of an adapter state; what every update must match."""
    return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()}


def is_lora_key(key: str) -> bool:
    """True for LoRA factor tensors (A or B), False for head tensors."""
    return ".lora_A." in key or ".lora_B." in key
