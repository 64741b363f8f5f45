"""Accuracy cost of client-level DP on a config: no DP vs DP at target epsilons, one run each.

The clip norm is set to the median update-delta norm of round 1 of the non-private run (a
common tuning choice; that choice itself is not accounted for). Writes results/dp_accuracy.json
and .md. Reproduce (about 20 minutes on 2 cores):

    flock /tmp/lorafed-heavy.lock python scripts/dp_accuracy.py --config configs/clothing_recommend.yaml
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import lorafed.measure as lm
from lorafed.config import load_config
from lorafed.engine.inprocess import simulate
from lorafed.engine.record import read_metrics
from lorafed.server.privacy import clip_delta
from lorafed.wire.reader import load_payload


def _median_delta_norm(run: Path) -> float:
    """The median L2 norm of the round-1 updates' deltas from the round-0 global adapter."""
    ref = load_payload(run / "rounds" / "global_r0.safetensors").decoded()
    updates = sorted((run / "rounds" / "r1").glob("*"))
    return statistics.median(clip_delta(load_payload(p).decoded(), ref, 1e30)[1] for p in updates)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 3.0])
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--out", default="results/dp_accuracy")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lorafed-dp-"))
    rows = []
    base = load_config(args.config, args.overrides)
    runs = [("no DP, sample-weighted", [], None), ("no DP, uniform", ["federation.weighting=uniform"], None)]
    clip = None
    for label, extra, eps in runs + [(f"DP eps={e:g}", [], e) for e in args.epsilons]:
        over = list(args.overrides) + extra
        if eps is not None:
            over += [
                "federation.weighting=uniform",
                "federation.dp.enabled=true",
                f"federation.dp.target_epsilon={eps}",
                f"federation.dp.delta={args.delta}",
                f"federation.dp.clip_norm={clip}",
            ]
        cfg = load_config(args.config, over)
        out = work / label.replace(" ", "_").replace(",", "").replace("=", "")
        summary = simulate(cfg, out, progress=False)
        if clip is None:
            clip = _median_delta_norm(out)
        metrics = read_metrics(out / "metrics.jsonl")
        priv = metrics[-1].get("privacy", {})
        rows.append(
            {
                "setting": label,
                "accuracy": summary["final"]["accuracy"],
                "macro_f1": summary["final"]["macro_f1"],
                "round0_accuracy": summary["round0"]["accuracy"],
                "epsilon": priv.get("epsilon"),
                "noise_multiplier": priv.get("noise_multiplier"),
                "clip_norm": priv.get("clip_norm"),
                "clipped_fraction_last_round": priv.get("clipped_fraction"),
                "wall_seconds": round(summary["wall_seconds"], 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "config": args.config,
        "overrides": args.overrides,
        "clients": len(summary["clients"]),
        "rounds": base.federation.rounds,
        "delta": args.delta,
        "rows": rows,
        "command": lm.command_line("dp_accuracy.py", sys.argv[1:], python="python"),
    }
    lines = [
        f"# Accuracy cost of client-level DP ({args.config}, {result['clients']} clients, "
        f"{result['rounds']} rounds, delta={args.delta:g})",
        "",
        "| setting | accuracy | macro-F1 | epsilon | noise multiplier z | clip C |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        z = "-" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.3f}"
        c = "-" if r["clip_norm"] is None else f"{r['clip_norm']:.4f}"
        lines.append(f"| {r['setting']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | {eps} | {z} | {c} |")
    lines += [
        "",
        f"Round-0 (untrained) accuracy: {rows[0]['round0_accuracy']:.4f}.",
        "",
        "```",
        result["command"],
        "```",
    ]
    lm.write_results(args.out, result, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
