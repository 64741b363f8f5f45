"""FedAvg against the robust options when 1 of 5 clients poisons its update; writes results/robustness.{json,md}.

Each attack (none, delta x100, sign flip) is run with each defence (FedAvg, trimmed mean, median,
norm clipping) from the same seed; the table gives final test accuracy and macro-F1 and the change
against the clean FedAvg run.

    flock /tmp/lorafed-heavy.lock python scripts/robustness.py --setting tiny
    flock /tmp/lorafed-heavy.lock python scripts/robustness.py --setting real   # packaged MiniLM, real data
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from _tiny import make_tiny, tiny_overrides  # noqa: E402

import lorafed.measure as lm  # noqa: E402
from lorafed.config import load_config  # noqa: E402
from lorafed.engine.faults import scale_update  # noqa: E402
from lorafed.engine.inprocess import simulate  # noqa: E402

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", choices=["tiny", "real"], default="tiny")
    ap.add_argument("--clip", type=float, default=4.0, help="clip_update_norm bound (clean deltas: see update_norms)")
    ap.add_argument("--out", default=str(ROOT / "results" / "robustness"))
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()
