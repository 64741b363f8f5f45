"""Heterogeneous LoRA ranks: clients with r = 4, 8, 16 in one federation, aggregated exactly.

Averaging factors of different ranks is undefined (and for equal ranks inexact, see
:mod:`lorafed.wire.roles`). The exact aggregate is the weighted mean of each client's dense
change ``delta_i = (alpha_i / r_i) B_i A_i`` per adapted weight (FlexLoRA, Bai et al. 2024):

    delta = sum_i w_i delta_i,  w_i = n_i / n

which the server then truncates back to the global rank by SVD (``U_k S_k V_k^T``, the best
rank-k approximation in Frobenius norm), as :func:`lorafed.wire.factors.merge_adapters` does
for ``svd`` merging, whose code this reuses. The factors are rescaled to the global LoRA
scaling ``global_alpha / global_rank``. The head is a full weight: its weighted mean is exact.

A client of rank r_i starts its next round from the global delta truncated to its own rank
(:func:`truncate_for_client`, :func:`start_for_client`).

In a federation (``federation.hetero_ranks``) the server step works on dense changes
(:class:`DenseUpdates`), in one of two modes (``federation.hetero_mode``):

* ``residual`` (the default): each client's *change from its own start*,

      delta = delta_global + sum_i w_i (delta_i - start_i),

  where ``start_i`` is the dense change of the adapter client i started from
  (:func:`start_dense`: ``delta_global`` itself at the global rank and alpha, else its rank-r_i
  cut, which the server recomputes with the client's own function). What a rank-4 client
  cannot represent of the global change is then kept, not averaged towards zero: its cut of a
  round-2 clothing global dropped 42% of the change's norm, and the products mode pulled the
  mean back into that subspace every round (``results/scenarios.md``).
* ``products``: the weighted mean of the clients' final dense changes, ``sum_i w_i delta_i``
  (FlexLoRA as published).

Both equal plain FedAvg of the dense products when every client has the global rank and alpha
(then ``start_i = delta_global`` and the weights sum to one). Each valid update is rebased
(``delta_global + delta_i - start_i``) or :func:`densify`-ed as it is folded in, so the streamed
weighted mean, the norm bounds, clipping and the robust rules all apply to it; the mean is then
:func:`factorize`-d back to the global rank. A module's dense change travels inside the server
under ``<module>.lora_delta.<suffix>`` in place of its A/B pair. ``max_update_ratio`` still
scales with the norm of the global adapter's factors; the update norm it bounds is the dense
one, ``sqrt(sum ||delta_i - delta_global||^2 + ||head_i - head_global||^2)`` (``residual``: the
client's own change, ``delta_i - start_i``). A server optimizer steps on the dense changes too.

A truncated component whose singular value is (numerically) zero has a zero row of A and a
zero column of B, and LoRA's gradients of both are then zero forever: the component is dead.
:func:`start_for_client` revives it with the client's own seeded fresh row of A (B's column
stays zero, so ``B @ A`` is unchanged, exactly LoRA's own initialisation). In round 1 the global
delta is zero, so every client starts from its own fresh adapter, as a cross-silo client
without a global adapter does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lorafed.wire.factors import LoraFactors, MergeError, delta_weights, lora_modules, merge_adapters, svd_factors

#: A module's dense change ``(alpha / r) B @ A`` is kept under ``<module>.lora_delta.<suffix>``.
DELTA = ".lora_delta."
#: Singular values below this share of a module's largest are dropped when a client's start is
#: truncated (a rank-8 delta cut to 16 has 8 values at ~1e-16 of the largest: dead components).
DEAD_RTOL = 1e-6

#: How the server combines clients of other ranks (``federation.hetero_mode``; see the module docstring).
HeteroMode = Literal["residual", "products"]


@dataclass(frozen=True)
class HeteroResult:
    """A rank-truncated aggregate.

    Attributes:
        tensors: The global adapter's tensors (LoRA factors of ``global_rank``, the head), fp32.
        truncation: Module prefix -> relative Frobenius error ``||S_{>k}|| / ||S||`` of the truncation.
    """

    tensors: dict[str, torch.Tensor]
    truncation: dict[str, float]


def _rescale(tensors: Mapping[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    """Multiply every LoRA factor by ``sqrt(factor)`` (so B @ A is multiplied by ``factor``)."""
    root = math.sqrt(factor)
    pairs = lora_modules(tensors)
    lora = {k for ab in pairs.values() for k in ab}
    return {k: (v * root if k in lora else v).float() for k, v in tensors.items()}


def aggregate_hetero_rank_report(
    updates: Sequence[tuple[Mapping[str, torch.Tensor], float, int, float]],
    global_rank: int,
    global_alpha: float,
) -> HeteroResult:
    """Aggregate updates of different LoRA ranks into a global adapter of ``global_rank``.

    Args:
        updates: ``(tensors, weight, r, alpha)`` per client: its peft-format adapter tensors,
            its FedAvg weight (e.g. training rows; normalised here), its LoRA rank and alpha.
        global_rank: Rank of the global adapter's factors.
        global_alpha: LoRA alpha of the global adapter (its scaling is ``global_alpha / global_rank``).

    Returns:
        The global tensors and the relative truncation error of every module.

    Raises:
        MergeError: No updates, bad weights, mismatched modules or head shapes, a factor whose
            rank disagrees with its ``r``, or a global rank larger than a weight allows.
    """
    if global_rank < 1 or not global_alpha > 0:
        raise MergeError(f"global rank must be >= 1 and alpha > 0, got r={global_rank}, alpha={global_alpha}")
    adapters = [LoraFactors(t, int(r), float(alpha)) for t, _, r, alpha in updates]
    merged = merge_adapters(adapters, [w for _, w, _, _ in updates], "svd", rank=global_rank)
    # merge_adapters' svd result has scaling 1 (B A = delta); the global adapter's is alpha/r.
    tensors = _rescale(merged.tensors, global_rank / global_alpha)
    return HeteroResult(tensors, merged.truncation)


def aggregate_hetero_rank(
    updates: Sequence[tuple[Mapping[str, torch.Tensor], float, int, float]],
    global_rank: int,
    global_alpha: float,
) -> dict[str, torch.Tensor]:
    """The global adapter's tensors (see :func:`aggregate_hetero_rank_report`)."""
    return aggregate_hetero_rank_report(updates, global_rank, global_alpha).tensors


def truncate_for_client(
    global_tensors: Mapping[str, torch.Tensor], global_rank: int, global_alpha: float, r: int, alpha: float
) -> dict[str, torch.Tensor]:
    """The global adapter as a client of rank ``r`` and alpha ``alpha`` loads it: its delta truncated to rank ``r``.

    Raises:
        MergeError: ``r`` larger than a weight allows.
    """
    return aggregate_hetero_rank([(global_tensors, 1.0, global_rank, global_alpha)], r, alpha)


def dense_deltas(tensors: Mapping[str, torch.Tensor], r: int, alpha: float) -> dict[str, torch.Tensor]:
    """Module prefix -> ``(alpha / r) B @ A`` (float64), the change an adapter makes to each weight."""
    return delta_weights(LoraFactors(tensors, r, alpha))


def lora_rank(lora: Mapping[str, Any]) -> tuple[int, float]:
    """``(r, alpha)`` of a header's LoRA config."""
    return int(lora["r"]), float(lora["alpha"])


def densify(tensors: Mapping[str, torch.Tensor], r: int, alpha: float) -> dict[str, torch.Tensor]:
    """The adapter with every LoRA pair replaced by its dense change ``(alpha / r) B @ A`` (float64).

    The head and any other full tensor are kept as they are. Keys: see :data:`DELTA`.

    Raises:
        MergeError: A factor without its partner.
    """
    pairs = lora_modules(tensors)
    factors = {k for ab in pairs.values() for k in ab}
    out = {k: v for k, v in tensors.items() if k not in factors}
    scale = alpha / r
    for prefix, (a_key, b_key) in pairs.items():
        suffix = a_key.partition(".lora_A.")[2]
        out[f"{prefix}{DELTA}{suffix}"] = scale * (tensors[b_key].double() @ tensors[a_key].double())
    return out


def factorize(dense: Mapping[str, torch.Tensor], r: int, alpha: float, rtol: float = 0.0) -> HeteroResult:
    """Dense changes (:func:`densify`) back to LoRA factors of rank ``r`` and scaling ``alpha / r`` (fp32).

    Each change is cut to its best rank-``r`` approximation (:func:`~lorafed.wire.factors.svd_factors`,
    singular values at most ``rtol`` times the largest dropped); the other tensors are kept.

    Raises:
        MergeError: ``r`` larger than a weight allows.
    """
    out: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    for key, value in dense.items():
        if DELTA not in key:
            out[key] = value.float()
            continue
        prefix, _, suffix = key.partition(DELTA)
        b, a, errors[prefix] = svd_factors(value.double() * (r / alpha), r, prefix, rtol)
        out[f"{prefix}.lora_A.{suffix}"], out[f"{prefix}.lora_B.{suffix}"] = a, b
    return HeteroResult(out, errors)


def revive(tensors: Mapping[str, torch.Tensor], fresh: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dead components (a zero row of A and the zero column of B) take ``fresh``'s row of A.

    ``B @ A`` is unchanged (the column of B stays zero); the component can learn again, as a
    freshly initialised LoRA pair does (B = 0, A random).
    """
    out = dict(tensors)
    for a_key, b_key in lora_modules(tensors).values():
        a, b = tensors[a_key], tensors[b_key]
        dead = (a == 0).all(dim=1) & (b == 0).all(dim=0)
        if bool(dead.any()):
            out[a_key] = torch.where(dead[:, None], fresh[a_key].to(a.dtype), a)
    return out


def start_for_client(
    global_tensors: Mapping[str, torch.Tensor],
    global_lora: Mapping[str, Any],
    lora: Mapping[str, Any],
    fresh: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """What a client of a hetero-rank federation trains its round from.

    The global adapter itself when the client has its rank and alpha, else its delta truncated
    to the client's rank (:func:`truncate_for_client`, with numerically zero components
    dropped); dead components are then revived from the client's own fresh adapter (:func:`revive`).

    Args:
        global_tensors: The global adapter (fp32).
        global_lora: The global adapter's LoRA config (its header's).
        lora: The client's LoRA config.
        fresh: The client's seeded fresh adapter (its rank).

    Raises:
        MergeError: The client's rank is larger than a weight allows, or its modules differ.
    """
    tensors = _start_factors(global_tensors, global_lora, lora)
    if set(fresh) != set(tensors):
        diff = sorted(set(fresh) ^ set(tensors))
        raise MergeError(f"the global adapter's tensors differ from this client's ({len(diff)} keys, e.g. {diff[0]})")
    revived = revive(tensors, fresh)
    return {k: revived[k] for k in fresh}


def _start_factors(
    global_tensors: Mapping[str, torch.Tensor], global_lora: Mapping[str, Any], lora: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """The factors a client of LoRA config ``lora`` starts from, before reviving (fp32)."""
    gr, ga = lora_rank(global_lora)
    r, alpha = lora_rank(lora)
    if (gr, ga) == (r, alpha):
        return {k: v.float() for k, v in global_tensors.items()}
    return factorize(densify(global_tensors, gr, ga), r, alpha, DEAD_RTOL).tensors


def start_dense(
    global_tensors: Mapping[str, torch.Tensor], global_lora: Mapping[str, Any], lora: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """The dense changes (:func:`densify`, float64) of the adapter a client of ``lora`` starts from.

    The same factors :func:`start_for_client` gives the client (reviving a dead component leaves
    ``B @ A`` unchanged), so the server can recompute every client's start exactly.

    Raises:
        MergeError: The client's rank is larger than a weight allows.
    """
    return densify(_start_factors(global_tensors, global_lora, lora), *lora_rank(lora))


class DenseUpdates:
    """What the server averages for an update of any rank: its dense changes, rebased on its start.

    Args:
        global_tensors: The global adapter the clients started the round from.
        global_lora: Its LoRA config (``r``, ``alpha``).
        mode: ``residual``: ``delta_global + delta_i - start_i`` (the client's change from its
            own start, :func:`start_dense`); ``products``: ``delta_i`` (see the module docstring).

    Attributes:
        reference: The global adapter's dense changes (:func:`densify`): the mean's reference.
    """

    def __init__(
        self, global_tensors: Mapping[str, torch.Tensor], global_lora: Mapping[str, Any], mode: HeteroMode
    ) -> None:
        self.global_tensors = global_tensors
        self.global_lora = lora_rank(global_lora)
        self.mode = mode
        self.reference = densify(global_tensors, *self.global_lora)
        self._offsets: dict[tuple[int, float], dict[str, torch.Tensor]] = {}

    def offset(self, lora: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``delta_global - start`` per dense key for a client of ``lora`` (empty: nothing to add).

        Raises:
            MergeError: The client's rank is larger than a weight allows.
        """
        key = lora_rank(lora)
        if self.mode == "products" or key == self.global_lora:  # start = global: nothing to add
            return {}
        if key not in self._offsets:
            start = start_dense(self.global_tensors, {"r": self.global_lora[0], "alpha": self.global_lora[1]}, lora)
            self._offsets[key] = {k: v - start[k] for k, v in self.reference.items() if DELTA in k}
        return self._offsets[key]

    def __call__(self, tensors: Mapping[str, torch.Tensor], lora: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The update's dense changes as the server averages them.

        Raises:
            MergeError: A factor without its partner, or a rank larger than a weight allows.
        """
        dense = densify(tensors, *lora_rank(lora))
        offset = self.offset(lora)
        return {k: v + offset[k] if k in offset else v for k, v in dense.items()}


def aggregate_dense(
    updates: Sequence[tuple[Mapping[str, torch.Tensor], float, Mapping[str, Any]]],
    global_tensors: Mapping[str, torch.Tensor],
    global_lora: Mapping[str, Any],
    mode: HeteroMode = "residual",
) -> HeteroResult:
    """The server step's mean without its checks: the weighted mean of :class:`DenseUpdates`, cut to the global rank.

    For reports that recompute a round from its recorded updates; a federation runs
    :meth:`lorafed.server.step.RoundPolicy.try_aggregate`, which validates each update first.

    Args:
        updates: ``(tensors, weight, lora)`` per client (weights normalised here).
        global_tensors: The global adapter the clients started from.
        global_lora: Its LoRA config (the result's rank and alpha).
        mode: See :class:`DenseUpdates`.

    Raises:
        MergeError: No updates, a weight that is not finite and >= 0 (or all zero), or a rank
            larger than a weight allows.
    """
    weights = [float(w) for _, w, _ in updates]
    if not weights or not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise MergeError(f"weights must be finite, >= 0 and not all zero, got {weights}")
    rebase = DenseUpdates(global_tensors, global_lora, mode)
    total = sum(weights)
    mean: dict[str, torch.Tensor] = {}
    for (tensors, _, lora), w in zip(updates, weights, strict=True):
        for k, v in rebase(tensors, lora).items():
            mean[k] = mean.get(k, 0) + (w / total) * v.double()
    return factorize(mean, *lora_rank(global_lora))
