"""Client training speed (samples/s) of train-time options, side by side, same rows and seeds.

Each variant is a list of overrides; variants are run in turn, ``--repeats`` times interleaved
(A B C A B C ...), each time ``--steps`` steps of :func:`lorafed.client.train.train_local` on the pooled
training rows from the same starting adapter. Prints the median samples/s per variant and its
ratio to the first variant.

    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/quality_speed.py --config configs/clothing_recommend.yaml \
        --base train.num_threads=1 --variant 'default:' --variant 'bf16:train.autocast=bf16'
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys

import numpy as np

from lorafed.client.train import train_local
from lorafed.config import load_config
from lorafed.wire.adapter import set_adapter_state

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from quality_ablation import federation_for


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--base", nargs="*", default=[])
    ap.add_argument("--variant", action="append", default=[], help="NAME:OVERRIDE ...")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    variants = []
    for spec in args.variant:
        name, _, rest = spec.partition(":")
        variants.append((name, load_config(args.config, [*args.base, *rest.split()])))
    rates: dict[str, list[float]] = {name: [] for name, _ in variants}
    for _, cfg in variants:  # untimed warm-up: data preparation, first-call kernel selection
        fed = federation_for(cfg)
        set_adapter_state(fed.client.model, fed.initial_state)
        warm = dataclasses.replace(cfg.train, max_steps=2)
        train_local(fed.client.model, fed.rows, fed.splits[0].train, warm, seed=0, progress=False)
    for rep in range(args.repeats):
        for name, cfg in variants:
            fed = federation_for(cfg)
            pooled = np.sort(np.concatenate([s.train for s in fed.splits]))
            train = dataclasses.replace(cfg.train, max_steps=args.steps)
            set_adapter_state(fed.client.model, fed.initial_state)
            res = train_local(fed.client.model, fed.rows, pooled, train, seed=rep + 1, progress=False)
            rates[name].append(res.samples / res.seconds)
            print(f"rep {rep} {name}: {res.samples / res.seconds:.2f} samples/s", flush=True)
    first = statistics.median(rates[variants[0][0]])
    for name, _ in variants:
        med = statistics.median(rates[name])
        print(
            json.dumps(
                {
                    "name": name,
                    "samples_per_s": round(med, 2),
                    "ratio": round(med / first, 2),
                    "all": [round(r, 2) for r in rates[name]],
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
