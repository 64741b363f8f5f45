"""Personalization: after the federation, each client's own adapter, the global one plus a local part.

Three ways, all starting from the final global adapter and run on the client's own rows only:

* ``finetune``: a short local fine-tune of every adapter tensor (LoRA and head).
* ``local_head`` (FedRep-style, Collins et al. 2021): the global LoRA stays frozen (the shared
  representation); only the classifier head is retrained locally.
* ``prior`` (post-hoc logit adjustment for label shift, Menon et al. 2021, "Long-tail learning
  via logit adjustment"; the local-prior idea of FedLC / FedRoD's personalized heads): nothing is
  trained; ``tau * log(prior)`` is added to the classifier's output bias, ``prior`` being the
  client's label frequencies on its train rows with ``personalize.prior_smoothing`` added to each
  count. When the federation's pooled prior is flat, tau = 1 is the Bayes correction from the
  pooled posterior to the client's; the client picks tau from ``personalize.prior_taus``
  (each a candidate of the rule below). The result is an ordinary adapter with another head bias.

For ``finetune`` and ``local_head``, training runs in checkpoints of ``personalize.eval_every``
steps (each a fresh AdamW, as a federated round is), at most ``personalize.max_epochs`` passes
over the client's rows. A client leaves the global adapter only with evidence from its own rows
(:func:`choose_adapter`; for ``prior`` each tau is a candidate): the checkpoint must beat the
global adapter's validation macro-F1 by ``personalize.min_gain`` and, by a one-sided paired
bootstrap over the validation rows at ``personalize.confidence`` (Bonferroni over the
checkpoints), by more than 0. ``prior`` trains nothing and moves each logit in one known
direction, so it faces a non-inferiority rule instead (``personalize.prior_margin``): a tau
is adopted when it scores at least the global adapter and the bootstrap bound of its gain is
above ``-prior_margin``. A client's validation rows are often all right under a converged
global adapter (intents, Dirichlet 0.1: 0-2 errors per client), so no gain can be shown there,
while on its test rows a single prediction of an intent it never holds costs a whole class of
F1 0. Without validation rows (a newcomer with 25 labelled rows keeps
none back), ``personalize.cross_fit`` folds of its train rows give out-of-fold predictions that
face the same rule. Otherwise the global adapter is kept, so a
client whose rows do not clearly help keeps it. Nothing personalized leaves the client: the
result is written as a payload of kind ``personalized`` that ``lorafed export`` accepts like any
adapter.

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
PersonalizeMethod = Literal["none", "finetune", "local_head", "prior"]

#: The adapter roles each method changes locally (``prior`` trains nothing; it shifts the head's bias).
METHOD_ROLES: dict[str, frozenset[Role]] = {
    "none": frozenset(),
    "finetune": ALL_ROLES,
    "local_head": frozenset({"head"}),
    "prior": frozenset({"head"}),
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
        steps: Local optimizer steps run (cross-fitting's included).
        best_step: Steps of the kept checkpoint (0: the global adapter was kept).
        val_global: Macro-F1 of the global adapter on the rows that decided (the validation
            rows, or the train rows under cross-fitting; ``None`` when nothing decided).
        val_best: Macro-F1 of the kept adapter on those rows (out-of-fold under cross-fitting).
        num_examples: The client's training rows.
        selection: What decided: ``validation``, ``cross_fit``, ``last`` (no rows to decide on:
            the last checkpoint) or ``none`` (nothing trained).
        gain_bound: Lower confidence bound of the best candidate's macro-F1 gain over the global
            adapter (paired bootstrap; ``None`` without the test or without candidates).
        tau: ``prior`` only: the adopted strength of the logit adjustment (``None``: the global
            adapter was kept).
    """

    tensors: dict[str, torch.Tensor]
    method: str
    steps: int
    best_step: int
    val_global: float | None
    val_best: float | None
    num_examples: int
    selection: str = "validation"
    gain_bound: float | None = None
    tau: float | None = None

    @property
    def adopted(self) -> bool:
        """Whether the client left the global adapter."""
        return self.best_step > 0 or self.tau is not None

    def header_metrics(self) -> dict[str, Any]:
        """What the payload header reports."""
        out: dict[str, Any] = {
            "method": self.method,
            "steps": self.steps,
            "best_step": self.best_step,
            "selection": self.selection,
        }
        if self.val_global is not None:
            out.update(val_macro_f1_global=self.val_global, val_macro_f1=self.val_best)
        if self.gain_bound is not None:
            out["gain_bound"] = self.gain_bound
        if self.tau is not None:
            out["tau"] = self.tau
        return out


def _clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.float32).clone() for k, v in state.items()}


def local_steps(p: PersonalizeConfig, n_rows: int, batch_size: int) -> int:
    """``p.steps``, capped at ``p.max_epochs`` passes over ``n_rows`` rows in batches of ``batch_size``.

    20 steps of 16 rows are 6.4 passes over a 50-row newcomer: the cap keeps a few rows from
    being memorized (3 epochs: 5 steps on 25 rows, 10 on 50, 19 on 100).
    """
    if p.max_epochs is None or n_rows <= 0:
        return p.steps
    return max(1, min(p.steps, math.ceil(p.max_epochs * n_rows / batch_size)))


def bootstrap_macro_f1_gains(
    y: np.ndarray, pred_old: np.ndarray, pred_new: np.ndarray, num_labels: int, resamples: int, seed: int
) -> np.ndarray:
    """Paired bootstrap of macro-F1(``pred_new``) - macro-F1(``pred_old``) over the rows.

    Each resample draws ``len(y)`` rows with replacement, the same rows for both predictions
    (paired), and scores both as :func:`lorafed.metrics.classification_scores` does: the mean F1
    over the labels present in the resample's truth or predictions.

    Args:
        y: True label ids.
        pred_old: The reference's predicted label ids (the global adapter's).
        pred_new: The candidate's predicted label ids.
        num_labels: Number of labels (ids are ``0..num_labels-1``).
        resamples: Bootstrap resamples.
        seed: Seeds the draws.

    Returns:
        One gain per resample.
    """
    y, a, b = (np.asarray(v, dtype=np.int64) for v in (y, pred_old, pred_new))
    n = len(y)
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    # Row counts per resample: resample j's weight of row i (a multinomial draw), without a B x n x n array.
    flat = (idx + np.arange(resamples)[:, None] * n).ravel()
    w = np.bincount(flat, minlength=resamples * n).reshape(resamples, n).astype(np.float64)
    eye = np.eye(num_labels)
    truth = eye[y]

    def macro(pred: np.ndarray) -> np.ndarray:
        hit = eye[pred]
        tp, pc, tc = w @ (truth * hit), w @ hit, w @ truth
        present = (pc + tc) > 0
        f1 = np.divide(2 * tp, pc + tc, out=np.zeros_like(tp), where=present)
        return f1.sum(axis=1) / present.sum(axis=1)

    return macro(b) - macro(a)


@dataclass(frozen=True)
class Adoption:
    """The adoption rule's verdict on a list of candidates (see :func:`choose_adapter`).

    Attributes:
        index: The adopted candidate (``None``: keep the global adapter).
        scores: Each candidate's macro-F1 on the deciding rows.
        global_score: The global adapter's macro-F1 on them.
        bound: Lower confidence bound of the best-scoring candidate's gain (``None`` without the test).
    """

    index: int | None
    scores: list[float]
    global_score: float
    bound: float | None


def choose_adapter(
    y: np.ndarray,
    global_pred: np.ndarray,
    candidates: list[np.ndarray],
    num_labels: int,
    p: PersonalizeConfig,
    seed: int,
    margin: float | None = None,
) -> Adoption:
    """Which candidate adapter, if any, a client adopts over the global one, from predictions on its own rows.

    A candidate qualifies when its macro-F1 beats the global adapter's by at least
    ``p.min_gain`` and, with ``p.confidence`` set, the lower ``1 - (1 - confidence) / m``
    quantile of its paired-bootstrap gain (:func:`bootstrap_macro_f1_gains`, ``p.bootstrap``
    resamples) is above 0, ``m`` being the number of candidates (Bonferroni: the best of ``m``
    noisy checkpoints looks better than it is). The best-scoring qualifier is adopted (the
    earliest on ties); none qualifying keeps the global adapter.

    With ``margin`` set the rule is non-inferiority instead: a candidate qualifies when its
    macro-F1 is at least the global adapter's and the same bootstrap bound is above ``-margin``
    (``min_gain`` is not used).

    Args:
        y: True label ids of the deciding rows.
        global_pred: The global adapter's predictions on them.
        candidates: Each candidate's predictions on them.
        num_labels: Number of labels.
        p: The settings (``min_gain``, ``confidence``, ``bootstrap``).
        seed: Seeds the bootstrap.
        margin: Non-inferiority margin (``None``: the superiority rule above).
    """
    from lorafed.metrics import classification_scores

    names = tuple(str(i) for i in range(num_labels))
    g = classification_scores(y, global_pred, names)[1]
    scores = [classification_scores(y, c, names)[1] for c in candidates]
    if not candidates:
        return Adoption(None, scores, g, None)
    level = None if p.confidence is None else (1 - p.confidence) / len(candidates)
    bounds: list[float | None] = []
    for c in candidates:
        if level is None:
            bounds.append(None)
            continue
        gains = bootstrap_macro_f1_gains(y, global_pred, c, num_labels, p.bootstrap, seed)
        bounds.append(float(np.quantile(gains, level)))
    top = max(range(len(scores)), key=lambda i: (scores[i], -i))
    need, floor = (p.min_gain, 0.0) if margin is None else (0.0, -margin)
    ok = [i for i, s in enumerate(scores) if s >= g + need and (bounds[i] is None or bounds[i] > floor)]
    pick = max(ok, key=lambda i: (scores[i], -i)) if ok else None
    return Adoption(pick, scores, g, bounds[top])


def personal_learning_rate(p: PersonalizeConfig, train_lr: float) -> float:
    """The local learning rate of personalization and cold start: the setting, else a tenth of ``train_lr``."""
    from lorafed.config import PERSONALIZE_LR_SCALE

    return p.learning_rate if p.learning_rate is not None else train_lr * PERSONALIZE_LR_SCALE


class _Trainer:
    """Runs the method's local steps from a given state on given rows (a fresh AdamW each call)."""

    def __init__(self, site: Site, p: PersonalizeConfig, progress: bool) -> None:
        cfg = site.config
        self.site, self.p, self.progress = site, p, progress
        self.tcfg = dataclasses.replace(
            cfg.train,
            learning_rate=personal_learning_rate(p, cfg.train.learning_rate),
            warmup_ratio=0.0,
            prox_mu=0.0,
        )

    def train(self, state: dict[str, torch.Tensor], positions: np.ndarray, steps: int, tag: int) -> dict[str, Any]:
        from lorafed.client.train import train_local
        from lorafed.seeds import client_seed
        from lorafed.wire.adapter import get_adapter_state, set_adapter_state
        from lorafed.wire.roles import trainable_roles

        site, model = self.site, self.site.model.model
        set_adapter_state(model, state)
        with trainable_roles(model, METHOD_ROLES[self.p.method]):
            train_local(
                model,
                site.rows,
                positions,
                dataclasses.replace(self.tcfg, max_steps=steps),
                client_seed(site.config.seed, 100_000 + tag, f"{site.client_id}.personal"),
                desc=f"personalize {site.client_id}",
                progress=self.progress,
            )
        return _clone(get_adapter_state(model))

    def predict(self, state: dict[str, torch.Tensor], positions: np.ndarray) -> np.ndarray:
        from lorafed import metrics
        from lorafed.wire.adapter import set_adapter_state

        cfg = self.site.config
        set_adapter_state(self.site.model.model, state)
        logits = metrics.predict_logits(
            self.site.model.model, self.site.rows, positions, cfg.train.eval_batch_size, cfg.train.autocast
        )
        return np.asarray(logits).argmax(axis=1)


def personalize_report(
    site: Site,
    global_state: dict[str, torch.Tensor],
    pcfg: PersonalizeConfig | None = None,
    *,
    progress: bool = False,
) -> Personalized:
    """Personalize ``global_state`` on ``site``'s rows (see the module docstring).

    With validation rows, training runs in checkpoints of ``eval_every`` steps (early-stopped by
    ``patience``) and :func:`choose_adapter` picks among them or keeps the global adapter. Without
    validation rows (a newcomer with 25 rows keeps none back), ``cross_fit`` folds of the train
    rows decide: each fold is predicted by an adapter tuned on the other folds, and the tuned
    adapter (trained on every row) is adopted only if those out-of-fold predictions pass
    :func:`choose_adapter` against the global adapter's; with ``cross_fit`` 0 or fewer than
    2 rows a fold, the last checkpoint is kept unjudged (``cross_fit`` 0) or the global adapter
    is kept (too few rows).

    Args:
        site: The client (its model, rows, split, config and id).
        global_state: The final global adapter (every tensor).
        pcfg: The personalization settings (default: ``site.config.personalize``).
        progress: Show progress bars over steps.

    Returns:
        The personalized adapter with its figures.
    """
    cfg = site.config
    p = pcfg if pcfg is not None else cfg.personalize
    split = site.split
    n_train = len(split.train)
    state = _clone(global_state)
    if p.method == "none" or n_train == 0:
        return Personalized(state, p.method, 0, 0, None, None, n_train, "none")
    trainer = _Trainer(site, p, progress)
    steps = local_steps(p, n_train, cfg.train.batch_size)
    if p.method == "prior":
        result = _by_prior(trainer, state, n_train)
    elif len(split.val) > 0:
        result = _by_validation(trainer, state, steps, n_train)
    elif p.cross_fit > 0:
        result = _by_cross_fit(trainer, state, steps, n_train)
    else:
        last = trainer.train(state, split.train, steps, 1)
        result = Personalized(last, p.method, steps, steps, None, None, n_train, "last")
    logger.info(
        "%s: personalized (%s) in %d step(s), kept step %d (%s)%s",
        site.client_id,
        p.method,
        result.steps,
        result.best_step,
        result.selection,
        ("" if result.tau is None else f", tau {result.tau:g}")
        + (
            ""
            if result.val_global is None
            else f", macro-F1 {result.val_global:.4f} -> {result.val_best:.4f}"
            + ("" if result.gain_bound is None else f", gain bound {result.gain_bound:+.4f}")
        ),
    )
    return result


def _by_validation(trainer: _Trainer, state: dict[str, torch.Tensor], steps: int, n_train: int) -> Personalized:
    """Checkpoints every ``eval_every`` steps on the train rows, the adapter chosen on the validation rows."""
    from lorafed.metrics import classification_scores

    site, p = trainer.site, trainer.p
    split = site.split
    y = site.rows.labels[torch.as_tensor(split.val)].numpy()
    num_labels = len(site.identity.labels)
    names = tuple(site.identity.labels)
    global_pred = trainer.predict(state, split.val)
    best = classification_scores(y, global_pred, names)[1]
    states, preds, at = [], [], []
    done, since, checkpoint, current = 0, 0, 0, state
    while done < steps:
        chunk = min(p.eval_every, steps - done)
        checkpoint += 1
        current = trainer.train(current, split.train, chunk, checkpoint)
        done += chunk
        pred = trainer.predict(current, split.val)
        states.append(current)
        preds.append(pred)
        at.append(done)
        v = classification_scores(y, pred, names)[1]
        if v > best:
            best, since = v, 0
        else:
            since += 1
            if p.patience is not None and since >= p.patience:
                break
    verdict = choose_adapter(y, global_pred, preds, num_labels, p, _bootstrap_seed(site))
    if verdict.index is None:
        return Personalized(
            state, p.method, done, 0, verdict.global_score, verdict.global_score, n_train, "validation", verdict.bound
        )
    i = verdict.index
    return Personalized(
        states[i], p.method, done, at[i], verdict.global_score, verdict.scores[i], n_train, "validation", verdict.bound
    )


def _by_cross_fit(trainer: _Trainer, state: dict[str, torch.Tensor], steps: int, n_train: int) -> Personalized:
    """Out-of-fold predictions on the train rows decide between the global adapter and the tuned one."""
    site, p = trainer.site, trainer.p
    train = np.asarray(site.split.train)
    k = p.cross_fit
    drawn = _folds(site, n_train, k)
    if drawn is None:
        return Personalized(state, p.method, 0, 0, None, None, n_train, "cross_fit")
    perm, folds = drawn
    oof = np.empty(n_train, dtype=np.int64)
    run = 0
    for f, held in enumerate(folds):
        fit = np.sort(train[np.setdiff1d(perm, held)])
        s = local_steps(p, len(fit), site.config.train.batch_size)
        tuned = trainer.train(state, fit, s, 1_000 + f)
        run += s
        oof[held] = trainer.predict(tuned, train[held])
    y = site.rows.labels[torch.as_tensor(train)].numpy()
    verdict = choose_adapter(
        y, trainer.predict(state, train), [oof], len(site.identity.labels), p, _bootstrap_seed(site)
    )
    if verdict.index is None:
        return Personalized(
            state, p.method, run, 0, verdict.global_score, verdict.global_score, n_train, "cross_fit", verdict.bound
        )
    final = trainer.train(state, train, steps, 1)
    return Personalized(
        final,
        p.method,
        run + steps,
        steps,
        verdict.global_score,
        verdict.scores[0],
        n_train,
        "cross_fit",
        verdict.bound,
    )


def _folds(site: Site, n_train: int, k: int) -> tuple[np.ndarray, list[np.ndarray]] | None:
    """A seeded permutation of ``0..n_train-1`` and its ``k`` folds (indices into the train rows).

    ``None`` (logged) with fewer than 2 rows a fold: the caller keeps the global adapter.
    """
    from lorafed.seeds import client_seed

    if n_train < 2 * k:
        logger.info("%s: %d row(s), too few for %d folds: the global adapter is kept", site.client_id, n_train, k)
        return None
    perm = np.random.default_rng(client_seed(site.config.seed, 0, f"{site.client_id}.cross-fit")).permutation(n_train)
    return perm, np.array_split(perm, k)


def log_prior(labels: np.ndarray, num_labels: int, smoothing: float) -> np.ndarray:
    """``log((n_y + smoothing) / (n + smoothing * num_labels))`` for each label ``y``, ``n_y`` its rows in ``labels``.

    The smoothing keeps a label the client never holds finite: with 1 (add-one), a label absent
    from 700 rows over 27 labels sits at log(1/727) = -6.6, one held 50 times at log(51/727) = -2.7.
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_labels).astype(np.float64)
    return np.log((counts + smoothing) / (counts.sum() + smoothing * num_labels))


def head_bias_key(state: dict[str, torch.Tensor], num_labels: int) -> str:
    """The adapter key of the classifier's output bias: the one head tensor named ``*bias`` of shape ``[num_labels]``.

    Raises:
        ModelError: No such tensor, or more than one (a head this method does not know).
    """
    from lorafed.errors import ModelError
    from lorafed.wire.roles import tensor_role

    keys = [
        k
        for k, v in state.items()
        if tensor_role(k) == "head" and k.endswith("bias") and tuple(v.shape) == (num_labels,)
    ]
    if len(keys) != 1:
        raise ModelError(
            f"personalize.method prior: the adapter needs exactly one head bias of shape [{num_labels}], "
            f"found {keys or 'none'}"
        )
    return keys[0]


def prior_adjusted(state: dict[str, torch.Tensor], shift: np.ndarray) -> dict[str, torch.Tensor]:
    """``state`` with ``shift`` (one value a label) added to the classifier's output bias; other tensors shared."""
    key = head_bias_key(state, len(shift))
    out = dict(state)
    out[key] = state[key] + torch.as_tensor(shift, dtype=torch.float32)
    return out


def _by_prior(trainer: _Trainer, state: dict[str, torch.Tensor], n_train: int) -> Personalized:
    """Logit adjustment by the client's label prior, tau chosen by the adoption rule (see the module docstring).

    With validation rows, each tau of ``prior_taus`` (the prior from the train rows) is a
    candidate scored on them. Without, ``cross_fit`` folds of the train rows give each tau's
    out-of-fold predictions (each fold's prior from the other folds) and the adopted tau's prior
    comes from every train row; with ``cross_fit`` 0, tau = 1 is applied unjudged; with too few
    rows for the folds the global adapter is kept.
    """
    site, p = trainer.site, trainer.p
    split, k = site.split, p.cross_fit
    num_labels = len(site.identity.labels)
    labels = site.rows.labels.numpy()
    train = np.asarray(split.train)
    taus = list(p.prior_taus)
    whole = log_prior(labels[train], num_labels, p.prior_smoothing)
    head_bias_key(state, num_labels)  # a head this method cannot adjust fails before any scoring

    def kept(selection: str, verdict: Adoption | None = None) -> Personalized:
        g = None if verdict is None else verdict.global_score
        b = None if verdict is None else verdict.bound
        return Personalized(state, p.method, 0, 0, g, g, n_train, selection, b)

    if len(split.val) > 0:
        selection, rows = "validation", np.asarray(split.val)
        preds = [trainer.predict(prior_adjusted(state, t * whole), rows) for t in taus]
    elif k == 0:
        return Personalized(prior_adjusted(state, whole), p.method, 0, 0, None, None, n_train, "last", tau=1.0)
    else:
        drawn = _folds(site, n_train, k)
        if drawn is None:
            return kept("cross_fit")
        selection, rows = "cross_fit", train
        perm, folds = drawn
        preds = [np.empty(n_train, dtype=np.int64) for _ in taus]
        for held in folds:
            fold_prior = log_prior(labels[train[np.setdiff1d(perm, held)]], num_labels, p.prior_smoothing)
            for pred, t in zip(preds, taus, strict=True):
                pred[held] = trainer.predict(prior_adjusted(state, t * fold_prior), train[held])
    y = labels[rows]
    verdict = choose_adapter(
        y, trainer.predict(state, rows), preds, num_labels, p, _bootstrap_seed(site), margin=p.prior_margin
    )
    if verdict.index is None:
        return kept(selection, verdict)
    tau = taus[verdict.index]
    return Personalized(
        prior_adjusted(state, tau * whole),
        p.method,
        0,
        0,
        verdict.global_score,
        verdict.scores[verdict.index],
        n_train,
        selection,
        verdict.bound,
        tau,
    )


def _bootstrap_seed(site: Site) -> int:
    from lorafed.seeds import client_seed

    return client_seed(site.config.seed, 0, f"{site.client_id}.bootstrap")


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
