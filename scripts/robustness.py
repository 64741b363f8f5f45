"""One poisoning client of 5 against lorafed's defences; writes results/robustness_*.{json,md}.

Two studies, each from the same seed in every run:

``--study defences`` (the default): each attack (none, delta x100, sign flip) with each
aggregation rule (FedAvg, trimmed mean, median, norm clipping); final test accuracy and macro-F1
and the change against the clean FedAvg run. Writes ``results/robustness_<setting>``.

``--study policy``: the server's *default* policy (FedAvg; ``federation.max_update_ratio`` 10;
``max_examples_ratio`` 10 with ``over_ratio: refuse``, ``max_examples_growth`` 2 and
``trust_weight_above`` 2 with ``trust_min_cosine`` 0, see :mod:`lorafed.server.claims`) against
a scaled update (x100), a sign flip (x-1: same norm as an honest delta, so it passes the norm
bound), an inflated weight (``num_examples`` claimed 10^6 with an honest update), an inflated
sign flip, and the *adaptive* attacker, which claims just under the ratio bound (10 x the median
of the other clients' rows: the most the default policy accepts) with an honest update and with
a sign flip, those two also with ``federation.max_client_share=0.5``, and the same with
``federation.trust_weight_above=0`` (the check off); and a sign flip claiming just under the
trust bound (2 x that median: the most the default policy averages at full weight whatever the
update's direction). Reports the clean macro-F1, each attack's and the
difference (target: at most 1 point), and per run how often the attacker was refused and its
largest share of the average. Writes ``results/robustness_policy_<setting>``.

    flock /tmp/lorafed-heavy.lock python scripts/robustness.py --setting tiny
    flock /tmp/lorafed-heavy.lock python scripts/robustness.py --setting real   # packaged MiniLM, real data
    python scripts/robustness.py --study policy --tiny                         # tiny model, ~1 min
    flock /tmp/lorafed-heavy.lock python scripts/robustness.py --study policy --setting real  # ~7 min, 2 cores

The real policy setting is the packaged MiniLM in int8 on ``configs/clothing_recommend.yaml`` with
5 IID clients, 4000 rows, 4 rounds of 12 steps of 16 at ``max_length`` 64 with the main job's
client step (~3,840 training samples and the evaluations of 400 test rows per run, 9 runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import numpy as np  # noqa: E402
from _tiny import make_tiny, tiny_overrides  # noqa: E402

import lorafed.measure as lm  # noqa: E402
from lorafed.config import load_config  # noqa: E402
from lorafed.engine.faults import Wrapper, chain, scale_update  # noqa: E402
from lorafed.engine.inprocess import simulate  # noqa: E402
from lorafed.engine.record import read_metrics  # noqa: E402

ATTACKS = {"none": None, "delta x100": 100.0, "sign flip": -1.0}


def defences(clip: float) -> dict[str, list[str]]:
    return {
        "fedavg": [],
        "trimmed_mean (0.2)": ["federation.robust=trimmed_mean", "federation.trim_ratio=0.2"],
        "median": ["federation.robust=median"],
        f"clip_update_norm={clip}": [f"federation.clip_update_norm={clip}"],
    }


def setting(name: str, work: Path) -> tuple[Path, list[str]]:
    common = ["partition.num_clients=5", "federation.min_clients=5"]
    if name == "tiny":
        model_dir, csv = make_tiny(work)
        train = ["federation.rounds=6", "train.max_steps=40", "train.learning_rate=0.01"]
        return ROOT / "configs" / "tiny.yaml", [*tiny_overrides(model_dir, csv), *common, *train]
    real = ["data.max_rows=1500", "federation.rounds=3", "train.max_steps=12", "model.precision=int8"]
    return ROOT / "configs" / "retail_intents.yaml", [*common, *real, "partition.scheme=iid"]


def defence_study(args: argparse.Namespace) -> None:
    """``--study defences``: every attack against every aggregation rule."""
    work = Path(tempfile.mkdtemp(prefix="lorafed-robust-"))
    config_path, base = setting(args.setting, work)
    runs = []
    for attack, factor in ATTACKS.items():
        for defence, overrides in defences(args.clip).items():
            cfg = load_config(config_path, [*base, *overrides, "train.num_threads=1"])
            fn = scale_update(["client0"], factor) if factor is not None else None
            t = time.perf_counter()
            summary = simulate(cfg, work / f"{len(runs)}", progress=False, client_fn=fn)
            runs.append(
                {
                    "attack": attack,
                    "defence": defence,
                    "accuracy": summary["final"]["accuracy"],
                    "macro_f1": summary["final"]["macro_f1"],
                    "seconds": round(time.perf_counter() - t, 1),
                }
            )
            print(runs[-1], flush=True)
    clean = next(r for r in runs if r["attack"] == "none" and r["defence"] == "fedavg")
    command = lm.command_line("robustness.py", ["--setting", args.setting, "--clip", str(args.clip)], python="python")
    result = {
        "setting": args.setting,
        "config": str(config_path.relative_to(ROOT)),
        "overrides": base,
        "attacker": "client0 of 5, every round",
        "clip": args.clip,
        "runs": runs,
        "command": command,
    }
    out = Path(args.out + f"_{args.setting}")
    shown = " ".join(o for o in base if not o.startswith(("data.path", "model.name")))
    lines = [
        f"# Robust aggregation against one poisoning client ({args.setting})",
        "",
        f"Config `{result['config']}` with overrides `{shown}`.",
        "client0 of 5 sends `g + factor * (u - g)` every round (x100: boosted update; sign flip: factor -1).",
        "Robust rules are unweighted and coordinate-wise; clipping bounds each delta's L2 norm, then FedAvg.",
        "One run per cell (seed 0); accuracy and macro-F1 on the held-out test rows after the last round.",
        "",
        "| attack | defence | accuracy | macro-F1 | accuracy vs clean FedAvg (points) | seconds |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in runs:
        d = 100 * (r["accuracy"] - clean["accuracy"])
        cells = [r["attack"], r["defence"], f"{r['accuracy']:.4f}", f"{r['macro_f1']:.4f}", f"{d:+.2f}", r["seconds"]]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += ["", f"Reproduce: `{command}`"]
    lm.write_results(out, result, lines)
    print(f"wrote {out}.md and .json")


#: num_examples the weight-inflating attacker claims (the server's default bound is 10^9).
CLAIMED = 1_000_000
ATTACKER = "client0"


def inflate_examples(clients: list[str], claimed: int) -> Wrapper:
    """The chosen clients claim ``claimed`` training examples in their update's header.

    The in-process transport writes the header's ``num_examples`` from the client's
    ``TrainResult``, so replacing it there is what a client lying in its header does.
    """

    def wrap(inner):
        def client(fed, state, k, r):
            tensors, result = inner(fed, state, k, r)
            if fed.partition.client_ids[k] in clients:
                result = dataclasses.replace(result, num_examples=claimed)
            return tensors, result

        return client

    return wrap


def claim_under_bound(clients: list[str], bound: str = "max_examples_ratio") -> Wrapper:
    """The chosen clients claim just under one of the server's bounds: the adaptive weight inflater.

    The claim is ``ceil(ratio x m) - 1``, with ``ratio`` the federation setting ``bound``
    (``max_examples_ratio``: the most the default policy accepts; ``trust_weight_above``: the
    most it averages at full weight whatever the update's direction) and ``m`` the median of the
    other clients' training rows (their claims): what a client that knows the others' sizes can
    still get.
    """

    def wrap(inner):
        def client(fed, state, k, r):
            tensors, result = inner(fed, state, k, r)
            ratio = getattr(fed.config.federation, bound)
            if fed.partition.client_ids[k] in clients and ratio:
                others = [len(s.train) for j, s in enumerate(fed.splits) if j != k]
                claim = math.ceil(ratio * float(np.median(others))) - 1
                result = dataclasses.replace(result, num_examples=claim)
            return tensors, result

        return client

    return wrap


def policy_attacks() -> dict[str, tuple[Wrapper | None, bool]]:
    """Attack name -> (client wrapper, whether ``max_client_share`` and ``trust_weight_above`` can matter for it)."""
    flip = scale_update([ATTACKER], -1.0)
    inflate = inflate_examples([ATTACKER], CLAIMED)
    adaptive = claim_under_bound([ATTACKER])
    under_trust = claim_under_bound([ATTACKER], "trust_weight_above")
    return {
        "none": (None, False),
        "scaled x100": (scale_update([ATTACKER], 100.0), False),
        "sign flip (x-1)": (flip, False),
        # Refused under the default policy (over_ratio: refuse), so max_client_share cannot matter.
        f"weight inflated (num_examples {CLAIMED:.0e}, honest update)": (inflate, False),
        f"weight inflated + sign flip ({CLAIMED:.0e})": (chain(inflate, flip), False),
        "adaptive: claims just under the ratio bound, honest update": (adaptive, True),
        "adaptive: claims just under the ratio bound + sign flip": (chain(adaptive, flip), True),
        "adaptive: claims just under the trust bound + sign flip": (chain(under_trust, flip), False),
    }


def policy_setting(name: str, work: Path, threads: int) -> tuple[Path, list[str]]:
    """Config and overrides of the policy study (default server policy, 5 IID clients)."""
    common = [
        "partition.scheme=iid",
        "partition.num_clients=5",
        "federation.min_clients=2",
        "federation.robust=none",
        "federation.max_update_ratio=10",
        f"train.num_threads={threads}",
    ]
    if name == "tiny":
        model_dir, csv = make_tiny(work)
        train = ["federation.rounds=4", "train.max_steps=30", "train.learning_rate=0.01"]
        return ROOT / "configs" / "tiny.yaml", [*tiny_overrides(model_dir, csv), *common, *train]
    # The main job's client step (lr 3e-3, bf16, length bucketing, backbone dropout off) for 4 rounds:
    # trained far enough that 4 honest clients and 5 give the same model.
    real = [
        "model.precision=int8",
        "data.max_rows=4000",
        "data.max_length=64",
        "federation.rounds=4",
        "train.max_steps=12",
        "federation.max_test_rows=400",
    ]
    return ROOT / "configs" / "clothing_recommend.yaml", [*common, *real]


def _attacker_record(run_dir: Path) -> dict[str, object]:
    """How the server treated the attacker, from the run's metrics.jsonl."""
    rounds = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("round", 0) > 0]
    refused = [reason for r in rounds for reason in r.get("rejected", []) if f"'{ATTACKER}'" in reason]
    shares = [float(r.get("shares", {}).get(ATTACKER, 0.0)) for r in rounds]
    lowered = [r["weight_lowered"][ATTACKER] for r in rounds if ATTACKER in r.get("weight_lowered", {})]
    return {
        "attacker_refused_rounds": len(refused),
        "attacker_lowered_rounds": len(lowered),
        "rounds": len(rounds),
        "attacker_max_share": round(max(shares, default=0.0), 4),
        "refusal": refused[0][:300] if refused else "",
    }


def policy_study(args: argparse.Namespace) -> None:
    """``--study policy``: the default policy, with and without ``max_client_share``, against four attacks."""
    work = Path(tempfile.mkdtemp(prefix="lorafed-policy-"))
    threads = args.threads if args.threads is not None else (1 if args.setting == "tiny" else 2)
    config_path, base = policy_setting(args.setting, work, threads)
    policies = {
        "default": [],
        "default + max_client_share=0.5": ["federation.max_client_share=0.5"],
        "default, trust_weight_above=0 (off)": ["federation.trust_weight_above=0"],
    }
    runs = []
    for attack, (fn, share_matters) in policy_attacks().items():
        for policy, overrides in policies.items():
            if overrides and not share_matters:
                continue  # neither binds for a weight up to 2 x the typical (5 IID clients: ~0.2 each)
            cfg = load_config(config_path, [*base, *overrides])
            out = work / f"{len(runs)}"
            t = time.perf_counter()
            summary = simulate(cfg, out, progress=False, client_fn=fn)
            runs.append(
                {
                    "attack": attack,
                    "policy": policy,
                    "accuracy": summary["final"]["accuracy"],
                    "macro_f1": summary["final"]["macro_f1"],
                    **(_attacker_record(out) if fn is not None else {}),
                    "seconds": round(time.perf_counter() - t, 1),
                }
            )
            print(runs[-1], flush=True)
    clean = runs[0]
    targets = []
    for r in runs:
        r["macro_f1_drop_points"] = round(100 * (clean["macro_f1"] - r["macro_f1"]), 2)
        if r["attack"] != "none":
            name = f"{r['attack']} under {r['policy']}: macro-F1 drop <= 1 point"
            targets.append(lm.target(name, r["macro_f1_drop_points"], r["macro_f1_drop_points"] <= 1.0))
    args_line = ["--study", "policy", "--setting", args.setting]
    command = lm.command_line("robustness.py", args_line, python="python")
    shown = [o for o in base if not o.startswith(("data.path", "model.name"))]
    result = {
        "study": "policy",
        "setting": args.setting,
        "config": str(config_path.relative_to(ROOT)),
        "overrides": shown,
        "attacker": f"{ATTACKER} of 5, every round",
        "clean_macro_f1": clean["macro_f1"],
        "targets": targets,
        "runs": runs,
        "command": command,
    }
    lines = [
        f"# The default server policy against one poisoning client ({args.setting})",
        "",
        f"Config `{result['config']}` with overrides `{' '.join(shown)}`.",
        f"{ATTACKER} of 5 attacks every round. Scaled: it sends `g + factor * (u - g)` (x100; sign flip x-1, the",
        "same norm as its honest delta). Weight inflated: its header claims "
        f"`num_examples` = {CLAIMED:,} (under the default bound of 10^9). Adaptive: it claims just under the",
        "ratio bound, `ceil(10 x m) - 1` with m the median of the other clients' rows, every round (or just under",
        "the trust bound, `ceil(2 x m) - 1`).",
        "Default policy (the config defaults): FedAvg weighted by samples; `federation.max_update_ratio` 10 (an",
        "update whose delta norm is above 10x the global adapter's norm is refused); `max_examples_ratio` 10 with",
        "`over_ratio: refuse` (a claim above 10x the median claim of the other clients is refused, not averaged);",
        "`max_examples_growth` 2 (a claim above 2x the client's first accepted one is capped); `trust_weight_above`",
        "2 with `trust_min_cosine` 0 (a claim above 2x the others' median keeps its weight only if its delta's cosine",
        "with the others' mean delta is >= 0, else it weighs that median); `min_update_cosine` off.",
        "`max_client_share=0.5` additionally caps any share; `trust_weight_above=0` turns the trust check off.",
        "One run per row (seed 0); macro-F1 on the held-out test rows after the last round.",
        "",
        f"Clean macro-F1: {clean['macro_f1']:.4f} (accuracy {clean['accuracy']:.4f}).",
        "",
        "| attack | policy | accuracy | macro-F1 | drop (points) | attacker refused (rounds) "
        "| attacker's weight lowered (rounds) | attacker's max share | seconds |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        refused = f"{r['attacker_refused_rounds']}/{r['rounds']}" if "rounds" in r else "-"
        lowered = f"{r['attacker_lowered_rounds']}/{r['rounds']}" if "rounds" in r else "-"
        share = f"{r['attacker_max_share']:.3f}" if "rounds" in r else "-"
        cells = [r["attack"], r["policy"], f"{r['accuracy']:.4f}", f"{r['macro_f1']:.4f}"]
        cells += [f"{r['macro_f1_drop_points']:+.2f}", refused, lowered, share, r["seconds"]]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += ["", "| target | value | |", "|---|---:|---|"]
    lines += [f"| {t['target']} | {t['value']:+.2f} | {lm.met_word(t['met'])} |" for t in targets]
    lines += ["", f"Reproduce: `{command}`"]
    out = Path(args.out + f"_policy_{args.setting}")
    lm.write_results(out, result, lines)
    print(f"wrote {out}.md and .json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", choices=["defences", "policy"], default="defences")
    ap.add_argument("--setting", choices=["tiny", "real"], default="tiny")
    ap.add_argument("--tiny", action="store_const", const="tiny", dest="setting", help="same as --setting tiny")
    ap.add_argument("--clip", type=float, default=4.0, help="clip_update_norm bound (clean deltas: see update_norms)")
    ap.add_argument("--threads", type=int, help="train.num_threads of the policy study (default: 1 tiny, 2 real)")
    ap.add_argument("--out", default=str(ROOT / "results" / "robustness"))
    args = ap.parse_args()
    if args.study == "policy":
        policy_study(args)
    else:
        defence_study(args)


if __name__ == "__main__":
    main()
