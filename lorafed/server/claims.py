"""How much a client's self-claimed ``num_examples`` may weigh: the server's policy against weight inflation.

A client's FedAvg weight is the number of training rows its header claims, and nothing the
server receives can prove it. Two checks bound what a lie buys, both explainable to the parties:

1. **Plausible against the others.** A claim above ``max_examples_ratio`` x the median claim of
   the *other* clients is implausible. The others are this round's other valid updates plus the
   claims pinned for clients seen in earlier rounds of the run (so a sampled round of three
   small clients does not make an honest large one look implausible). Leaving the claimant out
   of its own median means a huge claim cannot drag the median up with it. By default
   (``over_ratio: refuse``) such an update is refused with its reason and not averaged at all;
   ``cap`` averages it as if it had claimed the bound (the behaviour before refusal was the
   default: one attacker of 5 claiming 10^6 rows still got a share of 0.71).
2. **Pinned across rounds.** A client's first accepted claim in a run is pinned; a later claim
   above ``max_examples_growth`` x the pinned one is *capped* to that, not refused: the client's
   rows do not change within a run (``num_examples`` is its training-row count), so growth is
   either a lie, which the cap bounds exactly as a refusal would, or new data, which then still
   counts. A refusal would shut an honest client out for the rest of the run, since the pin
   never moves.

3. **Weight above the typical must be earned by agreement** (:func:`unearned_weights`). A claim
   above ``trust_weight_above`` (2) x the median claim of the round's *other* updates keeps its
   weight only if the update's delta points the way the others' do: its cosine with their
   weighted mean delta is at least ``trust_min_cosine`` (0). Otherwise the weight is lowered to
   that median, a typical client's, not refused: an honest large client under label skew may
   disagree with the others (cosine -0.36 seen against a Dirichlet round's median delta) and
   still counts as one typical client. An adaptive client of 5 claiming just under the ratio
   bound with a sign-flipped update holds 10 / 14 = 0.71 of the average without this check and
   a typical 1 / 5 with it.

   An update whose header declares record-level DP noise (``metrics.noise_multiplier`` > 0, as
   :mod:`lorafed.client.dp` writes it) is compared against what that noise explains: DP-SGD
   makes each update mostly independent noise, and two unrelated vectors of d coordinates have a
   cosine of mean 0 and std 1 / sqrt(d), so an honest noisy update lands below 0 half the time
   (Tops, the largest clothing department, was averaged at the median weight in two of five DP
   rounds). Such an update is lowered only when its cosine is below ``trust_min_cosine`` by more
   than :func:`chance_band` (3 / sqrt(d)), i.e. when it points against the others beyond chance.
   A client that falsely declares noise gains that band only (0.016 for the 37k coordinates
   FFA sends on clothing): along the others' mean its update still pulls with at most that share
   of its norm.

What it still trusts: a claim up to ``trust_weight_above`` x the others' median keeps its full
weight whatever its direction (2 / 6 = 0.33 for one client of 5 at the default), and a heavy
claim that agrees with the others keeps its full weight up to the ratio bound;
``federation.max_client_share`` bounds any share further.

The pinned claims travel with the run (``rounds/claims_rN.json`` in a run folder, and
``<global>.claims.json`` beside a global adapter written by ``lorafed aggregate``), so a resumed
run or the next round by hand keeps them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from lorafed.errors import LorafedError
from lorafed.files import atomic_write_json

#: What the server does with a claim above ``max_examples_ratio`` x the others' median.
OverRatio = Literal["refuse", "cap"]

#: A claims file is a few dozen bytes per client; anything much larger is not one lorafed wrote.
MAX_CLAIMS_BYTES = 16 * 1024 * 1024


@dataclass
class ClaimCheck:
    """The verdict on a round's claims.

    Attributes:
        weights: Client id -> the weight it is averaged with (refused clients left out).
        refused: Client id -> why its claim was refused (no client id or source in the text).
        pinned: Client ids whose claim was lowered to ``max_examples_growth`` x their pinned claim.
    """

    weights: dict[str, float]
    refused: dict[str, str] = field(default_factory=dict)
    pinned: list[str] = field(default_factory=list)


def check_claims(
    claims: Mapping[str, float],
    known: Mapping[str, float] | None = None,
    max_ratio: float | None = None,
    max_growth: float | None = None,
    over_ratio: OverRatio = "refuse",
) -> ClaimCheck:
    """Apply the pin (``max_growth``) and then the ratio bound (``max_ratio``) to a round's claims.

    Args:
        claims: Client id -> the ``num_examples`` its valid update claims this round.
        known: Client id -> its pinned claim (the first accepted in this run), for clients of
            earlier rounds; those absent this round still count among the others in the median.
        max_ratio: A claim above this multiple of the median of the other clients' claims is
            implausible; checked only when at least 2 other claims are known. ``None``: off.
        max_growth: A claim above this multiple of the client's pinned claim is capped to it.
            ``None``: off.
        over_ratio: ``refuse`` an implausible claim, or ``cap`` it to the bound.

    Returns:
        The weights and the refusals; every client's claim is compared with the same others'
        claims (after the pin), all at once, so the order of the updates does not matter.
    """
    known = known or {}
    pinned = dict(claims)
    check = ClaimCheck(weights=pinned)
    if max_growth is not None:
        for cid, claim in claims.items():
            first = known.get(cid)
            if first is not None and claim > max_growth * first:
                pinned[cid] = max_growth * first
                check.pinned.append(cid)
    if max_ratio is None:
        return check
    absent = [w for cid, w in known.items() if cid not in claims]
    weights = dict(pinned)
    for cid, claim in pinned.items():
        median, n_others = _median_of_others(pinned, cid, absent)
        if n_others < 2:
            continue
        bound = max_ratio * median
        if claim <= bound:
            continue
        if over_ratio == "cap":
            weights[cid] = bound
            continue
        grown = f" (lowered from {claims[cid]:g} by max_examples_growth)" if cid in check.pinned else ""
        check.refused[cid] = (
            f"num_examples: expected at most {bound:g} (federation.max_examples_ratio {max_ratio:g} x {median:g}, "
            f"the median claim of the {n_others} other clients), received {claim:g}{grown}; "
            "not averaged (federation.over_ratio: refuse)"
        )
        del weights[cid]
    check.weights = weights
    return check


@dataclass(frozen=True)
class Lowered:
    """A weight above the typical that an update did not earn by agreement.

    Attributes:
        cosine: The cosine of its delta with the weighted mean delta of the round's other updates.
        claimed: The weight it claimed (after the pin and the ratio bound).
        weight: The weight it is averaged with: the median claim of the round's other updates.
    """

    cosine: float
    claimed: float
    weight: float


#: Standard deviations of a chance cosine (:func:`chance_band`) a noisy update may fall below the threshold.
CHANCE_SIGMAS = 3.0


def chance_band(dim: int, sigmas: float = CHANCE_SIGMAS) -> float:
    """How far below 0 chance puts the cosine of two unrelated vectors of ``dim`` coordinates: ``sigmas / sqrt(dim)``.

    For independent isotropic vectors the cosine has mean 0 and variance 1 / d, so at 3 sigmas a
    noise-dominated honest update falls below ``-band`` about once in 740 rounds.
    """
    return sigmas / math.sqrt(max(int(dim), 1))


def declares_noise(metrics: Mapping[str, object]) -> bool:
    """Whether an update's header metrics declare record-level DP noise (``noise_multiplier`` > 0)."""
    z = metrics.get("noise_multiplier")
    return isinstance(z, int | float) and not isinstance(z, bool) and math.isfinite(z) and z > 0


def unearned_weights(
    weights: Mapping[str, float],
    deltas: Mapping[str, torch.Tensor],
    above: float,
    min_cosine: float = 0.0,
    noisy: Collection[str] = (),
) -> dict[str, Lowered]:
    """The heavy updates whose weight is not earned by agreement with the others, and their lowered weights.

    For client i, let m_i be the median of the *other* clients' weights. When ``w_i > above x m_i``,
    its delta d_i is compared with the others' mean delta ``sum_j v_j d_j / sum_j v_j``, with each
    other weight counted at most as typical (``v_j = min(w_j, m_i)``), so that a second heavy
    update cannot steer the consensus the first one is compared with. If the cosine is below
    ``min_cosine``, w_i becomes m_i. Every client is judged against the same claimed weights, so the
    order of the updates does not matter. With two clients, m_i is the other's weight; when all
    weights are equal nobody is above (``above >= 1``). When the others' mean delta is zero there is
    nothing to agree with, and the weight is kept. A client in ``noisy`` (its header declares
    record-DP noise) is lowered only below ``min_cosine - chance_band(d)``, d the delta's length.

    Args:
        weights: Client id -> its weight this round (the accepted claim).
        deltas: Client id -> its delta from the global adapter, flattened (one 1-D tensor each;
            same keys as ``weights``).
        above: The multiple of the others' median above which a weight must be earned (> 0).
        min_cosine: The least cosine that earns it.
        noisy: Client ids whose updates declare record-level DP noise (:func:`declares_noise`).

    Returns:
        Client id -> :class:`Lowered`, for each client whose weight is lowered.
    """
    lowered: dict[str, Lowered] = {}
    for cid, typical in above_typical(weights, above).items():
        own = deltas[cid].double()
        # The others' weighted sum of deltas: their mean up to a positive factor, the same cosine.
        others = (min(w, typical) * deltas[other].double() for other, w in weights.items() if other != cid)
        mean = sum(others, start=torch.zeros_like(own))
        m_norm = float(mean.norm())
        if m_norm == 0.0:
            continue
        cosine = float(own @ mean) / (max(float(own.norm()), 1e-30) * m_norm)
        if cosine < min_cosine - (chance_band(own.numel()) if cid in noisy else 0.0):
            lowered[cid] = Lowered(cosine, float(weights[cid]), typical)
    return lowered


def above_typical(weights: Mapping[str, float], above: float) -> dict[str, float]:
    """Client id -> the median of the other clients' weights, for each client weighing more than ``above`` x it.

    The cheap half of :func:`unearned_weights`: a round in which nobody is above needs no deltas.
    """
    out: dict[str, float] = {}
    for cid, w in weights.items():
        typical, n_others = _median_of_others(weights, cid)
        if n_others and w > above * typical:
            out[cid] = typical
    return out


def _median_of_others(weights: Mapping[str, float], cid: str, extra: Sequence[float] = ()) -> tuple[float, int]:
    """The median of every weight but ``cid``'s (plus ``extra``), and how many there are (0: nan)."""
    others = [w for other, w in weights.items() if other != cid] + list(extra)
    return (float(np.median(others)) if others else math.nan), len(others)


def save_claims(path: str | Path, claims: Mapping[str, float]) -> Path:
    """Write pinned claims (client id -> first accepted claim) as a JSON object, atomically."""
    return atomic_write_json(path, {cid: float(v) for cid, v in sorted(claims.items())})


def load_claims(path: str | Path) -> dict[str, float]:
    """Read pinned claims written by :func:`save_claims`; a missing file means none pinned yet.

    Raises:
        LorafedError: The file is too large, not JSON, or not an object of client id -> positive
            finite number.
    """
    p = Path(path)
    if not p.is_file():
        return {}
    if p.stat().st_size > MAX_CLAIMS_BYTES:
        raise LorafedError(f"{p}: a claims file over {MAX_CLAIMS_BYTES} bytes; not one lorafed wrote")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise LorafedError(f"{p}: unreadable claims file ({exc})") from exc
    if not isinstance(data, dict):
        raise LorafedError(f"{p}: expected a JSON object of client id -> claimed num_examples")
    out: dict[str, float] = {}
    for cid, v in data.items():
        ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        if not ok:
            raise LorafedError(f"{p}: client {cid[:128]!r}: expected a number > 0, got {str(v)[:60]!r}")
        out[cid] = float(v)
    return out
