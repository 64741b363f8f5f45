"""The head's input, computed once: rounds that train only the classifier head skip the backbone.

When a round trains the head alone (``federation.aggregation: head``, and so the record-level DP
recipe), everything below the head is frozen: the int8 backbone, the pooling and the LoRA
tensors, which only change in rounds that train them. The head's input for a row is then the
same in every step and every round, so :class:`FeatureCache` runs the network below the head
once per row and keeps the result; each later step is a matrix product on the kept rows. On
clothing (a) with the DP recipe that replaces about 8,400 backbone passes per round with one
pass over each client's training rows for the whole run.

A cached feature is only reused while it is still the feature the model would compute:

* the key holds a digest of every adapter tensor that is not the head's (the LoRA tensors): a
  global adapter that brings other LoRA values makes a new entry, one that brings the same ones
  (every round of ``aggregation: head``) does not;
* the frozen backbone is never written after loading (:func:`lorafed.model.backbone.load_client_model`);
* rows are computed in eval mode, so only where nothing below the head drops out in training:
  :func:`lorafed.client.train.frozen_dropout_off` (``train.backbone_dropout: false``, the default)
  switches off every dropout of the frozen network, LoRA's too when LoRA is frozen;
* ``autocast`` is part of the key.

Only heads whose input is one vector per row are cached (BERT's classifier reads the pooled
[CLS] or mean feature); a head that reads every token's state (RoBERTa's) runs the full model.
"""

from __future__ import annotations

import hashlib
import logging
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lorafed.autocast import autocast_context
from lorafed.data.tokens import TokenizedRows
from lorafed.wire.roles import tensor_role

logger = logging.getLogger(__name__)

#: The attribute of a model that holds its cache (set by :func:`enable_feature_cache`).
CACHE_ATTR = "lorafed_feature_cache"
#: No cache above this size (rows x feature width x 4 bytes): the model runs as before.
MAX_CACHE_BYTES = 2 << 30


def head_module(model: Any) -> torch.nn.Module | None:
    """The module that holds every head tensor of a peft ``model`` (its trained copy of the classifier).

    ``None`` without one (no peft ``modules_to_save``), or when the head's tensors do not share
    one module below the root.
    """
    names = [n for n, _ in model.named_parameters() if ".modules_to_save." in n]
    if not names:
        return None
    parts = [n.split(".")[:-1] for n in names]
    common: list[str] = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    if not common:
        return None
    return model.get_submodule(".".join(common))


def below_head_digest(model: Any) -> str:
    """A digest of the trainable-by-design tensors below the head (LoRA), by value."""
    digest = hashlib.blake2b(digest_size=16)
    for name, p in model.named_parameters():
        if tensor_role(name) != "head" and ("lora_" in name):
            digest.update(name.encode())
            digest.update(p.detach().float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class _Entry:
    feats: torch.Tensor
    have: np.ndarray = field(repr=False)
    rows: Callable[[], TokenizedRows | None] = field(repr=False)


class FeatureCache:
    """Per-row head inputs of one model, reused while the network below the head is unchanged.

    Holds up to ``max_entries`` keys (rows, LoRA digest, autocast), the least recently used
    dropped first, within ``max_bytes`` together.
    """

    def __init__(self, max_bytes: int = MAX_CACHE_BYTES, max_entries: int = 4) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._entries: dict[tuple[int, str, str], _Entry] = {}  # least recently used first
        self.computed = 0
        self.reused = 0

    def features(
        self, model: Any, rows: TokenizedRows, positions: np.ndarray, batch_size: int, autocast: str
    ) -> torch.Tensor | None:
        """The head's input for ``rows[positions]``, in order; ``None`` when it cannot be cached.

        Rows not yet kept for the current key are run through the model (eval mode, no grad,
        shortest first) with a hook that records the head's input.
        """
        head = head_module(model)
        pos = np.asarray(positions, dtype=np.int64)
        if head is None or not len(pos):
            return None
        key = (id(rows), below_head_digest(model), autocast)
        entry = self._entries.pop(key, None)
        if entry is not None and entry.rows() is not rows:  # an id can be reused once its rows are gone
            entry = None
        missing = np.unique(pos if entry is None else pos[~entry.have[pos]])
        if len(missing):
            got = _run_below_head(model, head, rows, missing, batch_size, autocast)
            if got is None:
                return None
            if entry is None:
                size = len(rows) * got.shape[1] * got.element_size()
                if size > self.max_bytes:
                    logger.debug("feature cache: %d rows x %d too large; computed, not kept", len(rows), got.shape[1])
                    return got[torch.from_numpy(np.searchsorted(missing, pos))]
                feats = torch.zeros((len(rows), got.shape[1]), dtype=got.dtype)
                entry = _Entry(feats, np.zeros(len(rows), bool), weakref.ref(rows))
            entry.feats[torch.from_numpy(missing)] = got
            entry.have[missing] = True
            self.computed += len(missing)
        self.reused += len(pos) - len(missing)
        self._entries[key] = entry
        self._evict()
        return entry.feats[torch.from_numpy(pos)]

    def _evict(self) -> None:
        """Drop the least recently used entries beyond ``max_entries`` or ``max_bytes``."""

        def size() -> int:
            return sum(e.feats.numel() * e.feats.element_size() for e in self._entries.values())

        while len(self._entries) > 1 and (len(self._entries) > self.max_entries or size() > self.max_bytes):
            del self._entries[next(iter(self._entries))]


@contextmanager
def _capture_input(head: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record the head's input at every call of ``head`` within the block."""
    seen: list[torch.Tensor] = []

    def pre_hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        seen.append(args[0].detach())

    handle = head.register_forward_pre_hook(pre_hook)
    try:
        yield seen
    finally:
        handle.remove()


def _run_below_head(
    model: Any, head: torch.nn.Module, rows: TokenizedRows, positions: np.ndarray, batch_size: int, autocast: str
) -> torch.Tensor | None:
    """The head's input for ``rows[positions]`` (in order), or ``None`` if it is not one vector per row."""
    was_training = model.training
    model.eval()
    order = np.argsort(rows.lengths(positions), kind="stable")
    chunks: list[torch.Tensor] = []
    try:
        with _capture_input(head) as seen:
            for start in range(0, len(order), batch_size):
                batch = rows.batch(positions[order[start : start + batch_size]])
                batch.pop("labels")
                with torch.no_grad(), autocast_context(model, autocast):
                    model(**batch)
                if len(seen) != 1:
                    return None
                x = seen.pop()
                if x.dim() != 2 or not x.is_floating_point() or x.shape[0] != len(batch["input_ids"]):
                    return None
                chunks.append(x)
    finally:
        model.train(was_training)
    feats = torch.cat(chunks)
    out = torch.empty_like(feats)
    out[torch.from_numpy(order)] = feats
    return out


def trainable_head(model: Any, backbone_dropout: bool) -> torch.nn.Module | None:
    """The head module when a training round may read cached features, else ``None``.

    That is when every trainable tensor belongs to the head and nothing below it drops out in
    training (``train.backbone_dropout: false``; see the module docstring).
    """
    if backbone_dropout:
        return None
    head = head_module(model)
    if head is None:
        return None
    own = {id(p) for p in head.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable or any(id(p) not in own for p in trainable):
        return None
    return head


def enable_feature_cache(model: Any) -> FeatureCache:
    """Give ``model`` a :class:`FeatureCache` (kept on the model; the same one on later calls)."""
    cache = getattr(model, CACHE_ATTR, None)
    if cache is None:
        cache = FeatureCache()
        object.__setattr__(model, CACHE_ATTR, cache)
    return cache


def feature_cache(model: Any) -> FeatureCache | None:
    """The model's cache, if :func:`enable_feature_cache` gave it one."""
    return getattr(model, CACHE_ATTR, None)


def head_logits(model: Any, feats: torch.Tensor, autocast: str) -> torch.Tensor:
    """The head applied to cached inputs, as inside the model's forward (same autocast)."""
    head = head_module(model)
    assert head is not None
    with autocast_context(model, autocast):
        return head(feats)
