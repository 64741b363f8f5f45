"""Cold start: a party that was not in the federation, with 25 to 200 labelled rows, starts from the global adapter.

:func:`cold_start` runs the federation without the held-out client, then compares the global adapter
(as is, and after a few local steps) with training from the untrained adapter on the same rows.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lorafed.client.personalize import personalize_report, sample_rows
from lorafed.config import PersonalizeConfig, RunConfig
from lorafed.data.tokens import Split
from lorafed.engine.cohort import Cohort, evaluate_state, prepare_cohort
from lorafed.engine.scenarios import COLD_START_SIZES, client_site, converged_global, final_global
from lorafed.errors import ConfigError
from lorafed.partition import Partition
from lorafed.seeds import client_seed

logger = logging.getLogger(__name__)


def federation_without(fed: Cohort, holdout: str) -> tuple[Cohort, int]:
    """``fed`` without client ``holdout`` (a newcomer that was not in the federation).

    The result shares the model and the tokenized rows; its global test rows are the other
    clients' (capped by ``federation.max_test_rows`` as in :func:`prepare_cohort`).

    Returns:
        The reduced federation and the index of ``holdout`` in ``fed``.

    Raises:
        ConfigError: No such client, or too few left for ``federation.min_clients``.
    """
    ids = list(fed.partition.client_ids)
    if holdout not in ids:
        raise ConfigError([f"hold-out client {holdout!r} is not in the partition; clients: {', '.join(ids)}"])
    k = ids.index(holdout)
    keep = [i for i in range(len(ids)) if i != k]
    if len(keep) < fed.config.federation.min_clients:
        raise ConfigError(
            [
                f"without {holdout}, {len(keep)} client(s) remain, fewer than federation.min_clients="
                f"{fed.config.federation.min_clients}"
            ]
        )
    part = Partition(
        [ids[i] for i in keep],
        [fed.partition.indices[i] for i in keep],
        [*fed.partition.notes, f"client {holdout} held out of the federation"],
    )
    splits = [fed.splits[i] for i in keep]
    test = np.sort(np.concatenate([s.test for s in splits]))
    cap = fed.config.federation.max_test_rows
    if cap is not None and len(test) > cap:
        test = np.sort(np.random.default_rng(fed.config.seed).choice(test, size=cap, replace=False))
    return dataclasses.replace(fed, partition=part, splits=splits, test_positions=test), k


def cold_start(
    config: RunConfig,
    holdout: str,
    out_dir: str | Path,
    sizes: Sequence[int] = COLD_START_SIZES,
    *,
    fed: Cohort | None = None,
    local_steps: int | None = None,
    alone_steps: int | None = None,
    repeats: int = 1,
    rounds: int | None = None,
    patience: int | None = None,
    variants: Mapping[str, PersonalizeConfig] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """A newcomer with few labelled rows: the federation's global adapter vs training alone.

    The federation runs without ``holdout`` (:func:`federation_without`, written to
    ``out_dir/federation``). For each size k, k rows are drawn from the newcomer's train rows
    (nested draws, ``repeats`` seeds) and three adapters are scored on its test rows:

    * ``global``: the final global adapter as is (needs no rows; the same for every k);
    * ``global_tuned``: the global adapter fine-tuned (LoRA and head) on the k rows by the
      ``personalize`` recipe: at most ``local_steps`` steps and ``personalize.max_epochs`` passes
      over the rows, adopted only if ``personalize.cross_fit`` folds of the rows say it beats
      the global adapter (no validation rows: a newcomer with 25 rows keeps none back);
    * ``alone``: the untrained (round-0) adapter trained ``alone_steps`` steps on the k rows;
    * each of ``variants`` (other recipes from the global adapter, for diagnosis).

    With ``patience`` set, the federation runs to convergence
    (:func:`~lorafed.engine.scenarios.converged_global`: at most ``rounds`` rounds, early-stopped
    on its pooled validation rows) and its best round's global adapter is the start.

    Args:
        config: The federation config.
        holdout: The newcomer's client id.
        out_dir: Folder for the federation's run and ``cold_start.png``.
        sizes: Row budgets (a size above the newcomer's train rows is capped to them).
        fed: The full federation already prepared for ``config``.
        local_steps: Fine-tuning steps from the global adapter (default ``personalize.steps``).
        alone_steps: Steps of training alone (default ``rounds x train.max_steps``, what a client
            of the federation trains over the run, or ``personalize.steps``).
        repeats: Draws of the k rows per size (scores are averaged).
        rounds: Round cap of a converged federation (default ``federation.rounds``).
        patience: Early stopping of the federation (``None``: ``federation.rounds`` rounds, the last kept).
        variants: Name -> other fine-tuning recipes from the global adapter, scored beside it.
        progress: Show progress bars.

    Returns:
        ``{"holdout", "test_rows", "train_rows", "federation": {...}, "curve": [{"rows", "global",
        "global_tuned", "adopted", "alone", "variants"}...], "seconds"}`` (macro-F1 values;
        ``adopted``: the share of draws whose tuned adapter was kept over the global one).
    """
    from lorafed.engine.inprocess import simulate

    t0 = time.perf_counter()
    out = Path(out_dir)
    full = prepare_cohort(config) if fed is None else fed
    others, k = federation_without(full, holdout)
    if patience is None:
        summary = simulate(config, out / "federation", progress=progress, fed=others)
        best_round, glob = final_global(full, out / "federation")
        fed_info: dict[str, Any] = {"final": summary["final"], "best_round": best_round, "rounds_run": best_round}
    else:
        cap = config.federation.rounds if rounds is None else rounds
        best_round, glob, run = converged_global(others, out / "federation", cap, patience)
        fed_info = {
            "final": {"macro_f1": run["macro_f1"], "accuracy": run["accuracy"]},
            "best_round": best_round,
            "rounds_run": run["rounds_run"],
            "round_cap": cap,
            "patience": patience,
        }
    split = full.splits[k]
    test = split.test
    if len(test) == 0:
        raise ConfigError([f"hold-out client {holdout!r} has no test rows"])
    steps_fed = config.federation.rounds * (config.train.max_steps or config.personalize.steps)
    local_steps = config.personalize.steps if local_steps is None else local_steps
    alone_steps = steps_fed if alone_steps is None else alone_steps
    tune = dataclasses.replace(
        config.personalize, method="finetune", steps=local_steps, eval_every=local_steps, patience=None
    )
    # Training alone runs its steps unjudged (there is no global adapter to fall back to), from the
    # untrained adapter at the training learning rate, as a client that trains from scratch does
    # (the tenth that personalization takes by default is for a converged start).
    lr = config.train.learning_rate
    alone = PersonalizeConfig("finetune", alone_steps, lr, alone_steps, None, max_epochs=None, cross_fit=0)
    recipes = dict(variants or {})
    g_score = evaluate_state(full, glob, test).macro_f1
    curve = []
    for n in sizes:
        n_eff = min(int(n), len(split.train))
        tuned_scores, alone_scores, adopted = [], [], []
        variant_scores: dict[str, list[float]] = {name: [] for name in recipes}
        for rep in range(repeats):
            rows = sample_rows(split.train, n_eff, client_seed(config.seed, rep, f"cold-start.{holdout}"))
            site = client_site(full, k, Split(rows, np.empty(0, np.int64), test))
            tuned = personalize_report(site, glob, tune, progress=progress)
            tuned_scores.append(evaluate_state(full, tuned.tensors, test).macro_f1)
            adopted.append(tuned.adopted)
            scratch = personalize_report(site, full.initial_state, alone, progress=progress).tensors
            alone_scores.append(evaluate_state(full, scratch, test).macro_f1)
            for name, recipe in recipes.items():
                v = personalize_report(site, glob, recipe, progress=progress).tensors
                variant_scores[name].append(evaluate_state(full, v, test).macro_f1)
        point = {
            "rows": int(n),
            "rows_used": n_eff,
            "global": g_score,
            "global_tuned": float(np.mean(tuned_scores)),
            "adopted": float(np.mean(adopted)),
            "alone": float(np.mean(alone_scores)),
            "variants": {name: float(np.mean(v)) for name, v in variant_scores.items()},
        }
        curve.append(point)
        logger.info(
            "cold start %s, %d rows: global %.4f, global + %d steps %.4f, alone %.4f",
            holdout,
            n_eff,
            g_score,
            local_steps,
            point["global_tuned"],
            point["alone"],
        )
    result = {
        "holdout": holdout,
        "test_rows": len(test),
        "train_rows": len(split.train),
        "local_steps": local_steps,
        "recipe": {"max_epochs": tune.max_epochs, "cross_fit": tune.cross_fit, "confidence": tune.confidence},
        "alone_steps": alone_steps,
        "repeats": repeats,
        "federation": {"clients": list(others.partition.client_ids), **fed_info},
        "curve": curve,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    plot_cold_start(result, out / "cold_start.png")
    return result


def plot_cold_start(result: Mapping[str, Any], path: str | Path, title: str | None = None) -> Path:
    """Macro-F1 of the newcomer against its labelled rows: global, global + local steps, alone."""
    from lorafed.plots import figure, save_figure

    fig, ax = figure(figsize=(5.2, 3.6))
    xs = [c["rows"] for c in result["curve"]]
    for key, label, style in (
        ("global", "global adapter", "--"),
        ("global_tuned", f"global + up to {result['local_steps']} local steps (guarded)", "-o"),
        ("alone", f"alone ({result['alone_steps']} steps from untrained)", "-s"),
    ):
        ax.plot(xs, [c[key] for c in result["curve"]], style, label=label)
    ax.set_xscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.set_xlabel("labelled rows of the newcomer")
    ax.set_ylabel("macro-F1 on its test rows")
    ax.set_title(title or f"cold start: {result['holdout']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
