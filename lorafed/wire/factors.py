"""LoRA factors of adapter states, and their weighted combinations: the math, on state dicts only.

For each adapted weight W, adapter i contributes ``delta_i = s_i * B_i @ A_i`` with LoRA scaling
``s_i = alpha_i / r_i``. With normalised weights ``w_i`` (summing to 1) there are three combinations:

* ``fedavg`` (tensor FedAvg): ``A = sum_i w_i A_i`` and ``B = sum_i w_i B_i``, separately. This is
  what FedAvg computes; the combined delta ``s * B @ A`` is *not* ``sum_i w_i delta_i`` in general.
  Needs identical ranks and scalings.
* ``cat`` (exact, rank concatenation as peft's ``add_weighted_adapter(combination_type="cat")``):
  ``A = [A_1; ...; A_k]`` and ``B = [w_1 s_1 B_1, ..., w_k s_k B_k]``, so ``B @ A = sum_i w_i delta_i``.
* ``svd`` (exact up to truncation): ``sum_i w_i delta_i`` cut to rank k by SVD.

The classification head (a full weight) is the weighted mean in every mode. Used by
:mod:`lorafed.serve.combine` (``lorafed combine``) and :mod:`lorafed.server.hetero` (clients of
different ranks).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from lorafed.errors import LorafedError
from lorafed.server.aggregate import fedavg
from lorafed.wire.adapter import is_lora_key

#: How adapters are combined (see the module docstring).
MergeMode = Literal["fedavg", "cat", "svd"]
MERGE_MODES: tuple[str, ...] = ("fedavg", "cat", "svd")


class MergeError(LorafedError):
    """Adapters that cannot be merged (different bases, labels, modules or shapes; bad weights or rank)."""


@dataclass(frozen=True)
class LoraFactors:
    """One adapter: its tensors and LoRA scaling."""

    tensors: Mapping[str, torch.Tensor]
    r: int
    alpha: float

    @property
    def scaling(self) -> float:
        """peft's LoRA scaling ``alpha / r``."""
        return self.alpha / self.r


@dataclass
class MergeResult:
    """A merged adapter.

    Attributes:
        tensors: The merged tensors (fp32), in peft key format.
        r: Rank of the merged LoRA factors.
        alpha: LoRA alpha such that ``alpha / r`` is the merged adapter's scaling.
        truncation: ``svd`` only: module -> relative Frobenius error of the rank-k truncation.
    """

    tensors: dict[str, torch.Tensor]
    r: int
    alpha: float
    truncation: dict[str, float] = field(default_factory=dict)


def normalise_weights(weights: Sequence[float]) -> list[float]:
    """Weights divided by their sum.

    Raises:
        MergeError: A weight is negative or not finite, or they sum to zero.
    """
    ws = [float(w) for w in weights]
    if any(not (w >= 0 and w < float("inf")) for w in ws):
        raise MergeError(f"merge weights must be finite and >= 0, got {ws}")
    total = sum(ws)
    if total <= 0:
        raise MergeError(f"merge weights must sum to a positive number, got {ws}")
    return [w / total for w in ws]


def lora_modules(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """Module prefix -> (A key, B key) of every LoRA pair in a peft state dict.

    Raises:
        MergeError: A factor without its partner.
    """
    out: dict[str, tuple[str, str]] = {}
    for key in tensors:
        if ".lora_A." in key:
            prefix, _, suffix = key.partition(".lora_A.")
            b_key = f"{prefix}.lora_B.{suffix}"
            if b_key not in tensors:
                raise MergeError(f"tensor {key} has no matching {b_key}")
            out[prefix] = (key, b_key)
        elif ".lora_B." in key and key.replace(".lora_B.", ".lora_A.", 1) not in tensors:
            raise MergeError(f"tensor {key} has no matching lora_A tensor")
    return out


def delta_weights(adapter: LoraFactors) -> dict[str, torch.Tensor]:
    """Module prefix -> ``scaling * B @ A`` (float64), the change the adapter makes to each weight."""
    return {
        prefix: adapter.scaling * (adapter.tensors[b].double() @ adapter.tensors[a].double())
        for prefix, (a, b) in lora_modules(adapter.tensors).items()
    }


def merge_adapters(
    adapters: Sequence[LoraFactors], weights: Sequence[float], mode: MergeMode, rank: int | None = None
) -> MergeResult:
    """Merge ``adapters`` with ``weights`` (normalised here) by ``mode`` (see the module docstring).

    Args:
        adapters: The adapters, all on the same modules and head.
        weights: One non-negative weight per adapter.
        mode: ``fedavg``, ``cat`` or ``svd``.
        rank: Target rank for ``svd`` (default: the largest input rank).

    Raises:
        MergeError: Mismatched adapters, bad weights, or a rank that does not fit.
    """
    if not adapters:
        raise MergeError("no adapters to merge")
    if len(weights) != len(adapters):
        raise MergeError(f"{len(adapters)} adapters but {len(weights)} weights")
    ws = normalise_weights(weights)
    _check_same_layout(adapters, need_same_rank=mode == "fedavg")
    if mode == "fedavg":
        scalings = {a.scaling for a in adapters}
        if len(scalings) > 1:
            raise MergeError(f"fedavg needs one LoRA scaling alpha/r, got {sorted(scalings)}; use cat or svd")
        if sum(w > 0 for w in ws) == 0:  # pragma: no cover - normalise_weights forbids it
            raise MergeError("all weights are zero")
        pairs = [(a.tensors, w) for a, w in zip(adapters, ws, strict=True) if w > 0]
        return MergeResult(fedavg(pairs), adapters[0].r, adapters[0].alpha)
    head = _head_mean(adapters, ws)
    modules = lora_modules(adapters[0].tensors)
    if mode == "cat":
        out = dict(head)
        for a_key, b_key in modules.values():
            out[a_key] = torch.cat([a.tensors[a_key].float() for a in adapters], dim=0)
            out[b_key] = torch.cat(
                [w * a.scaling * a.tensors[b_key].float() for a, w in zip(adapters, ws, strict=True)], dim=1
            )
        r = sum(a.r for a in adapters)
        return MergeResult(out, r, float(r))
    if mode == "svd":
        k = rank if rank is not None else max(a.r for a in adapters)
        out = dict(head)
        errors: dict[str, float] = {}
        for prefix, (a_key, b_key) in modules.items():
            delta = sum(
                w * a.scaling * (a.tensors[b_key].double() @ a.tensors[a_key].double())
                for a, w in zip(adapters, ws, strict=True)
            )
            out[b_key], out[a_key], errors[prefix] = svd_factors(delta, k, prefix)
        return MergeResult(out, k, float(k), errors)
    raise MergeError(f"unknown merge mode {mode!r}; expected one of {', '.join(MERGE_MODES)}")


def svd_factors(delta: torch.Tensor, k: int, name: str, rtol: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(B, A, error)``: the best rank-``k`` factors of ``delta`` (``B @ A = U_k S_k V_k^T``, fp32).

    The singular values are split evenly (``B = U_k S_k^(1/2)``, ``A = S_k^(1/2) V_k^T``), so both
    factors have the same scale. Singular values at most ``rtol`` times the largest are dropped
    (their rows of A and columns of B are exactly zero); ``error`` is the relative Frobenius error
    ``||S_{>k}|| / ||S||`` of the truncation (0 for a zero ``delta``).

    Raises:
        MergeError: ``k`` outside ``[1, min(delta.shape)]``.
    """
    if not 1 <= k <= min(delta.shape):
        raise MergeError(f"svd rank must be in [1, {min(delta.shape)}] for {name}, got {k}")
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    kept = s[:k] if rtol <= 0 else torch.where(s[:k] > rtol * s[0], s[:k], torch.zeros_like(s[:k]))
    root = kept.sqrt()
    total = float(s.norm())
    error = float(s[k:].norm()) / total if total > 0 else 0.0
    return (u[:, :k] * root).float(), (root[:, None] * vh[:k]).float(), error


def _head_mean(adapters: Sequence[LoraFactors], ws: Sequence[float]) -> dict[str, torch.Tensor]:
    keys = [k for k in adapters[0].tensors if not is_lora_key(k)]
    if not keys:
        return {}
    pairs = [({k: a.tensors[k] for k in keys}, w) for a, w in zip(adapters, ws, strict=True) if w > 0]
    return fedavg(pairs)


def _check_same_layout(adapters: Sequence[LoraFactors], need_same_rank: bool) -> None:
    """Same keys everywhere; same head shapes; same in/out sizes; ranks equal if asked."""
    first = adapters[0]
    for i, a in enumerate(adapters):
        if a.r < 1 or not a.alpha > 0:
            raise MergeError(f"adapter {i}: LoRA r must be >= 1 and alpha > 0, got r={a.r}, alpha={a.alpha}")
        if set(a.tensors) != set(first.tensors):
            diff = sorted(set(a.tensors) ^ set(first.tensors))
            raise MergeError(f"adapter {i}: tensors differ from adapter 0 ({len(diff)} keys, e.g. {diff[0]})")
        for key, t in a.tensors.items():
            ref = first.tensors[key]
            if ".lora_A." in key:
                same = t.shape[1:] == ref.shape[1:] and t.shape[0] == a.r
            elif ".lora_B." in key:
                same = t.shape[0] == ref.shape[0] and t.shape[1] == a.r
            else:
                same = t.shape == ref.shape
            if need_same_rank:
                same = same and t.shape == ref.shape
            if not same:
                raise MergeError(
                    f"adapter {i}: tensor {key} has shape {tuple(t.shape)}, adapter 0 has {tuple(ref.shape)} "
                    f"(ranks {a.r} and {first.r})"
                )
