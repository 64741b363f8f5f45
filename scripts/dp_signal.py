"""Why record-level DP-SGD learns little on clothing: each row's clipped gradient against the noise.

Two measurements on clothing by department (64 tokens, the DP recipe of its day: FFA-LoRA on the
[CLS] model, batch 256 x 6, public class weights; ``SIGNAL_RECIPE``), on the largest client (the
one with the least noise):

1. **Signal against noise per step**, at the start (round 0 adapter). For each trainable set
   (LoRA on every layer, on the top two layers, the head alone; FFA trains LoRA B and the head)
   ``--rows`` per-row gradients are computed one row at a time, clipped as DP-SGD clips them
   (``flat``: all tensors together to the config's C = 1; ``per_role``: each role to C / sqrt(k)
   with C = 0.05, below every row's norm) and
   weighted by the recipe's public class weights. Per role: the norm of the mean clipped
   gradient (the signal; unbiased, from the pairwise products of the rows, so the rows' own
   sampling noise is not counted as signal), the norm of the DP noise on a step's mean gradient,
   z C sqrt(d) / B (z of that client at epsilon 8 for the round cap, B the expected batch), and
   their ratio, per step and over all the client's steps (x sqrt(steps): the signal adds up, the
   noise as a random walk).
2. **One client's curves**: the largest client alone trains the federation's rounds (the
   adapter it sends is the next round's global), validation macro-F1 after each round, for no
   DP, DP-SGD with clipping and no noise (z = 1e-6), epsilon 8 with ``flat`` clipping and
   epsilon 8 with ``per_role`` clipping (C = 0.05, below every row's norm). Noise seed 0.

Writes results/dp_signal.{json,md,png}. About 8 min on 2 idle cores:

    flock /tmp/lorafed-heavy.lock env PYTHONPATH=. python scripts/dp_signal.py

``--tiny`` runs the same code on the tests' tiny random BERT (seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig

from lorafed import measure
from lorafed.client.dp import clip_and_weight_rows, plan_record_dp
from lorafed.client.train import autocast, fixed_class_weights, frozen_dropout_off
from lorafed.config import RunConfig, load_config
from lorafed.engine.cohort import Cohort, evaluate_state, prepare_cohort
from lorafed.engine.compare import val_positions
from lorafed.model.backbone import resolve_backbone
from lorafed.plots import figure, save_figure
from lorafed.wire.roles import apply_round, round_roles, tensor_role, trainable_roles

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from _dp_recipe import CLOTHING_CLASS_WEIGHTS, TINY_DP_RECIPE  # noqa: E402

#: Setting (a) of dp_record_accuracy.py and what every run here shares.
BASE = ["data.max_length=64", "federation.max_test_rows=500", "train.class_weighting=none"]
BASE += ["train.length_bucketing=false", "federation.rounds=6", "seed=0"]
#: The DP recipe results/dp_signal.md was measured with (the recipe of its day: FFA-LoRA on [CLS],
#: batch 256 x 6), kept here so the report reproduces; scripts/_dp_recipe.py has today's.
SIGNAL_RECIPE = [*CLOTHING_CLASS_WEIGHTS, "federation.aggregation=ffa", "train.batch_size=256", "train.max_steps=6"]
#: Trainable sets of part 1: name -> overrides.
SETS: dict[str, list[str]] = {
    "LoRA, every layer + head": [],
    "LoRA, top 2 layers + head": ["model.lora.layers={top2}"],
    "head only": ["federation.aggregation=head"],
}
#: C of ``per_role`` in both parts: below every row's norm of every role (LoRA B about 0.066, head 1.1).
PER_ROLE_CLIP = 0.05
#: Runs of part 2: name -> overrides.
DP = ["train.record_dp.enabled=true", "train.record_dp.noise_seed=0"]
RUNS: dict[str, list[str]] = {
    "no DP": [],
    "clipping only (z = 1e-6)": [*DP, "train.record_dp.noise_multiplier=0.000001"],
    "epsilon 8, flat": [*DP, "train.record_dp.target_epsilon=8"],
    "epsilon 8, per_role C 0.05": [
        *DP,
        "train.record_dp.target_epsilon=8",
        "train.record_dp.clipping=per_role",
        f"train.record_dp.clip_norm={PER_ROLE_CLIP}",
    ],
}
EPSILON = 8.0


def row_gradients(fed: Cohort, positions: np.ndarray) -> tuple[list[torch.Tensor], np.ndarray, list[str]]:
    """Each row's gradient of the round-1 trainable tensors, one row at a time, as DP training takes them.

    Returns one ``[rows, numel]`` tensor per trainable tensor, the rows' labels and the tensors' roles.
    """
    model = fed.client.model
    named = dict(model.named_parameters())
    grads: list[list[torch.Tensor]] = []
    labels = []
    with trainable_roles(model, round_roles(fed.config.federation.aggregation, 1)) as names:
        model.train()
        with contextlib.ExitStack() as stack:
            if not fed.config.train.backbone_dropout:
                stack.enter_context(frozen_dropout_off(model))
            for j in positions:
                batch = fed.rows.batch(np.array([j]))
                y = batch.pop("labels")
                with autocast(model, fed.config.train.autocast):
                    logits = model(**batch).logits
                model.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(logits.float(), y).backward()
                grads.append([named[n].grad.reshape(-1).float().clone() for n in names])
                labels.append(int(y))
        model.zero_grad(set_to_none=True)
        model.eval()
    per_tensor = [torch.stack([row[i] for row in grads]) for i in range(len(names))]
    return per_tensor, np.array(labels), [tensor_role(n) for n in names]


def mean_norm(g: np.ndarray) -> float:
    """Unbiased norm of the rows' mean: sqrt of the mean pairwise product (0 when negative)."""
    n = len(g)
    s = g.sum(0)
    pair = (s @ s - (g * g).sum()) / (n * (n - 1))
    return float(math.sqrt(max(pair, 0.0)))


def signal(fed: Cohort, dp_cfg: RunConfig, rows: int) -> dict[str, Any]:
    """Part 1 for one trainable set (``dp_cfg``: its config at epsilon 8): per role and clipping, signal and noise."""
    cfg = fed.config
    k = int(np.argmax([len(s.train) for s in fed.splits]))
    n = len(fed.splits[k].train)
    plan = plan_record_dp(dp_cfg.train, n, cfg.federation.rounds)
    pos = np.random.default_rng(0).choice(fed.splits[k].train, size=min(rows, n), replace=False)
    tensors, y, tensor_roles = row_gradients(fed, pos)
    weights = torch.ones(len(fed.data.label_names))
    if cfg.train.class_weights:
        weights = fixed_class_weights(cfg.train.class_weights, fed.client.model)
    w = (weights / weights.max())[torch.from_numpy(y)]
    roles = sorted(set(tensor_roles))
    # One matrix of per-row gradients per role: a role's norm is that of its tensors together.
    by_role = {r: torch.cat([t for t, tr in zip(tensors, tensor_roles, strict=True) if tr == r], 1) for r in roles}
    norms = {r: by_role[r].norm(dim=1).numpy() for r in roles}
    total = np.sqrt(sum(v**2 for v in norms.values()))
    c = dp_cfg.train.record_dp.clip_norm
    steps = plan.steps_per_round * cfg.federation.rounds
    out: dict[str, Any] = {
        "client_rows": n,
        "rows": len(pos),
        "z": plan.noise_multiplier,
        "expected_batch": plan.expected_batch_size,
        "steps": steps,
        "clip_norm": c,
        "roles": {},
    }
    clipped = {}
    for mode, clip in (("flat", c), ("per_role", PER_ROLE_CLIP)):
        # The training's own clipping (lorafed.client.dp), on one pseudo-tensor per role.
        rows = [torch.nn.Parameter(torch.zeros(by_role[r].shape[1])) for r in roles]
        for p, r in zip(rows, roles, strict=True):
            p.grad_sample = by_role[r].clone()
        clip_and_weight_rows(rows, clip, w, None if mode == "flat" else list(range(len(roles))))
        clipped[mode] = {r: p.grad_sample.double().numpy() for r, p in zip(roles, rows, strict=True)}
    for r in roles:
        d = by_role[r].shape[1]
        row = {
            "d": d,
            "row_norm_median": float(np.median(norms[r])),
            "share_of_row_norm": float(np.median(norms[r] / total)),
        }
        for mode, clip in (("flat", c), ("per_role", PER_ROLE_CLIP)):
            s = mean_norm(clipped[mode][r])
            noise = plan.noise_multiplier * clip * math.sqrt(d) / plan.expected_batch_size
            row[mode] = {
                "clip_norm": clip,
                "signal": s,
                "noise": noise,
                "snr_step": s / noise,
                "snr_all_steps": s / noise * math.sqrt(steps),
            }
        out["roles"][r] = row
    return out


def curve(fed: Cohort, val: np.ndarray) -> list[float]:
    """Part 2: the largest client alone for the federation's rounds; validation macro-F1 after each."""
    k = int(np.argmax([len(s.train) for s in fed.splits]))
    state = dict(fed.initial_state)
    scores = []
    for r in range(1, fed.config.federation.rounds + 1):
        update = fed.client_update(state, k, r, progress=False)
        state = apply_round(state, update.tensors)
        scores.append(evaluate_state(fed, state, val).macro_f1)
    return scores


def render(report: dict[str, Any]) -> list[str]:
    """The Markdown report."""
    lines = [
        "# Record-level DP: each row's clipped gradient against the noise (clothing, largest client)",
        "",
        __doc__.split("\n\n")[1].replace("\n", " "),
        "",
        f"Config `{report['config']}` with `{' '.join(report['overrides'])}`. "
        f"Reproduce: `{report['command']}` ({report['wall_seconds'] / 60:.1f} min).",
        "",
        "## 1. Signal and noise per step, at the start",
        "",
        "| trainable set | role | d | row norm (median) | share of the row's norm | clipping | signal | noise "
        "per step | signal/noise per step | over all steps |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in report["signal"].items():
        for role, r in s["roles"].items():
            for mode in ("flat", "per_role"):
                v = r[mode]
                lines.append(
                    f"| {name} | {role} | {r['d']} | {r['row_norm_median']:.3f} | {r['share_of_row_norm']:.3f} | "
                    f"{mode}, C {v['clip_norm']:g} | {v['signal']:.5f} | {v['noise']:.4f} | {v['snr_step']:.4f} | "
                    f"{v['snr_all_steps']:.3f} |"
                )
    first = next(iter(report["signal"].values()))
    lines += [
        "",
        f"Largest client: {first['client_rows']} training rows, {first['rows']} rows measured; z {first['z']:.2f} "
        f"(epsilon {EPSILON:g} over {first['steps']} steps), expected batch {first['expected_batch']:.0f}. "
        "The noise of a role is z C sqrt(d) / B with its clipping's C.",
        "",
        "## 2. The largest client alone, validation macro-F1 after each round",
        "",
        "| run | " + " | ".join(f"round {i + 1}" for i in range(len(next(iter(report["curves"].values()))))) + " |",
        "|---|" + "---|" * len(next(iter(report["curves"].values()))),
    ]
    for name, scores in report["curves"].items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * x:.1f}" for x in scores) + " |")
    lines += ["", "![curves](dp_signal.png)", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    """Measure both parts and write the report."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny random BERT on synthetic reviews (seconds)")
    ap.add_argument("--rows", type=int, default=384, help="rows of the largest client whose gradients are measured")
    ap.add_argument("--out", default=str(ROOT / "results" / "dp_signal"), help="output path, no suffix")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="lorafed-dpsignal-") as tmp:
        work = Path(tmp)
        path, base, recipe = ROOT / "configs" / "clothing_recommend.yaml", BASE, SIGNAL_RECIPE
        if args.tiny:
            from _tiny import make_tiny, tiny_overrides

            model_dir, csv = make_tiny(work, rows=300)
            path = ROOT / "configs" / "tiny.yaml"
            base = [*tiny_overrides(model_dir, csv), "partition.scheme=natural", "partition.column=shop"]
            base += ["federation.rounds=2", "train.length_bucketing=false", "train.class_weighting=none"]
            recipe = TINY_DP_RECIPE
        overrides = [*base, *recipe, f"output_dir={work}"]
        report: dict[str, Any] = {
            "mode": "tiny" if args.tiny else "real",
            "command": measure.command_line("dp_signal.py", sys.argv[1:] if argv is None else argv),
            "config": str(path.relative_to(ROOT)),
            "overrides": [x for x in overrides if not x.startswith("output_dir=")],
            "signal": {},
            "curves": {},
            "targets": [],
        }
        layers = AutoConfig.from_pretrained(resolve_backbone(load_config(path, overrides).model.name_or_path))
        top2 = f"[{layers.num_hidden_layers - 2},{layers.num_hidden_layers - 1}]"
        for name, extra in SETS.items():
            extra = [x.format(top2=top2) for x in extra]
            dp_cfg = load_config(path, [*overrides, *extra, *DP, f"train.record_dp.target_epsilon={EPSILON}"])
            report["signal"][name] = signal(prepare_cohort(load_config(path, [*overrides, *extra])), dp_cfg, args.rows)
            print(f"{time.perf_counter() - t0:6.0f}s signal {name}", file=sys.stderr, flush=True)
        for name, extra in RUNS.items():
            fed = prepare_cohort(load_config(path, [*overrides, *extra]))
            report["curves"][name] = curve(fed, val_positions(fed))
            print(
                f"{time.perf_counter() - t0:6.0f}s curve {name}: {report['curves'][name]}", file=sys.stderr, flush=True
            )
        report["wall_seconds"] = time.perf_counter() - t0
    fig, ax = figure(1, 1, figsize=(6, 3.6))
    for name, scores in report["curves"].items():
        ax.plot(range(1, len(scores) + 1), [100 * x for x in scores], "o-", label=name)
    ax.set(xlabel="round (largest client alone)", ylabel="validation macro-F1", title="record-level DP, clothing")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, out.with_name(out.name + ".png"))
    measure.write_results(out, report, render(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
