"""The shopping-guide scenarios, measured: personalization after federation, and a newcomer's cold start.

Personalization (settings (a) clothing by department, (b) intents Dirichlet 0.1): one federation
per setting, then every client personalizes the final global adapter two ways (``finetune``:
LoRA and head; ``local_head``: the head only, FedRep-style), each kept at its best checkpoint on
the client's validation rows; per client, on its own test slice: global vs personalized vs the
client trained alone (best of ``local_rounds`` checkpoints on its validation rows). Targets on
(b): personalized mean >= global + 2 points; no client more than 1 point below its global score.

Cold start: the federation runs without one client (clothing: ``Jackets``; intents: its largest
Dirichlet client); that newcomer then holds 25, 50, 100 or 200 labelled rows, and its test rows
score the global adapter (as is, and after ``local_steps`` steps on the rows) against an adapter
trained from the untrained one on those rows alone. Target: with 50 rows, the global start
(after its local steps) beats training alone by >= 10 points.

Real mode budget (not yet measured; estimated from ~100 samples/s on intents at max_length 64 and
~35 samples/s on clothing at max_length 64 with the int8 MiniLM on 2 idle cores): about 20-25
minutes. ``--tiny`` runs the tests' tiny random BERT on synthetic reviews in well under a minute.

Writes results/scenarios.json (with ``targets``), results/scenarios.md and
results/scenarios_cold_<setting>.png.

    flock /tmp/lorafed-heavy.lock env PYTHONPATH=. python scripts/bench_scenarios.py
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

#: Personalization methods compared.
METHODS = ("finetune", "local_head")

#: Real-mode settings: config, overrides, the cold-start newcomer (``None``: the largest client).
SETTINGS: dict[str, dict[str, Any]] = {
    "a": {
        "title": "clothing by department",
        "config": "clothing_recommend.yaml",
        "overrides": ["data.max_rows=10000", "data.max_length=64", "federation.max_test_rows=400"],
        "holdout": "Jackets",
        "personalize": {"steps": 12, "eval_every": 4, "patience": 2, "learning_rate": None},
        "local_rounds": 3,
        "cold": {"local_steps": 12, "alone_steps": 36},
    },
    "b": {
        "title": "intents Dirichlet 0.1",
        "config": "retail_intents_dirichlet.yaml",
        "overrides": ["data.max_rows=8000", "federation.max_test_rows=800"],
        "holdout": None,
        "personalize": {"steps": 20, "eval_every": 5, "patience": 2, "learning_rate": None},
        "local_rounds": 3,
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
        "cold": {"local_steps": 3, "alone_steps": 6},
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
        "cold": {"local_steps": 3, "alone_steps": 6},
    },
}

SIZES = (25, 50, 100, 200)
TINY_SIZES = (5, 10, 20)


def setting_config(key: str, spec: dict[str, Any], tiny: list[str] | None, out: Path) -> RunConfig:
    """The setting's config with its budget overrides (the tiny model's with ``--tiny``)."""
    path = ROOT / "configs" / ("tiny.yaml" if tiny is not None else spec["config"])
    overrides = [*(tiny or []), *spec["overrides"], f"output_dir={out}", f"name=scenarios_{key}"]
    return load_config(path, overrides)


def run_personalization(config: RunConfig, spec: dict[str, Any], out: Path) -> dict[str, Any]:
    """One federation, then each personalization method and the local-only baseline, per client."""
    from lorafed.engine.cohort import prepare_cohort
    from lorafed.engine.inprocess import simulate
    from lorafed.engine.scenarios import final_global, measure_personalization, personalize_all

    t0 = time.perf_counter()
    fed = prepare_cohort(config)
    run = out / "federation"
    simulate(config, run, progress=False, fed=fed)
    _, glob = final_global(fed, run)
    t_fed = time.perf_counter() - t0
    methods: dict[str, Any] = {}
    baseline: dict[str, Any] | None = None
    for m in METHODS:
        t = time.perf_counter()
        pcfg = PersonalizeConfig(method=m, **spec["personalize"])
        done = personalize_all(config, run, fed=fed, pcfg=pcfg)
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
        res["seconds"] = round(time.perf_counter() - t, 1)
        methods[m] = res
    return {
        "clients": dict(zip(fed.partition.client_ids, fed.partition.sizes(), strict=True)),
        "federation_seconds": round(t_fed, 1),
        "methods": methods,
        "fed": fed,
    }


def run_cold(config: RunConfig, spec: dict[str, Any], out: Path, sizes: tuple[int, ...], fed: Any) -> dict[str, Any]:
    """The cold-start curve of the setting's newcomer (its largest client when none is named)."""
    from lorafed.engine.cold_start import cold_start

    holdout = spec["holdout"]
    if holdout is None:
        sizes_ = fed.partition.sizes()
        holdout = fed.partition.client_ids[max(range(len(sizes_)), key=sizes_.__getitem__)]
    return cold_start(config, holdout, out, sizes, fed=fed, **spec["cold"])


def markdown(result: dict[str, Any]) -> list[str]:
    """The report."""
    lines = ["# Shopping-guide scenarios", "", f"Mode: {result['mode']}; {result['seconds']:.0f} s in all.", ""]
    lines += ["## Targets", ""]
    lines += [f"- {t['target']}: {t['value']:.4f} ({met_word(t['met'])})" for t in result["targets"]]
    for key, s in result["settings"].items():
        lines += ["", f"## ({key}) {s['title']}: personalization", "", f"Reproduce: `{s['command']}`", ""]
        lines += [
            "| method | global mean | personalized mean | local-only mean | worst personalized | "
            "clients gaining | largest drop |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for m, r in s["personalization"]["methods"].items():
            lines.append(
                f"| {m} | {r['mean']['global']:.4f} | {r['mean']['personalized']:.4f} | "
                f"{r['mean']['local_only']:.4f} | {r['worst']['personalized']:.4f} | "
                f"{r['gained']}/{r['num_clients']} | {r['max_drop']:.4f} |"
            )
        first = next(iter(s["personalization"]["methods"].values()))
        lines += ["", "| client | test rows | global | " + " | ".join(METHODS) + " | local-only |"]
        lines.append("| --- " * (4 + len(METHODS)) + "|")
        for c, v in first["clients"].items():
            per = " | ".join(f"{s['personalization']['methods'][m]['clients'][c]['personalized']:.4f}" for m in METHODS)
            lines.append(f"| {c} | {v['test_rows']} | {v['global']:.4f} | {per} | {v['local_only']:.4f} |")
        cold = s["cold_start"]
        lines += [
            "",
            f"## ({key}) {s['title']}: cold start of {cold['holdout']}",
            "",
            f"Reproduce: `{s['command']}`. The federation ran without {cold['holdout']} "
            f"({cold['train_rows']} train rows, {cold['test_rows']} test rows); global + "
            f"{cold['local_steps']} local steps vs {cold['alone_steps']} steps alone from the untrained adapter. "
            f"Plot: `{s['plot']}`.",
            "",
            "| rows | global | global + local steps | alone | gain of the global start |",
            "| --- | --- | --- | --- | --- |",
        ]
        for p in cold["curve"]:
            lines.append(
                f"| {p['rows_used']} | {p['global']:.4f} | {p['global_tuned']:.4f} | {p['alone']:.4f} | "
                f"{p['global_tuned'] - p['alone']:+.4f} |"
            )
    return lines


def judge(settings: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets: personalization on (b), cold start with 50 rows on every setting."""
    out = []
    if "b" in settings:
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
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the scenarios and write ``<out>/scenarios.{json,md}`` and the cold-start plots."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny random BERT on synthetic reviews (seconds)")
    ap.add_argument("--settings", default="a,b", help="comma-separated subset of a,b")
    ap.add_argument("--out", default=str(ROOT / "results"), help="folder of scenarios.{json,md}")
    ap.add_argument("--work", default=None, help="folder for the run folders (default: a temporary one)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    keys = [k.strip() for k in args.settings.split(",") if k.strip()]
    out = Path(args.out)
    specs = TINY if args.tiny else SETTINGS
    sizes = TINY_SIZES if args.tiny else SIZES
    cli = [*(["--tiny"] if args.tiny else []), "--settings"]
    with tempfile.TemporaryDirectory(prefix="lorafed-scenarios-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        tiny = None
        if args.tiny:
            sys.path.insert(0, str(ROOT / "scripts"))
            from _tiny import make_tiny, tiny_overrides

            model_dir, csv = make_tiny(work / "tiny", rows=600)
            tiny = tiny_overrides(model_dir, csv)
        settings: dict[str, Any] = {}
        for key in keys:
            spec = specs[key]
            config = setting_config(key, spec, tiny, work)
            logger.info("setting (%s) %s", key, spec["title"])
            pers = run_personalization(config, spec, work / f"{key}_personalize")
            fed = pers.pop("fed")
            cold = run_cold(config, spec, work / f"{key}_cold", sizes, fed)
            plot = out / f"scenarios_cold_{key}.png"
            from lorafed.engine.cold_start import plot_cold_start

            plot_cold_start(cold, plot, f"({key}) {spec['title']}: cold start of {cold['holdout']}")
            settings[key] = {
                "title": spec["title"],
                "config": spec.get("config", "tiny.yaml"),
                "overrides": spec["overrides"],
                "personalize": spec["personalize"],
                "command": command_line("bench_scenarios.py", [*cli, key]),
                "plot": str(plot.relative_to(out.parent) if out.parent in plot.parents else plot),
                "personalization": pers,
                "cold_start": cold,
            }
    result = {
        "mode": "tiny" if args.tiny else "real",
        "command": command_line("bench_scenarios.py", [*cli, ",".join(keys)]),
        "targets": judge(settings),
        "settings": settings,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_results(out / "scenarios", result, markdown(result))
    for t in result["targets"]:
        print(f"{t['target']}: {t['value']:.4f} ({met_word(t['met'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
