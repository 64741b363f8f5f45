"""Accuracy cost of record-level DP at convergence: no DP against DP-SGD at epsilon 8, 3 and 1.

Settings: (a) clothing reviews by department (``configs/clothing_recommend.yaml``,
``data.max_length=64``), with the protocol of ``scripts/bench_quality.py --full``: 2,000
validation and 2,000 test rows (``federation.max_test_rows`` caps both), round cap 10, patience
3; (b) retail intents, Dirichlet 0.1 over 10 clients (``configs/retail_intents_dirichlet.yaml``,
800 test rows), round cap 8 and patience 2, shorter than the quality benchmark's 20 and 3 for
time (on (b) no target is judged). Every run is the convergence protocol
(:func:`lorafed.engine.compare.run_federated`): FedAvg up to the round cap, early-stopped on the
pooled validation rows, scored on the test rows at its best-validation round. The DP runs set
``train.record_dp.target_epsilon``, which each client's noise multiplier is calibrated to
(Opacus) for the round cap, so early stopping spends less; the epsilon reported is the most any
client spent by its last round, read from the clients' update headers (``metrics.jsonl``'s
``record_epsilon``). Delta is each client's default, 1 / (10 n); the row sampling and noise are
seeded by the run seed
(``record_dp.noise_seed``), so a rerun reproduces the numbers.

Same settings for the baseline, plus on clothing the DP recipe of ``scripts/_dp_recipe.py``
(applied to every level, no DP included; its docstring has what each candidate measured): fixed
class weights from the public prior, which DP-SGD applies to each row's clipped gradient
(without them clipped DP-SGD stays on the majority class), the head alone on the whitened mean
after layer 4 of reviews up to 128 tokens (``model.whitening``, fitted for each seed on the text
of the validation rows the server early-stops on: no client's training row, no test row), and
the batch, steps and optimizer; on intents the same
head-only recipe on the last layer's mean at the config's 64 tokens, without class weights
(``INTENTS_DP_RECIPE``). ``--levels plain`` adds
the non-private reference without the recipe (the public class weights only: plain LoRA on the
config's [CLS] model at 64 tokens, batch 16 x 12 steps, AdamW), so the report shows what DP with
its recipe costs against the federation a user runs without DP; ``--levels plain_tokens`` the
same reference at the recipe's 128 tokens, so it reads the same text as the DP runs. Each recipe
gets its own cohort (tokens and model) on the same rows, and the run checks that the test and
validation rows are the same. Record-level DP refuses balanced class weights
(a row's weight would depend on every other row's label) and length bucketing (Poisson sampling
draws each step's rows independently), so every run, the no-DP baseline included, has
``train.class_weighting=none`` and ``train.length_bucketing=false``: the only difference between
a row of the table and the baseline is DP-SGD. (The clothing config's own runs use balanced
weights, so their macro-F1 is not this baseline's.)

Order: seed 0 of every setting and level first, then seeds 1 and 2; no new run starts after
``--time-budget-s``; the results (``results/dp_record_accuracy.{json,md,png}``) are rewritten
after every run, so a partial run keeps what it measured. ``--levels`` runs a subset and
``--merge`` adds a command's runs to the report already written (same recipe only; with
``--replace`` a setting whose recipe changed starts over), so each level can be its own locked
command under the 15 minutes a command may hold the lock.

Measured on 2 cores here, setting (a), round cap 10 (int8 MiniLM, bf16 autocast): fitting the
whitening and preparing the cohorts about 40 s a seed, the recipe's
first level of a seed about 100 s, most of it computing the features of the rows its steps draw
(:mod:`lorafed.model.features`), each later level 1-15 s on the kept features; the plain-LoRA
references about 220 s (64 tokens) and 480 s (128 tokens). Setting (b), round cap 8: no DP
128-143 s, a DP run 120-184 s.

    flock /tmp/lorafed-heavy.lock env PYTHONPATH=. python scripts/dp_record_accuracy.py \\
        --settings a --seeds 1 --levels none,8,3,plain

``--tiny`` runs the same code on the tests' tiny random BERT and synthetic reviews (seconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorafed import measure
from lorafed.client.dp import plan_record_dp
from lorafed.config import RunConfig, load_config
from lorafed.engine.cohort import Cohort, prepare_cohort
from lorafed.engine.compare import run_federated, val_positions
from lorafed.engine.record import read_metrics
from lorafed.plots import figure, save_figure
from lorafed.wire.reader import load_payload

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from _dp_recipe import (  # noqa: E402
    CLOTHING_CLASS_WEIGHTS,
    CLOTHING_DP_RECIPE,
    CLOTHING_WHITENING_SHRINKAGE,
    INTENTS_DP_RECIPE,
    INTENTS_WHITENING_SHRINKAGE,
    TINY_DP_RECIPE,
    fit_validation_whitening,
    whitening_mark,
)

#: Per setting: title, config, overrides, round cap, patience ((a): bench_quality's full profile).
SETTINGS: dict[str, dict[str, Any]] = {
    "a": {
        "title": "(a) clothing reviews, Recommended IND, one client per department",
        "config": "clothing_recommend.yaml",
        "overrides": ["data.max_length=64", "federation.max_test_rows=2000"],
        "recipe": CLOTHING_DP_RECIPE,
        "whiten": CLOTHING_WHITENING_SHRINKAGE,
        "plain": CLOTHING_CLASS_WEIGHTS,
        "plain_tokens": [*CLOTHING_CLASS_WEIGHTS, "data.max_length=128"],
        "rounds": 10,
        "patience": 3,
    },
    "b": {
        "title": "(b) retail intents, Dirichlet alpha=0.1 over 10 clients",
        "config": "retail_intents_dirichlet.yaml",
        "overrides": ["federation.max_test_rows=800"],
        "recipe": INTENTS_DP_RECIPE,
        "whiten": INTENTS_WHITENING_SHRINKAGE,
        "plain": [],
        "plain_tokens": [],
        "rounds": 8,
        "patience": 2,
    },
}
#: ``--tiny``: every setting is configs/tiny.yaml on the tiny BERT, with these overrides.
TINY: dict[str, dict[str, Any]] = {
    "a": {
        "overrides": ["partition.scheme=natural", "partition.column=shop"],
        "recipe": [*TINY_DP_RECIPE, "model.pooling=mean"],  # and the whitening on the validation rows, as (a)
        "plain": [],
        "plain_tokens": [],
        "rounds": 2,
        "patience": 1,
    },
    "b": {
        "overrides": ["partition.scheme=dirichlet", "partition.num_clients=2"],
        "recipe": TINY_DP_RECIPE,
        "whiten": None,
        "rounds": 2,
        "patience": 1,
    },
}
#: Every run, the baseline included: what record-level DP requires (see the module docstring).
SAME_FOR_ALL = ["train.class_weighting=none", "train.length_bucketing=false"]
#: (name, target epsilon or None for no DP).
LEVELS: tuple[tuple[str, float | None], ...] = (("no DP", None), ("eps 8", 8.0), ("eps 3", 3.0), ("eps 1", 1.0))
#: ``--levels`` keys -> level names; ``plain`` and ``plain_tokens`` are the references below.
LEVEL_KEYS: dict[str, str] = {
    "none": "no DP",
    "8": "eps 8",
    "3": "eps 3",
    "1": "eps 1",
    "plain": "no DP, plain LoRA",
    "plain_tokens": "no DP, plain LoRA, recipe's tokens",
}
#: The non-private reference without the DP recipe's training changes (the setting's ``plain``
#: overrides instead of its ``recipe``: on clothing the public class weights only, so plain LoRA at
#: the config's batch 16 x 12 steps): what the recipe itself costs. Opt-in (``--levels ...,plain``).
PLAIN = LEVEL_KEYS["plain"]
#: The same reference at the DP recipe's ``data.max_length`` (the setting's ``plain_tokens``): on
#: clothing the recipe reads reviews up to 128 tokens, the quality protocol 64, so this one sees
#: the same text as the DP runs. Opt-in (``--levels ...,plain_tokens``).
PLAIN_TOKENS = LEVEL_KEYS["plain_tokens"]
#: The non-private references: level -> the setting's key of the overrides it runs instead of the recipe.
REFERENCE_RECIPES: dict[str, str] = {PLAIN: "plain", PLAIN_TOKENS: "plain_tokens"}
#: Each reference: (level, summary key of the cost against it, phrase in the targets).
REFERENCES = (
    ("no DP", "cost_points", ""),
    (PLAIN, "cost_vs_plain_points", " against plain LoRA without DP"),
    (PLAIN_TOKENS, "cost_vs_plain_tokens_points", " against plain LoRA without DP on the recipe's tokens"),
)
#: The issue's targets on clothing: (level, largest cost in macro-F1 points against no DP).
TARGETS = (("eps 8", 2.0), ("eps 3", 4.0))


def dp_overrides(target: float | None, seed: int) -> list[str]:
    """Record-level DP at ``target`` epsilon, noise seeded by the run seed (none for ``None``)."""
    if target is None:
        return []
    return [
        "train.record_dp.enabled=true",
        f"train.record_dp.target_epsilon={target}",
        f"train.record_dp.noise_seed={seed}",
    ]


def spent(work: Path, fed: Cohort, cfg: RunConfig) -> dict[str, Any]:
    """Epsilon spent (from the headers, via ``metrics.jsonl``), delta and noise multipliers of a DP run."""
    rows = read_metrics(work / "metrics.jsonl")
    last = rows[-1]
    eps = last["record_epsilon"] or {}
    sizes = [len(s.train) for s in fed.splits]
    z = [plan_record_dp(cfg.train, n, cfg.federation.rounds).noise_multiplier for n in sizes]
    header = load_payload(work / "rounds" / f"r{last['round']}" / f"{last['clients'][0]}.safetensors").meta.metrics
    return {
        "epsilon_max": max(eps.values()) if eps else None,
        "epsilon_min": min(eps.values()) if eps else None,
        "epsilon_at_cap": cfg.train.record_dp.target_epsilon,
        "delta_first_client": header.get("delta"),
        "noise_multiplier_min": min(z),
        "noise_multiplier_max": max(z),
        "failed_clients": sum(len(r["failed"]) for r in rows),
    }


def run_one(fed: Cohort, cfg: RunConfig, val: np.ndarray, rounds: int, patience: int, work: Path) -> dict[str, Any]:
    """One early-stopped federation; its best-round scores, rounds run, and under DP the epsilon spent."""
    res = run_federated(fed, cfg, work, val, rounds, patience)
    out = {k: res[k] for k in ("macro_f1", "accuracy", "best_round", "rounds_run", "seconds")}
    out["curve"] = [{k: p[k] for k in ("round", "val_macro_f1", "macro_f1")} for p in res["curve"]]
    if cfg.train.record_dp.enabled:
        cap = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, rounds=rounds))
        out.update(spent(work, fed, cap))
    return out


def summarize(per_seed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per level: macro-F1 and rounds over seeds, epsilon spent, and the cost against no DP on the same seeds."""
    out: dict[str, Any] = {}
    for name in [*(n for n, _ in LEVELS), *REFERENCE_RECIPES]:
        seeds = [s for s, r in per_seed.items() if name in r]
        if not seeds:
            continue
        runs = [per_seed[s][name] for s in seeds]
        row = {
            "macro_f1": measure.summarize([r["macro_f1"] for r in runs]),
            "rounds_run": measure.summarize([r["rounds_run"] for r in runs]),
            "seconds": measure.summarize([r["seconds"] for r in runs]),
        }
        if runs[0].get("epsilon_max") is not None:
            row["epsilon_max"] = max(r["epsilon_max"] for r in runs)
            row["noise_multiplier"] = [
                min(r["noise_multiplier_min"] for r in runs),
                max(r["noise_multiplier_max"] for r in runs),
            ]
        if name != "no DP" and name not in REFERENCE_RECIPES:
            for reference, key, _ in REFERENCES:
                paired = [s for s in seeds if reference in per_seed[s]]
                if paired:
                    row[key] = measure.summarize(
                        [100 * (per_seed[s][reference]["macro_f1"] - per_seed[s][name]["macro_f1"]) for s in paired]
                    )
        out[name] = row
    return out


def check_targets(settings: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's clothing targets, judged on the mean paired cost over seeds (``value`` in points).

    First against no DP with the same recipe, then the stricter readings: against the federation a
    user gets without DP (plain LoRA, no recipe), at the quality protocol's tokens and at the
    recipe's.
    """
    s = settings.get("a", {}).get("summary", {})
    targets = []
    for below, key, against in REFERENCES:
        for name, limit in TARGETS:
            cost = s.get(name, {}).get(key)
            if cost is None:
                continue
            eps = name.split()[1]
            targets.append(
                measure.target(
                    f"epsilon {eps} costs <= {limit:g} points on clothing{against}",
                    cost["mean"],
                    cost["mean"] <= limit,
                    seeds=cost["n"],
                    text=f"{cost['mean']:.2f} ± {cost['std']:.2f} macro-F1 points below {below} "
                    f"over {cost['n']} seed(s)",
                )
            )
    return targets


def render(report: dict[str, Any]) -> list[str]:
    """The Markdown report."""
    lines = [
        f"# Accuracy cost of record-level DP at convergence ({report['mode']})",
        "",
        "Each run: FedAvg up to the round cap, early-stopped on the pooled validation rows, test "
        "macro-F1 of its best-validation round (`lorafed.engine.compare.run_federated`, bench_quality's protocol). "
        "DP: DP-SGD in every client (Opacus), `target_epsilon` calibrated for the round cap, delta 1 / (10 n) per "
        "client; epsilon spent = the most any client spent by its last round (from its update headers). "
        "**Every run, the no-DP baseline included, has `train.class_weighting=none` and "
        "`train.length_bucketing=false`** (record-level DP refuses both), so DP-SGD is the only difference. "
        "Cost = no-DP macro-F1 minus DP macro-F1 on the same seed, in points, mean ± std over seeds. "
        "A setting's **DP recipe** (`scripts/_dp_recipe.py`, listed under each setting) is applied to every "
        "level of it, the no-DP baseline included (same protocol); the reference *no DP, plain LoRA* has the "
        "setting's plain overrides instead (on clothing the public class weights only), so it shows what the "
        "recipe itself costs without DP.",
        "",
        "Reproduce (each command adds its runs to the report with `--merge`):",
        "",
        *[f"    {c}" for c in measure.commands(report)],
        "",
    ]
    for s in report["settings"].values():
        lines += [
            f"## {s['title']}",
            "",
            f"`{s['config']}` with `{' '.join(s['overrides'])}`; round cap {s['rounds_cap']}, "
            f"patience {s['patience']}; "
            f"{s.get('clients', '?')} clients, {s.get('test_rows', '?')} test rows, {s.get('val_rows', '?')} "
            "validation rows. DP recipe (every level, no DP included): "
            f"`{' '.join(s.get('recipe', [])) or 'none'}`.",
            "",
            "| setting | seeds | test macro-F1 | cost vs no DP (points) | vs plain LoRA | vs plain LoRA, recipe's "
            "tokens | epsilon spent (max client) | noise z (clients) | rounds run | wall s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, v in s["summary"].items():
            f1, n = v["macro_f1"], v["macro_f1"]["n"]
            costs = [v.get(key) for _, key, _ in REFERENCES]
            cost_s = " | ".join("-" if c is None else f"{c['mean']:.2f} ± {c['std']:.2f}" for c in costs)
            eps = "-" if "epsilon_max" not in v else f"{v['epsilon_max']:.2f}"
            z = "-" if "noise_multiplier" not in v else "{:.2f}-{:.2f}".format(*v["noise_multiplier"])
            lines.append(
                f"| {name} | {n} | {100 * f1['mean']:.2f} ± {100 * f1['std']:.2f} | {cost_s} | {eps} | {z} | "
                f"{v['rounds_run']['mean']:.1f} | {v['seconds']['mean']:.0f} |"
            )
        summ = s["summary"]
        for ref, over in REFERENCE_RECIPES.items():
            if ref in summ and "no DP" in summ:
                gap = 100 * (summ[ref]["macro_f1"]["mean"] - summ["no DP"]["macro_f1"]["mean"])
                lines += [
                    "",
                    f"Without DP the recipe is {abs(gap):.2f} points {'below' if gap > 0 else 'above'} *{ref}* "
                    f"(`{' '.join(s.get(over, [])) or 'no overrides'}`): {100 * summ[ref]['macro_f1']['mean']:.2f} "
                    f"against {100 * summ['no DP']['macro_f1']['mean']:.2f}.",
                ]
        ran = {f"seed{seed}/{name}" for seed, runs in s["seeds"].items() for name in runs}  # a later --merge ran it
        skipped = [x for x in s["skipped"] if x.split("/", 1)[1] not in ran]
        if skipped:
            lines += ["", f"Skipped (time budget spent): {', '.join(skipped)}."]
        lines.append("")
    lines += ["## Targets", ""]
    lines += [f"- {t['target']}: **{measure.met_word(t['met'])}** — {t['text']}" for t in report["targets"]]
    if not report["targets"]:
        lines.append("- not evaluated (setting (a) or its DP runs missing from this run)")
    lines += ["", f"![macro-F1 per epsilon]({Path(report['plot']).name})", ""]
    return lines


def protocol(setting: dict[str, Any]) -> tuple[Any, ...]:
    """What must match for two runs of a setting to share one table: overrides (recipe), round cap, patience."""
    return (setting["overrides"], setting.get("rounds_cap"), setting.get("patience"))


def merged_into(report: dict[str, Any], prior: dict[str, Any]) -> None:
    """Put the runs of an earlier report of the same settings (``--merge``) into ``report``, before it runs.

    This run's own runs then replace those of the same setting, seed and level. Keeps the earlier
    commands (then this one) and wall time; settings not run now are kept as they were.
    """
    report["command"] = [*measure.commands(prior), report["command"]]
    report["prior_wall_seconds"] = prior.get("wall_seconds", 0.0)  # already holds the commands before it
    for k, old in prior["settings"].items():
        new = report["settings"].setdefault(k, old)
        if new is not old:
            new["seeds"] = {seed: dict(runs) for seed, runs in old["seeds"].items()}
            new["skipped"] = list(old["skipped"])
            new.update({x: old[x] for x in ("clients", "test_rows", "val_rows") if x in old})
        new["summary"] = summarize(new["seeds"])
    report["targets"] = check_targets(report["settings"])


def reference_protocol(setting: dict[str, Any]) -> tuple[Any, ...]:
    """What the non-private references of a setting depend on: its overrides without the recipe, the
    references' own overrides, round cap and patience (not the DP recipe)."""
    base = setting["overrides"][: len(setting["overrides"]) - len(setting.get("recipe", []))]
    refs = tuple(tuple(setting.get(r, [])) for r in REFERENCE_RECIPES.values())
    return (tuple(base), refs, setting.get("rounds_cap"), setting.get("patience"))


def dropped(prior: dict[str, Any], keys: list[str], now: dict[str, Any]) -> dict[str, Any]:
    """``prior`` without the recipe's runs of settings ``keys`` (``--replace``), and the commands that ran only them.

    A setting whose references (``plain``, ``plain_tokens``) would run exactly as before (same
    :func:`reference_protocol` in ``now``) keeps their runs, and the commands that ran them.
    """
    if not keys:
        return prior
    settings = {}
    kept_refs: set[str] = set()
    for k, v in prior["settings"].items():
        if k not in keys:
            settings[k] = v
        elif reference_protocol(v) == reference_protocol(now[k]):
            seeds = {s: {n: r for n, r in runs.items() if n in REFERENCE_RECIPES} for s, runs in v["seeds"].items()}
            settings[k] = {**now[k], "seeds": {s: runs for s, runs in seeds.items() if runs}, "skipped": []}
            settings[k].update({x: v[x] for x in ("clients", "test_rows", "val_rows") if x in v})
            kept_refs.add(k)
    out = {**prior, "settings": settings}

    def keeps(c: str) -> bool:
        ran = measure.command_settings(c, SETTINGS)
        levels = c.split("--levels ")[1].split()[0].split(",") if "--levels " in c else []
        return not ran <= set(keys) or (bool(ran & kept_refs) and bool({"plain", "plain_tokens"} & set(levels)))

    out["command"] = [c for c in measure.commands(prior) if keeps(c)]
    return out


def plot(settings: dict[str, Any], path: Path) -> Path:
    """Test macro-F1 (mean ± std over seeds) per privacy level, one panel per setting."""
    fig, axes = figure(1, len(settings), figsize=(5 * len(settings), 3.6), squeeze=False)
    for ax, s in zip(axes[0], settings.values(), strict=True):
        names = [n for n in s["summary"] if n not in REFERENCE_RECIPES]
        mean = [100 * s["summary"][n]["macro_f1"]["mean"] for n in names]
        std = [100 * s["summary"][n]["macro_f1"]["std"] for n in names]
        ax.errorbar(range(len(names)), mean, yerr=std, fmt="o-", capsize=4, label="DP recipe")
        for ref, style in ((PLAIN, "--"), (PLAIN_TOKENS, ":")):
            if ref in s["summary"]:
                ax.axhline(100 * s["summary"][ref]["macro_f1"]["mean"], ls=style, color="grey", label=ref)
        ax.set_xticks(range(len(names)), names)
        ax.set(ylabel="test macro-F1 (points)", title=s["title"][:48])
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run every setting, level and seed; write the results after each run."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny random BERT on synthetic reviews (seconds)")
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset of a,b")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="run seeds K..seeds-1 only (with --merge: add seeds to the runs of an earlier command)",
    )
    ap.add_argument(
        "--levels",
        default="none,8,3,1",
        help="comma-separated subset of none,8,3,1 (epsilons), plain (no DP without the recipe) and "
        "plain_tokens (the same at the recipe's max_length)",
    )
    ap.add_argument(
        "--merge",
        action="store_true",
        help="add this run's runs to those of <out>.json (same seed, setting and level: replaced)",
    )
    ap.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="add a config override to every setting's DP recipe (every level but plain; repeatable; an ablation)",
    )
    ap.add_argument(
        "--replace",
        action="store_true",
        help="with --merge: a setting whose recipe changed drops its earlier runs and the commands that ran only it",
    )
    ap.add_argument("--time-budget-s", type=float, default=10000, help="start no new run after this (0: none)")
    ap.add_argument("--out", default=str(ROOT / "results" / "dp_record_accuracy"), help="output path, no suffix")
    args = ap.parse_args(argv)
    keys = args.settings.split(",")
    if unknown := [k for k in keys if k not in SETTINGS]:
        ap.error(f"unknown settings {unknown}")
    if args.seeds < 1:
        ap.error("--seeds must be >= 1")
    if not 0 <= args.first_seed < args.seeds:
        ap.error(f"--first-seed must be in 0..{args.seeds - 1}")
    if unknown := [x for x in args.levels.split(",") if x not in LEVEL_KEYS]:
        ap.error(f"unknown levels {unknown}; expected some of {','.join(LEVEL_KEYS)}")
    want = {LEVEL_KEYS[x] for x in args.levels.split(",")}
    levels = [(name, eps, "recipe") for name, eps in LEVELS if name in want]
    levels += [(ref, None, recipe) for ref, recipe in REFERENCE_RECIPES.items() if ref in want]
    out = Path(args.out)
    budget = args.time_budget_s or None
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "mode": "tiny" if args.tiny else "real",
        "command": measure.command_line("dp_record_accuracy.py", sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.node()} ({os.cpu_count()} CPU cores), torch {torch.__version__}",
        "time_budget_s": budget,
        "same_for_all": SAME_FOR_ALL,
        "plot": str(out.with_name(out.name + ".png")),
        "settings": {},
        "targets": [],
    }

    def log(msg: str) -> None:
        print(f"{time.perf_counter() - t0:7.0f}s {msg}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="lorafed-dprec-") as tmp:
        work = Path(tmp)
        base = SAME_FOR_ALL
        if args.tiny:
            sys.path.insert(0, str(ROOT / "scripts"))
            from _tiny import make_tiny, tiny_overrides

            model_dir, csv = make_tiny(work, rows=300)
            base = [*tiny_overrides(model_dir, csv), *SAME_FOR_ALL]
        plans = {k: {**SETTINGS[k], **(TINY[k] if args.tiny else {})} for k in keys}
        for k, p in plans.items():
            p["recipe"] = [*p["recipe"], *args.sets]
            shown = [*p["recipe"], *([whitening_mark(p["whiten"])] if p.get("whiten") else [])]
            p["path"] = ROOT / "configs" / ("tiny.yaml" if args.tiny else p["config"])
            report["settings"][k] = {
                "title": f"tiny BERT, synthetic rows, as {p['title']}" if args.tiny else p["title"],
                "config": str(p["path"].relative_to(ROOT)),
                "overrides": [*p["overrides"], *SAME_FOR_ALL, *shown],
                "recipe": shown,
                **{recipe: list(p[recipe]) for recipe in REFERENCE_RECIPES.values()},
                "rounds_cap": p["rounds"],
                "patience": p["patience"],
                "seeds": {},
                "skipped": [],
                "summary": {},
            }
        if args.merge and out.with_suffix(".json").is_file():
            prior = json.loads(out.with_suffix(".json").read_text())
            old = prior["settings"]
            changed = [k for k in keys if k in old and protocol(old[k]) != protocol(report["settings"][k])]
            if prior["mode"] != report["mode"] or (changed and not args.replace):
                ap.error(
                    f"--merge: {out}.json has another mode, or other overrides (recipe), round cap or patience for "
                    f"settings {changed}; "
                    "--replace drops their earlier runs"
                )
            merged_into(report, dropped(prior, changed, report["settings"]))
        for seed in range(args.first_seed, args.seeds):
            for k, p in plans.items():
                s = report["settings"][k]

                def load(
                    extra: list[str], recipe: str = "recipe", p: dict[str, Any] = p, seed: int = seed
                ) -> RunConfig:
                    over = [*base, *p["overrides"], *p[recipe], f"seed={seed}", f"federation.rounds={p['rounds']}"]
                    over += extra
                    return load_config(p["path"], [*over, f"output_dir={work}"])

                if budget is not None and time.perf_counter() - t0 > budget:
                    s["skipped"] += [f"{k}/seed{seed}/{name}" for name, _, _ in levels]
                    continue
                # One cohort per recipe: the plain reference may read other tokens or another model
                # (the DP recipe's max_length, pooling and layers); each keeps its model's features.
                # recipe -> (cohort, validation rows, the overrides its whitening adds)
                feds: dict[str, tuple[Cohort, np.ndarray, list[str]]] = {}
                runs = s["seeds"].setdefault(str(seed), {})
                for name, target, recipe in levels:
                    if budget is not None and time.perf_counter() - t0 > budget:
                        s["skipped"].append(f"{k}/seed{seed}/{name}")
                        continue
                    if recipe not in feds:
                        fed = prepare_cohort(load([], recipe))
                        val = val_positions(fed)
                        whiten: list[str] = []
                        if recipe == "recipe" and p.get("whiten"):
                            # fitted on the validation rows' text, then the cohort with it (same rows)
                            path = work / f"whitening-{k}-{seed}.safetensors"
                            whiten = [fit_validation_whitening(fed, val, path, p["whiten"])]
                            fed = prepare_cohort(load(whiten, recipe))
                            if not np.array_equal(val_positions(fed), val):
                                raise RuntimeError(f"{k} seed {seed}: whitening changed the validation rows")
                        if feds:
                            first, first_val, _ = next(iter(feds.values()))
                            same = np.array_equal(fed.test_positions, first.test_positions)
                            if not (same and np.array_equal(val, first_val)):
                                raise RuntimeError(
                                    f"{k} seed {seed}: the {recipe} cohort has other test or validation rows"
                                )
                        feds[recipe] = (fed, val, whiten)
                    fed, val, whiten = feds[recipe]
                    s.update(
                        clients=len(fed.partition.client_ids), test_rows=len(fed.test_positions), val_rows=len(val)
                    )
                    cfg = load([*whiten, *dp_overrides(target, seed)], recipe)
                    run_dir = work / f"{k}-{seed}-{name.replace(' ', '_')}"
                    runs[name] = run_one(fed, cfg, val, p["rounds"], p["patience"], run_dir)
                    r = runs[name]
                    log(
                        f"[{k} seed {seed}] {name}: macro-F1 {r['macro_f1']:.4f}, {r['rounds_run']} rounds, "
                        f"epsilon {r.get('epsilon_max')}, {r['seconds']:.0f}s"
                    )
                    s["summary"] = summarize(s["seeds"])
                    report["targets"] = check_targets(report["settings"])
                    report["wall_seconds"] = time.perf_counter() - t0 + report.get("prior_wall_seconds", 0.0)
                    # After every run, so a partial run keeps its results.
                    measure.write_results(out, report, render(report))
                    plot({x: v for x, v in report["settings"].items() if v["summary"]}, Path(report["plot"]))
    for t in report["targets"]:
        log(f"target {t['target']}: {measure.met_word(t['met'])}: {t['text']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
