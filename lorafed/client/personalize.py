"""Personalization: after the federation, each client's own adapter, the global one plus a local part.

Two ways, both starting from the final global adapter and run on the client's own rows only:

* ``finetune``: a short local fine-tune of every adapter tensor (LoRA and head).
* ``local_head`` (FedRep-style, Collins et al. 2021): the global LoRA stays frozen (the shared
  representation); only the classifier head is retrained locally.

Training runs in checkpoints of ``personalize.eval_every`` steps (each a fresh AdamW, as a
federated round is) and each checkpoint is scored on the client's validation rows; the
best-scoring one is kept, the global adapter itself being checkpoint 0, so a client whose local
rows do not help keeps the global adapter. Nothing personalized leaves the client: the result
is written as a payload of kind ``personalized`` that ``lorafed export`` accepts like any adapter.

This module imports :mod:`lorafed.config` only lazily: the config imports
:data:`PersonalizeMethod` from here.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import torch

from lorafed.wire.roles import ALL_ROLES, Role

if TYPE_CHECKING:
    from lorafed.config import PersonalizeConfig, RunConfig
    from lorafed.data.tokens import Split, TokenizedRows
    from lorafed.model.backbone import ClientModel
    from lorafed.wire.payload import ModelIdentity, PayloadMeta

logger = logging.getLogger(__name__)

#: Personalization methods, the one place their names are defined.
PersonalizeMethod = Literal["none", "finetune", "local_head"]

#: The adapter roles each method trains locally.
METHOD_ROLES: dict[str, frozenset[Role]] = {
    "none": frozenset(),
    "finetune": ALL_ROLES,
    "local_head": frozenset({"head"}),
}

#: Payload kind of a personalized adapter.
PERSONALIZED_KIND = "personalized"


class Site(Protocol):
    """One client as personalization sees it (a :class:`~lorafed.client.local.LocalClient` is one).

    Attributes:
        client_id: The client's id (seeds its local steps).
        config: The run config (``train`` for per-step settings, ``seed``, ``personalize``).
        model: The client's model (its adapter is overwritten).
        rows: Tokenized rows; ``split`` indexes them.
        split: The client's train rows (trained on) and validation rows (pick the checkpoint).
        identity: The federation identity (labels; written in the payload header).
    """

    client_id: str
    config: RunConfig
    model: ClientModel
    rows: TokenizedRows
    split: Split
    identity: ModelIdentity


@dataclass(frozen=True)
class Personalized:
    """One client's personalized adapter and how it was reached.

    Attributes:
        tensors: Every adapter tensor (fp32), global ones where the method trains none.
        method: The method used.
        steps: Local optimizer steps run.
        best_step: Steps of the kept checkpoint (0: the global adapter was kept).
        val_global: Validation macro-F1 of the global adapter (``None`` without validation rows).
        val_best: Validation macro-F1 of the kept checkpoint (``None`` without validation rows).
        num_examples: The client's training rows.
    """

    tensors: dict[str, torch.Tensor]
    method: str
    steps: int
    best_step: int
    val_global: float | None
    val_best: float | None
    num_examples: int

    def header_metrics(self) -> dict[str, Any]:
        """What the payload header reports."""
        out: dict[str, Any] = {"method": self.method, "steps": self.steps, "best_step": self.best_step}
        if self.val_global is not None:
            out.update(val_macro_f1_global=self.val_global, val_macro_f1=self.val_best)
        return out


def _clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.float32).clone() for k, v in state.items()}


def personalize_report(
    site: Site,
    global_state: dict[str, torch.Tensor],
    pcfg: PersonalizeConfig | None = None,
    *,
    progress: bool = False,
) -> Personalized:
    """Personalize ``global_state`` on ``site``'s rows (see the module docstring).

    Args:
        site: The client (its model, rows, split, config and id).
        global_state: The final global adapter (every tensor).
        pcfg: The personalization settings (default: ``site.config.personalize``).
        progress: Show progress bars over steps.

    Returns:
        The personalized adapter with its figures.
    """
    from lorafed.client.train import train_local
    from lorafed.metrics import evaluate
    from lorafed.seeds import client_seed
    from lorafed.wire.adapter import get_adapter_state, set_adapter_state
    from lorafed.wire.roles import trainable_roles

    cfg = site.config
    p = pcfg if pcfg is not None else cfg.personalize
    split = site.split
    n_train = len(split.train)
    state = _clone(global_state)
    if p.method == "none" or n_train == 0:
        return Personalized(state, p.method, 0, 0, None, None, n_train)
    model = site.model.model
    roles = METHOD_ROLES[p.method]
    tcfg = dataclasses.replace(
        cfg.train,
        learning_rate=p.learning_rate if p.learning_rate is not None else cfg.train.learning_rate,
        warmup_ratio=0.0,
        prox_mu=0.0,
    )
    labels = site.identity.labels
    has_val = len(split.val) > 0

    def score(s: dict[str, torch.Tensor]) -> float:
        set_adapter_state(model, s)
        return evaluate(model, site.rows, split.val, cfg.train.eval_batch_size, labels, cfg.train.autocast).macro_f1

    val_global = score(state) if has_val else None
    best, best_step, best_state = (val_global if val_global is not None else -math.inf), 0, state
    done, since, checkpoint = 0, 0, 0
    while done < p.steps:
        chunk = min(p.eval_every, p.steps - done)
        checkpoint += 1
        set_adapter_state(model, state)
        with trainable_roles(model, roles):
            train_local(
                model,
                site.rows,
                split.train,
                dataclasses.replace(tcfg, max_steps=chunk),
                client_seed(cfg.seed, 100_000 + checkpoint, f"{site.client_id}.personal"),
                desc=f"personalize {site.client_id}",
                progress=progress,
            )
        state = _clone(get_adapter_state(model))
        done += chunk
        if not has_val:
            best_state, best_step = state, done
            continue
        v = score(state)
        # Leaving the global adapter takes a validation gain of min_gain (a client's few validation
        # rows are noisy); after that, any better checkpoint replaces the kept one.
        if v > best and (best_step > 0 or val_global is None or v >= val_global + p.min_gain):
            best, best_step, best_state, since = v, done, state, 0
        else:
            since += 1
            if p.patience is not None and since >= p.patience:
                break
    logger.info(
        "%s: personalized (%s) in %d step(s), kept step %d%s",
        site.client_id,
        p.method,
        done,
        best_step,
        f", validation macro-F1 {val_global:.4f} -> {best:.4f}" if has_val else "",
    )
    return Personalized(best_state, p.method, done, best_step, val_global, best if has_val else None, n_train)


def personalize(
    site: Site,
    global_state: dict[str, torch.Tensor],
    pcfg: PersonalizeConfig | None = None,
    *,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """The client's personalized adapter tensors (see :func:`personalize_report`)."""
    return personalize_report(site, global_state, pcfg, progress=progress).tensors


def personalized_meta(identity: ModelIdentity, client_id: str, round_: int, result: Personalized) -> PayloadMeta:
    """The header of a personalized adapter: kind ``personalized``, the global's round, fp32."""
    return identity.meta(
        client_id, round_, max(result.num_examples, 1), kind=PERSONALIZED_KIND, metrics=result.header_metrics()
    )


def personalize_local(
    config: RunConfig, client_id: str, global_path: str | Path, out_path: str | Path, progress: bool = True
) -> Personalized:
    """A company personalizes the federation's global adapter on its own file ``config.data.path``.

    What a ``lorafed client personalize`` verb runs: the client's rows are split as in
    ``lorafed client train`` (all train but a ``data.val_fraction`` slice, which picks the
    checkpoint), and the result is written to ``out_path`` as a ``personalized`` payload.

    Raises:
        ConfigError: No label list, or a bad client id.
        DataError: The file cannot be read or leaves no training rows.
        PayloadError: The global adapter is unreadable or does not fit this config.
    """
    from lorafed.client.local import LocalClient
    from lorafed.client.round import check_client_id
    from lorafed.server.specs import federation_labels
    from lorafed.wire.payload import save_payload
    from lorafed.wire.reader import payload_from_bytes
    from lorafed.wire.sign import read_signature

    check_client_id(client_id)
    data = Path(global_path).read_bytes()
    glob = payload_from_bytes(data, str(global_path))
    labels = federation_labels(config, glob.meta, str(global_path))
    local = LocalClient.from_file(config, client_id, config.data.path, labels)
    # With a key registry configured, the global must carry the server's signature (a .sig beside it).
    state = local.check_global(glob, str(global_path), data=data, signature=read_signature(global_path))
    result = personalize_report(local, state, progress=progress)
    save_payload(out_path, result.tensors, personalized_meta(local.identity, client_id, glob.meta.round, result))
    return result


def sample_rows(positions: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The first ``k`` of a seeded permutation of ``positions`` (nested: a larger ``k`` adds rows), sorted."""
    perm = np.random.default_rng(seed).permutation(np.asarray(positions))
    return np.sort(perm[:k])
