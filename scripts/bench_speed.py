"""CPU speed of a client step: bf16 autocast chosen automatically, and the thread policy.

Writes ``results/speed.json`` and ``results/speed.md``; every number comes from one run, side by
side. Each measurement runs in its own child process, so each starts from a clean torch (the
children get a private thread census and no ``OMP_NUM_THREADS``, which would override auto):

1. **autocast**: one process alone trains the clothing job's client step (the pooled training
   rows, the config's batches) under ``train.autocast: none`` (fp32 matmuls, the default until
   now) and ``auto`` (bf16 where the CPU has it natively), ``--repeats`` times ``--steps`` steps
   interleaved (none, auto, none, auto...) from the same adapter with the same batches; then a
   short fixed training of ``--final-steps`` steps under each, scored on the same test rows, to
   show that the final metric is the same.
3. **convergence** (``--convergence-seeds``, default 3): the same question at convergence, the
   protocol of ``scripts/bench_quality.py`` (:func:`lorafed.engine.compare.run_federated`): the
   clothing federation under ``none`` and under ``auto``, each early-stopped on validation
   (patience 3, ``--convergence-rounds`` cap), scored on the test rows at its best-validation
   round, for every seed; the target is judged on the median over seeds of the paired difference
   (auto - none, same seed, same rows). The short run of part 1 stops in the middle of training,
   where one seed's macro-F1 moves by several points from one step to the next.
2. **threads**: samples/s of one training process alone (auto), then of two at once with the old
   behaviour (each ``train.num_threads`` = every core) and two at once under the policy (auto:
   each gets its share). The two processes prepare, meet at a barrier, then train for
   ``--window`` seconds each.

Parts 1-2 are sized to stay under 8 minutes on 2 cores (``data.max_rows`` 6000, ``max_length`` 128
as in the clothing config, 400 test rows); part 3 adds ``data.max_length=64`` (as the quality
benchmark) and takes about 4 minutes per seed. ``--parts convergence`` runs part 3 alone and
keeps the other parts' results of the existing ``speed.json``:

    flock /tmp/lorafed-heavy.lock env PYTHONPATH=. python scripts/bench_speed.py
    flock /tmp/lorafed-heavy.lock env PYTHONPATH=. python scripts/bench_speed.py --parts convergence
    env PYTHONPATH=. python scripts/bench_speed.py --tiny --out /tmp/speed     # smoke run, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lorafed.measure as lm  # noqa: E402
from lorafed.threads import CENSUS_ENV, cores_available  # noqa: E402

#: Autocast settings compared in part 1: the old default first (the ratio's denominator).
AUTOCAST_VARIANTS = ("none", "auto")
#: The ratio part 1 must reach, and the share of a lone process each of two must keep.
SPEEDUP_TARGET = 1.5
SHARE_TARGET = 0.4
#: Largest |macro-F1 difference| of the short fixed run that still counts as the same final metric.
SAME_METRIC = 0.02
#: Largest |median paired macro-F1 difference| at convergence that counts as the same final metric.
SAME_METRIC_CONVERGED = 0.01
#: The parts, in the order they run.
PARTS = ("autocast", "threads", "convergence")


# --- the child processes ---------------------------------------------------------------------


def _cohort(spec: dict[str, Any]) -> Any:
    """The prepared job of a child (this joins the thread census, as any lorafed client does)."""
    from lorafed.config import load_config
    from lorafed.engine.cohort import prepare_cohort

    return prepare_cohort(load_config(spec["config"], [*spec["overrides"], f"train.num_threads={spec['threads']}"]))


def _train(fed: Any, positions: Any, steps: int, autocast: str, seed: int) -> Any:
    """``steps`` steps of the client step from the round-0 adapter; the :class:`TrainResult`."""
    from lorafed.client.train import train_local
    from lorafed.wire.adapter import set_adapter_state

    train = dataclasses.replace(fed.config.train, max_steps=steps, autocast=autocast)
    set_adapter_state(fed.client.model, fed.initial_state)
    return train_local(fed.client.model, fed.rows, positions, train, seed, progress=False)


def _window(fed: Any, positions: Any, seconds: float, threads: int) -> dict[str, Any]:
    """Train one step at a time for ``seconds`` (each step starts like a client round: threads rechosen)."""
    from lorafed.threads import use_threads

    samples, steps, start = 0, 0, time.perf_counter()
    first = None
    while steps == 0 or time.perf_counter() - start < seconds:
        choice = use_threads(threads)
        # Reported: the first step's choice, made while every process of the run is alive (each
        # registered before the barrier); a later step may follow another process's exit.
        if first is None:
            first = choice
        samples += _train(fed, positions, 1, fed.config.train.autocast, seed=100 + steps).samples
        steps += 1
    elapsed = time.perf_counter() - start
    return {
        "samples_per_s": samples / elapsed,
        "samples": samples,
        "steps": steps,
        "seconds": elapsed,
        "threads": first.threads,
        "log": first.describe(),
    }


def converge(spec: dict[str, Any]) -> dict[str, Any]:
    """Part 3: per seed, the federation to convergence under each autocast mode (same rows, same seed)."""
    from lorafed.config import load_config
    from lorafed.engine.cohort import prepare_cohort
    from lorafed.engine.compare import run_federated, val_positions

    runs: dict[str, dict[str, Any]] = {}
    for seed in range(spec["seeds"]):
        cfg = load_config(spec["config"], [*spec["overrides"], *spec["convergence_overrides"], f"seed={seed}"])
        fed = prepare_cohort(cfg)
        val = val_positions(fed)
        runs[str(seed)] = {}
        for mode in AUTOCAST_VARIANTS:
            cfg_m = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, autocast=mode))
            with tempfile.TemporaryDirectory(prefix=f"lorafed-speed-s{seed}-{mode}-") as work:
                r = run_federated(fed, cfg_m, Path(work), val, spec["rounds"], spec["patience"])
            runs[str(seed)][mode] = {k: r[k] for k in ("macro_f1", "accuracy", "best_round", "rounds_run", "seconds")}
            runs[str(seed)][mode]["curve"] = [round(c["macro_f1"], 4) for c in r["curve"]]
            print(f"seed {seed} {mode}: {r['macro_f1']:.4f} at round {r['best_round']}", flush=True)
    return {"convergence": runs}


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One measuring process: ``solo`` (part 1, then a window alone), ``window`` (one of a pair) or ``converge``."""
    import numpy as np

    if spec["kind"] == "converge":
        return converge(spec)

    from lorafed.autocast import resolve_autocast
    from lorafed.engine.cohort import evaluate_state
    from lorafed.wire.adapter import get_adapter_state

    fed = _cohort(spec)
    pooled = np.sort(np.concatenate([s.train for s in fed.splits]))
    for mode in AUTOCAST_VARIANTS if spec["kind"] == "solo" else (fed.config.train.autocast,):
        _train(fed, pooled, 2, mode, seed=0)  # untimed warm-up: first-call kernel selection
    out: dict[str, Any] = {"pid": os.getpid()}
    if spec["kind"] == "solo":
        rates: dict[str, list[float]] = {m: [] for m in AUTOCAST_VARIANTS}
        for rep in range(spec["repeats"]):
            for mode in AUTOCAST_VARIANTS:
                res = _train(fed, pooled, spec["steps"], mode, seed=rep + 1)
                rates[mode].append(res.samples / res.seconds)
        final = {}
        for mode in AUTOCAST_VARIANTS:
            res = _train(fed, pooled, spec["final_steps"], mode, seed=0)
            cfg = dataclasses.replace(fed.config, train=dataclasses.replace(fed.config.train, autocast=mode))
            ev = evaluate_state(dataclasses.replace(fed, config=cfg), get_adapter_state(fed.client.model))
            final[mode] = {
                "macro_f1": ev.macro_f1,
                "accuracy": ev.accuracy,
                "test_rows": ev.n,
                "train_samples_per_s": res.samples / res.seconds,
            }
        out["autocast"] = {"rates": rates, "final": final, "auto_is": resolve_autocast("auto")}
    else:
        Path(spec["ready"]).touch()
        deadline = time.monotonic() + spec["barrier_timeout"]
        while not Path(spec["go"]).exists():
            if time.monotonic() > deadline:
                raise TimeoutError("the other process never got ready")
            time.sleep(0.02)
    out["window"] = _window(fed, pooled, spec["window"], spec["threads"])
    return out


# --- the parent ------------------------------------------------------------------------------


def _env(census: Path) -> dict[str, str]:
    """Children's environment: lorafed importable, a private census, no OMP/MKL thread override."""
    env = lm.pythonpath_env(ROOT)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(var, None)
    env[CENSUS_ENV] = str(census)
    env["LORAFED_PROGRESS"] = "0"
    return env


def _start(spec: dict[str, Any], work: Path, name: str, env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    spec_path = work / f"{name}.json"
    spec_path.write_text(json.dumps({**spec, "result": str(work / f"{name}.result.json")}))
    with open(work / f"{name}.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, __file__, "--child", str(spec_path)], stdout=log, stderr=log, env=env)
    return proc, spec_path


def _finish(proc: subprocess.Popen, spec_path: Path, timeout: float) -> dict[str, Any]:
    """Wait for a child and return its result (its log's tail in the error if it failed)."""
    rc = proc.wait(timeout=timeout)
    if rc != 0:
        log = spec_path.with_suffix(".log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{spec_path.stem} exited with {rc}:\n{log}")
    return json.loads(Path(json.loads(spec_path.read_text())["result"]).read_text())


def run_pair(base: dict[str, Any], threads: int, work: Path, env: dict[str, str], name: str) -> list[dict[str, Any]]:
    """Two ``window`` children at once: both prepare, meet at a barrier, then train ``--window`` s."""
    go = work / f"{name}.go"
    started = []
    for i in range(2):
        spec = {**base, "kind": "window", "threads": threads, "ready": str(work / f"{name}{i}.ready"), "go": str(go)}
        started.append(_start(spec, work, f"{name}{i}", env))
    deadline = time.monotonic() + base["barrier_timeout"]
    while not all((work / f"{name}{i}.ready").exists() for i in range(2)):
        if time.monotonic() > deadline or any(p.poll() is not None for p, _ in started):
            for p, _ in started:
                p.kill()
            raise RuntimeError(f"{name}: a child failed before the barrier; logs in {work}")
        time.sleep(0.05)
    go.touch()
    return [_finish(p, s, base["barrier_timeout"] + 20 * base["window"])["window"] for p, s in started]


def summarize_autocast(solo: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Part 1: medians, the ratio, and its two targets."""
    rates = solo["autocast"]["rates"]
    stats = {m: lm.summarize(rates[m], runs=True) for m in AUTOCAST_VARIANTS}
    ratio = stats["auto"]["median"] / stats["none"]["median"]
    final = solo["autocast"]["final"]
    d_f1 = final["auto"]["macro_f1"] - final["none"]["macro_f1"]
    summary = {"auto_is": solo["autocast"]["auto_is"], "samples_per_s": stats, "ratio": ratio, "final": final}
    return summary, [
        lm.target(
            f"CPU samples/s on clothing >= {SPEEDUP_TARGET}x today's default (train.autocast none)",
            round(ratio, 3),
            ratio >= SPEEDUP_TARGET,
            auto_is=solo["autocast"]["auto_is"],
        ),
        lm.target(
            f"same final metric: macro-F1 after the short run within {SAME_METRIC} of autocast none (auto - none)",
            round(d_f1, 4),
            abs(d_f1) <= SAME_METRIC,
            macro_f1_none=round(final["none"]["macro_f1"], 4),
            macro_f1_auto=round(final["auto"]["macro_f1"], 4),
        ),
    ]


def summarize_threads(
    solo: dict[str, Any], old: list[dict[str, Any]], policy: list[dict[str, Any]]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Part 2: each process's share of a lone one, and its target."""
    alone = solo["window"]["samples_per_s"]
    old_share = min(w["samples_per_s"] for w in old) / alone
    policy_share = min(w["samples_per_s"] for w in policy) / alone
    summary = {
        "alone": solo["window"],
        "old": old,
        "policy": policy,
        "old_share_min": old_share,
        "policy_share_min": policy_share,
    }
    return summary, [
        lm.target(
            f"two processes do not collapse: each >= {SHARE_TARGET}x of one process alone",
            round(policy_share, 3),
            policy_share >= SHARE_TARGET,
            old_behaviour_share=round(old_share, 3),
        )
    ]


def summarize_convergence(runs: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Part 3: per-mode medians over seeds and the median paired difference, and its target."""
    by_mode = {m: lm.summarize([runs[s][m]["macro_f1"] for s in runs], runs=True) for m in AUTOCAST_VARIANTS}
    diffs = [runs[s]["auto"]["macro_f1"] - runs[s]["none"]["macro_f1"] for s in runs]
    diff = lm.summarize(diffs, runs=True)
    summary = {"runs": runs, "macro_f1": by_mode, "paired_difference": diff}
    return summary, [
        lm.target(
            f"same final metric at convergence: median over {len(runs)} seeds of the paired macro-F1 difference "
            f"(auto - none) within {SAME_METRIC_CONVERGED}",
            round(diff["median"], 4),
            abs(diff["median"]) <= SAME_METRIC_CONVERGED,
            macro_f1_none_median=round(by_mode["none"]["median"], 4),
            macro_f1_auto_median=round(by_mode["auto"]["median"], 4),
        )
    ]


def markdown(res: dict[str, Any]) -> list[str]:
    """The report."""
    s = res["setup"]
    bf16 = ", ".join(s["bf16_features"]) or "none"
    lines = [
        "# CPU speed: bf16 autocast by default where native, and the thread policy",
        "",
        f"{s['cores']} cores ({s['cpu']}; native bf16: {bf16}), torch {s['torch']}; config `{s['config']}` with "
        f"`{' '.join(s['overrides']) or '-'}`. `train.autocast: auto` resolves to **{s['auto_is']}** here.",
        "",
        "## Targets",
        "",
        "| target | value | met |",
        "|---|---:|---|",
        *[f"| {g['target']} | {g['value']} | {lm.met_word(g['met'])} |" for g in res["targets"]],
    ]
    if "autocast" in res:
        a = res["autocast"]
        lines += [
            "",
            "## 1. Autocast: none (the old default) against auto",
            "",
            f"One process alone, every core; {s['repeats']} interleaved repeats of {s['steps']} steps from the "
            f"same adapter with the same batches (after an untimed warm-up), then {s['final_steps']} steps under "
            "each, scored on the same test rows.",
            "",
            "| train.autocast | samples/s, median (min-max) | ratio | final macro-F1 | final accuracy |",
            "|---|---|---:|---:|---:|",
        ]
        base = a["samples_per_s"]["none"]["median"]
        for m in AUTOCAST_VARIANTS:
            st, fin = a["samples_per_s"][m], a["final"][m]
            lines.append(
                f"| `{m}` | {lm.fmt_range(st)} | {st['median'] / base:.2f} | {fin['macro_f1']:.4f} "
                f"| {fin['accuracy']:.4f} |"
            )
    if "threads" in res:
        t = res["threads"]
        alone = t["alone"]["samples_per_s"]
        lines += [
            "",
            "## 2. Two training processes on one machine",
            "",
            "Each process prepares the same job, waits at a barrier, then trains one step at a time for "
            f"{s['window']:.0f} s (each step rechooses its threads, as a client round does).",
            "",
            "| run | process | torch threads | samples/s | x one process alone |",
            "|---|---|---:|---:|---:|",
            f"| one process alone (auto) | 1 | {t['alone']['threads']} | {alone:.2f} | 1.00 |",
        ]
        labels = (("old", "two at once, each every core (old)"), ("policy", "two at once, auto (thread policy)"))
        for key, label in labels:
            for i, w in enumerate(t[key], 1):
                rate = w["samples_per_s"]
                lines.append(f"| {label} | {i} | {w['threads']} | {rate:.2f} | {rate / alone:.2f} |")
        lines += ["", f"What a process under the policy logged: `{t['policy'][0]['log']}`."]
    if "convergence" in res:
        c, cs = res["convergence"], res["convergence_setup"]
        lines += [
            "",
            "## 3. The final metric at convergence: none against auto",
            "",
            f"The federation (every client, FedAvg) with `{' '.join(cs['overrides']) or '-'}` on top of the above, "
            f"early-stopped on the pooled validation rows (patience {cs['patience']}, cap {cs['rounds']} rounds), "
            "test macro-F1 at the best-validation round; the same seed and rows under both modes. Reproduce: "
            f"`{cs['command']}`.",
            "",
            "| seed | none: macro-F1 (best round) | auto: macro-F1 (best round) | auto - none | none s | auto s |",
            "|---|---|---|---:|---:|---:|",
        ]
        for seed, r in c["runs"].items():
            n, u = r["none"], r["auto"]
            lines.append(
                f"| {seed} | {n['macro_f1']:.4f} ({n['best_round']}) | {u['macro_f1']:.4f} ({u['best_round']}) "
                f"| {u['macro_f1'] - n['macro_f1']:+.4f} | {n['seconds']:.0f} | {u['seconds']:.0f} |"
            )
        d = c["paired_difference"]
        lines.append(
            f"| median | {c['macro_f1']['none']['median']:.4f} | {c['macro_f1']['auto']['median']:.4f} "
            f"| {d['median']:+.4f} | | |"
        )
    lines += ["", "Reproduce:", "", "```bash", res["command"], "```"]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "clothing_recommend.yaml"))
    ap.add_argument("--set", action="append", default=[], help="a config override (repeatable)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--steps", type=int, default=8, help="steps per timed repeat in part 1")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--final-steps", type=int, default=48, help="steps of part 1's fixed training")
    ap.add_argument("--window", type=float, default=30.0, help="seconds each process trains in part 2")
    ap.add_argument("--convergence-seeds", type=int, default=3, help="seeds of part 3")
    ap.add_argument("--convergence-rounds", type=int, default=8, help="round cap of part 3")
    ap.add_argument("--max-rows", type=int, default=6000, help="data.max_rows")
    ap.add_argument("--test-rows", type=int, default=400, help="federation.max_test_rows")
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny random BERT and synthetic rows, seconds")
    ap.add_argument("--out", default=str(ROOT / "results"), help="folder of speed.json and speed.md")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        spec = json.loads(Path(args.child).read_text())
        Path(spec["result"]).write_text(json.dumps(child(spec)))
        return 0
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")

    import torch

    from lorafed.autocast import cpu_bf16_features, resolve_autocast

    argv_used = sys.argv[1:] if argv is None else argv
    command = lm.command_line("bench_speed.py", argv_used)
    json_path = Path(args.out) / "speed.json"
    res: dict[str, Any] = {}
    if set(parts) != set(PARTS) and json_path.exists():
        res = json.loads(json_path.read_text(encoding="utf-8"))  # the parts not run now keep their results
    with tempfile.TemporaryDirectory(prefix="lorafed-speed-") as tmp:
        work = Path(tmp)
        config = args.config
        overrides = [f"data.max_rows={args.max_rows}", f"federation.max_test_rows={args.test_rows}"]
        conv_overrides = ["data.max_length=64"]
        if args.tiny:
            from _tiny import make_tiny, tiny_overrides

            model_dir, csv = make_tiny(work)
            config = str(ROOT / "configs" / "tiny.yaml")
            overrides = [*tiny_overrides(model_dir, csv), "train.autocast=auto"]
            conv_overrides = []
            args.steps, args.repeats, args.final_steps, args.window = 2, 2, 4, 1.0
            args.convergence_seeds, args.convergence_rounds = min(args.convergence_seeds, 2), 2
        overrides += args.set
        base = {
            "config": config,
            "overrides": overrides,
            "steps": args.steps,
            "repeats": args.repeats,
            "final_steps": args.final_steps,
            "window": args.window,
            "barrier_timeout": 600.0,
        }
        env = _env(work / "census")
        t0 = time.perf_counter()
        targets: dict[str, list[dict[str, Any]]] = {}
        if "autocast" in parts or "threads" in parts:
            proc, spec = _start({**base, "kind": "solo", "threads": 0}, work, "solo", env)
            solo = _finish(proc, spec, 600)
            res["autocast"], targets["autocast"] = summarize_autocast(solo)
            if "threads" in parts:
                old = run_pair(base, cores_available(), work, env, "old")
                policy = run_pair(base, 0, work, env, "policy")
                res["threads"], targets["threads"] = summarize_threads(solo, old, policy)
        if "convergence" in parts:
            conv = {
                **base,
                "kind": "converge",
                "threads": 0,
                "seeds": args.convergence_seeds,
                "rounds": args.convergence_rounds,
                "patience": 3,
                "convergence_overrides": conv_overrides,
            }
            proc, spec = _start(conv, work, "converge", env)
            runs = _finish(proc, spec, 3 * 3600)["convergence"]
            res["convergence"], targets["convergence"] = summarize_convergence(runs)
            res["convergence_setup"] = {
                "overrides": conv_overrides,
                "rounds": args.convergence_rounds,
                "patience": 3,
                "command": command,
            }
        wall = time.perf_counter() - t0
    # Targets of the parts run now replace theirs; the others' stay (kept in the part order).
    kept = {k: [g for g in res.get("targets", []) if _part_of(g) == k] for k in PARTS}
    res["targets"] = [g for k in PARTS for g in targets.get(k, kept[k])]
    setup = res.get("setup", {})
    setup.update(
        {
            "config": os.path.relpath(config, ROOT) if not args.tiny else "configs/tiny.yaml (tiny model)",
            "overrides": overrides if not args.tiny else args.set,
            "cores": cores_available(),
            "cpu": platform.processor() or platform.machine(),
            "bf16_features": cpu_bf16_features(),
            "auto_is": resolve_autocast("auto"),
            "torch": torch.__version__,
            "steps": args.steps,
            "repeats": args.repeats,
            "final_steps": args.final_steps,
            "window": args.window,
            f"wall_s_{'_'.join(parts)}": round(wall, 1),
        }
    )
    res["setup"] = setup
    if set(parts) == set(PARTS) or "command" not in res:
        res["command"] = command
    json_path, md_path = lm.write_results(Path(args.out) / "speed", res, markdown(res))
    for g in res["targets"]:
        print(f"{lm.met_word(g['met'])}: {g['target']}: {g['value']}")
    print(f"wrote {json_path} and {md_path} ({wall:.0f} s)")
    return 0


def _part_of(target: dict[str, Any]) -> str:
    """Which part a stored target belongs to (from its wording)."""
    name = target["target"]
    if "two processes" in name:
        return "threads"
    if "at convergence" in name:
        return "convergence"
    return "autocast"


if __name__ == "__main__":
    sys.exit(main())
