"""Client training: from (model with the global adapter loaded, rows, settings) to an update.

The caller decides where the update goes (a file, Flower, memory). A fresh AdamW runs each
round over the trainable tensors only (LoRA and head): clients keep no optimizer state. With
``prox_mu > 0`` the loss gets FedProx's proximal term mu/2 * ||w - w_global||^2, w_global being
the trainable tensors as loaded at the start of the round. With ``gradient_checkpointing`` each
layer is recomputed in backward (about half the peak memory, one more forward pass per step);
with ``autocast: bf16`` the matmuls run in bfloat16 (``results/memory.md`` has the numbers), and
``autocast: auto`` (the default) does so where the CPU or GPU has native bf16 (:mod:`lorafed.autocast`).

Two options change what a client step computes and how fast (``results/quality_findings.md``):
``backbone_dropout: false`` switches off the frozen network's own dropout during training (on
intents, IID 5 clients x 10 steps x 6 rounds, macro-F1 0.670 -> 0.792), and
``length_bucketing`` batches rows of similar length so fewer pad tokens run through the
backbone. ``optimizer: sgd`` replaces AdamW by SGD with momentum. ``label_skew`` (``fedrs`` or
``fedlc``, :mod:`lorafed.client.label_skew`) adjusts the logits the loss sees from the client's
own label counts, so each engine's clients get it; prediction is unchanged.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lorafed.autocast import autocast_context
from lorafed.client.label_skew import LogitAdjustment, label_skew_adjustment
from lorafed.config import TrainConfig
from lorafed.data.tokens import TokenizedRows
from lorafed.errors import ConfigError
from lorafed.model.backbone import enable_gradient_checkpointing
from lorafed.model.features import FeatureCache, enable_feature_cache, trainable_head
from lorafed.progress import progress_bar

#: Batches per length-sorted window with ``train.length_bucketing`` (16 x 16 = 256 rows).
BUCKET_WINDOW = 16


@dataclass(frozen=True)
class TrainResult:
    """What one client's local training did.

    Attributes:
        num_examples: Training rows of the client (its FedAvg weight n_i).
        steps: Optimizer steps taken.
        samples: Samples processed (steps x batch, the last batch may be short).
        mean_loss: Mean training loss over the steps.
        seconds: Wall time of the training loop.
        privacy: Under record-level DP, what the header reports (``epsilon``, ``delta``, ...; see
            :meth:`lorafed.client.dp.RecordDPPlan.report`); ``None`` otherwise.
    """

    num_examples: int
    steps: int
    samples: int
    mean_loss: float
    seconds: float
    privacy: dict[str, Any] | None = None


def planned_steps(n_rows: int, cfg: TrainConfig) -> int:
    """Optimizer steps for a client of ``n_rows``: ``max_steps`` or epochs x ceil(n / batch)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return cfg.epochs * math.ceil(n_rows / cfg.batch_size)


def balanced_class_weights(labels: torch.Tensor, model: Any) -> torch.Tensor:
    """Weights n / (k * n_c) for the labels a client holds (k = labels it has); absent labels get 0.

    With these, every label present contributes equally to the client's loss, as in
    scikit-learn's ``class_weight="balanced"``.
    """
    num_labels = int(model.config.num_labels)
    counts = torch.bincount(labels, minlength=num_labels).float()
    present = counts > 0
    weights = torch.zeros(num_labels)
    weights[present] = labels.numel() / (int(present.sum()) * counts[present])
    return weights


def fixed_class_weights(weights: Mapping[str, float], model: Any) -> torch.Tensor:
    """``train.class_weights`` (label name -> weight) as a vector over the model's label ids.

    Labels not named weigh 1.

    Raises:
        ConfigError: A name that is not one of the model's labels.
    """
    label2id = {str(k): int(v) for k, v in model.config.label2id.items()}
    unknown = sorted(set(weights) - set(label2id))
    if unknown:
        raise ConfigError(
            [f"train.class_weights: {unknown} are not labels of this model; labels: {sorted(label2id)}"], "train"
        )
    vec = torch.ones(int(model.config.num_labels))
    for name, w in weights.items():
        vec[label2id[name]] = float(w)
    return vec


def loss_class_weights(cfg: TrainConfig, labels: torch.Tensor, model: Any) -> torch.Tensor | None:
    """The loss's class weights: ``balanced`` from the client's ``labels``, the fixed ``class_weights``, or none."""
    if cfg.class_weighting == "balanced":
        return balanced_class_weights(labels, model)
    if cfg.class_weights:
        return fixed_class_weights(cfg.class_weights, model)
    return None


def client_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_weights: torch.Tensor | None,
    adjustment: LogitAdjustment | None = None,
) -> torch.Tensor:
    """Cross-entropy in fp32; with class weights, sum_i w_yi * ce_i / sum_i w_yi.

    Args:
        logits: The model's logits, ``[batch, num_labels]``.
        labels: The batch's labels.
        class_weights: Per-label loss weights (``train.class_weighting``), or ``None``.
        adjustment: The label-skew fix (``train.label_skew``): the cross-entropy is taken on
            ``adjustment.apply(logits)`` instead of the logits.
    """
    logits = logits.float() if adjustment is None else adjustment.apply(logits)
    return torch.nn.functional.cross_entropy(logits, labels, weight=class_weights)


def client_adjustment(labels: torch.Tensor, model: Any, cfg: TrainConfig) -> LogitAdjustment | None:
    """The ``train.label_skew`` fix from the labels of all of a client's training rows (``None``: off)."""
    return label_skew_adjustment(cfg.label_skew, labels, int(model.config.num_labels), cfg.fedrs_alpha, cfg.fedlc_tau)


def autocast(model: Any, mode: str) -> torch.autocast:
    """The forward's autocast context: bfloat16 matmuls for ``bf16`` (and ``auto`` where bf16 is native).

    ``auto`` is resolved by :func:`lorafed.autocast.resolve_autocast`. Leaving the block before
    the loss keeps the loss (and so the gradients' start) in fp32.
    """
    return autocast_context(model, mode)


def length_bucketed_batches(
    positions: np.ndarray, lengths: np.ndarray, batch_size: int, seed: int, window: int
) -> list[np.ndarray]:
    """Batches of rows of similar length, in a random order.

    The rows are shuffled with ``seed``, cut into windows of ``window`` batches, each window is
    sorted by length and cut into batches, and the batches of all windows are shuffled. Every
    row is used exactly once per pass. A batch is padded to its longest row, so on the clothing
    reviews (token lengths 33 / 80 / 130 at the 10th / 50th / 90th percentile, max_length 128)
    random batches of 16 are padded to a mean width of 127 tokens and bucketed ones to about 85:
    fewer pad tokens to run through the frozen backbone.

    Args:
        positions: Row positions to batch.
        lengths: Token length of each row of ``positions`` (same order).
        batch_size: Rows per batch (the last batch of a window may be shorter).
        seed: Shuffle seed.
        window: Batches per sorted window (1 gives plain shuffled batches).
    """
    pos = np.asarray(positions, dtype=np.int64)
    lens = np.asarray(lengths)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pos))
    batches: list[np.ndarray] = []
    span = batch_size * window
    for start in range(0, len(order), span):
        chunk = order[start : start + span]
        chunk = chunk[np.argsort(lens[chunk], kind="stable")]
        batches += [pos[chunk[i : i + batch_size]] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


@contextlib.contextmanager
def frozen_dropout_off(model: Any) -> Iterator[int]:
    """Within the block, the frozen network's dropout layers drop nothing (p = 0).

    Every ``torch.nn.Dropout`` outside LoRA's own ``lora_dropout`` is set to p = 0 (BERT's
    attention reads its rate from the same module, so attention dropout is off too) and
    restored on exit; ``lora_dropout`` too when no LoRA tensor trains (a head-only round: LoRA
    is then part of the frozen network, and its features can be cached,
    :mod:`lorafed.model.features`). A frozen pretrained backbone gains nothing from its
    dropout's regularisation, while the dropout noise makes every client's gradient noisier.

    Yields:
        How many dropout layers were switched off.
    """
    trains_lora = any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    touched = [
        (m, m.p)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Dropout) and (not trains_lora or "lora_dropout" not in name) and m.p > 0
    ]
    try:
        for m, _ in touched:
            m.p = 0.0
        yield len(touched)
    finally:
        for m, p in touched:
            m.p = p


def proximal_term(params: list[torch.Tensor], anchors: list[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's mu/2 * sum_j ||w_j - anchor_j||^2 (its gradient is mu * (w - anchor))."""
    total = sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))
    return 0.5 * mu * total


def train_local(
    model: Any,
    rows: TokenizedRows,
    positions: np.ndarray,
    cfg: TrainConfig,
    seed: int,
    desc: str | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train the model's trainable tensors on ``rows[positions]``.

    Linear warm-up over ``warmup_ratio`` of the steps, then a constant learning rate. With
    ``cfg.prox_mu > 0`` the FedProx term toward the starting weights is added to the loss.

    Args:
        model: A peft model whose adapter holds the starting (global) weights.
        rows: Tokenized rows.
        positions: This client's training rows.
        cfg: Training settings.
        seed: Seeds batch order and dropout, so a client's round is reproducible.
        desc: Progress-bar label.
        progress: Show a progress bar over steps.
    """
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    client_labels = rows.labels[torch.as_tensor(positions)]
    class_weights = loss_class_weights(cfg, client_labels, model)
    adjustment = client_adjustment(client_labels, model, cfg)
    anchors = [p.detach().clone() for p in params] if cfg.prox_mu > 0 else []
    opt = make_optimizer(params, cfg)
    total = planned_steps(len(positions), cfg)
    warmup = int(total * cfg.warmup_ratio)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    torch.manual_seed(seed)
    model.train()
    losses: list[float] = []
    samples = 0
    epoch = 0
    start = time.perf_counter()
    bar = progress_bar(total=total, desc=desc or "train", unit="step", leave=False, enabled=progress)
    dropout = contextlib.nullcontext() if cfg.backbone_dropout else frozen_dropout_off(model)
    with dropout:
        cache, head = head_feature_cache(model, rows, positions, cfg)
        while len(losses) < total:
            for chosen in epoch_positions(rows, positions, cfg, seed * 1000 + epoch):
                labels = rows.labels[torch.from_numpy(chosen)]
                with autocast(model, cfg.autocast):
                    if cache is not None:  # only the head trains: it reads the kept features
                        logits = head(cache.features(model, rows, chosen, cfg.eval_batch_size, cfg.autocast))
                    else:
                        batch = rows.batch(chosen)
                        batch.pop("labels")
                        logits = model(**batch).logits
                task_loss = client_loss(logits, labels, class_weights, adjustment)
                loss = task_loss + proximal_term(params, anchors, cfg.prox_mu) if anchors else task_loss
                loss.backward()
                if cfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(task_loss.detach()))
                samples += int(labels.shape[0])
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                if len(losses) >= total:
                    break
            epoch += 1
    bar.close()
    model.eval()
    return TrainResult(
        num_examples=len(positions),
        steps=len(losses),
        samples=samples,
        mean_loss=float(np.mean(losses)) if losses else float("nan"),
        seconds=time.perf_counter() - start,
    )


def make_optimizer(params: list[torch.Tensor], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The client optimizer, fresh each round: AdamW, or SGD with (heavy-ball) momentum."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def epoch_positions(rows: TokenizedRows, positions: np.ndarray, cfg: TrainConfig, seed: int) -> Iterator[np.ndarray]:
    """One pass over ``positions`` in batches of positions: shuffled, or length-bucketed (``cfg.length_bucketing``)."""
    if not cfg.length_bucketing:
        yield from rows.position_batches(positions, cfg.batch_size, shuffle_seed=seed)
        return
    pos = np.asarray(positions, dtype=np.int64)
    yield from length_bucketed_batches(pos, rows.lengths(pos), cfg.batch_size, seed, BUCKET_WINDOW)


def head_feature_cache(
    model: Any, rows: TokenizedRows, positions: np.ndarray, cfg: TrainConfig
) -> tuple[FeatureCache | None, torch.nn.Module | None]:
    """The model's feature cache and its head, when only the head trains and its input can be kept.

    ``(None, None)`` otherwise: the round runs the whole model (:mod:`lorafed.model.features`).
    The cache fills lazily, with the rows each step draws, so a round never runs more rows
    through the backbone than it would without it (a one-round process, such as ``lorafed client
    train``, runs the same rows; a long-lived one skips every row it has seen). One row of
    ``positions`` is run here to learn whether the head's input can be kept.
    """
    head = trainable_head(model, cfg.backbone_dropout)
    if head is None or not len(positions):
        return None, None
    cache = enable_feature_cache(model)
    if cache.features(model, rows, np.asarray(positions)[:1], cfg.eval_batch_size, cfg.autocast) is None:
        return None, None
    return cache, head
