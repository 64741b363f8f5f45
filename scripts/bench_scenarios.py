"""The shopping-guide scenarios, measured: personalization, cold start, mixed LoRA ranks, continued iteration.

Both start from a converged federation (the convergence protocol of ``bench_quality.py``,
:func:`lorafed.engine.scenarios.converged_global`: at most ``converge.rounds`` rounds, stopped
after ``converge.patience`` rounds without a better macro-F1 on the pooled validation rows; the
best-validation round's global adapter is the start).

Personalization (settings (a) clothing by department, (b) intents Dirichlet 0.1): every client
personalizes the global adapter three ways (``finetune``: LoRA and head; ``local_head``: the head
only, FedRep-style; ``prior``: the head's bias shifted by tau x the log of the client's label
prior, nothing trained), adopting a checkpoint only if it beats the global adapter on the
client's validation rows by ``personalize.min_gain`` and by a one-sided 95% paired bootstrap
(``personalize.confidence``, Bonferroni over the checkpoints or taus); ``prior`` adopts a tau
under the non-inferiority rule (``personalize.prior_margin``: at least the global's validation
score, bootstrap bound of the gain above ``-prior_margin``); per client, on its own test
slice: global vs personalized vs the client trained alone (best of ``local_rounds`` checkpoints on
its validation rows). A diagnostic beside them, no target: ``prior`` with the rule relaxed to
"not worse on validation" (``min_gain`` 0, no bootstrap), to tell the method from the guard.
Targets on (b), per method: personalized mean >= global + 2 points; no client more than 1 point
below its global score.

Cold start: the federation runs without one client (clothing: ``Jackets``; intents: its largest
Dirichlet client); that newcomer then holds 25, 50, 100 or 200 labelled rows, and its test rows
score the global adapter as is, the global adapter after the ``personalize`` recipe on the rows
(at most ``local_steps`` steps and ``personalize.max_epochs`` passes, kept only if 2-fold
cross-fitting on the rows says it beats the global adapter), and an adapter trained from the
untrained one on those rows alone; diagnostic recipes beside it (the earlier fixed-step
fine-tune, the epoch cap alone, the head only, a tenth of the learning rate). Target: with 50
rows, the global start (after its recipe) beats training alone by >= 10 points.

Heterogeneous ranks (setting (a) only): the six departments train LoRA ranks 4, 8, 16 in turn
(two of each) in one federation whose global adapter has rank 8 (``federation.hetero_ranks``:
the server averages the dense changes (alpha_i / r_i) B_i A_i and cuts the mean back to rank 8
by SVD), against the same federation with every client at r=8, each to convergence (the protocol
of ``bench_quality.py``: at most 10 rounds of 12 steps, stopped after 3 rounds without a better
macro-F1 on the pooled validation rows; the best-validation round's test scores), for 2 seeds.
If mixed ranks lose more than 2 points, seed 0 runs again with no client below rank 8 and with
none above it, to locate the loss; the SVD cuts' errors are reported per round. Target: the mixed
federation's macro-F1 within 2 points of the all-r=8 one (mean over seeds).

Continued iteration (setting (a) only): federate four departments (Jackets and Intimate kept
out), then resume the same run folder with all six for more rounds (``simulate(resume=True)``
with a changed client set, the lineage unbroken). Each department's test macro-F1 on its own
test slice before and after. Targets: no first-four department loses more than 1 point; each
new department gains.

Real mode budget (not yet measured; estimated from ~100 samples/s on intents at max_length 64 and
~35 samples/s on clothing at max_length 64 with the int8 MiniLM on 2 idle cores): personalization
and cold start about 20-25 minutes; hetero ranks 2 seeds x 2 federations of at most 10 rounds x
5-6 clients x 12 steps x 16 rows (~2.5 min per federation), plus 2 ablations when triggered (12
minutes measured); continued iteration 4 x 2 x 8 x 16 + 6 x 2 x 8 x 16 =
2,560 samples plus the per-department scoring (~2 min). The whole real run: about 25-30 minutes.
``--parts`` runs a subset (e.g. ``--parts hetero,continue --settings a``: ~5 minutes).
``--tiny`` runs the tests' tiny random BERT on synthetic reviews in well under a minute.

Writes results/scenarios.json (with ``targets``), results/scenarios.md and
results/scenarios_cold_<setting>.png.

    flock /tmp/lorafed-heavy.lock env PYTHONPATH=. python scripts/bench_scenarios.py
    flock /tmp/lorafed-heavy.lock env PYTHONPATH=. python scripts/bench_scenarios.py --parts hetero,continue
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lorafed.config import PersonalizeConfig, RunConfig, load_config  # noqa: E402
from lorafed.measure import command_line, met_word, target, write_results  # noqa: E402

logger = logging.getLogger("bench_scenarios")

#: Personalization methods compared (each judged against the targets).
METHODS = ("finetune", "local_head", "prior")
#: Diagnostic personalization variants (no target): name -> (method, PersonalizeConfig overrides).
DIAGNOSTICS: dict[str, tuple[str, dict[str, Any]]] = {
    "prior, unguarded": ("prior", {"min_gain": 0.0, "confidence": None, "prior_margin": None}),
}
#: The measured parts, in the order they run; ``hetero`` and ``continue`` only for settings that define them.
PARTS = ("personalize", "cold", "hetero", "continue")

#: Real-mode settings: config, overrides, the cold-start newcomer (``None``: the largest client).
SETTINGS: dict[str, dict[str, Any]] = {
    "a": {
        "title": "clothing by department",
        "config": "clothing_recommend.yaml",
        "overrides": ["data.max_rows=10000", "data.max_length=64", "federation.max_test_rows=400"],
        "holdout": "Jackets",
        "personalize": {"steps": 12, "eval_every": 4, "patience": 2, "learning_rate": None},
        "local_rounds": 3,
        # the round caps and patience of bench_quality.py's full profile for (a) and (b)
        "converge": {"rounds": 10, "patience": 3},
        "cold": {"local_steps": 12, "alone_steps": 36},
        # to convergence (bench_quality.py's (a): cap 10, patience 3, 12 steps a round; ~3 min per
        # federation), 2 seeds; the ablations run on seed 0 only if mixed ranks lose more than 2 points
        "hetero": {
            "ranks": (4, 8, 16),
            "overrides": ["train.max_steps=12"],
            "rounds": 10,
            "patience": 3,
            "seeds": 2,
            "ablations": {"ranks 4 and 8 only": (4, 8, 8), "ranks 8 and 16 only": (8, 8, 16)},
            "ablate_below": -0.02,
        },
        "continue": {"new": ("Jackets", "Intimate"), "rounds": (2, 2), "overrides": ["train.max_steps=8"]},
    },
    "b": {
        "title": "intents Dirichlet 0.1",
        "config": "retail_intents_dirichlet.yaml",
        "overrides": ["data.max_rows=8000", "federation.max_test_rows=800"],
        "holdout": None,
        "personalize": {"steps": 20, "eval_every": 5, "patience": 2, "learning_rate": None},
        "local_rounds": 3,
        "converge": {"rounds": 20, "patience": 3},
        "cold": {"local_steps": 20, "alone_steps": 100},
    },
}

#: ``--tiny``: the tests' tiny random BERT on synthetic reviews (3 shops; Dirichlet over 4 clients).
TINY: dict[str, dict[str, Any]] = {
    "a": {
        "title": "tiny, natural by shop",
        "overrides": ["partition.scheme=natural", "partition.column=shop", "federation.rounds=2"],
        "holdout": "north",
        "personalize": {"steps": 4, "eval_every": 2, "patience": 2, "learning_rate": None},
        "local_rounds": 2,
        "converge": {"rounds": 2, "patience": 1},
        "cold": {"local_steps": 3, "alone_steps": 6},
        "hetero": {
            "ranks": (2, 4, 8),
            "overrides": [],
            "rounds": 2,
            "patience": 2,
            "seeds": 1,
            "ablations": {"ranks 2 and 4 only": (2, 4, 4)},
            "ablate_below": 1.0,  # always, so the tests cover them
        },
        "continue": {"new": ("east",), "rounds": (2, 2), "overrides": []},
    },
    "b": {
        "title": "tiny, Dirichlet 0.5",
        "overrides": [
            "partition.scheme=dirichlet",
            "partition.num_clients=4",
            "partition.alpha=0.5",
            "federation.min_clients=3",
            "federation.rounds=2",
        ],
        "holdout": None,
        "personalize": {"steps": 4, "eval_every": 2, "patience": 2, "learning_rate": None},
        "local_rounds": 2,
        "converge": {"rounds": 2, "patience": 1},
        "cold": {"local_steps": 3, "alone_steps": 6},
    },
}

SIZES = (25, 50, 100, 200)
TINY_SIZES = (5, 10, 20)


def setting_config(
    key: str, spec: dict[str, Any], tiny: list[str] | None, out: Path, extra: list[str] | None = None
) -> RunConfig:
    """The setting's config with its budget overrides (the tiny model's with ``--tiny``), then ``extra``."""
    path = ROOT / "configs" / ("tiny.yaml" if tiny is not None else spec["config"])
    overrides = [*(tiny or []), *spec["overrides"], f"output_dir={out}", f"name=scenarios_{key}", *(extra or [])]
    return load_config(path, overrides)


def run_personalization(config: RunConfig, spec: dict[str, Any], out: Path) -> dict[str, Any]:
    """One federation, then each personalization method and the local-only baseline, per client."""
    from lorafed.engine.cohort import prepare_cohort
    from lorafed.engine.scenarios import converged_global, measure_personalization, personalize_all

    t0 = time.perf_counter()
    fed = prepare_cohort(config)
    run = out / "federation"
    best_round, glob, fed_run = converged_global(fed, run, **spec["converge"])
    t_fed = time.perf_counter() - t0
    methods: dict[str, Any] = {}
    diagnostics: dict[str, Any] = {}
    baseline: dict[str, Any] | None = None
    runs = [(m, m, {}) for m in METHODS] + [(name, m, kw) for name, (m, kw) in DIAGNOSTICS.items()]
    for name, m, kw in runs:
        t = time.perf_counter()
        pcfg = PersonalizeConfig(method=m, **{**spec["personalize"], **kw})
        done = personalize_all(config, run, fed=fed, pcfg=pcfg, round_=best_round)
        local = baseline is None
        res = measure_personalization(
            fed, glob, {c: v.tensors for c, v in done.items()}, local_only=local, local_rounds=spec["local_rounds"]
        )
        if local:
            baseline = {c: v["local_only"] for c, v in res["clients"].items()}
            baseline_mean = res["mean"]["local_only"]
            baseline_worst = res["worst"]["local_only"]
        else:
            assert baseline is not None
            for c, v in res["clients"].items():
                v["local_only"] = baseline[c]
            res["mean"]["local_only"], res["worst"]["local_only"] = baseline_mean, baseline_worst
        res["steps"] = {c: v.steps for c, v in done.items()}
        res["best_step"] = {c: v.best_step for c, v in done.items()}
        res["gain_bound"] = {c: v.gain_bound for c, v in done.items()}
        res["adopted"] = sum(v.adopted for v in done.values())
        if m == "prior":
            res["tau"] = {c: v.tau for c, v in done.items()}
        res["seconds"] = round(time.perf_counter() - t, 1)
        (methods if name in METHODS else diagnostics)[name] = res
    rule = PersonalizeConfig(**spec["personalize"])
    return {
        "clients": dict(zip(fed.partition.client_ids, fed.partition.sizes(), strict=True)),
        "federation_seconds": round(t_fed, 1),
        "federation": {
            "best_round": best_round,
            "rounds_run": fed_run["rounds_run"],
            "macro_f1": fed_run["macro_f1"],
            **spec["converge"],
        },
        "adoption": {"min_gain": rule.min_gain, "confidence": rule.confidence, "bootstrap": rule.bootstrap},
        "prior": {"taus": list(rule.prior_taus), "smoothing": rule.prior_smoothing, "margin": rule.prior_margin},
        "methods": methods,
        "diagnostics": {name: {"method": m, **kw, **diagnostics[name]} for name, (m, kw) in DIAGNOSTICS.items()},
        "fed": fed,
    }


def run_cold(config: RunConfig, spec: dict[str, Any], out: Path, sizes: tuple[int, ...], fed: Any) -> dict[str, Any]:
    """The cold-start curve of the setting's newcomer (its largest client when none is named), diagnostics beside."""
    import dataclasses

    from lorafed.engine.cold_start import cold_start

    holdout = spec["holdout"]
    if holdout is None:
        sizes_ = fed.partition.sizes()
        holdout = fed.partition.client_ids[max(range(len(sizes_)), key=sizes_.__getitem__)]
    steps = spec["cold"]["local_steps"]
    # The diagnostics at the training learning rate (the recipe's own default is a tenth of it).
    plain = PersonalizeConfig("finetune", steps, config.train.learning_rate, steps, None, max_epochs=None, cross_fit=0)
    variants = {
        "fixed steps": plain,
        "epoch cap": dataclasses.replace(plain, max_epochs=config.personalize.max_epochs),
        "head only": dataclasses.replace(plain, method="local_head"),
        "lr / 10": dataclasses.replace(plain, learning_rate=config.train.learning_rate / 10),
    }
    return cold_start(config, holdout, out, sizes, fed=fed, **spec["cold"], **spec["converge"], variants=variants)


def run_hetero(make: Any, spec: dict[str, Any], out: Path, fed: Any) -> dict[str, Any]:
    """Every client at the global rank vs ranks cycling over ``spec["hetero"]["ranks"]``, each to convergence.

    Every federation follows the convergence protocol of ``bench_quality.py``
    (:func:`lorafed.engine.compare.run_federated`): at most ``rounds`` rounds, stopped after
    ``patience`` rounds without a better macro-F1 on the pooled validation rows; the test scores
    are the best-validation round's. The pair runs for each of ``seeds`` seeds (seed 0 on ``fed``,
    the others on their own prepared federation: the seed draws the splits, the fresh adapters and
    the batches); the gap is the mean over seeds. When that gap is below ``ablate_below``, each
    ``ablations`` entry (name -> ranks) runs one more mixed federation on seed 0, to tell a loss
    from clients below the global rank (they start each round from the global cut to their rank)
    from one of clients above it (their update is cut back to the global rank).

    Args:
        make: ``extra overrides -> RunConfig`` of the setting.
        spec: The setting.
        out: Folder of the run folders.
        fed: The setting's prepared federation, seed 0 (its config is replaced by each run's).
    """
    import json

    from lorafed.engine.cohort import prepare_cohort
    from lorafed.engine.compare import val_positions

    h = spec["hetero"]
    ids = list(fed.partition.client_ids)

    def ranks_of(cycle: tuple[int, ...]) -> dict[str, int]:
        return {cid: cycle[i % len(cycle)] for i, cid in enumerate(ids)}

    def mixed(cycle: tuple[int, ...], seed: int) -> list[str]:
        ranks = json.dumps(ranks_of(cycle))
        return [*h["overrides"], f"seed={seed}", "federation.hetero_ranks=true", f"model.lora.client_ranks={ranks}"]

    global_rank = make(h["overrides"]).model.lora.r
    seeds = []
    for seed in range(h["seeds"]):
        sfed = fed if seed == 0 else prepare_cohort(make([*h["overrides"], f"seed={seed}"]))
        val = val_positions(sfed)
        configs = {"same": make([*h["overrides"], f"seed={seed}"]), "mixed": make(mixed(h["ranks"], seed))}
        runs = {
            name: _hetero_run(sfed, cfg, out / f"seed{seed}" / name, val, h["rounds"], h["patience"])
            for name, cfg in configs.items()
        }
        seeds.append({"seed": seed, "runs": runs, "gap": runs["mixed"]["macro_f1"] - runs["same"]["macro_f1"]})
    gaps = [s["gap"] for s in seeds]
    ablations = h.get("ablations", {}) if sum(gaps) / len(gaps) < h.get("ablate_below", -1.0) else {}
    ablation_runs = {  # seed 0's federation again, with other ranks
        name: _hetero_run(fed, make(mixed(c, 0)), out / "seed0" / name, val_positions(fed), h["rounds"], h["patience"])
        for name, c in ablations.items()
    }
    return {
        "global_rank": global_rank,
        "mode": make(mixed(h["ranks"], 0)).federation.hetero_mode,
        "ranks": ranks_of(h["ranks"]),
        "ablations": {name: ranks_of(cycle) for name, cycle in ablations.items()},
        "rounds": h["rounds"],
        "patience": h["patience"],
        "overrides": h["overrides"],
        "runs": seeds[0]["runs"],
        "ablation_runs": ablation_runs,
        "seeds": seeds,
        "gap": sum(gaps) / len(gaps),
    }


def _hetero_run(fed: Any, cfg: RunConfig, run: Path, val: Any, rounds: int, patience: int) -> dict[str, Any]:
    """One federation to convergence, with what each round's SVD cuts lost (hetero ranks only).

    ``truncation``: per round, the mean over modules of the relative Frobenius error of cutting
    the weighted mean change back to the global rank, recomputed from the updates as received and
    the global adapter they started from (:func:`lorafed.server.hetero.aggregate_dense`, the
    run's ``federation.hetero_mode``).
    ``start_cut``: per round and per client rank below the global one, the mean error of cutting
    the global adapter the clients started that round from down to that rank.
    """
    from lorafed.engine.compare import run_federated
    from lorafed.server.hetero import aggregate_dense, dense_deltas, truncate_for_client
    from lorafed.wire.reader import load_payload

    res = run_federated(fed, cfg, run, val, rounds, patience)
    out = {
        "macro_f1": res["macro_f1"],
        "accuracy": res["accuracy"],
        "best_round": res["best_round"],
        "rounds_run": res["rounds_run"],
        "final_macro_f1": res["final_macro_f1"],
        "curve": [c["macro_f1"] for c in res["curve"]],
        "val_curve": [c["val_macro_f1"] for c in res["curve"]],
        "kb_up": round(res["curve"][-1]["bytes_up_cum"] / 1024, 1),
        "seconds": round(res["seconds"], 1),
    }
    if not cfg.federation.hetero_ranks:
        return out
    lora = cfg.model.lora
    below = sorted({r for r in (lora.client_ranks or {}).values() if r < lora.r})
    cuts: list[dict[str, float]] = []
    out["start_cut"] = {str(k): [] for k in below}
    for r in range(1, res["rounds_run"] + 1):
        ups = [load_payload(p) for p in sorted((run / "rounds" / f"r{r}").glob("*.safetensors"))]
        glob = load_payload(run / "rounds" / f"global_r{r - 1}.safetensors").decoded()
        cut = aggregate_dense(
            [(u.decoded(), u.meta.num_examples, u.meta.lora) for u in ups],
            glob,
            {"r": lora.r, "alpha": lora.alpha},
            cfg.federation.hetero_mode,
        )
        cuts.append(cut.truncation)
        whole = dense_deltas(glob, lora.r, lora.alpha)
        for k in below:
            part = dense_deltas(truncate_for_client(glob, lora.r, lora.alpha, k, lora.alpha), k, lora.alpha)
            errs = [float((whole[m] - part[m]).norm()) / max(float(whole[m].norm()), 1e-30) for m in whole]
            out["start_cut"][str(k)].append(sum(errs) / len(errs))
    out["truncation"] = [sum(c.values()) / len(c) for c in cuts]
    at_best = cuts[max(out["best_round"], 1) - 1]  # the cut that made the global adapter reported
    out["truncation_mean"] = sum(at_best.values()) / len(at_best)
    out["truncation_max"] = max(at_best.values())
    return out


def run_continue(make: Any, spec: dict[str, Any], out: Path, fed: Any) -> dict[str, Any]:
    """Federate all clients but ``spec["continue"]["new"]``, then resume the run folder with every client.

    Each client is scored on its own test slice with the global adapter after the first phase
    (``before``) and after the resumed rounds (``after``).
    """
    import dataclasses

    from lorafed.engine.cohort import evaluate_state
    from lorafed.engine.cold_start import federation_without
    from lorafed.engine.inprocess import simulate
    from lorafed.engine.record import RunRecord, lineage
    from lorafed.engine.scenarios import final_global

    c = spec["continue"]
    first_rounds, more = c["rounds"]
    cfg1 = make([*c["overrides"], f"federation.rounds={first_rounds}"])
    cfg2 = make([*c["overrides"], f"federation.rounds={first_rounds + more}"])
    early = dataclasses.replace(fed, config=cfg1)
    for cid in c["new"]:
        early, _ = federation_without(early, cid)
    run = out / "run"

    def scores() -> dict[str, float]:
        _, glob = final_global(fed, run)
        return {
            cid: evaluate_state(fed, glob, fed.splits[k].test).macro_f1
            for k, cid in enumerate(fed.partition.client_ids)
            if len(fed.splits[k].test)
        }

    t = time.perf_counter()
    simulate(cfg1, run, progress=False, fed=early)
    before = scores()
    simulate(cfg2, run, progress=False, resume=True, fed=dataclasses.replace(fed, config=cfg2))
    after = scores()
    chain = lineage(RunRecord(run).global_path(first_rounds + more))
    clients = {
        cid: {
            "new": cid in c["new"],
            "test_rows": len(fed.splits[k].test),
            "before": before[cid],
            "after": after[cid],
            "change": after[cid] - before[cid],
        }
        for k, cid in enumerate(fed.partition.client_ids)
        if cid in before
    }
    old = [v["change"] for v in clients.values() if not v["new"]]
    new = [v["change"] for v in clients.values() if v["new"]]
    return {
        "new": list(c["new"]),
        "rounds": [first_rounds, more],
        "clients": clients,
        "forgetting": float(max(0.0, -min(old))) if old else 0.0,
        "new_gain_min": float(min(new)) if new else 0.0,
        "lineage_length": len(chain),
        "seconds": round(time.perf_counter() - t, 1),
    }


def markdown(result: dict[str, Any]) -> list[str]:
    """The report."""
    lines = ["# Shopping-guide scenarios", "", f"Mode: {result['mode']}; {result['seconds']:.0f} s in all.", ""]
    lines += ["## Targets", ""]
    lines += [f"- {t['target']}: {t['value']:.4f} ({met_word(t['met'])})" for t in result["targets"]]
    for key, s in result["settings"].items():
        # Each part's own command: a later --parts run replaces some parts and keeps the others.
        tiny = ["--tiny"] if result["mode"] == "tiny" else []
        s["commands"] = {
            part: command_line("bench_scenarios.py", [*tiny, "--parts", part, "--settings", key]) for part in PARTS
        }
        if "personalization" in s:
            lines += _personalization_md(key, s)
        if "cold_start" in s:
            lines += _cold_md(key, s)
        if "hetero" in s:
            lines += _hetero_md(key, s)
        if "continued" in s:
            lines += _continued_md(key, s)
    return lines


def _personalization_md(key: str, s: dict[str, Any]) -> list[str]:
    lines = ["", f"## ({key}) {s['title']}: personalization", "", f"Reproduce: `{s['commands']['personalize']}`", ""]
    pers = s["personalization"]
    fed, rule, prior = pers.get("federation"), pers.get("adoption"), pers.get("prior")
    if fed is not None and rule is not None:
        lines += [
            f"Global adapter: round {fed['best_round']} of {fed['rounds_run']} run (cap {fed['rounds']}, patience "
            f"{fed['patience']} on the pooled validation rows; test macro-F1 {fed['macro_f1']:.4f}). A client adopts "
            f"a checkpoint only if it beats the global adapter on its validation rows by {rule['min_gain']} and the "
            f"lower {rule['confidence']} paired-bootstrap bound of the gain ({rule['bootstrap']} resamples, "
            "Bonferroni over the checkpoints) is above 0.",
            "",
        ]
    if prior is not None:
        lines += [
            f"`prior`: the head's bias + tau x log of the client's label frequencies on its train rows (each count "
            f"+ {prior['smoothing']}), tau in {prior['taus']}; nothing trained. "
            + (
                "Each tau is a candidate of the same rule. "
                if prior.get("margin") is None
                else f"A tau is adopted under a non-inferiority rule: at least the global's validation macro-F1, "
                f"and the lower {rule['confidence'] if rule else 0.95} bootstrap bound of the gain above "
                f"-{prior['margin']} (min_gain does not apply). "
            )
            + "Diagnostics (no target) relax the rule: "
            + "; ".join(
                f"{n}: min_gain {d.get('min_gain')}, confidence {d.get('confidence')}"
                for n, d in pers.get("diagnostics", {}).items()
            )
            + ".",
            "",
        ]
    rows = {**pers["methods"], **pers.get("diagnostics", {})}
    lines += [
        "| method | global mean | personalized mean | local-only mean | worst personalized | "
        "clients adopting | clients gaining | largest drop |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m, r in rows.items():
        name = m if m in pers["methods"] else f"{m} (diagnostic)"
        lines.append(
            f"| {name} | {r['mean']['global']:.4f} | {r['mean']['personalized']:.4f} | "
            f"{r['mean']['local_only']:.4f} | {r['worst']['personalized']:.4f} | "
            f"{r.get('adopted', '-')}/{r['num_clients']} | {r['gained']}/{r['num_clients']} | {r['max_drop']:.4f} |"
        )
    first = next(iter(pers["methods"].values()))
    taus = {n: r["tau"] for n, r in rows.items() if "tau" in r}
    errs = all("errors" in v for v in first["clients"].values())
    if errs:
        lines += [
            "",
            "Global errors: test rows the global adapter predicts wrong, and (in brackets) those predicted as a "
            "label absent from the client's train rows; macro-F1 over the labels present in truth or prediction "
            "counts each such label as a class of F1 0.",
        ]
    lines += [
        "",
        "| client | test rows | global | "
        + ("global errors | " if errs else "")
        + " | ".join(rows)
        + " | local-only |"
        + "".join(f" tau ({n}) |" for n in taus),
    ]
    lines.append("| --- " * (4 + int(errs) + len(rows) + len(taus)) + "|")
    for c, v in first["clients"].items():
        per = " | ".join(f"{r['clients'][c]['personalized']:.4f}" for r in rows.values())
        kept = "".join(f" {'-' if t.get(c) is None else t[c]} |" for t in taus.values())
        e = v["errors"]["global"] if errs else {}
        err = f"{e['wrong']} ({e['into_unheld']}) | " if errs else ""
        lines.append(f"| {c} | {v['test_rows']} | {v['global']:.4f} | {err}{per} | {v['local_only']:.4f} |{kept}")
    return lines


def _cold_md(key: str, s: dict[str, Any]) -> list[str]:
    cold = s["cold_start"]
    lines = [
        "",
        f"## ({key}) {s['title']}: cold start of {cold['holdout']}",
        "",
        f"Reproduce: `{s['commands']['cold']}`. The federation ran without {cold['holdout']} "
        f"({cold['train_rows']} train rows, {cold['test_rows']} test rows)"
        + _cold_federation(cold)
        + f"; global + local steps (the recipe: at most {cold['local_steps']} steps"
        + _cold_recipe(cold)
        + f") vs {cold['alone_steps']} steps alone from the untrained adapter. Plot: `{s['plot']}`.",
        "",
    ]
    names = list(cold["curve"][0].get("variants", {}))
    lines += [
        "| rows | global | global + local steps | tuned kept | alone | gain of the global start | "
        + "".join(f"{n} | " for n in names).rstrip(),
        "| --- " * (6 + len(names)) + "|",
    ]
    for p in cold["curve"]:
        kept = f"{p['adopted']:.0%}" if "adopted" in p else "-"
        lines.append(
            f"| {p['rows_used']} | {p['global']:.4f} | {p['global_tuned']:.4f} | {kept} | {p['alone']:.4f} | "
            f"{p['global_tuned'] - p['alone']:+.4f} | " + "".join(f"{p['variants'][n]:.4f} | " for n in names).rstrip()
        )
    if names:
        lines += [
            "",
            f"Diagnostic recipes from the same global adapter, unguarded: fixed steps = {cold['local_steps']} steps "
            "at the training learning rate whatever the rows (the earlier recipe); epoch cap = the same capped at "
            "personalize.max_epochs passes; head only = the fixed steps on the head alone; lr / 10 = the fixed "
            "steps at a tenth of the learning rate.",
        ]
    return lines


def _cold_federation(cold: dict[str, Any]) -> str:
    f = cold["federation"]
    if "round_cap" not in f:
        return ""
    return (
        f", to convergence: round {f['best_round']} of {f['rounds_run']} run (cap {f['round_cap']}, patience "
        f"{f['patience']}; test macro-F1 of the others {f['final']['macro_f1']:.4f})"
    )


def _cold_recipe(cold: dict[str, Any]) -> str:
    r = cold.get("recipe")
    if r is None:
        return ""
    return (
        f" and {r['max_epochs']} passes over the rows, kept only if {r['cross_fit']}-fold cross-fitting on the rows "
        f"says it beats the global adapter at confidence {r['confidence']}; tuned kept = share of draws that kept it"
    )


#: ``federation.hetero_mode`` in words (results before the setting existed were ``products``).
MODES = {
    "residual": "the global change plus each client's change from its own start (the global cut to its "
    "rank below it; `hetero_mode: residual`)",
    "products": "the clients' final dense changes (`hetero_mode: products`)",
}


def _hetero_md(key: str, s: dict[str, Any]) -> list[str]:
    h = s["hetero"]
    g = h["global_rank"]

    def ranks_text(ranks: dict[str, int]) -> str:
        return ", ".join(f"{c}: {r}" for c, r in ranks.items())

    names = {"same": f"all at rank {g}", "mixed": "mixed ranks", **{n: n for n in h.get("ablations", {})}}
    per_seed = ", ".join(f"seed {x['seed']} {x['gap']:+.4f}" for x in h.get("seeds", []))
    overrides = f"; `{' '.join(h['overrides'])}`" if h.get("overrides") else ""
    lines = [
        "",
        f"## ({key}) {s['title']}: heterogeneous LoRA ranks",
        "",
        f"Reproduce: `{s['commands']['hetero']}`. Global rank {g}; mixed ranks {ranks_text(h['ranks'])} "
        f"(`federation.hetero_ranks=true`, `model.lora.client_ranks`{overrides}; the server averages "
        f"{MODES.get(h.get('mode', 'products'), h.get('mode'))}). "
        f"Each federation runs to convergence: at most {h.get('rounds', '?')} rounds, stopped after "
        f"{h.get('patience', '?')} rounds without a better macro-F1 on the pooled validation rows; the test scores "
        f"are the best-validation round's. Mixed minus all at rank {g}: **{h['gap']:+.4f}** macro-F1, the mean over "
        f"{len(h.get('seeds', [])) or 1} seed(s) ({per_seed}).",
        "",
        "| seed | clients | macro-F1 | accuracy | best round / rounds run | test macro-F1 by round | KB up | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for x in h.get("seeds", [{"seed": 0, "runs": h["runs"]}]):
        runs = {**x["runs"], **(h.get("ablation_runs", {}) if x["seed"] == 0 else {})}
        for name, r in runs.items():
            curve = " ".join(f"{v:.3f}" for v in r["curve"] if v is not None)
            lines.append(
                f"| {x['seed']} | {names.get(name, name)} | {r['macro_f1']:.4f} | {r['accuracy']:.4f} | "
                f"{r.get('best_round', '-')} / {r.get('rounds_run', '-')} | {curve} | {r['kb_up']:.0f} | "
                f"{r['seconds']:.0f} |"
            )
    cut = {n: r for n, r in {**h["runs"], **h.get("ablation_runs", {})}.items() if "truncation" in r}
    if cut:
        lines += [
            "",
            f"What the SVD cuts lost (seed 0): the mean change cut back to rank {g} by the server (relative "
            "Frobenius error, mean over modules, per round), and the global adapter cut down to a lower rank for "
            "the clients of that rank to start each round from.",
            "",
            "| clients | ranks | server cut at the best round (mean / max) | server cut by round | start cuts by round "
            "|",
            "| --- | --- | --- | --- | --- |",
        ]
        ranks = {"mixed": h["ranks"], **h.get("ablations", {})}
        for name, r in cut.items():
            starts = "; ".join(
                f"to {k}: " + " ".join(f"{v:.3f}" for v in vals) for k, vals in r.get("start_cut", {}).items()
            )
            lines.append(
                f"| {names.get(name, name)} | {ranks_text(ranks.get(name, {}))} | {r['truncation_mean']:.4f} / "
                f"{r['truncation_max']:.4f} | {' '.join(f'{v:.3f}' for v in r.get('truncation', []))} | "
                f"{starts or '-'} |"
            )
    return lines


def _continued_md(key: str, s: dict[str, Any]) -> list[str]:
    c = s["continued"]
    first, more = c["rounds"]
    lines = [
        "",
        f"## ({key}) {s['title']}: continued iteration",
        "",
        f"Reproduce: `{s['commands']['continue']}`. {first} rounds without {', '.join(c['new'])}, "
        "then the run folder resumed "
        f"with every client for {more} more (lineage: {c['lineage_length']} global adapters back to round 0). "
        "Macro-F1 of each client on its own test slice.",
        "",
        "| client | joined | test rows | before | after | change |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for cid, v in c["clients"].items():
        lines.append(
            f"| {cid} | {'later' if v['new'] else 'first'} | {v['test_rows']} | {v['before']:.4f} | "
            f"{v['after']:.4f} | {v['change']:+.4f} |"
        )
    return lines


def judge(settings: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets: personalization on (b), cold start with 50 rows, hetero ranks, continued iteration."""
    out = []
    if "personalization" in settings.get("b", {}):
        for m, r in settings["b"]["personalization"]["methods"].items():
            gain = r["mean"]["personalized"] - r["mean"]["global"]
            out.append(target(f"(b) {m}: personalized mean >= global mean + 0.02", gain, gain >= 0.02, method=m))
            out.append(
                target(
                    f"(b) {m}: no client more than 0.01 below its global score (largest drop)",
                    r["max_drop"],
                    r["max_drop"] <= 0.01,
                    method=m,
                )
            )
    for key, s in settings.items():
        if "cold_start" in s:
            curve = s["cold_start"]["curve"]
            p50 = next((p for p in curve if p["rows"] == 50), curve[min(1, len(curve) - 1)])
            gain = p50["global_tuned"] - p50["alone"]
            out.append(
                target(
                    f"({key}) cold start, {p50['rows']} rows: global start beats training alone by >= 0.10",
                    gain,
                    gain >= 0.10,
                    holdout=s["cold_start"]["holdout"],
                )
            )
        if "hetero" in s:
            gap = s["hetero"]["gap"]
            out.append(
                target(
                    f"({key}) mixed LoRA ranks: macro-F1 within 0.02 of every client at rank "
                    f"{s['hetero']['global_rank']} (mixed - same)",
                    gap,
                    gap >= -0.02,
                )
            )
        if "continued" in s:
            c = s["continued"]
            out.append(
                target(
                    f"({key}) continued iteration: the first clients forget at most 0.01 (largest drop)",
                    c["forgetting"],
                    c["forgetting"] <= 0.01,
                )
            )
            out.append(
                target(
                    f"({key}) continued iteration: every client that joined later gains (smallest gain)",
                    c["new_gain_min"],
                    c["new_gain_min"] > 0,
                )
            )
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the scenarios and write ``<out>/scenarios.{json,md}`` and the cold-start plots.

    With ``--parts`` a subset of :data:`PARTS` runs; the parts it runs replace those of an
    earlier ``<out>/scenarios.json`` of the same mode, whose other parts are kept, so parts can
    be run one at a time into one report.
    """
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny random BERT on synthetic reviews (seconds)")
    ap.add_argument("--settings", default="a,b", help="comma-separated subset of a,b")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--out", default=str(ROOT / "results"), help="folder of scenarios.{json,md}")
    ap.add_argument("--work", default=None, help="folder for the run folders (default: a temporary one)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    keys = [k.strip() for k in args.settings.split(",") if k.strip()]
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS] + [k for k in keys if k not in SETTINGS]
    if bad:
        ap.error(f"unknown part or setting {bad[0]!r}; parts: {', '.join(PARTS)}; settings: {', '.join(SETTINGS)}")
    out = Path(args.out)
    specs = TINY if args.tiny else SETTINGS
    sizes = TINY_SIZES if args.tiny else SIZES
    mode = "tiny" if args.tiny else "real"
    cli = [*(["--tiny"] if args.tiny else []), *(["--parts", ",".join(parts)] if set(parts) != set(PARTS) else [])]
    cli.append("--settings")
    settings = _earlier(out / "scenarios.json", mode) if set(parts) != set(PARTS) else {}
    with tempfile.TemporaryDirectory(prefix="lorafed-scenarios-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        tiny = None
        if args.tiny:
            sys.path.insert(0, str(ROOT / "scripts"))
            from _tiny import make_tiny, tiny_overrides

            model_dir, csv = make_tiny(work / "tiny", rows=600)
            tiny = tiny_overrides(model_dir, csv)
        for key in keys:
            spec = specs[key]
            config = setting_config(key, spec, tiny, work)
            logger.info("setting (%s) %s", key, spec["title"])
            entry = settings.setdefault(key, {})
            entry.update(
                title=spec["title"],
                config=spec.get("config", "tiny.yaml"),
                overrides=spec["overrides"],
                personalize=spec["personalize"],
                command=command_line("bench_scenarios.py", [*cli, key]),
            )
            entry.update(_run_parts(key, spec, parts, config, tiny, work, out, sizes))
    result = {
        "mode": mode,
        "command": command_line("bench_scenarios.py", [*cli, ",".join(keys)]),
        "targets": judge(settings),
        "settings": settings,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_results(out / "scenarios", result, markdown(result))
    for t in result["targets"]:
        print(f"{t['target']}: {t['value']:.4f} ({met_word(t['met'])})")
    return 0


def _run_parts(
    key: str,
    spec: dict[str, Any],
    parts: list[str],
    config: RunConfig,
    tiny: list[str] | None,
    work: Path,
    out: Path,
    sizes: tuple[int, ...],
) -> dict[str, Any]:
    """The chosen parts of one setting (one prepared federation for all of them)."""
    from lorafed.engine.cohort import prepare_cohort

    got: dict[str, Any] = {}
    fed = None
    if "personalize" in parts:
        got["personalization"] = run_personalization(config, spec, work / f"{key}_personalize")
        fed = got["personalization"].pop("fed")
    todo = [p for p in parts if p == "cold" or (p in ("hetero", "continue") and p in spec)]
    if fed is None and todo:
        fed = prepare_cohort(config)
    if "cold" in parts:
        from lorafed.engine.cold_start import plot_cold_start

        cold = run_cold(config, spec, work / f"{key}_cold", sizes, fed)
        plot = out / f"scenarios_cold_{key}.png"
        plot_cold_start(cold, plot, f"({key}) {spec['title']}: cold start of {cold['holdout']}")
        got["cold_start"] = cold
        got["plot"] = str(plot.relative_to(out.parent) if out.parent in plot.parents else plot)

    def make(extra: list[str]) -> RunConfig:
        return setting_config(key, spec, tiny, work, extra)

    if "hetero" in todo:
        got["hetero"] = run_hetero(make, spec, work / f"{key}_hetero", fed)
    if "continue" in todo:
        got["continued"] = run_continue(make, spec, work / f"{key}_continue", fed)
    return got


def _earlier(path: Path, mode: str) -> dict[str, Any]:
    """The settings of an earlier report of the same mode (its parts are kept), or nothing."""
    import json

    if not path.is_file():
        return {}
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return dict(earlier.get("settings", {})) if earlier.get("mode") == mode else {}


if __name__ == "__main__":
    sys.exit(main())
