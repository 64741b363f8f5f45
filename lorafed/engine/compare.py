"""The point of federation, measured: federated vs centralized vs each party alone, on the same test rows.

:func:`compare` prepares a federation once and trains three ways from the same seeded adapter:

* **federated**: the configured federation (:func:`~lorafed.engine.inprocess.simulate`);
* **centralized**: one model on the pooled training rows of every client (what the parties
  would get by pooling their data); each checkpoint is ``clients x train.max_steps`` steps, the
  samples one federated round processes, so pooling gets the same compute as the federation;
* **local-only**: each client alone on its own rows, ``train.max_steps`` steps a checkpoint.

Each method keeps its best checkpoint on validation rows (early stopping, ``patience``
checkpoints) and reports the test scores of that checkpoint only, so no method is judged at an
arbitrary budget: the federation and the pooled model on the pooled validation rows, each party
alone on its own validation slice (a party alone has nothing else). The test rows are the
federation's global test rows for all three.

:func:`run_federated` is the benchmarks' convergence protocol for one federated run: the
federation up to a round cap, early-stopped on the pooled validation rows, scored at its best
round (``scripts/bench_quality.py``, ``scripts/dp_record_accuracy.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorafed.client.train import train_local
from lorafed.config import RunConfig
from lorafed.engine.cohort import Cohort, evaluate_state, prepare_cohort
from lorafed.engine.inprocess import simulate
from lorafed.engine.record import RunRecord, read_metrics
from lorafed.files import atomic_write_json
from lorafed.metrics import EvalResult
from lorafed.seeds import client_seed
from lorafed.wire.adapter import get_adapter_state, set_adapter_state
from lorafed.wire.reader import load_payload

logger = logging.getLogger(__name__)


def val_positions(fed: Cohort, max_rows: int | None = None) -> np.ndarray:
    """The pooled validation rows of the federation (union of the clients' slices), capped.

    Capped at ``max_rows`` (default ``federation.max_test_rows``) by a seeded sample (seed + 1, so
    not the test sample's draw).
    """
    val = np.sort(np.concatenate([s.val for s in fed.splits]))
    cap = fed.config.federation.max_test_rows if max_rows is None else max_rows
    if cap is not None and len(val) > cap:
        val = np.sort(np.random.default_rng(fed.config.seed + 1).choice(val, size=cap, replace=False))
    return val


@dataclass
class EarlyStop:
    """Early stopping on validation macro-F1: stop once ``patience`` checkpoints in a row bring no improvement.

    Attributes:
        patience: Checkpoints without a strictly better score before stopping (``None``: never stop).
        best: The best score so far.
        best_at: The checkpoint that scored it (the earliest on ties).
        since: Checkpoints since the best one.
    """

    patience: int | None = None
    best: float = -math.inf
    best_at: int = -1
    since: int = 0

    def update(self, checkpoint: int, score: float) -> bool:
        """Record a checkpoint's validation score; return whether training should stop."""
        if score > self.best:
            self.best, self.best_at, self.since = score, checkpoint, 0
        else:
            self.since += 1
        return self.patience is not None and self.since >= self.patience


def _best(checkpoints: list[tuple[int, EvalResult, EvalResult | None]]) -> dict[str, Any]:
    """The test scores of the checkpoint with the best validation macro-F1 (earliest on ties).

    A checkpoint's test scores may be ``None`` (not scored) except at the best one.
    """
    step, val, test = max(checkpoints, key=lambda c: (c[1].macro_f1, -c[0]))
    assert test is not None
    return {
        "best_checkpoint": step,
        "val_macro_f1": val.macro_f1,
        "macro_f1": test.macro_f1,
        "accuracy": test.accuracy,
        "curve": [
            {
                "checkpoint": s,
                "val_macro_f1": v.macro_f1,
                "macro_f1": t.macro_f1 if t is not None else None,
                "accuracy": t.accuracy if t is not None else None,
            }
            for s, v, t in checkpoints
        ],
    }


def train_alone(
    fed: Cohort,
    positions: np.ndarray,
    seed_id: str,
    val: np.ndarray,
    *,
    rounds: int | None = None,
    patience: int | None = None,
    test_each: bool = True,
    steps: int | None = None,
) -> dict[str, Any]:
    """Train one model on ``positions``, scored on ``val`` at each round-sized checkpoint (``max_steps`` steps).

    Args:
        fed: The prepared federation (its model, rows, test rows and config).
        positions: The training rows.
        seed_id: Seeds each checkpoint's batches with the run seed and the checkpoint number.
        val: The validation rows that pick the best checkpoint (and stop early).
        rounds: At most this many checkpoints after checkpoint 0 (default ``federation.rounds``).
        patience: Stop after this many checkpoints without a better validation macro-F1
            (:class:`EarlyStop`; default: never).
        test_each: Score every checkpoint on the test rows (for a curve); otherwise only the best one.
        steps: Optimizer steps per checkpoint (default ``train.max_steps``).

    Returns:
        :func:`_best`'s dict, plus ``checkpoints_run`` (trained checkpoints) and ``stopped_early``.
    """
    cfg = fed.config
    train_cfg = cfg.train if steps is None else dataclasses.replace(cfg.train, max_steps=steps)
    model = fed.client.model
    last = cfg.federation.rounds if rounds is None else rounds
    stop = EarlyStop(patience)
    state = best_state = fed.initial_state
    checkpoints: list[tuple[int, EvalResult, EvalResult | None]] = []
    stopped = False
    for r in range(last + 1):
        if r:
            # Each checkpoint is a round's worth of steps; the optimizer restarts, as a federated round's does.
            set_adapter_state(model, state)
            train_local(model, fed.rows, positions, train_cfg, client_seed(cfg.seed, r, seed_id), progress=False)
            state = get_adapter_state(model)
        v = evaluate_state(fed, state, val)
        checkpoints.append((r, v, evaluate_state(fed, state) if test_each else None))
        stopped = stop.update(r, v.macro_f1)
        if stop.best_at == r:
            best_state = state
        if stopped:
            break
    if not test_each:
        b = stop.best_at
        checkpoints[b] = (b, checkpoints[b][1], evaluate_state(fed, best_state))
    return {**_best(checkpoints), "checkpoints_run": len(checkpoints) - 1, "stopped_early": stopped and r < last}


def run_federated(
    fed: Cohort, cfg: RunConfig, work: Path, val: np.ndarray, rounds: int, patience: int | None
) -> dict[str, Any]:
    """One federated run through the in-process engine, early-stopped on ``val`` (the convergence protocol).

    The federation runs with ``federation.rounds = rounds``, the cap, so a record-level DP
    ``target_epsilon`` is calibrated for the cap and early stopping spends less epsilon, never
    more. After each round the engine's stop callback scores the new global adapter (as recorded)
    on the pooled validation rows; ``patience`` rounds without a better validation macro-F1 end
    the run. The test scores reported are those of the best-validation round.

    Args:
        fed: The federation prepared once for the setting and seed (data, splits, tokens, model).
        cfg: The method's config (the setting's, with the method's overrides); its
            ``federation.rounds`` is replaced by ``rounds``.
        work: The run folder (``metrics.jsonl`` and the payloads of every round).
        val: The validation rows (:func:`val_positions`).
        rounds: The round cap.
        patience: Rounds without a better validation macro-F1 before stopping (``None``: never).

    Returns:
        The test scores of the best-validation round, the per-round curve (validation and test
        macro-F1, cumulative upload bytes), rounds run, bytes per client per round and seconds.
    """
    t0 = time.perf_counter()
    cfg = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, rounds=rounds))
    stop = EarlyStop(patience)
    val_f1 = [evaluate_state(fed, fed.initial_state, val).macro_f1]
    stop.update(0, val_f1[0])
    record = RunRecord(work)

    def scored(r: int, _state: dict[str, torch.Tensor], _scores: EvalResult | None) -> bool:
        # The adapter as recorded (decoded from its wire encoding) is the one that would be released.
        state = {k: v.to(torch.float32) for k, v in load_payload(record.global_path(r)).decoded().items()}
        val_f1.append(evaluate_state(fed, state, val).macro_f1)
        return stop.update(r, val_f1[-1])

    simulate(cfg, work, progress=False, fed=dataclasses.replace(fed, config=cfg), stop=scored)
    rows = read_metrics(work / "metrics.jsonl")
    curve, bytes_cum = [], 0
    for row, v in zip(rows, val_f1, strict=True):
        bytes_cum += row["bytes_up"]
        curve.append(
            {
                "round": row["round"],
                "val_macro_f1": v,
                "macro_f1": row["macro_f1"],
                "accuracy": row["accuracy"],
                "bytes_up_cum": bytes_cum,
            }
        )
    best = curve[stop.best_at]
    return {
        "macro_f1": best["macro_f1"],
        "accuracy": best["accuracy"],
        "best_round": stop.best_at,
        "rounds_run": len(curve) - 1,
        "final_macro_f1": curve[-1]["macro_f1"],
        "curve": curve,
        "bytes_per_client_round": statistics.mean(row["bytes_up"] / len(row["clients"]) for row in rows[1:]),
        "seconds": time.perf_counter() - t0,
    }


def compare(
    config: RunConfig, out_dir: str | Path, progress: bool = True, patience: int = 2, val_rows: int | None = None
) -> dict[str, Any]:
    """Train federated, centralized and local-only models on one prepared federation; write ``compare.json``.

    Args:
        config: The federation's config.
        out_dir: Where ``compare.json`` and the federated run folder go.
        progress: Show progress bars (on a terminal).
        patience: Checkpoints without a better validation score before a local-only client stops
            (the pooled model, the reference, runs every checkpoint).
        val_rows: Pooled validation rows that pick the federation's and the pooled model's best
            checkpoint (a seeded sample; default ``federation.max_test_rows``). Fewer rows are
            cheaper but noisier: on the main job 400 rows picked round 4 (test 0.840) over round 5
            (0.866), 800 picked round 5.

    Returns:
        ``{"federated", "centralized", "local_mean", "local_worst", "local", "test_rows", "seconds"}``;
        each method's ``macro_f1``/``accuracy`` are on the same global test rows.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    fed = prepare_cohort(config)
    val = val_positions(fed, val_rows)
    times: dict[str, float] = {}

    t = time.perf_counter()
    simulate(config, out / "federated", progress=progress, fed=fed)
    record = RunRecord(out / "federated")
    rows = read_metrics(record.metrics_path)
    checkpoints = []
    for r in range(config.federation.rounds + 1):
        state = {k: v.to(torch.float32) for k, v in load_payload(record.global_path(r)).decoded().items()}
        # The run scored every round on the test rows already; only the validation score is new.
        checkpoints.append((r, evaluate_state(fed, state, val), _row_scores(rows[r])))
    federated = _best(checkpoints)
    times["federated"] = time.perf_counter() - t

    t = time.perf_counter()
    pooled = np.sort(np.concatenate([s.train for s in fed.splits]))
    # A pooled client trains with the same per-step settings; its loss weights come from the pooled labels.
    per_round = len(fed.partition.client_ids) * (config.train.max_steps or 1)
    centralized = train_alone(fed, pooled, "centralized", val, test_each=False, steps=per_round)
    times["centralized"] = time.perf_counter() - t

    t = time.perf_counter()
    local = {}
    for k, cid in enumerate(fed.partition.client_ids):
        own_val = fed.splits[k].val[:200] if len(fed.splits[k].val) else fed.splits[k].train[:200]
        local[cid] = train_alone(fed, fed.splits[k].train, cid, own_val, patience=patience, test_each=False)
        logger.info("local-only %s: macro-F1 %.4f", cid, local[cid]["macro_f1"])
    times["local"] = time.perf_counter() - t
    f1s = [v["macro_f1"] for v in local.values()]
    accs = [v["accuracy"] for v in local.values()]
    result = {
        "run": config.name,
        "test_rows": len(fed.test_positions),
        "val_rows": len(val),
        "rounds": config.federation.rounds,
        "steps_per_round": config.train.max_steps,
        "centralized_steps_per_checkpoint": per_round,
        "federated": federated,
        "centralized": centralized,
        "local_mean": {"macro_f1": float(np.mean(f1s)), "accuracy": float(np.mean(accs))},
        "local_worst": {"macro_f1": float(np.min(f1s)), "accuracy": float(np.min(accs))},
        "local": local,
        "seconds": {**{k: round(v, 1) for k, v in times.items()}, "total": round(time.perf_counter() - t0, 1)},
    }
    atomic_write_json(out / "compare.json", result)
    logger.info("\n%s", format_compare(result))
    return result


def _row_scores(row: dict[str, Any]) -> EvalResult:
    """A ``metrics.jsonl`` row's test scores as an :class:`EvalResult` (headline numbers only)."""
    return EvalResult(row["test_loss"], row["accuracy"], row["macro_f1"], {}, [], 0)


def format_compare(result: dict[str, Any]) -> str:
    """The side-by-side table of :func:`compare`."""
    lines = [
        f"{'model':<28} {'macro-F1':>9} {'accuracy':>9}",
        "-" * 48,
    ]
    for name, key in (
        ("federated", "federated"),
        ("centralized (pooled rows)", "centralized"),
        ("local-only, mean client", "local_mean"),
        ("local-only, worst client", "local_worst"),
    ):
        m = result[key]
        lines.append(f"{name:<28} {m['macro_f1']:>9.4f} {m['accuracy']:>9.4f}")
    lines.append(
        f"same {result['test_rows']} test rows for all; each model's best validation checkpoint "
        f"(federated and pooled: {result['val_rows']} pooled validation rows; local: the client's own); "
        f"{result['seconds']['total']:.0f} s"
    )
    return "\n".join(lines)
