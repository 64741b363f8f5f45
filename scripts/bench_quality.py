"""Quality benchmark: how much does federating cost against pooling the data, and gain over training alone?

Runs every method with the same data, seeds and training budget (the same total number of
training samples: rounds x clients x max_steps x batch_size) on three real non-IID settings.
The federated methods run through the in-process engine itself (``simulate`` on one prepared
federation: the same round loop, payload bytes, validation and server step as ``lorafed
simulate``); the baselines train with the client's ``train_local`` on the same model:

    centralized      all clients' training rows pooled, rounds x (clients x max_steps) steps
    local-only       each client alone for rounds x max_steps steps (mean and worst client, on
                     the global test rows and on its own test slice)
    fedavg           federation.aggregation=fedavg (A and B averaged separately)
    fedavg-uniform   fedavg with weighting=uniform (setting a only)
    ffa              federation.aggregation=ffa (FFA-LoRA, exact)
    rolora           federation.aggregation=rolora (RoLoRA, exact)
    fedadam          fedavg + federation.server_optimizer=fedadam
    fedprox          fedavg + train.prox_mu

Writes results/quality.json, results/quality.md and results/quality_<setting>.png.

    flock /tmp/lorafed-heavy.lock python scripts/bench_quality.py --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lorafed import measure
from lorafed.client.train import train_local
from lorafed.config import RunConfig, load_config
from lorafed.engine.federation import Federation, evaluate_state, prepare_federation, train_client
from lorafed.engine.inprocess import simulate
from lorafed.engine.record import read_metrics
from lorafed.plots import figure, save_figure
from lorafed.seeds import client_seed
from lorafed.wire.adapter import get_adapter_state, set_adapter_state
from lorafed.wire.roles import merge_round

ROOT = Path(__file__).resolve().parents[1]

SETTINGS: dict[str, dict[str, Any]] = {
    "a": {"title": "(a) clothing reviews, Recommended IND, 6 department clients", "config": "clothing_recommend.yaml"},
    "b": {
        "title": "(b) retail intents, Dirichlet alpha=0.1 over 10 clients",
        "config": "retail_intents_dirichlet.yaml",
    },
    "c": {
        "title": "(c) retail intents, one client per category (label-disjoint)",
        "config": "retail_intents_by_category.yaml",
    },
}
# Per profile: seeds, config overrides per setting, rows scored on a client's own test slice.
PROFILES: dict[str, dict[str, Any]] = {
    "quick": {
        "seeds": [0],
        "own_test_rows": 150,
        "overrides": {
            "a": ["federation.rounds=3", "train.max_steps=4", "federation.max_test_rows=400"],
            "b": ["federation.rounds=3", "train.max_steps=6", "federation.max_test_rows=600"],
            "c": ["federation.rounds=3", "train.max_steps=6", "federation.max_test_rows=600"],
        },
    },
    "full": {
        "seeds": [0, 1, 2],
        "own_test_rows": 400,
        "overrides": {
            "a": ["federation.rounds=10", "train.max_steps=12", "federation.max_test_rows=2000"],
            "b": ["federation.rounds=10", "train.max_steps=20", "federation.max_test_rows=null"],
            "c": ["federation.rounds=10", "train.max_steps=20", "federation.max_test_rows=null"],
        },
    },
}
# Federated methods: config overrides on top of the setting's (the engine features under test).
FEDERATED: dict[str, list[str]] = {
    "fedavg": [],
    "fedavg-uniform": ["federation.weighting=uniform"],
    "ffa": ["federation.aggregation=ffa"],
    "rolora": ["federation.aggregation=rolora"],
    "fedadam": ["federation.server_optimizer=fedadam"],
    "fedprox": ["train.prox_mu=0.01"],
}
UNIFORM_ONLY_ON = {"a"}
EXACT = ("ffa", "rolora")


def run_federated(fed: Federation, cfg: RunConfig, work: Path) -> dict[str, Any]:
    """One federated run through the in-process engine; the global scores after every round.

    Args:
        fed: The federation prepared once for the setting and seed (data, splits, tokens, model).
        cfg: The method's config (the setting's, with the method's overrides).
        work: The run folder (``metrics.jsonl`` and the payloads of every round).
    """
    t0 = time.perf_counter()
    simulate(cfg, work, progress=False, fed=dataclasses.replace(fed, config=cfg))
    rows = read_metrics(work / "metrics.jsonl")[1:]  # row 0: the untrained adapter
    curve, bytes_cum = [], 0
    for row in rows:
        bytes_cum += row["bytes_up"]
        curve.append(
            {"round": row["round"], "macro_f1": row["macro_f1"], "accuracy": row["accuracy"], "bytes_up_cum": bytes_cum}
        )
    return {
        **_final(curve),
        "curve": curve,
        "bytes_per_client_round": statistics.mean(row["bytes_up"] / len(row["clients"]) for row in rows),
        "samples": _budget(cfg, len(fed.partition.client_ids)),
        "seconds": time.perf_counter() - t0,
    }


def run_centralized(fed: Federation, cfg: RunConfig) -> dict[str, Any]:
    """All clients' training rows pooled; each round trains clients x max_steps steps (same budget)."""
    k = len(fed.partition.client_ids)
    train = dataclasses.replace(cfg.train, max_steps=cfg.train.max_steps * k)
    pooled = np.sort(np.concatenate([s.train for s in fed.splits]))
    state, curve, t0 = fed.initial_state, [], time.perf_counter()
    model = fed.client.model
    for r in range(1, cfg.federation.rounds + 1):
        set_adapter_state(model, state)
        train_local(model, fed.rows, pooled, train, client_seed(cfg.seed, r, "centralized"), progress=False)
        state = get_adapter_state(model)
        ev = evaluate_state(fed, state)
        curve.append({"round": r, "macro_f1": ev.macro_f1, "accuracy": ev.accuracy, "bytes_up_cum": 0})
    return {**_final(curve), "curve": curve, "samples": _budget(cfg, k), "seconds": time.perf_counter() - t0}


def run_local(fed: Federation, cfg: RunConfig, own_rows: int) -> dict[str, Any]:
    """Each client trains alone for rounds x max_steps steps; scored on the global and its own test rows."""
    fed = dataclasses.replace(fed, config=cfg)
    clients, t0 = {}, time.perf_counter()
    for k, cid in enumerate(fed.partition.client_ids):
        state = fed.initial_state
        for r in range(1, cfg.federation.rounds + 1):
            sent, _ = train_client(fed, state, k, r, progress=False)
            state = merge_round(state, sent)
        own = fed.splits[k].test
        if len(own) > own_rows:
            own = np.sort(np.random.default_rng(cfg.seed).choice(own, size=own_rows, replace=False))
        g, o = evaluate_state(fed, state), evaluate_state(fed, state, own)
        clients[cid] = {
            "global_macro_f1": g.macro_f1,
            "global_accuracy": g.accuracy,
            "own_macro_f1": o.macro_f1,
            "own_accuracy": o.accuracy,
            "own_rows": len(own),
        }
    vals = list(clients.values())
    return {
        "clients": clients,
        "mean_global_macro_f1": statistics.mean(c["global_macro_f1"] for c in vals),
        "mean_global_accuracy": statistics.mean(c["global_accuracy"] for c in vals),
        "worst_global_macro_f1": min(c["global_macro_f1"] for c in vals),
        "mean_own_macro_f1": statistics.mean(c["own_macro_f1"] for c in vals),
        "mean_own_accuracy": statistics.mean(c["own_accuracy"] for c in vals),
        "worst_own_macro_f1": min(c["own_macro_f1"] for c in vals),
        "samples": _budget(cfg, len(vals)),
        "seconds": time.perf_counter() - t0,
    }


def _final(curve: list[dict[str, Any]]) -> dict[str, float]:
    return {"macro_f1": curve[-1]["macro_f1"], "accuracy": curve[-1]["accuracy"]}


def _budget(cfg: RunConfig, clients: int) -> int:
    """Training samples every method sees: rounds x clients x max_steps x batch_size."""
    return cfg.federation.rounds * clients * (cfg.train.max_steps or 0) * cfg.train.batch_size


def run_setting(key: str, profile: dict[str, Any], methods: list[str], log: Callable[[str], None]) -> dict[str, Any]:
    """Every method on one setting, for every seed of the profile."""
    spec = SETTINGS[key]
    cfg_path = ROOT / "configs" / spec["config"]
    overrides = profile["overrides"][key]
    per_seed: dict[str, dict[str, Any]] = {}
    info: dict[str, Any] = {}
    for seed in profile["seeds"]:
        base = load_config(cfg_path, [*overrides, f"seed={seed}"])
        t = time.perf_counter()
        fed = prepare_federation(base)
        log(f"[{key} seed {seed}] prepared in {time.perf_counter() - t:.0f}s")
        info = {
            "clients": dict(zip(fed.partition.client_ids, fed.partition.sizes(), strict=True)),
            "test_rows": len(fed.test_positions),
            "rounds": base.federation.rounds,
            "max_steps": base.train.max_steps,
            "batch_size": base.train.batch_size,
            "precision": fed.client.precision,
            "labels": len(fed.data.label_names),
        }
        r0 = evaluate_state(fed, fed.initial_state)
        res: dict[str, Any] = {"round0": {"macro_f1": r0.macro_f1, "accuracy": r0.accuracy}}
        with tempfile.TemporaryDirectory(prefix="lorafed-bench-") as tmp:
            for m in methods:
                if m == "fedavg-uniform" and key not in UNIFORM_ONLY_ON:
                    continue
                if m == "centralized":
                    res[m] = run_centralized(fed, base)
                elif m == "local-only":
                    res[m] = run_local(fed, base, profile["own_test_rows"])
                else:
                    cfg = load_config(cfg_path, [*overrides, f"seed={seed}", *FEDERATED[m]])
                    res[m] = run_federated(fed, cfg, Path(tmp) / m)
                score = res[m].get("macro_f1", res[m].get("mean_global_macro_f1"))
                log(f"[{key} seed {seed}] {m}: macro-F1 {score:.4f} ({res[m]['seconds']:.0f}s)")
        per_seed[str(seed)] = res
    return {
        "title": spec["title"],
        "config": f"configs/{spec['config']}",
        "overrides": overrides,
        **info,
        "seeds": per_seed,
        "summary": summarize(per_seed),
    }


def summarize(per_seed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean and std over seeds of every method's final scores."""
    runs = list(per_seed.values())
    out: dict[str, Any] = {}
    for m in runs[0]:
        if m == "round0":
            continue
        fields = [f for f, v in runs[0][m].items() if isinstance(v, (int, float)) and f != "samples"]
        out[m] = {f: measure.summarize([r[m][f] for r in runs]) for f in fields}
        out[m]["samples"] = runs[0][m]["samples"]
    return out


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's three targets, judged on the mean over seeds (``value`` in macro-F1 points)."""
    targets = []
    for key in ("a", "b"):
        if key not in results:
            continue
        s = results[key]["summary"]
        fed = {m: v["macro_f1"]["mean"] for m, v in s.items() if m in FEDERATED}
        if not fed or "centralized" not in s or "local-only" not in s:
            continue
        best = max(fed, key=fed.get)
        cen = s["centralized"]["macro_f1"]["mean"]
        loc = s["local-only"]["mean_global_macro_f1"]["mean"]
        gap = 100 * (cen - fed[best])
        lift = 100 * (fed[best] - loc)
        targets += [
            measure.target(
                "best federated within 1.0 macro-F1 point of centralized",
                -gap,
                gap <= 1.0,
                setting=key,
                best=best,
                text=f"{best} {100 * fed[best]:.2f} vs centralized {100 * cen:.2f}: gap {gap:.2f} points",
            ),
            measure.target(
                "best federated >= 3 points above the mean local-only client",
                lift,
                lift >= 3.0,
                setting=key,
                best=best,
                text=f"{best} {100 * fed[best]:.2f} vs mean local-only (global test) {100 * loc:.2f}: "
                f"+{lift:.2f} points",
            ),
        ]
    if "c" in results:
        s = results["c"]["summary"]
        fed = {m: v["macro_f1"]["mean"] for m, v in s.items() if m in FEDERATED and m != "fedavg"}
        if fed and "fedavg" in s:
            best = max(fed, key=fed.get)
            base = s["fedavg"]["macro_f1"]
            margin = 100 * (fed[best] - base["mean"])
            noise = 100 * max(base["std"], s[best]["macro_f1"]["std"])
            targets.append(
                measure.target(
                    "best method beats FedAvg-LoRA by a clear margin (>= 2 points and > 2 seed std)",
                    margin,
                    margin >= 2.0 and margin > 2 * noise,
                    setting="c",
                    best=best,
                    text=f"{best} {100 * fed[best]:.2f} vs fedavg {100 * base['mean']:.2f}: "
                    f"{margin:+.2f} points (seed std {noise:.2f})",
                )
            )
    return targets


def plot_setting(key: str, setting: dict[str, Any], path: Path) -> Path:
    """Global macro-F1 against round and against cumulative upload bytes (first seed's curves)."""
    fig, (ax1, ax2) = figure(1, 2, figsize=(11, 4))
    first = next(iter(setting["seeds"].values()))
    r0 = first["round0"]["macro_f1"]
    for m, res in first.items():
        if "curve" not in res:
            continue
        rounds = [0] + [p["round"] for p in res["curve"]]
        f1 = [r0] + [p["macro_f1"] for p in res["curve"]]
        style = "--" if m == "centralized" else "-"
        ax1.plot(rounds, f1, style, marker="o", label=m)
        if m != "centralized":
            mb = [0] + [p["bytes_up_cum"] / 1e6 for p in res["curve"]]
            ax2.plot(mb, f1, marker="o", label=m)
    if "local-only" in first:
        ax1.axhline(first["local-only"]["mean_global_macro_f1"], color="grey", ls=":", label="local-only (mean)")
    if "centralized" in first:
        ax2.axhline(first["centralized"]["macro_f1"], color="black", ls="--", label="centralized (final)")
    ax1.set(xlabel="round", ylabel="global macro-F1", title=setting["title"])
    ax2.set(xlabel="cumulative MB uploaded (all clients)", ylabel="global macro-F1")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def render_markdown(report: dict[str, Any]) -> str:
    """Tables per setting, the targets, and where and how the figures were taken."""
    lines = [
        "# Quality benchmark (scripts/bench_quality.py)",
        "",
        f"Profile **{report['profile']}**, seeds {report['seeds']}. Reproduce: `{report['command']}`",
        "",
        f"Taken on {report['machine']['where']}; wall time {report['wall_seconds'] / 60:.1f} min. "
        "Macro-F1 and accuracy of the final global adapter on the global test rows (the union of "
        "the clients' test slices, seeded sample of `max_test_rows`), mean ± std over seeds "
        "(std 0 with one seed). Every method sees the same number of training samples "
        "(rounds × clients × max_steps × batch). KB up = mean payload file size per client per round.",
        "",
    ]
    for key, s in report["settings"].items():
        sm = s["summary"]
        lines += [
            f"## {s['title']}",
            "",
            f"`{s['config']}` with `{' '.join(s['overrides'])}`; {len(s['clients'])} clients "
            f"({', '.join(f'{c} {n}' for c, n in s['clients'].items())}), {s['labels']} labels, "
            f"{s['test_rows']} test rows, {s['rounds']} rounds × {s['max_steps']} steps × batch "
            f"{s['batch_size']}, backbone {s['precision']}.",
            "",
            "| method | macro-F1 | accuracy | rounds | KB up / client / round | samples seen | seconds |",
            "|---|---|---|---|---|---|---|",
        ]

        def pm(d: dict[str, float]) -> str:
            return f"{100 * d['mean']:.2f} ± {100 * d['std']:.2f}"

        for m, v in sm.items():
            if m == "local-only":
                for label, f1, acc in (
                    ("mean client, global test", "mean_global_macro_f1", "mean_global_accuracy"),
                    ("worst client, global test", "worst_global_macro_f1", None),
                    ("mean client, own test slice", "mean_own_macro_f1", "mean_own_accuracy"),
                    ("worst client, own test slice", "worst_own_macro_f1", None),
                ):
                    acc_s = pm(v[acc]) if acc else "-"
                    lines.append(
                        f"| local-only ({label}) | {pm(v[f1])} | {acc_s} | {s['rounds']} | 0 | "
                        f"{v['samples']} | {v['seconds']['mean']:.0f} |"
                    )
                continue
            kb = f"{v['bytes_per_client_round']['mean'] / 1024:.1f}" if "bytes_per_client_round" in v else "0"
            lines.append(
                f"| {m} | {pm(v['macro_f1'])} | {pm(v['accuracy'])} | {s['rounds']} | {kb} | "
                f"{v['samples']} | {v['seconds']['mean']:.0f} |"
            )
        r0 = next(iter(s["seeds"].values()))["round0"]
        lines += [
            "",
            f"Untrained adapter (round 0): macro-F1 {100 * r0['macro_f1']:.2f}.",
            f"![macro-F1 per round and per byte](quality_{key}.png)",
            "",
        ]
    lines += ["## Targets", ""]
    for t in report["targets"]:
        lines.append(f"- ({t['setting']}) {t['target']}: **{measure.met_word(t['met'])}** — {t['text']}")
    if not report["targets"]:
        lines.append("- not evaluated (settings missing from this run)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, 3 rounds, capped test rows (< 60 min on 2 cores)")
    ap.add_argument("--settings", default="a,b,c", help="comma-separated subset of a,b,c")
    ap.add_argument("--methods", default=",".join(["centralized", "local-only", *FEDERATED]))
    ap.add_argument("--out", default=str(ROOT / "results"))
    args = ap.parse_args(argv)
    profile_name = "quick" if args.quick else "full"
    profile = PROFILES[profile_name]
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in ("centralized", "local-only", *FEDERATED)]
    if unknown:
        ap.error(f"unknown methods {unknown}")
    out = Path(args.out)
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "profile": profile_name,
        "seeds": profile["seeds"],
        "command": measure.command_line("bench_quality.py", sys.argv[1:] if argv is None else argv),
        "machine": {
            "where": f"{platform.node()} ({os.cpu_count()} CPU cores, no GPU, shared with other jobs)",
            "python": platform.python_version(),
        },
        "settings": {},
    }

    def log(msg: str) -> None:
        print(f"{time.perf_counter() - t0:7.0f}s {msg}", file=sys.stderr, flush=True)

    for key in args.settings.split(","):
        report["settings"][key] = run_setting(key, profile, methods, log)
        report["targets"] = check_targets(report["settings"])
        report["wall_seconds"] = time.perf_counter() - t0
        # After each setting, so a partial run keeps its results.
        measure.write_results(out / "quality", report, render_markdown(report))
        plot_setting(key, report["settings"][key], out / f"quality_{key}.png")
    for t in report["targets"]:
        log(f"target ({t['setting']}) {t['target']}: {measure.met_word(t['met'])}: {t['text']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
