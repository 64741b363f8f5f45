"""Performance benchmark: bytes on the wire, client step speed, aggregation at scale.

Writes ``results/perf.json`` and ``results/perf.md`` (+ ``results/perf_aggregation.png``).
Every timing is the median of ``--reps`` (>= 5) runs with min-max; ratios are measured side
by side in the same run. Sections can be run separately (``--sections comm``); each section
overwrites only its own part of ``perf.json`` and records the command that produced it.

    flock /tmp/lorafed-heavy.lock .venv/bin/python scripts/bench_perf.py            # everything
    .venv/bin/python scripts/bench_perf.py --quick --out /tmp/perf                   # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lorafed.measure as lm  # noqa: E402
from lorafed.client.round import set_threads  # noqa: E402
from lorafed.client.train import train_local  # noqa: E402
from lorafed.config import RunConfig, load_config  # noqa: E402
from lorafed.engine.cohort import prepare_cohort  # noqa: E402
from lorafed.engine.inprocess import simulate  # noqa: E402
from lorafed.engine.record import read_metrics  # noqa: E402
from lorafed.model.backbone import load_client_model, lora_config_dict  # noqa: E402
from lorafed.plots import figure, save_figure  # noqa: E402
from lorafed.server.aggregate import WeightedMean  # noqa: E402
from lorafed.server.fold import aggregate_files  # noqa: E402
from lorafed.server.validate import UpdateSpec  # noqa: E402
from lorafed.wire.adapter import adapter_spec, get_adapter_state, is_lora_key, set_adapter_state  # noqa: E402
from lorafed.wire.compress import TRANSPORTS  # noqa: E402
from lorafed.wire.payload import ModelIdentity, payload_to_bytes, save_payload  # noqa: E402

SECTIONS = ("comm", "quality", "speed", "aggregation")


def stats(values: list[float]) -> dict[str, Any]:
    """Median with min-max (and mean, std) and the raw values."""
    return lm.summarize(values, runs=True)


# --- 1. communication --------------------------------------------------------------------------


def comm_sizes(config: RunConfig, block_size: int) -> dict[str, Any]:
    """Bytes per client per round: full-model FedAvg vs lorafed payloads, all as real safetensors bytes."""
    from safetensors.torch import save as st_save

    labels = ("0", "1")
    full = load_client_model(config.model, labels, config.seed, precision="fp32", with_lora=False)
    full_state = {k: v.detach().contiguous() for k, v in full.model.named_parameters()}
    full_bytes = len(st_save(full_state))
    full_params = sum(v.numel() for v in full_state.values())
    lora = load_client_model(config.model, labels, config.seed, precision="fp32")
    # A trained-looking update (B is zero at init, which would flatter int8): random values of the right shapes.
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=gen) * 0.02 for k, v in get_adapter_state(lora.model).items()}
    b_only = {k: v for k, v in state.items() if not (is_lora_key(k) and ".lora_A." in k)}
    identity = ModelIdentity(full.fingerprint, lora_config_dict(config.model.lora), labels)
    rows = []
    for variant, tensors in (("A+B+head", state), ("B+head (A frozen)", b_only)):
        for transport in TRANSPORTS:
            # The header a simulated client writes (same fields, realistic metric values).
            meta = identity.meta(
                "Intimate",
                1,
                10_490,
                dtype=transport,
                block_size=block_size if transport == "int8_block" else None,
                metrics={"loss": 0.4182394, "steps": 12, "seconds": 9.532148},
            )
            n = len(payload_to_bytes(tensors, meta))
            rows.append(
                {
                    "payload": variant,
                    "transport": transport,
                    "bytes": n,
                    "kb": n / 1024,
                    "ratio_vs_full": n / full_bytes,
                    "one_in": full_bytes / n,
                }
            )
    return {
        "backbone": config.model.name_or_path,
        "full_model_params": full_params,
        "full_model_bytes": full_bytes,
        "full_model_kb": full_bytes / 1024,
        "adapter_params": sum(v.numel() for v in state.values()),
        "b_only_params": sum(v.numel() for v in b_only.values()),
        "block_size": block_size,
        "payloads": rows,
    }


def quality(config: RunConfig, transports: list[str], out_dir: Path) -> dict[str, Any]:
    """Macro-F1 of the same federation (same seeds, data, clients) under each update transport."""
    fed = prepare_cohort(config)
    runs = []
    for transport in transports:
        cfg = dataclasses.replace(config, federation=dataclasses.replace(config.federation, transport=transport))
        t0 = time.perf_counter()
        summary = simulate(cfg, out_dir / transport, progress=False, fed=dataclasses.replace(fed, config=cfg))
        rows = read_metrics(out_dir / transport / "metrics.jsonl")
        runs.append(
            {
                "transport": transport,
                "macro_f1": summary["final"]["macro_f1"],
                "accuracy": summary["final"]["accuracy"],
                "macro_f1_by_round": [r["macro_f1"] for r in rows],
                "kb_up_per_client": [r["bytes_up"] / max(len(r["clients"]), 1) / 1024 for r in rows[1:]],
                "seconds": time.perf_counter() - t0,
            }
        )
        print(f"quality {transport}: macro-F1 {runs[-1]['macro_f1']:.4f}", flush=True)
    base = runs[0]["macro_f1"]
    for r in runs:
        r["delta_macro_f1_points"] = 100 * (r["macro_f1"] - base)
    return {
        "run": config.name,
        "rounds": config.federation.rounds,
        "max_steps": config.train.max_steps,
        "batch_size": config.train.batch_size,
        "clients": list(fed.partition.client_ids),
        "test_rows": len(fed.test_positions),
        "round0_macro_f1": runs[0]["macro_f1_by_round"][0],
        "runs": runs,
    }


# --- 3. speed ----------------------------------------------------------------------------------


def raw_loop(model: Any, batches: list[dict[str, torch.Tensor]], cfg: Any) -> float:
    """The minimal loop: AdamW + clipping over pre-padded batches. Returns seconds."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    model.train()
    t = time.perf_counter()
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t
    model.eval()
    return dt


def speed(config: RunConfig, steps: int, reps: int) -> dict[str, Any]:
    """samples/s of ``train_local`` vs the raw loop on the same model, batches and data, alternating."""
    set_threads(config.train.num_threads)
    fed = prepare_cohort(config)
    k = int(np.argmax([len(s.train) for s in fed.splits]))
    positions = fed.splits[k].train
    cfg = dataclasses.replace(config.train, max_steps=steps, warmup_ratio=0.0)
    seed = 1234
    # Exactly the batches train_local will draw (same shuffle, same dynamic padding), built up front.
    batches = list(fed.rows.batches(positions, cfg.batch_size, shuffle_seed=seed * 1000))[:steps]
    samples = sum(int(b["labels"].shape[0]) for b in batches)
    model = fed.client.model
    engine, raw = [], []
    for i in range(reps + 1):  # run 0 of each is a warm-up, not counted
        for which in ("engine", "raw") if i % 2 == 0 else ("raw", "engine"):
            set_adapter_state(model, fed.initial_state)
            if which == "engine":
                t = time.perf_counter()
                res = train_local(model, fed.rows, positions, cfg, seed, progress=False)
                dt = time.perf_counter() - t
                assert res.samples == samples
            else:
                torch.manual_seed(seed)
                dt = raw_loop(model, batches, cfg)
            if i:
                (engine if which == "engine" else raw).append(samples / dt)
    e, r = statistics.median(engine), statistics.median(raw)
    return {
        "model": config.model.name_or_path,
        "precision": fed.client.precision,
        "batch_size": cfg.batch_size,
        "steps_per_run": steps,
        "samples_per_run": samples,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "engine_samples_per_s": stats(engine),
        "raw_samples_per_s": stats(raw),
        "engine_overhead_pct": 100 * (r / e - 1),
        "tokenization": "once per process (TokenizedRows in prepare_cohort); train_local only pads",
    }


# --- 4. aggregation ----------------------------------------------------------------------------


def memcpy_bandwidth(reps: int, nbytes: int = 256 << 20) -> dict[str, Any]:
    """Bytes/s of a numpy copy of a large buffer (beyond any cache)."""
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    return stats([nbytes / t for t in lm.time_runs(lambda: np.copyto(dst, src), reps)])


def agg_worker(args: argparse.Namespace) -> None:
    """One N in a fresh process: time the file path and the in-memory path, report RSS high-water."""
    spec_obj = json.loads(Path(args.spec).read_text())
    spec = UpdateSpec(
        spec_obj["fingerprint"],
        spec_obj["lora"],
        tuple(spec_obj["labels"]),
        {k: (tuple(s), d) for k, (s, d) in spec_obj["tensors"].items()},
        round=1,
    )
    paths = sorted(Path(args.files).glob("*.safetensors"))[: args.n]
    torch.set_num_threads(1)
    rss0 = lm.rss_bytes()
    lm.reset_peak_rss()  # imports peak above rss0 and free again; measure from here
    file_bytes = sum(p.stat().st_size for p in paths)
    out = aggregate_files(paths, spec)  # the first run warms the page cache and is not timed
    if len(out.accepted) != args.n:
        raise RuntimeError(f"{len(out.rejected)} rejected: {out.rejected[:1]}")
    files_t = lm.time_runs(lambda: aggregate_files(paths, spec), args.reps, warmup=0)
    peak_files = lm.peak_rss_bytes()
    bw = memcpy_bandwidth(args.reps)  # after the peak was read: its 512 MB of buffers are not the aggregation's
    # In memory: a pool of distinct updates cycled N times (the updates themselves are the caller's memory).
    pool = [out.state] + [{k: torch.randn(s) for k, (s, _) in spec.tensors.items()} for _ in range(min(args.n, 64) - 1)]
    tensor_bytes = sum(v.numel() * 4 for v in pool[0].values()) * args.n

    def in_memory() -> None:
        acc = WeightedMean()
        for i in range(args.n):
            acc.add(pool[i % len(pool)], 1.0 + i % 7)
        acc.result()

    mem_t = lm.time_runs(in_memory, args.reps)
    print(
        json.dumps(
            {
                "n": args.n,
                "file_bytes": file_bytes,
                "tensor_bytes": tensor_bytes,
                "memcpy_bytes_per_s": bw,
                "files_seconds": stats(files_t),
                "memory_seconds": stats(mem_t),
                "rss_before_bytes": rss0,
                "peak_rss_files_bytes": peak_files,
            }
        )
    )


def aggregation(config: RunConfig, ns: list[int], reps: int, work: Path) -> dict[str, Any]:
    """Write max(ns) synthetic updates of the real adapter shape, then one fresh process per N."""
    client = load_client_model(config.model, ("0", "1"), config.seed, precision="fp32")
    state = get_adapter_state(client.model)
    lora = {"r": config.model.lora.r}
    spec_path = work / "spec.json"
    tensors = {k: [list(s), d] for k, (s, d) in adapter_spec(state).items()}
    spec_path.write_text(
        json.dumps({"fingerprint": client.fingerprint, "lora": lora, "labels": ["0", "1"], "tensors": tensors})
    )
    files = work / "updates"
    identity = ModelIdentity(client.fingerprint, lora, ("0", "1"))
    gen = torch.Generator().manual_seed(0)
    for i in range(max(ns)):
        upd = {k: torch.randn(v.shape, generator=gen) for k, v in state.items()}
        save_payload(files / f"client-{i:05d}.safetensors", upd, identity.meta(f"client-{i:05d}", 1, 1 + i % 500))
    rows = []
    for n in ns:
        cmd = [sys.executable, __file__, "--agg-worker", str(n), "--files", str(files), "--spec", str(spec_path)]
        cmd += ["--reps", str(reps)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=lm.pythonpath_env(ROOT))
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        bw = row["memcpy_bytes_per_s"]["median"]
        row["files_bound_seconds"] = row["file_bytes"] / bw
        row["files_vs_bound"] = row["files_seconds"]["median"] / row["files_bound_seconds"]
        row["memory_bound_seconds"] = row["tensor_bytes"] / bw
        row["memory_vs_bound"] = row["memory_seconds"]["median"] / row["memory_bound_seconds"]
        rows.append(row)
        print(
            f"aggregation N={n}: files {row['files_vs_bound']:.2f}x bound, memory {row['memory_vs_bound']:.2f}x",
            flush=True,
        )
    return {"update_tensors": len(state), "update_params": sum(v.numel() for v in state.values()), "rows": rows}


# --- report -------------------------------------------------------------------------------------


def render_report(res: dict[str, Any], out: Path) -> str:
    """perf.md from the results (with results/flower_overhead.md appended where present)."""
    lines = ["# lorafed performance", "", f"Machine: {res.get('machine', '')}", ""]
    if "comm" in res:
        c = res["comm"]
        lines += [
            "## Communication: bytes per client per round",
            "",
            f"Command: `{c['command']}`",
            "",
            f"Full-model FedAvg of `{c['backbone']}` ({c['full_model_params']:,} parameters, fp32 safetensors): "
            f"**{c['full_model_kb']:,.0f} KB** per client per round.",
            "",
            "| payload | transport | KB | ratio vs full model |",
            "|---|---|---:|---:|",
        ]
        for r in c["payloads"]:
            lines.append(f"| {r['payload']} | {r['transport']} | {r['kb']:.1f} | 1/{r['one_in']:.0f} |")
        lines += [
            "",
            f"int8_block uses blocks of {c['block_size']} elements. Sizes are whole files (header included).",
            "",
        ]
    if "quality" in res:
        q = res["quality"]
        lines += [
            f"## Metric change by transport ({q['run']})",
            "",
            f"Command: `{q['command']}`",
            "",
            f"{q['rounds']} rounds x {len(q['clients'])} clients x {q['max_steps']} steps of {q['batch_size']}, "
            f"{q['test_rows']} test rows, same seeds for every transport "
            f"(round 0 macro-F1 {q['round0_macro_f1']:.4f}).",
            "",
            "| transport | macro-F1 | accuracy | delta macro-F1 (points) | KB up per client |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in q["runs"]:
            kb = statistics.mean(r["kb_up_per_client"]) if r["kb_up_per_client"] else 0.0
            lines.append(
                f"| {r['transport']} | {r['macro_f1']:.4f} | {r['accuracy']:.4f} | "
                f"{r['delta_macro_f1_points']:+.2f} | {kb:.1f} |"
            )
        lines.append("")
    if "speed" in res:
        s = res["speed"]
        lines += [
            "## Client step speed: lorafed train_local vs a raw PyTorch + peft loop",
            "",
            f"Command: `{s['command']}`",
            "",
            f"`{s['model']}` ({s['precision']}), batch {s['batch_size']}, {s['steps_per_run']} steps "
            f"({s['samples_per_run']} samples) per run, alternating, torch threads {s['torch_threads']} "
            f"of {s['cpu_count']} cores.",
            "",
            "| loop | samples/s median (min-max) |",
            "|---|---|",
            f"| lorafed train_local | {lm.fmt_range(s['engine_samples_per_s'], digits=2)} |",
            f"| raw loop (pre-padded batches) | {lm.fmt_range(s['raw_samples_per_s'], digits=2)} |",
            "",
            f"Engine overhead: **{s['engine_overhead_pct']:+.1f}%** (raw / engine - 1, medians). "
            f"Tokenization: {s['tokenization']}.",
            "",
        ]
    if "aggregation" in res:
        a = res["aggregation"]
        lines += [
            "## Aggregation at scale",
            "",
            f"Command: `{a['command']}`",
            "",
            f"Synthetic fp32 updates of the real adapter shape ({a['update_tensors']} tensors, {a['update_params']:,} "
            "parameters). Bound = bytes read / memcpy bandwidth (numpy copy of 256 MB, same process). "
            "Times in ms, median (min-max); peak = RSS high-water of a fresh process per N.",
            "",
            "| N | MB read | memcpy GB/s | files: ms | files / bound | in-memory: ms | in-memory / bound "
            "| peak RSS MB |",
            "|---:|---:|---:|---|---:|---|---:|---:|",
        ]
        for r in a["rows"]:
            lines.append(
                f"| {r['n']} | {r['file_bytes'] / 1e6:.1f} | {r['memcpy_bytes_per_s']['median'] / 1e9:.2f} | "
                f"{lm.fmt_range(r['files_seconds'], 1e3)} | {r['files_vs_bound']:.2f}x | "
                f"{lm.fmt_range(r['memory_seconds'], 1e3)} | "
                f"{r['memory_vs_bound']:.2f}x | {r['peak_rss_files_bytes'] / 2**20:.0f} |"
            )
        lines.append("")
    flower = out / "flower_overhead.md"  # written by scripts/flower_overhead.py (issue: Flower path cost)
    if flower.is_file():
        lines += ["", flower.read_text().rstrip(), ""]
    return "\n".join(lines)


def plot_aggregation(a: dict[str, Any], path: Path) -> None:
    """Aggregation time and peak memory against the number of updates."""
    ns = [r["n"] for r in a["rows"]]
    fig, (ax1, ax2) = figure(1, 2, figsize=(10, 4))
    for key, label in (("files_seconds", "aggregate_files (disk)"), ("memory_seconds", "WeightedMean (memory)")):
        med = [r[key]["median"] * 1e3 for r in a["rows"]]
        lo = [m - r[key]["min"] * 1e3 for m, r in zip(med, a["rows"], strict=True)]
        hi = [r[key]["max"] * 1e3 - m for m, r in zip(med, a["rows"], strict=True)]
        ax1.errorbar(ns, med, yerr=[lo, hi], marker="o", label=label, capsize=3)
    ax1.plot(ns, [r["files_bound_seconds"] * 1e3 for r in a["rows"]], "k--", label="memcpy bound (files)")
    ax1.set(xscale="log", yscale="log", xlabel="updates N", ylabel="ms", title="time vs N")
    ax1.legend(fontsize=8)
    ax2.plot(ns, [r["peak_rss_files_bytes"] / 2**20 for r in a["rows"]], marker="o", label="peak RSS")
    ax2.plot(ns, [r["rss_before_bytes"] / 2**20 for r in a["rows"]], "k--", label="RSS before aggregating")
    ax2.set(xscale="log", xlabel="updates N", ylabel="MB", title="peak memory vs N", ylim=(0, None))
    ax2.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "clothing_recommend.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--out", default=str(ROOT / "results"))
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (1 rep, N=2,4, 2 steps)")
    ap.add_argument("--agg-worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--files", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.agg_worker is not None:
        args.n = args.agg_worker
        agg_worker(args)
        return
    command = lm.command_line("bench_perf.py", sys.argv[1:], python=".venv/bin/python")
    reps = 1 if args.quick else args.reps
    quality_set = [] if args.quick else ["federation.rounds=3", "train.max_steps=4", "federation.max_test_rows=800"]
    config = load_config(args.config, [*quality_set, *args.set])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "perf.json"
    res: dict[str, Any] = json.loads(res_path.read_text()) if res_path.is_file() else {}
    res["machine"] = f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {sys.platform}"
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        if "comm" in sections:
            res["comm"] = {**comm_sizes(config, config.federation.transport_block_size), "command": command}
        if "quality" in sections:
            transports = ["float32", "int8"] if args.quick else list(TRANSPORTS)
            res["quality"] = {**quality(config, transports, Path(tmp) / "quality"), "command": command}
        if "speed" in sections:
            res["speed"] = {**speed(config, 2 if args.quick else 6, reps), "command": command}
        if "aggregation" in sections:
            ns = [2, 4] if args.quick else [10, 100, 1000]
            res["aggregation"] = {**aggregation(config, ns, reps, Path(tmp)), "command": command}
            plot_aggregation(res["aggregation"], out / "perf_aggregation.png")
        lm.write_results(out / "perf", res, render_report(res, out))
    print(f"wrote {res_path} and {out / 'perf.md'}")


if __name__ == "__main__":
    main()
