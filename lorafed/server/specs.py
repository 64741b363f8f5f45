"""What a federation's payloads must match, taken from a trusted source.

A round's updates are validated against an :class:`~lorafed.server.validate.UpdateSpec`. Outside the
simulator nobody holds the federation in memory, so the spec is rebuilt from one of two
trusted sources, never from the updates themselves:

* the previous global adapter (``global_rN.safetensors``, written by the server): its header
  gives the base fingerprint, LoRA config and labels, its tensors the names and shapes;
* the run config: the base model is loaded (fp32, no quantization needed) to fingerprint it
  and to build the fresh adapter whose tensor names and shapes every update must carry; the
  labels come from ``data.labels``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from lorafed.config import RunConfig
from lorafed.errors import ConfigError
from lorafed.model.backbone import load_client_model, model_header
from lorafed.server.validate import UpdateSpec
from lorafed.wire.adapter import adapter_spec, get_adapter_state
from lorafed.wire.payload import ModelIdentity, PayloadMeta
from lorafed.wire.reader import load_payload
from lorafed.wire.roles import Aggregation, round_keys, select


def federation_labels(
    config: RunConfig, global_meta: PayloadMeta | None = None, source: str = "config"
) -> tuple[str, ...]:
    """The federation's global label list: from the global adapter's header, else ``data.labels``.

    A client sees only its own rows, so it cannot infer the label list (its file may lack a
    class, and sorted-distinct ids would then differ between clients).

    Raises:
        ConfigError: Neither a global adapter nor ``data.labels`` is given, or both are and differ.
    """
    configured = config.data.labels
    if global_meta is not None:
        if configured is not None and tuple(configured) != tuple(global_meta.labels):
            raise ConfigError(
                [
                    f"data.labels {list(configured)} differs from the global adapter's labels "
                    f"{list(global_meta.labels)}; clients must agree on label ids"
                ],
                source,
            )
        return tuple(global_meta.labels)
    if configured is None:
        raise ConfigError(
            [
                "data.labels: required when no global adapter is given (round 1): every client must use "
                "the same label list in the same order, e.g. data.labels=[bad,good,meh]"
            ],
            source,
        )
    return tuple(configured)


def spec_for(
    identity: ModelIdentity,
    tensors: Mapping[str, torch.Tensor],
    round_: int | None,
    max_num_examples: int | None = None,
) -> UpdateSpec:
    """The spec of updates of a federation: its identity and exactly the tensors ``tensors`` names.

    The one place an :class:`~lorafed.server.validate.UpdateSpec` is built from trusted parts.
    """
    spec = UpdateSpec(
        base_fingerprint=identity.base_fingerprint,
        lora=dict(identity.lora),
        labels=tuple(identity.labels),
        tensors=adapter_spec(tensors),
        round=round_,
    )
    return spec if max_num_examples is None else dataclasses.replace(spec, max_num_examples=max_num_examples)


def spec_from_global(path: str | Path, round_: int | None) -> UpdateSpec:
    """The spec of updates trained from the global adapter at ``path``.

    Raises:
        PayloadError: The file is not a readable lorafed payload.
    """
    payload = load_payload(path)
    return spec_for(ModelIdentity.of(payload.meta), payload.tensors, round_)


def federation_base(config: RunConfig, labels: Sequence[str]) -> tuple[ModelIdentity, dict[str, torch.Tensor]]:
    """The federation's identity and its seeded fresh adapter, from the config (the base loaded in fp32).

    What a server that holds no client model needs: the fingerprint, LoRA config and labels every
    payload must name, and every tensor of the round-0 adapter (names, shapes, starting values).

    Raises:
        ModelError: The base model cannot be loaded.
    """
    client = load_client_model(config.model, labels, config.seed, precision="fp32")
    identity = ModelIdentity(
        client.fingerprint,
        model_header(config.model),
        tuple(labels),
    )
    return identity, get_adapter_state(client.model)


def round_spec(
    identity: ModelIdentity,
    state: Mapping[str, torch.Tensor],
    aggregation: Aggregation,
    round_: int | None,
    max_num_examples: int | None = None,
) -> UpdateSpec:
    """The spec of round ``round_``'s updates: the tensors of ``state`` that mode sends that round.

    FFA sends B and the head, RoLoRA A or B in turn (:func:`lorafed.wire.roles.round_keys`);
    ``round_=None`` means every tensor (a global adapter).
    """
    return spec_for(identity, select(state, round_keys(aggregation, round_, state)), round_, max_num_examples)


def spec_from_config(config: RunConfig, round_: int | None, source: str = "config") -> UpdateSpec:
    """The spec of updates of the federation described by ``config`` (loads the base in fp32).

    Raises:
        ConfigError: ``data.labels`` is not set.
        ModelError: The base model cannot be loaded.
    """
    identity, fresh = federation_base(config, federation_labels(config, None, source))
    return spec_for(identity, fresh, round_)
