"""Combining several LoRA adapters into one, with weights: the math, on state dicts only.

("Combine" here; "merge" in lorafed means only folding an adapter into the base weights at export.)

For each adapted weight W, adapter i contributes ``delta_i = s_i * B_i @ A_i`` with LoRA scaling
``s_i = alpha_i / r_i``. With normalised weights ``w_i`` (summing to 1) there are three merges:

* ``fedavg`` (tensor FedAvg): ``A = sum_i w_i A_i`` and ``B = sum_i w_i B_i``, separately. This is
  what FedAvg computes; the merged delta ``s * B @ A`` is *not* ``sum_i w_i delta_i`` in general.
  Needs identical ranks and scalings.
* ``cat`` (exact, rank concatenation as peft's ``add_weighted_adapter(combination_type="cat")``):
  ``A = [A_1; ...; A_k]`` (rows) and ``B = [w_1 s_1 B_1, ..., w_k s_k B_k]`` (columns), so
  ``B @ A = sum_i w_i delta_i`` exactly. The merged rank is ``sum_i r_i``; the scalings are folded
  into B, so the merged adapter's scaling is 1 (``alpha = r``).
* ``svd`` (exact up to truncation): ``sum_i w_i delta_i = U S V^T`` truncated to rank k, with
  ``B = U_k sqrt(S_k)`` and ``A = sqrt(S_k) V_k^T`` (scaling 1, ``alpha = r = k``). The relative
  Frobenius error ``||S_{>k}|| / ||S||`` of each module is reported.

Tensors that are not LoRA factors (the classification head) are full weights: every mode takes
their weighted mean, which is exact. Nothing here reads files or configs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from lorafed.errors import LorafedError
from lorafed.server.aggregate import fedavg
from lorafed.wire.adapter import is_lora_key
from lorafed.wire.payload import Payload, PayloadMeta

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
            if not 1 <= k <= min(delta.shape):
                raise MergeError(f"svd rank must be in [1, {min(delta.shape)}] for {prefix}, got {k}")
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            root = s[:k].sqrt()
            out[b_key] = (u[:, :k] * root).float()
            out[a_key] = (root[:, None] * vh[:k]).float()
            total = float(s.norm())
            errors[prefix] = float(s[k:].norm()) / total if total > 0 else 0.0
        return MergeResult(out, k, float(k), errors)
    raise MergeError(f"unknown merge mode {mode!r}; expected one of {', '.join(MERGE_MODES)}")


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


def combine_payloads(
    payloads: Sequence[Payload],
    sources: Sequence[str],
    mode: MergeMode,
    weights: Sequence[float] | None = None,
    rank: int | None = None,
) -> tuple[dict[str, torch.Tensor], PayloadMeta, MergeResult]:
    """Merge lorafed payloads (global or client adapters) and build the merged adapter's header.

    Args:
        payloads: The adapters, already loaded.
        sources: Their file names, for messages and the header.
        mode: See :func:`merge_adapters`.
        weights: One weight per adapter; default: each header's ``num_examples``.
        rank: Target rank for ``svd``.

    Returns:
        The merged tensors, their header (LoRA ``r``/``alpha`` of the merged factors) and the result.

    Raises:
        MergeError: Different base fingerprints, labels or target modules, or any error of
            :func:`merge_adapters`.
    """
    if not payloads:
        raise MergeError("no adapters to merge")
    first = payloads[0].meta
    for p, src in zip(payloads, sources, strict=True):
        m = p.meta
        for name, got, want in (
            ("base_fingerprint", m.base_fingerprint, first.base_fingerprint),
            ("labels", list(m.labels), list(first.labels)),
            (
                "lora target_modules",
                sorted(m.lora.get("target_modules", [])),
                sorted(first.lora.get("target_modules", [])),
            ),
        ):
            if got != want:
                raise MergeError(f"{src}: {name} {got} differs from {sources[0]}'s {want}")
    ws = list(weights) if weights is not None else [float(p.meta.num_examples) for p in payloads]
    adapters = []
    for p, src in zip(payloads, sources, strict=True):
        r, alpha = p.meta.lora.get("r"), p.meta.lora.get("alpha")
        if not isinstance(r, int) or not isinstance(alpha, (int, float)):
            raise MergeError(f"{src}: header lora needs integer r and numeric alpha, got r={r!r}, alpha={alpha!r}")
        adapters.append(LoraFactors(p.decoded(), r, float(alpha)))
    result = merge_adapters(adapters, ws, mode, rank)
    lora = dict(first.lora)
    lora["r"] = result.r
    lora["alpha"] = int(result.alpha) if float(result.alpha).is_integer() else result.alpha
    metrics: dict[str, object] = {
        "merge_mode": mode,
        "sources": list(sources),
        "weights": normalise_weights(ws),
    }
    if result.truncation:
        metrics["svd_relative_error_max"] = max(result.truncation.values())
        metrics["svd_relative_error"] = result.truncation
    meta = PayloadMeta(
        base_fingerprint=first.base_fingerprint,
        lora=lora,
        labels=tuple(first.labels),
        num_examples=sum(p.meta.num_examples for p in payloads),
        round=max(p.meta.round for p in payloads),
        client_id="merge",
        kind="merged",
        metrics=metrics,
    )
    return result.tensors, meta, result
