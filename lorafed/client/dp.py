"""Record-level differential privacy in each client: DP-SGD through Opacus.

Client-level DP (:mod:`lorafed.server.privacy`) hides whether a *client* took part; with a
handful of merchants that guarantee is weak (each merchant is a large share of the federation)
and it is the server that must be trusted to add the noise. Record-level DP hides whether any
one *row* of a client's data was used, and the client adds the noise itself, before its update
leaves it.

The mechanism (Abadi et al. 2016, "Deep learning with differential privacy"), per step:

* Poisson sampling: every training row of the client joins the step's batch independently with
  probability ``q = batch_size / n`` (n: the client's training rows), as the accountant assumes.
  A step may see an empty batch; it still takes a noise-only step.
* Per-sample gradients of the *trainable* tensors only (LoRA and head; for FFA-LoRA B and head;
  for RoLoRA the round's factor and head) through :class:`opacus.GradSampleModule`. The frozen
  backbone (int8 or not) has no trainable parameters, so Opacus puts no hooks on its layers and
  needs no grad sampler for them.
* :class:`opacus.optimizers.DPOptimizer`: each row's gradient (all trainable tensors together)
  is clipped to L2 norm ``C``, the clipped gradients are summed, Gaussian noise N(0, (z C)^2) is
  added to every coordinate, and the sum is divided by the *expected* batch size ``q n``. The
  round's optimizer (``train.optimizer``: AdamW, or SGD with momentum) then steps on that noisy
  gradient. FedProx's term mu * (w - w_global) depends on no row, so it is added after the noise
  (post-processing), not through the per-sample gradients; ``train.max_grad_norm`` then clips
  the noisy gradient with FedProx's term, as it clips the gradient in non-private training
  (post-processing too: it costs no privacy; ``null`` gives textbook DP-SGD).

Why DP models collapsed to the majority class, and what works (clothing "would recommend", 82 %
of the reviews recommend; the numbers are in ``results/dp_record_accuracy.md``):

* Clipping, not noise, decides the class balance. A clipped row pushes with force ``C`` however
  wrong the model is on it, so the rows of the majority class outvote the others on the head's
  bias; plain training escapes because misclassified minority rows have the large gradients.
  Measured: DP-SGD with *no* noise (z = 1e-6, C = 1) gave the majority-class model (macro-F1
  0.450) where plain training reached 0.765. Balanced weights from the client's own labels are
  refused (one row's label would change every other row's weight), and weights in the loss are
  undone by the clip; fixed, public ``train.class_weights`` are therefore applied to each row's
  *clipped* gradient, as w_y / max(w) (:func:`clip_and_weight_rows`): every row still contributes
  at most C, so noise and accounting are unchanged.
* The noise on the mean gradient has std z C / B per coordinate, a norm of about
  z C sqrt(d) / B over d trainable coordinates, against at most C of signal. With LoRA r=8 on
  query and value (d = 74k) and B = 16 that is ~7 C at epsilon 8 (z ~0.4), and the per-row
  gradient is mostly the head's anyway (norms at the start: head 1.1, LoRA B 0.065), so LoRA
  receives noise only, which AdamW (per-coordinate normalisation) turns into steps of size
  ``learning_rate`` on every coordinate. A large expected batch cuts z C / B: for a fixed
  epsilon z grows far slower than B (the largest clothing client: z 0.39 at batch 16 x 12 steps
  x 6 rounds, 0.49 at 128 x 4 x 6, so z / B is 6.3x smaller). ``federation.aggregation: head``
  trains only the head (d = 770 for two labels; a step is then a forward pass of the frozen
  backbone, so large batches are cheap). On clothing the pooled [CLS] features are too weak for
  a linear probe (no DP: macro-F1 0.498 after 3 rounds at batch 128, against 0.416 untrained);
  the mean of the token states, which all-MiniLM-L6-v2 was trained to produce
  (``model.pooling: mean``), is not: a pooled logistic regression scores 0.769 on it against
  0.692 on the [CLS] feature, and on it DP-SGD of the head keeps its signal
  (``results/dp_record_accuracy.md``; the clothing recipe of ``scripts/_dp_recipe.py``). The mean
  after layer 4 of reviews up to 128 tokens (``model.num_layers: 4``, ``data.max_length: 128``)
  is better still (0.830 on 2,000 test rows, against 0.790 for the last layer's at 64 tokens),
  and a head-only round reads features computed once per row (:mod:`lorafed.model.features`),
  so long reviews cost one pass, not one per step. Whitening that feature
  (``model.whitening``, :mod:`lorafed.model.whitening`) lifts the head most: the noise is
  isotropic, and on the raw feature the directions that separate the classes are the
  low-variance ones it drowns first (clothing, 3 seeds: epsilon 8 from 78.9 to 83.6, no DP from
  79.6 to 83.1).
* ``train.max_grad_norm`` clips the noisy mean gradient, whose noise alone has norm about
  z C sqrt(d) / B; above the bound every step shrinks by their ratio (intents, 27 classes: 1.2-3.4x
  at epsilon 3), so the DP recipes set it to ``null`` and a client warns when it binds.
* Unequal clients: q = B / n differs per client (the smallest clothing department has ~80 rows,
  so its q is 1 and its z is large); FedAvg weights by rows, so their noise is down-weighted.
* Clipping swings the federation between the classes: with the public class weights, DP-SGD
  with *no* noise (z = 1e-6, FFA, batch 64 x 6, AdamW) went from macro-F1 0.650 after round 1 to
  0.170 (all the minority class) after round 2 and back to 0.716 after round 3 (0.755 at round
  5), where non-private training rose steadily; with noise (epsilon 8 or 3, batch 64 or 256,
  AdamW or SGD) every run fell the same way in round 2 and none recovered within 6 rounds
  (``scripts/_dp_recipe.py`` has every run).

* ``record_dp.clipping: per_role`` clips the LoRA and head tensors each on its own (to C / sqrt(k)),
  so LoRA gets a share of the clip budget the head's gradient took (per-step signal to noise of
  LoRA B on the largest clothing client 0.0006 flat, 0.020 per role with every row clipped). It
  does not rescue clothing at epsilon 8: when every row is clipped, a row pushes the head's
  class balance with the same force however well it is already fitted, so nothing pulls the
  balance back (one run: 0.463, 0.371, 0.175 over rounds 1-3). ``scripts/dp_signal.py``
  (``results/dp_signal.md``) measures each role's signal against the noise and the largest
  client's curves alone: the signal of a clothing row after the class weights is far below the
  noise of epsilon 8 at these client sizes.

Every ``train`` setting either applies under DP or is refused when the config is loaded
(:mod:`lorafed.config`): ``class_weighting: balanced`` (a row's weight would depend on every other
row's label; fixed ``class_weights`` are allowed, see above), ``gradient_checkpointing`` (the
recomputed forward would feed Opacus' hooks twice) and ``length_bucketing`` (Poisson sampling
draws each step's rows independently, so there are no length-sorted batches to keep). Warm-up,
weight decay, autocast, backbone dropout and ``epochs``/``max_steps`` (the steps per round) apply
as in :func:`lorafed.client.train.train_local`.

Accounting: epsilon comes from Opacus' accountant (``rdp``: :class:`opacus.accountants.RDPAccountant`,
or ``prv``) for ``round x steps_per_round`` sampled-Gaussian steps at rate ``q`` and noise ``z``,
at ``delta`` (default ``1 / (10 n)``). The client keeps no state between rounds: it charges
itself as if it had taken part in every round up to the current one, an upper bound when it
skipped rounds (and exact with ``federation.fraction: 1``). This holds across every engine
(in-process, file drop, Flower, ``lorafed client train``), which share only the round number. It
assumes the client's rows and training settings (n, batch size, steps, z) stay the same across
rounds. Before training, a client whose epsilon after this round would exceed
``max_epsilon`` raises :class:`~lorafed.errors.PrivacyBudgetError`.

The row sampling and the noise are seeded from the operating system (``noise_seed: null``): a
noise generator seeded from public values (config seed, round, client id) could be replayed and
the noise subtracted. So, unlike a non-DP round, a DP round is not reproducible unless
``noise_seed`` is set, which is for experiments only.

Why one module over 300 lines: the plan (sampling rate, noise, delta), the accountant and
the DP training loop must agree on the same steps; kept together so they cannot drift.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import secrets
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lorafed.client.train import (
    TrainResult,
    autocast,
    client_loss,
    fixed_class_weights,
    frozen_dropout_off,
    head_feature_cache,
    make_optimizer,
    planned_steps,
)
from lorafed.config import RecordDPConfig, TrainConfig
from lorafed.data.tokens import TokenizedRows
from lorafed.errors import PrivacyBudgetError
from lorafed.progress import progress_bar
from lorafed.wire.roles import tensor_role

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecordDPPlan:
    """One client's DP-SGD settings and accounting, fixed for the whole federation.

    Attributes:
        noise_multiplier: z: the noise std on the clipped sum is ``z * clip_norm``.
        clip_norm: C: each row's gradient norm bound.
        sample_rate: q: the probability each row joins a step's batch.
        steps_per_round: DP steps the client takes in one round.
        delta: The delta of the guarantee.
        max_epsilon: The budget (``inf`` for none).
        accountant: ``rdp`` or ``prv`` (Opacus' accountant names).
        noise_seed: Seed of sampling and noise, or ``None`` for operating-system entropy.
        num_rows: The client's training rows n.
    """

    noise_multiplier: float
    clip_norm: float
    sample_rate: float
    steps_per_round: int
    delta: float
    max_epsilon: float
    accountant: str = "rdp"
    noise_seed: int | None = None
    num_rows: int = 1

    @property
    def expected_batch_size(self) -> float:
        """``q n``: the divisor of the noisy clipped sum."""
        return self.sample_rate * self.num_rows

    def steps_through(self, round_: int) -> int:
        """DP steps charged after ``round_`` rounds (participation in every round assumed)."""
        return round_ * self.steps_per_round

    def epsilon_after(self, round_: int) -> float:
        """Epsilon at :attr:`delta` after ``round_`` rounds."""
        return epsilon_spent(
            self.noise_multiplier, self.sample_rate, self.steps_through(round_), self.delta, self.accountant
        )

    def check_budget(self, round_: int, client_id: str) -> float:
        """Epsilon after ``round_``, if it is within the budget.

        Raises:
            PrivacyBudgetError: Training round ``round_`` would take epsilon past ``max_epsilon``.
        """
        eps = self.epsilon_after(round_)
        if eps > self.max_epsilon:
            raise PrivacyBudgetError(client_id, round_, eps, self.max_epsilon, self.delta)
        return eps

    def report(self, round_: int) -> dict[str, float | int]:
        """What a client puts in its header's ``metrics`` after round ``round_``."""
        return {
            "epsilon": self.epsilon_after(round_),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "dp_steps": self.steps_through(round_),
        }


def epsilon_spent(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon of ``steps`` Poisson-sampled Gaussian steps, from Opacus' accountant.

    Args:
        noise_multiplier: z (0 gives ``inf``).
        sample_rate: q in (0, 1].
        steps: Composed steps (0 gives 0).
        delta: The delta of the guarantee.
        accountant: ``rdp`` or ``prv``.
    """
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    return _epsilon_cached(float(noise_multiplier), float(sample_rate), int(steps), float(delta), accountant)


#: Rényi orders of the ``rdp`` accountant: Opacus' defaults and larger ones, which the small
#: clients (large q, few steps) need for a tight bound.
RDP_ORDERS: tuple[float, ...] = (
    *(1 + x / 10.0 for x in range(1, 100)),
    *range(12, 64),
    *(80, 96, 128, 192, 256, 384, 512),
)


def _import_opacus() -> None:
    """Import Opacus without the root log handler its import installs.

    ``opacus.utils.module_utils`` calls ``logging.basicConfig`` when it is imported, which gives a
    process whose root logger had no handler one on stderr: a Flower node or a user's script then
    printed every log line twice once record-level DP ran. A root logger that already has a
    handler makes ``basicConfig`` do nothing, so one is held there for the import.
    """
    root = logging.getLogger()
    guard = None if root.handlers else logging.NullHandler()
    if guard is not None:
        root.addHandler(guard)
    try:
        import opacus  # noqa: F401
    finally:
        if guard is not None:
            root.removeHandler(guard)


def _accountant_kwargs(accountant: str) -> dict[str, Any]:
    return {"alphas": list(RDP_ORDERS)} if accountant == "rdp" else {}


@functools.lru_cache(maxsize=1024)
def _epsilon_cached(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    _import_opacus()
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return float(acc.get_epsilon(delta, **_accountant_kwargs(accountant)))


@functools.lru_cache(maxsize=256)
def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """The smallest z (within Opacus' tolerance) whose epsilon after ``steps`` is at most ``target_epsilon``."""
    _import_opacus()
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
            **_accountant_kwargs(accountant),
        )
    )


def plan_record_dp(cfg: TrainConfig, n_rows: int, planned_rounds: int) -> RecordDPPlan:
    """A client's plan: its sample rate, steps per round, delta, z (calibrated if asked) and budget.

    Args:
        cfg: Training settings; ``cfg.record_dp`` must be enabled.
        n_rows: The client's training rows.
        planned_rounds: ``federation.rounds``: a ``target_epsilon`` is met after this many rounds.
    """
    dp: RecordDPConfig = cfg.record_dp
    n = max(int(n_rows), 1)
    q = min(1.0, cfg.batch_size / n)
    steps = planned_steps(n, cfg)
    delta = dp.delta if dp.delta is not None else 1.0 / (10 * n)
    if dp.target_epsilon is not None:
        z = calibrate_noise(dp.target_epsilon, delta, q, max(planned_rounds, 1) * steps, dp.accountant)
    else:
        z = float(dp.noise_multiplier or 0.0)
    budget = dp.max_epsilon if dp.max_epsilon is not None else dp.target_epsilon
    return RecordDPPlan(
        z, dp.clip_norm, q, steps, delta, math.inf if budget is None else budget, dp.accountant, dp.noise_seed, n
    )


def _generators(plan: RecordDPPlan, seed: int) -> tuple[np.random.Generator, torch.Generator]:
    """The row-sampling and noise generators: from ``noise_seed`` and ``seed``, else from OS entropy."""
    if plan.noise_seed is None:
        return np.random.default_rng(secrets.randbits(128)), torch.Generator().manual_seed(secrets.randbits(63))
    mixed = np.random.SeedSequence([plan.noise_seed, seed & 0xFFFFFFFF])
    sample_seed, noise_seed = mixed.generate_state(2, dtype=np.uint64)
    return np.random.default_rng(int(sample_seed)), torch.Generator().manual_seed(int(noise_seed) >> 1)


def make_private(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    noise_multiplier: float,
    clip_norm: float,
    expected_batch_size: float,
    generator: torch.Generator | None = None,
) -> tuple[Any, Any]:
    """Wrap ``model`` for per-sample gradients of its trainable tensors and ``optimizer`` for DP.

    The caller must call ``cleanup()`` on the returned module when done, which removes Opacus'
    hooks and per-sample attributes from ``model`` (the model itself is not replaced).

    Returns:
        ``(GradSampleModule, DPOptimizer)``; ``loss_reduction="mean"``: pass a batch-mean loss.
    """
    _import_opacus()
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    dp_opt = DPOptimizer(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=clip_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=generator,
    )
    return gsm, dp_opt


def _after_noise(dp_opt: Any, anchors: list[torch.Tensor], cfg: TrainConfig) -> None:
    """Opacus' step hook, on the noisy mean gradient: FedProx's term, then ``max_grad_norm``.

    Both only post-process the privatized gradient (neither reads a row), so they cost no privacy.
    """
    if anchors:
        for p, a in zip(dp_opt.params, anchors, strict=True):
            p.grad.add_(p.detach() - a, alpha=cfg.prox_mu)
    if cfg.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(dp_opt.params, cfg.max_grad_norm)


def clip_and_weight_rows(
    params: list[torch.Tensor],
    clip_norm: float,
    row_weights: torch.Tensor | None = None,
    groups: list[int] | None = None,
) -> None:
    """Clip each row's gradient to ``clip_norm``, then scale it by its weight in [0, 1], in place.

    Works on Opacus' per-sample gradients (``p.grad_sample``, one row per sampled row). With
    ``groups=None`` the norm is taken over all of ``params`` together, as Opacus clips. With
    ``groups`` (one group id per tensor; ``record_dp.clipping: per_role``) each of the k groups
    is clipped on its own to ``clip_norm / sqrt(k)``, so a row's whole gradient still has norm
    at most ``clip_norm``. The weight comes *after* the clip: a weight in the loss would scale
    the gradient before it and be undone whenever the row is clipped (typically every row, with
    a small clip norm). As every row then contributes at most ``clip_norm``, the sensitivity and
    so the noise and the accounting are unchanged; Opacus' own clipping that follows leaves
    these rows as they are (up to a factor 1 - 1e-6).

    Args:
        params: The trainable tensors, each with ``grad_sample`` of shape ``[rows, *shape]``.
        clip_norm: C.
        row_weights: One weight per row, each in [0, 1]; ``None``: 1 for every row.
        groups: The clipping group of each tensor (same length as ``params``); ``None``: one group.
    """
    if not params:
        return
    rows = params[0].grad_sample.shape[0]
    ids = [0] * len(params) if groups is None else list(groups)
    per_tensor = torch.stack([p.grad_sample.reshape(rows, -1).float().norm(dim=1) for p in params], dim=1)
    bound = clip_norm / math.sqrt(len(set(ids)))
    factors: dict[int, torch.Tensor] = {}
    for g in set(ids):
        cols = [i for i, x in enumerate(ids) if x == g]
        norms = per_tensor[:, cols].norm(dim=1)
        factors[g] = (bound / (norms + 1e-6)).clamp(max=1.0)
        if row_weights is not None:
            factors[g] = factors[g] * row_weights.to(norms)
    for p, g in zip(params, ids, strict=True):
        p.grad_sample = p.grad_sample.float() * factors[g].view(-1, *([1] * (p.grad_sample.dim() - 1)))


def clip_groups(names: list[str], clipping: str) -> list[int] | None:
    """The clipping group of each trainable tensor: its role (LoRA A, LoRA B, head) for ``per_role``."""
    if clipping != "per_role":
        return None
    roles = sorted({tensor_role(n) for n in names})
    return [roles.index(tensor_role(n)) for n in names]


def _empty_step(dp_opt: Any) -> None:
    """Mark an empty Poisson batch: zero per-sample gradients, so the step adds noise only."""
    for p in dp_opt.params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)


@functools.lru_cache(maxsize=32)
def _warn_clipped_noise(noise: float, max_grad_norm: float, coords: int) -> None:
    """Say once per (noise, bound, size) that ``max_grad_norm`` shrinks every DP step (see ``train.max_grad_norm``)."""
    logger.warning(
        "record_dp: the noise alone has norm ~%.2f on the mean gradient (z C sqrt(%d) / B), above "
        "train.max_grad_norm %g, so every step shrinks about %.1fx; train.max_grad_norm=null gives "
        "textbook DP-SGD",
        noise,
        coords,
        max_grad_norm,
        noise / max_grad_norm,
    )


def train_local_dp(
    model: Any,
    rows: TokenizedRows,
    positions: np.ndarray,
    cfg: TrainConfig,
    seed: int,
    plan: RecordDPPlan,
    desc: str | None = None,
    progress: bool = True,
) -> TrainResult:
    """:func:`~lorafed.client.train.train_local` under DP-SGD: same optimizer, warm-up, autocast, FedProx.

    Takes exactly ``plan.steps_per_round`` steps, each on a Poisson sample of ``positions``. Each
    row's gradient is clipped to ``plan.clip_norm`` before the noise; ``cfg.max_grad_norm`` (if
    set) clips the noisy mean gradient after it, with FedProx's term, as in non-private training.

    Args:
        model: A peft model whose adapter holds the starting (global) weights; its trainable
            tensors are the round's roles.
        rows: Tokenized rows.
        positions: This client's training rows.
        cfg: Training settings.
        seed: Seeds dropout (and, with ``noise_seed``, sampling and noise).
        plan: The client's DP plan (:func:`plan_record_dp`).
        desc: Progress-bar label.
        progress: Show a progress bar over steps.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    groups = clip_groups([n for n, _ in named], cfg.record_dp.clipping)
    anchors = [p.detach().clone() for p in params] if cfg.prox_mu > 0 else []
    opt = make_optimizer(params, cfg)
    total = plan.steps_per_round
    warmup = int(total * cfg.warmup_ratio)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    sampler, noise_gen = _generators(plan, seed)
    torch.manual_seed(seed)
    model.train()
    # The frozen backbone's own dropout off, as in non-private training (train.backbone_dropout).
    stack = contextlib.ExitStack()
    if not cfg.backbone_dropout:
        stack.enter_context(frozen_dropout_off(model))
    # Only the head trains: its per-sample gradients need only its input, kept across steps and rounds.
    cache, head = head_feature_cache(model, rows, positions, cfg)
    private = model if head is None else head
    gsm, dp_opt = make_private(private, opt, plan.noise_multiplier, plan.clip_norm, plan.expected_batch_size, noise_gen)
    if cfg.max_grad_norm is not None:
        coords = sum(p.numel() for p in params)
        noise = plan.noise_multiplier * plan.clip_norm * math.sqrt(coords) / plan.expected_batch_size
        if noise > cfg.max_grad_norm:
            _warn_clipped_noise(round(noise, 2), cfg.max_grad_norm, coords)
    if anchors or cfg.max_grad_norm is not None:
        dp_opt.attach_step_hook(functools.partial(_after_noise, anchors=anchors, cfg=cfg))
    # Fixed public class weights act on the clipped rows (clip_and_weight_rows), scaled to at most 1.
    row_weights = fixed_class_weights(cfg.class_weights, model) if cfg.class_weights else None
    if row_weights is not None:
        row_weights = row_weights / row_weights.max()
    pos = np.asarray(positions, dtype=np.int64)
    losses: list[float] = []
    samples = 0
    start = time.perf_counter()
    bar = progress_bar(total=total, desc=desc or "train (DP)", unit="step", leave=False, enabled=progress)
    try:
        for _ in range(total):
            chosen = pos[sampler.random(len(pos)) < plan.sample_rate]
            if len(chosen):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # Opacus' notes on backward hooks, once per call
                    with autocast(model, cfg.autocast):
                        if cache is not None:
                            labels = rows.labels[torch.from_numpy(chosen)]
                            logits = gsm(cache.features(model, rows, chosen, cfg.eval_batch_size, cfg.autocast))
                        else:
                            batch = rows.batch(chosen)
                            labels = batch.pop("labels")
                            logits = gsm(**batch).logits
                    loss = client_loss(logits, labels, None)
                    loss.backward()
                if row_weights is not None or groups is not None:
                    weights = None if row_weights is None else row_weights[labels]
                    clip_and_weight_rows(dp_opt.params, plan.clip_norm, weights, groups)
                losses.append(float(loss.detach()))
                samples += len(chosen)
            else:
                _empty_step(dp_opt)
            dp_opt.step()
            sched.step()
            dp_opt.zero_grad(set_to_none=True)
            bar.update(1)
            if losses:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        bar.close()
        gsm.cleanup()
        stack.close()
        for p in params:
            for attr in ("summed_grad", "grad_sample"):
                if hasattr(p, attr):
                    delattr(p, attr)
            p.grad = None
    model.eval()
    return TrainResult(
        num_examples=len(positions),
        steps=total,
        samples=samples,
        mean_loss=float(np.mean(losses)) if losses else float("nan"),
        seconds=time.perf_counter() - start,
    )
