"""Adaptive server optimizers on the adapter delta: FedAdam and FedYogi (Reddi et al. 2021, Alg. 2).

The round's average is turned into a pseudo-gradient Δ = average − global, and the server
takes an adaptive step instead of jumping to the average:

    m ← β1 m + (1 − β1) Δ
    v ← β2 v + (1 − β2) Δ²                      (FedAdam)
    v ← v − (1 − β2) Δ² sign(v − Δ²)            (FedYogi)
    x ← x + η m / (√v + τ)

with m₀ = 0 and v₀ = τ² as in the paper (no bias correction). ``fedavgm`` (Hsu et al. 2019)
is heavy-ball momentum on Δ, m ← β1 m + Δ, x ← x + η m (no second moment; η = 1 and β1 = 0
is plain FedAvg). Pure functions over state dicts:
the caller (the server) keeps :class:`ServerOptState` between rounds; it round-trips through
plain tensors (:meth:`ServerOptState.to_tensors`) so it can be saved with the global adapter.
Only the tensors present in the round's average move; the moments of the others are kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from lorafed.errors import AggregationError, PayloadError

#: Server optimizers applied to the aggregated adapter delta.
ServerOptimizer = Literal["none", "fedavgm", "fedadam", "fedyogi"]


@dataclass(frozen=True)
class ServerOptSettings:
    """Hyper-parameters of the server step (from ``federation.server_*``)."""

    kind: ServerOptimizer = "fedadam"
    lr: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3


@dataclass
class ServerOptState:
    """Moments per tensor and the number of steps taken."""

    m: dict[str, torch.Tensor] = field(default_factory=dict)
    v: dict[str, torch.Tensor] = field(default_factory=dict)
    step: int = 0

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat tensors (``m/<key>``, ``v/<key>``, ``step``) for a safetensors file."""
        out = {f"m/{k}": t for k, t in self.m.items()} | {f"v/{k}": t for k, t in self.v.items()}
        out["step"] = torch.tensor([self.step], dtype=torch.int64)
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> ServerOptState:
        """Inverse of :meth:`to_tensors`.

        Raises:
            AggregationError: A key is neither ``step`` nor ``m/...`` / ``v/...``, or ``step`` is missing.
        """
        if "step" not in tensors:
            raise AggregationError("server optimizer state: tensor 'step' missing")
        state = cls(step=int(tensors["step"].reshape(-1)[0]))
        for key, t in tensors.items():
            prefix, _, name = key.partition("/")
            if key == "step":
                continue
            if prefix not in ("m", "v") or not name:
                raise AggregationError(
                    f"server optimizer state: unexpected tensor {key!r} (expected m/<key> or v/<key>)"
                )
            getattr(state, prefix)[name] = t.to(torch.float32).clone()
        return state


def server_step(
    global_state: Mapping[str, torch.Tensor],
    averaged: Mapping[str, torch.Tensor],
    opt: ServerOptState,
    settings: ServerOptSettings,
) -> tuple[dict[str, torch.Tensor], ServerOptState]:
    """One FedAdam/FedYogi step from ``global_state`` toward the round's ``averaged`` tensors.

    Args:
        global_state: The current global adapter (every tensor).
        averaged: The round's average (the tensors sent this round; a subset is allowed).
        opt: The optimizer state before the step (not modified).
        settings: Which optimizer and its hyper-parameters.

    Returns:
        The new global adapter (every tensor, fp32) and the new optimizer state.

    Raises:
        AggregationError: A tensor of ``averaged`` is absent from ``global_state`` or differs in shape.
    """
    b1, b2, tau = settings.beta1, settings.beta2, settings.tau
    new_state = {k: v.to(torch.float32).clone() for k, v in global_state.items()}
    m, v = dict(opt.m), dict(opt.v)
    for key, avg in averaged.items():
        if key not in global_state:
            raise AggregationError(f"server step: tensor {key} is not in the global adapter")
        x = global_state[key].to(torch.float32)
        if avg.shape != x.shape:
            raise AggregationError(f"server step: tensor {key} shape {tuple(avg.shape)} != {tuple(x.shape)}")
        delta = avg.to(torch.float32) - x
        d2 = delta * delta
        m_prev = m.get(key, torch.zeros_like(x))
        v_prev = v.get(key, torch.full_like(x, tau * tau))
        if settings.kind == "fedavgm":
            m[key] = b1 * m_prev + delta
            new_state[key] = x + settings.lr * m[key]
            continue
        m[key] = b1 * m_prev + (1 - b1) * delta
        if settings.kind == "fedyogi":
            v[key] = v_prev - (1 - b2) * d2 * torch.sign(v_prev - d2)
        else:
            v[key] = b2 * v_prev + (1 - b2) * d2
        new_state[key] = x + settings.lr * m[key] / (v[key].sqrt() + tau)
    return new_state, ServerOptState(m=m, v=v, step=opt.step + 1)


def save_server_opt(path: str | Path, opt: ServerOptState) -> Path:
    """Write the optimizer state as a safetensors file (atomically), for resuming a run."""
    from safetensors.torch import save as st_save

    from lorafed.files import atomic_write_bytes

    return atomic_write_bytes(Path(path), st_save({k: t.contiguous() for k, t in opt.to_tensors().items()}))


def load_server_opt(path: str | Path) -> ServerOptState:
    """Read a state written by :func:`save_server_opt` (safetensors only, nothing is unpickled).

    Raises:
        PayloadError: The file is missing or is not a safetensors file.
        AggregationError: It holds tensors that are not an optimizer state.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    p = Path(path)
    try:
        tensors = st_load(p.read_bytes())
    except FileNotFoundError as exc:
        raise PayloadError(f"server optimizer state not found: {p}") from exc
    except (SafetensorError, ValueError) as exc:
        raise PayloadError(f"{p}: not a safetensors file ({exc})") from exc
    return ServerOptState.from_tensors(tensors)
