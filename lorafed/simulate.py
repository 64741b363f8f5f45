"""In-process simulation: every client and the server on one machine, one model in memory.

Per round: sample clients, let each train from the global adapter and write its payload, have
the server validate and aggregate the payload files, evaluate the new global adapter on the
held-out test rows, and append a line to ``metrics.jsonl``. Round 0 evaluates the untrained
adapter. The payloads are real files, the same bytes a remote client would send.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lorafed.adapter import adapter_spec, get_adapter_state, set_adapter_state
from lorafed.config import RunConfig, save_config
from lorafed.data import LabeledData, Split, TokenizedRows, load_labeled, split_indices
from lorafed.errors import ConfigError
from lorafed.evaluate import EvalResult, evaluate
from lorafed.io import append_jsonl, atomic_write_json
from lorafed.model import ClientModel, load_client_model, lora_config_dict
from lorafed.partition import Partition, client_table, partition
from lorafed.payload import PayloadMeta, save_payload
from lorafed.plots import plot_rounds
from lorafed.server import aggregate_files, require_enough
from lorafed.train import TrainResult, train_local
from lorafed.validate import UpdateSpec

Log = Callable[[str], None]


@dataclass
class Federation:
    """Everything a simulated run needs, prepared once: data, clients, tokens, model.

    Attributes:
        config: The run config.
        data: Clean rows and the global label list.
        partition: Client ids and their rows.
        splits: Train/validation/test rows of each client.
        rows: Every row tokenized once.
        client: The shared model (each client loads the global adapter into it in turn).
        test_positions: The global test rows (union of client test slices, maybe sampled).
        initial_state: The seeded round-0 adapter.
    """

    config: RunConfig
    data: LabeledData
    partition: Partition
    splits: list[Split]
    rows: TokenizedRows
    client: ClientModel
    test_positions: np.ndarray
    initial_state: dict[str, torch.Tensor]

    def spec(self, round_: int | None) -> UpdateSpec:
        """What updates of ``round_`` must match."""
        return UpdateSpec(
            base_fingerprint=self.client.fingerprint,
            lora=lora_config_dict(self.config.model.lora),
            labels=self.data.label_names,
            tensors=adapter_spec(self.initial_state),
            round=round_,
        )

    def meta(self, client_id: str, round_: int, num_examples: int, kind: str = "update", **metrics: Any) -> PayloadMeta:
        """A payload header for this federation; client updates use the configured transport."""
        fcfg = self.config.federation
        wire = fcfg.transport if kind == "update" else "float32"
        return PayloadMeta(
            base_fingerprint=self.client.fingerprint,
            lora=lora_config_dict(self.config.model.lora),
            labels=self.data.label_names,
            num_examples=num_examples,
            round=round_,
            client_id=client_id,
            kind=kind,
            metrics=metrics,
            dtype=wire,
            block_size=fcfg.transport_block_size if wire == "int8_block" else None,
        )


def set_threads(num_threads: int) -> None:
    """Use ``num_threads`` intra-op threads (0: every core)."""
    torch.set_num_threads(num_threads or os.cpu_count() or 1)


def prepare_federation(config: RunConfig, log: Log = print) -> Federation:
    """Load and clean the data, partition it, split each client, load the model, tokenize once."""
    part_cfg = config.partition
    extra = [part_cfg.column] if part_cfg.scheme == "natural" and part_cfg.column else []
    data = load_labeled(config.data, config.seed, extra_columns=extra)
    for reason, count in data.dropped.items():
        log(f"dropped {count} rows: {reason}")
    part = partition(data, part_cfg, config.seed)
    splits = [
        split_indices(idx, config.data.val_fraction, config.data.test_fraction, config.seed + 7919 * (k + 1))
        for k, idx in enumerate(part.indices)
    ]
    log(f"{len(data)} rows, {len(data.label_names)} labels, {len(part.client_ids)} clients ({part_cfg.scheme}):")
    log(client_table(part, data.labels, data.label_names))
    test = np.sort(np.concatenate([s.test for s in splits]))
    max_test = config.federation.max_test_rows
    if max_test is not None and len(test) > max_test:
        test = np.sort(np.random.default_rng(config.seed).choice(test, size=max_test, replace=False))
    if len(test) == 0:
        raise ConfigError(["data.test_fraction leaves no test rows; raise it or use more data"])
    set_threads(config.train.num_threads)
    client = load_client_model(config.model, data.label_names, config.seed)
    rows = TokenizedRows(data, client.tokenizer, config.data.max_length, config.data.pair_mode)
    return Federation(config, data, part, splits, rows, client, test, get_adapter_state(client.model))


def client_seed(seed: int, round_: int, client_index: int) -> int:
    """A distinct, reproducible seed for one client's round."""
    return (seed * 1_000_003 + round_ * 10_007 + client_index) % (2**31 - 1)


def sample_clients(num_clients: int, fraction: float, min_clients: int, seed: int, round_: int) -> list[int]:
    """Sorted indices of the clients that train in ``round_`` (at least ``min_clients``)."""
    k = min(num_clients, max(min_clients, math.ceil(fraction * num_clients)))
    if k >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, round_])
    return sorted(int(i) for i in rng.choice(num_clients, size=k, replace=False))


def train_client(
    fed: Federation, global_state: dict[str, torch.Tensor], k: int, round_: int, progress: bool = True
) -> tuple[dict[str, torch.Tensor], TrainResult]:
    """Client ``k`` trains one round from ``global_state``; returns its adapter tensors."""
    model = fed.client.model
    set_adapter_state(model, global_state)
    result = train_local(
        model,
        fed.rows,
        fed.splits[k].train,
        fed.config.train,
        client_seed(fed.config.seed, round_, k),
        desc=f"r{round_} {fed.partition.client_ids[k]}",
        progress=progress,
    )
    return get_adapter_state(model), result


def evaluate_state(fed: Federation, state: dict[str, torch.Tensor], positions: np.ndarray | None = None) -> EvalResult:
    """Score an adapter state on the global test rows (or ``positions``)."""
    set_adapter_state(fed.client.model, state)
    pos = fed.test_positions if positions is None else positions
    return evaluate(fed.client.model, fed.rows, pos, fed.config.train.eval_batch_size, fed.data.label_names)


def simulate(
    config: RunConfig, out_dir: str | Path, progress: bool = True, log: Log = print, fed: Federation | None = None
) -> dict[str, Any]:
    """Run a whole federated simulation and write its results to ``out_dir``.

    ``fed``, if given, is a federation already prepared for ``config`` (benchmarks reuse one
    across runs that differ only in the server or transport settings).

    Writes ``config.yaml``, ``metrics.jsonl`` (one line per round, round 0 included),
    ``rounds/global_rN.safetensors`` and ``rounds/rN/<client>.safetensors``, and ``summary.json``.

    Returns:
        The summary (also written to ``summary.json``).

    Raises:
        LorafedError: For bad config, data or a round without enough valid updates.
    """
    out = Path(out_dir)
    fed = prepare_federation(config, log) if fed is None else fed
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    metrics_path = out / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)
    fcfg = config.federation
    state = fed.initial_state
    t0 = time.perf_counter()
    first = evaluate_state(fed, state)
    g_path = save_payload(out / "rounds" / "global_r0.safetensors", state, fed.meta("server", 0, 1, kind="global"))
    rows = [_metrics_row(0, first, [], 0, 0, {"eval": time.perf_counter() - t0})]
    append_jsonl(metrics_path, rows[-1])
    log(f"round 0 (untrained): accuracy {first.accuracy:.4f}  macro-F1 {first.macro_f1:.4f}")
    last = first
    for r in tqdm(range(1, fcfg.rounds + 1), desc="rounds", unit="round", disable=not progress):
        times: dict[str, float] = {}
        t = time.perf_counter()
        chosen = sample_clients(len(fed.partition.client_ids), fcfg.fraction, fcfg.min_clients, config.seed, r)
        bytes_down = g_path.stat().st_size * len(chosen)
        update_dir = out / "rounds" / f"r{r}"
        if update_dir.exists():
            shutil.rmtree(update_dir)
        paths, losses = [], []
        for k in chosen:
            tensors, res = train_client(fed, state, k, r, progress)
            cid = fed.partition.client_ids[k]
            meta = fed.meta(cid, r, res.num_examples, loss=res.mean_loss, steps=res.steps, seconds=res.seconds)
            paths.append(save_payload(update_dir / f"{cid}.safetensors", tensors, meta))
            losses.append((res.mean_loss, res.num_examples))
        times["train"] = time.perf_counter() - t
        t = time.perf_counter()
        outcome = aggregate_files(paths, fed.spec(r), fcfg.weighting, fcfg.min_clients)
        for src, reason in outcome.rejected:
            log(f"round {r}: rejected {src}: {reason}")
        state = dict(require_enough(outcome, fcfg.min_clients, r))
        g_path = save_payload(
            out / "rounds" / f"global_r{r}.safetensors",
            state,
            fed.meta("server", r, outcome.num_examples, kind="global"),
        )
        times["aggregate"] = time.perf_counter() - t
        t = time.perf_counter()
        last = evaluate_state(fed, state)
        times["eval"] = time.perf_counter() - t
        train_loss = sum(loss * n for loss, n in losses) / max(sum(n for _, n in losses), 1)
        row = _metrics_row(r, last, [m.client_id for _, m in outcome.accepted], outcome.bytes_in, bytes_down, times)
        row["train_loss"] = train_loss
        row["rejected"] = [reason for _, reason in outcome.rejected]
        rows.append(row)
        append_jsonl(metrics_path, row)
    summary = {
        "run": config.name,
        "output_dir": str(out),
        "base_fingerprint": fed.client.fingerprint,
        "precision": fed.client.precision,
        "labels": list(fed.data.label_names),
        "clients": dict(zip(fed.partition.client_ids, fed.partition.sizes(), strict=True)),
        "test_rows": len(fed.test_positions),
        "round0": first.summary(),
        "final": last.summary(),
        "final_round": fcfg.rounds,
        "per_class": last.per_class,
        "confusion": last.confusion,
        "adapter_bytes": int(g_path.stat().st_size),
        "wall_seconds": time.perf_counter() - t0,
    }
    atomic_write_json(out / "summary.json", summary)
    plot_rounds(rows, out / "metrics.png")
    log(format_final_table(rows))
    return summary


def _metrics_row(
    r: int, ev: EvalResult, clients: list[str], up: int, down: int, times: dict[str, float]
) -> dict[str, Any]:
    return {
        "round": r,
        "test_loss": ev.loss,
        "accuracy": ev.accuracy,
        "macro_f1": ev.macro_f1,
        "clients": clients,
        "bytes_up": up,
        "bytes_down": down,
        "seconds": {k: round(v, 3) for k, v in times.items()},
    }


def format_final_table(rows: list[dict[str, Any]]) -> str:
    """A text table of the rounds' global metrics."""
    cols = ("round", "clients", "test loss", "accuracy", "macro-F1", "KB up", "seconds")
    head = "  ".join(f"{c:>{w}}" for c, w in zip(cols, (5, 7, 9, 8, 8, 8, 7), strict=True))
    lines = [head, "-" * len(head)]
    for row in rows:
        secs = sum(row["seconds"].values())
        lines.append(
            f"{row['round']:>5}  {len(row['clients']):>7}  {row['test_loss']:>9.4f}  {row['accuracy']:>8.4f}  "
            f"{row['macro_f1']:>8.4f}  {row['bytes_up'] / 1024:>8.1f}  {secs:>7.1f}"
        )
    if len(rows) > 1:
        d_acc = rows[-1]["accuracy"] - rows[0]["accuracy"]
        d_f1 = rows[-1]["macro_f1"] - rows[0]["macro_f1"]
        lines.append(f"final vs round 0: accuracy {d_acc:+.4f}, macro-F1 {d_f1:+.4f}")
    return "\n".join(lines)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read a ``metrics.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
