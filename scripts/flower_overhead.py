"""Per-round time of the Flower deployment path vs the in-process simulator, same tiny job, one run each.

Builds a random tiny BERT (hidden 32, 2 layers), then runs configs/tiny.yaml (300 rows of the retail
intents, 3 IID clients, 3 local steps) for R rounds in-process and through `lorafed flower run`
(SuperLink + 3 SuperNodes on 127.0.0.1, stock subprocess isolation: one flwr-clientapp process per
message), and again with `--isolation process` (one long-lived
lorafed.engine.flower.warm_exec per node). Round time = train (send global .. last reply) + aggregate + eval,
from metrics.jsonl.
Writes results/flower_overhead.json and .md. Reproduce:

    flock /tmp/lorafed-heavy.lock python scripts/flower_overhead.py --rounds 6
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lorafed.measure as lm  # noqa: E402

#: The random tiny BERT of the job (hidden 32, 2 layers).
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "max_position_embeddings": 128}  # fmt: skip


def _round_seconds(metrics: Path) -> list[float]:
    """Train + aggregate + eval seconds of every round after round 0."""
    from lorafed.engine.record import read_metrics

    return [sum(r["seconds"].values()) for r in read_metrics(metrics) if r["round"] > 0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", default=str(ROOT / "results" / "flower_overhead"))
    args = ap.parse_args()
    from lorafed.config import load_config
    from lorafed.engine.inprocess import simulate

    work = Path(tempfile.mkdtemp(prefix="lorafed-flower-overhead-"))
    tiny = lm.random_bert(work / "tiny", 1234, **TINY)
    over = [f"model.name_or_path={tiny}", "partition.num_clients=3", "federation.min_clients=3",
            f"federation.rounds={args.rounds}", "train.num_threads=1", f"output_dir={work}"]  # fmt: skip
    config = ROOT / "configs" / "tiny.yaml"
    t = time.perf_counter()
    simulate(load_config(config, over), work / "sim", progress=False)
    sim_wall = time.perf_counter() - t
    env = lm.pythonpath_env(ROOT)
    walls = {}
    for name, isolation in (("flower", "subprocess"), ("warm", "process")):
        t = time.perf_counter()
        cmd = [sys.executable, "-m", "lorafed", "flower", "run", "--config", str(config), "--nodes", "3",
               "--out", str(work / name), "--timeout", "900", "--isolation", isolation, *over]  # fmt: skip
        subprocess.run(cmd, env=env, check=True, timeout=1000)
        walls[name] = time.perf_counter() - t
    fl_wall, warm_wall = walls["flower"], walls["warm"]
    sim, fl = _round_seconds(work / "sim" / "metrics.jsonl"), _round_seconds(work / "flower" / "metrics.jsonl")
    warm = _round_seconds(work / "warm" / "metrics.jsonl")
    result = {
        "job": "configs/tiny.yaml, tiny BERT (hidden 32), 3 clients, 3 local steps, batch 8",
        "rounds": args.rounds,
        "simulator_round_s": lm.summarize(sim),
        "flower_round_s": lm.summarize(fl),
        "warm_round_s": lm.summarize(warm),
        "ratio_median": statistics.median(fl) / statistics.median(sim),
        "warm_ratio_median": statistics.median(warm) / statistics.median(sim),
        "warm_wall_s_incl_startup": warm_wall,
        "simulator_wall_s": sim_wall,
        "flower_wall_s_incl_startup": fl_wall,
        "per_round_s": {"simulator": sim, "flower": fl, "warm": warm},
        "cpu_cores": os.cpu_count(),
        "command": lm.command_line("flower_overhead.py", ["--rounds", str(args.rounds)], python="python"),
    }
    s, f, w = result["simulator_round_s"], result["flower_round_s"], result["warm_round_s"]
    md = [
        "## Flower deployment overhead (tiny job)",
        "",
        f"{result['job']}, {args.rounds} rounds, {os.cpu_count()} CPU cores shared with other jobs.",
        "",
        "| path | round time median (min-max), s | whole run incl. start-up, s |",
        "|---|---|---|",
        f"| in-process simulator | {lm.fmt_range(s, digits=2)} | {sim_wall:.1f} |",
        f"| Flower, SuperLink + 3 SuperNodes, subprocess isolation | {lm.fmt_range(f, digits=2)} | {fl_wall:.1f} |",
        f"| Flower, `--isolation process`: one long-lived ClientApp executor per SuperNode"
        f" | {lm.fmt_range(w, digits=2)} | {warm_wall:.1f} |",
        "",
        f"Flower / simulator, median round: {result['ratio_median']:.1f}x (stock), "
        f"{result['warm_ratio_median']:.1f}x (warm).",
        "",
        "```",
        result["command"],
        "```",
    ]
    lm.write_results(args.out, result, md)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
