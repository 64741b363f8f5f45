"""In-process simulation: every client and the server on one machine, one model in memory.

Per round: sample clients, let each train from the global adapter and write its payload, have
the server validate and aggregate the payload files, evaluate the new global adapter on the
held-out test rows, and append a line to ``metrics.jsonl``. Round 0 evaluates the untrained
adapter. The payloads are real files, the same bytes a remote client would send.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
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
from lorafed.compress import update_wire
from lorafed.config import RunConfig, save_config
from lorafed.data import LabeledData, Split, TokenizedRows, load_labeled, split_indices
from lorafed.errors import AggregationError, ConfigError, LorafedError
from lorafed.evaluate import EvalResult, evaluate
from lorafed.io import atomic_write_json, atomic_write_jsonl
from lorafed.lora_modes import round_keys, round_roles, select, trainable_roles
from lorafed.model import ClientModel, load_client_model, lora_config_dict
from lorafed.partition import Partition, client_table, partition
from lorafed.payload import PayloadMeta, load_payload, save_payload
from lorafed.plots import plot_rounds
from lorafed.rounds import RoundPolicy, client_seed, split_seed
from lorafed.server_opt import load_server_opt, save_server_opt
from lorafed.train import TrainResult, train_local
from lorafed.validate import UpdateSpec, validate_update

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

    def sent_keys(self, round_: int | None) -> list[str]:
        """The adapter tensors trained and sent in ``round_`` (all of them for ``None``)."""
        return round_keys(self.config.federation.aggregation, round_, self.initial_state)

    def spec(self, round_: int | None) -> UpdateSpec:
        """What updates of ``round_`` must match: exactly the tensors sent in that round."""
        return UpdateSpec(
            base_fingerprint=self.client.fingerprint,
            lora=lora_config_dict(self.config.model.lora),
            labels=self.data.label_names,
            tensors=adapter_spec(select(self.initial_state, self.sent_keys(round_))),
            round=round_,
            max_num_examples=self.config.federation.max_num_examples,
        )

    def meta(self, client_id: str, round_: int, num_examples: int, kind: str = "update", **metrics: Any) -> PayloadMeta:
        """A payload header for this federation; client updates use the configured transport."""
        dtype, block_size = update_wire(self.config.federation) if kind == "update" else ("float32", None)
        return PayloadMeta(
            base_fingerprint=self.client.fingerprint,
            lora=lora_config_dict(self.config.model.lora),
            labels=self.data.label_names,
            num_examples=num_examples,
            round=round_,
            client_id=client_id,
            kind=kind,
            metrics=metrics,
            dtype=dtype,
            block_size=block_size,
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
        split_indices(idx, config.data.val_fraction, config.data.test_fraction, split_seed(config.seed, cid))
        for cid, idx in zip(part.client_ids, part.indices, strict=True)
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


def single_client_config(config: RunConfig, data_path: str) -> RunConfig:
    """The config of a client that holds its own file: one client over all of its rows.

    The labels must match the federation's; set ``data.labels`` so every client agrees.
    """
    return dataclasses.replace(
        config,
        data=dataclasses.replace(config.data, path=data_path, max_rows=None),
        partition=dataclasses.replace(config.partition, scheme="iid", num_clients=1, min_client_size=1),
    )


def train_client(
    fed: Federation,
    global_state: dict[str, torch.Tensor],
    k: int,
    round_: int,
    progress: bool = True,
    client_id: str | None = None,
) -> tuple[dict[str, torch.Tensor], TrainResult]:
    """Client ``k`` trains one round from ``global_state``; returns the tensors it sends.

    Only the tensors of the round's roles (see :mod:`lorafed.lora_modes`) are trained and returned.
    ``client_id`` (default: the partition's id of client ``k``) picks the client's seed stream,
    for a client whose data is its own one-client federation (a Flower node or poller with its
    own file): the same id draws the same seeds in every engine.
    """
    model = fed.client.model
    set_adapter_state(model, global_state)
    cid = fed.partition.client_ids[k] if client_id is None else client_id
    with trainable_roles(model, round_roles(fed.config.federation.aggregation, round_)):
        result = train_local(
            model,
            fed.rows,
            fed.splits[k].train,
            fed.config.train,
            client_seed(fed.config.seed, round_, cid),
            desc=f"r{round_} {cid}",
            progress=progress,
        )
    return select(get_adapter_state(model), fed.sent_keys(round_)), result


def evaluate_state(fed: Federation, state: dict[str, torch.Tensor], positions: np.ndarray | None = None) -> EvalResult:
    """Score an adapter state on the global test rows (or ``positions``)."""
    set_adapter_state(fed.client.model, state)
    pos = fed.test_positions if positions is None else positions
    return evaluate(fed.client.model, fed.rows, pos, fed.config.train.eval_batch_size, fed.data.label_names)


ClientFn = Callable[["Federation", dict[str, torch.Tensor], int, int], tuple[dict[str, torch.Tensor], TrainResult]]
"""A client's round: ``(fed, global_state, client_index, round) -> (adapter tensors, TrainResult)``."""


def simulate(
    config: RunConfig,
    out_dir: str | Path,
    progress: bool = True,
    log: Log = print,
    *,
    resume: bool = False,
    client_fn: Callable[[ClientFn], ClientFn] | None = None,
    fed: Federation | None = None,
) -> dict[str, Any]:
    """Run a whole federated simulation and write its results to ``out_dir``.

    Writes ``config.yaml``, ``metrics.jsonl`` (one line per round, round 0 included),
    ``rounds/global_rN.safetensors`` and ``rounds/rN/<client>.safetensors``, and ``summary.json``,
    every one through a temporary file and a rename. A round's global adapter is written before
    its metrics line, so a line in ``metrics.jsonl`` means the round is complete on disk.

    Args:
        config: The run config.
        out_dir: The run folder.
        progress: Show progress bars.
        log: Where messages go.
        resume: Continue the run in ``out_dir`` from its last completed round (a round that was
            interrupted is redone from scratch). Each client's round is seeded by (seed, round,
            client) only, so a resumed run ends with the same adapter as an uninterrupted one.
        client_fn: Wraps the client's round (:func:`train_client`), e.g. to inject faults or
            attacks; it receives the real one and returns the function to call instead.
        fed: A federation already prepared for ``config`` (benchmarks reuse one across runs
            that differ only in the server or transport settings).

    Returns:
        The summary (also written to ``summary.json``).

    Raises:
        LorafedError: For bad config, data, a run folder that cannot be resumed, or a round
            without enough valid updates after its retries.
    """
    out = Path(out_dir)
    fed = prepare_federation(config, log) if fed is None else fed
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    base_client: ClientFn = functools.partial(train_client, progress=progress)
    run_client = client_fn(base_client) if client_fn is not None else base_client
    t0 = time.perf_counter()
    fcfg = config.federation
    policy = RoundPolicy(fcfg, len(fed.partition.client_ids), config.seed)
    if resume:
        rows, state = resume_point(fed, out, log, policy)
    else:
        rows, state = [], fed.initial_state
        _clear_run(out)
    if not rows:
        first = evaluate_state(fed, state)
        save_payload(_global_path(out, 0), state, fed.meta("server", 0, 1, kind="global"))
        rows.append(_metrics_row(0, first, [], 0, 0, {"eval": time.perf_counter() - t0}))
        atomic_write_jsonl(out / "metrics.jsonl", rows)
        log(f"round 0 (untrained): accuracy {first.accuracy:.4f}  macro-F1 {first.macro_f1:.4f}")
    start = rows[-1]["round"] + 1
    last: EvalResult | None = None
    for r in tqdm(range(start, fcfg.rounds + 1), desc="rounds", unit="round", disable=not progress):
        state, last, row = run_round(fed, policy, state, r, out, run_client, progress, log)
        rows.append(row)
        atomic_write_jsonl(out / "metrics.jsonl", rows)
    if last is None:  # nothing left to run (resumed a finished run, or rounds=0): score the state held
        last = evaluate_state(fed, state)
    g_path = _global_path(out, rows[-1]["round"])
    summary = {
        "run": config.name,
        "output_dir": str(out),
        "base_fingerprint": fed.client.fingerprint,
        "precision": fed.client.precision,
        "labels": list(fed.data.label_names),
        "clients": dict(zip(fed.partition.client_ids, fed.partition.sizes(), strict=True)),
        "test_rows": len(fed.test_positions),
        "round0": {"loss": rows[0]["test_loss"], "accuracy": rows[0]["accuracy"], "macro_f1": rows[0]["macro_f1"]},
        "final": last.summary(),
        "final_round": rows[-1]["round"],
        "per_class": last.per_class,
        "confusion": last.confusion,
        "adapter_bytes": int(g_path.stat().st_size),
        "wall_seconds": time.perf_counter() - t0,
        "resumed": resume,
    }
    atomic_write_json(out / "summary.json", summary)
    plot_rounds(rows, out / "metrics.png")
    log(format_final_table(rows))
    return summary


def run_round(
    fed: Federation,
    policy: RoundPolicy,
    state: dict[str, torch.Tensor],
    r: int,
    out: Path,
    run_client: ClientFn,
    progress: bool = True,
    log: Log = print,
) -> tuple[dict[str, torch.Tensor], EvalResult, dict[str, Any]]:
    """One round: sampled clients train, the server validates and aggregates, the result is scored.

    Clients that raise or exceed ``federation.client_timeout_s`` are recorded in the row's
    ``failed`` list and nothing of theirs is averaged. With fewer than ``min_clients`` valid
    updates the round is retried (same clients, same seeds) up to ``federation.round_retries``
    times, then abandoned. ``policy`` chooses the clients and aggregates (see
    :class:`lorafed.rounds.RoundPolicy`).

    Returns:
        The new global state, its evaluation and the ``metrics.jsonl`` row.

    Raises:
        AggregationError: Still too few valid updates after every retry.
    """
    fcfg = fed.config.federation
    times: dict[str, float] = {}
    t = time.perf_counter()
    chosen = policy.choose(r)
    bytes_down = _global_path(out, r - 1).stat().st_size * len(chosen)
    failed: list[dict[str, Any]] = []
    rejected: list[str] = []
    attempts = fcfg.round_retries + 1
    for attempt in range(1, attempts + 1):
        paths, losses, failures = train_round_clients(
            fed, state, r, chosen, out / "rounds" / f"r{r}", run_client, progress
        )
        failed += [{**f, "attempt": attempt} for f in failures]
        for f in failures:
            log(f"round {r}: client {f['client']} dropped (attempt {attempt}): {f['reason']}")
        times["train"] = times.get("train", 0.0) + time.perf_counter() - t
        t = time.perf_counter()
        result = policy.try_aggregate(paths, fed.spec(r), state, r, asked=len(chosen))
        outcome = result.outcome
        times["aggregate"] = times.get("aggregate", 0.0) + time.perf_counter() - t
        rejected += [reason for _, reason in outcome.rejected]
        for src, reason in outcome.rejected:
            log(f"round {r}: rejected {src}: {reason}")
        if result.state is not None:
            break
        if attempt < attempts:
            log(f"round {r}: {len(outcome.accepted)} valid update(s) < min_clients={fcfg.min_clients}; retrying")
        t = time.perf_counter()
    if result.state is None:
        dropped = "; ".join(f"{f['client']}: {f['reason']}" for f in failed) or "none"
        raise AggregationError(
            f"round {r} abandoned after {attempts} attempt(s): {len(outcome.accepted)} valid update(s), fewer than "
            f"federation.min_clients={fcfg.min_clients}. Failed clients: {dropped}. Rejected updates: "
            f"{'; '.join(rejected) or 'none'}. The run folder holds rounds 0..{r - 1}; fix the cause and resume."
        )
    new_state = result.state
    if policy.server_opt is not None:  # FedAdam/FedYogi moments, written before the round counts as done
        save_server_opt(_server_opt_path(out, r), policy.server_opt)
    g_path = save_payload(_global_path(out, r), new_state, fed.meta("server", r, outcome.num_examples, kind="global"))
    t = time.perf_counter()
    scores = evaluate_state(fed, new_state)
    times["eval"] = time.perf_counter() - t
    accepted = {m.client_id for _, m in outcome.accepted}
    used = [(loss, n) for cid, loss, n in losses if cid in accepted]
    row = _metrics_row(r, scores, [m.client_id for _, m in outcome.accepted], outcome.bytes_in, bytes_down, times)
    row["train_loss"] = sum(loss * n for loss, n in used) / max(sum(n for _, n in used), 1)
    row["rejected"] = rejected
    row["failed"] = failed
    row["attempts"] = attempt
    row["update_norms"] = {k: round(v, 6) for k, v in outcome.norms.items()}
    row["clipped"] = outcome.clipped
    row["global_bytes"] = int(g_path.stat().st_size)
    if result.privacy:
        row["privacy"] = result.privacy
    return new_state, scores, row


def train_round_clients(
    fed: Federation,
    state: dict[str, torch.Tensor],
    r: int,
    chosen: list[int],
    update_dir: Path,
    run_client: ClientFn,
    progress: bool = True,
) -> tuple[list[Path], list[tuple[str, float, int]], list[dict[str, Any]]]:
    """Let each chosen client train and write its update file; record the ones that fail.

    A client fails when ``run_client`` raises, or when it takes longer than
    ``federation.client_timeout_s`` (in one process the simulator cannot pre-empt a client, so a
    late update is discarded once it arrives, as a server would ignore it after its deadline).

    Returns:
        The update files, ``(client, mean loss, examples)`` of each success, and
        ``{"client", "reason"}`` of each failure.
    """
    if update_dir.exists():
        shutil.rmtree(update_dir)
    timeout = fed.config.federation.client_timeout_s
    paths: list[Path] = []
    losses: list[tuple[str, float, int]] = []
    failures: list[dict[str, Any]] = []
    for k in chosen:
        cid = fed.partition.client_ids[k]
        t = time.perf_counter()
        try:
            tensors, res = run_client(fed, state, k, r)
        except Exception as exc:  # any client fault is recorded; the round decides what follows
            failures.append({"client": cid, "reason": f"raised {type(exc).__name__}: {exc}"})
            continue
        took = time.perf_counter() - t
        if timeout is not None and took > timeout:
            failures.append({"client": cid, "reason": f"timed out: took {took:.2f} s, over client_timeout_s={timeout}"})
            continue
        meta = fed.meta(cid, r, res.num_examples, loss=res.mean_loss, steps=res.steps, seconds=res.seconds)
        paths.append(save_payload(update_dir / f"{cid}.safetensors", tensors, meta))
        losses.append((cid, res.mean_loss, res.num_examples))
    return paths, losses, failures


def resume_point(
    fed: Federation, out: Path, log: Log = print, policy: RoundPolicy | None = None
) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """The completed rounds of the run in ``out`` and the global adapter of the last one.

    ``metrics.jsonl`` is the record of completed rounds: its rows must be rounds 0, 1, ..., k,
    and ``rounds/global_rk.safetensors`` must exist and match this federation. Files of rounds
    after k (an interrupted round) are removed so the round is redone from scratch.

    Raises:
        LorafedError: No run to resume in ``out``, rounds out of order, or a global adapter that is
            missing or does not match the config (another base model, LoRA config or labels).
    """
    metrics = out / "metrics.jsonl"
    if not metrics.is_file():  # killed before round 0 was recorded
        log(f"{out}: no round completed yet; starting from round 0")
        _clear_run(out)
        return [], fed.initial_state
    rows = read_metrics(metrics)
    for i, row in enumerate(rows):
        if row.get("round") != i:
            raise LorafedError(f"{metrics}: line {i + 1} is round {row.get('round')!r}, expected round {i}")
    if not rows:
        _clear_run(out)
        return [], fed.initial_state
    last = rows[-1]["round"]
    g_path = _global_path(out, last)
    payload = load_payload(g_path)
    validate_update(payload, fed.spec(None), str(g_path))
    _remove_rounds_after(out, last)
    if policy is not None and fed.config.federation.server_optimizer != "none" and last > 0:
        policy.server_opt = load_server_opt(_server_opt_path(out, last))
    log(f"resuming {out} after round {last} of {fed.config.federation.rounds}")
    return rows, {k: v.to(torch.float32) for k, v in payload.decoded().items()}


def _server_opt_path(out: Path, r: int) -> Path:
    return out / "rounds" / f"server_opt_r{r}.safetensors"


def _global_path(out: Path, r: int) -> Path:
    return out / "rounds" / f"global_r{r}.safetensors"


def _clear_run(out: Path) -> None:
    """Remove the files a previous run left (a fresh run starts from nothing)."""
    (out / "metrics.jsonl").unlink(missing_ok=True)
    (out / "summary.json").unlink(missing_ok=True)
    if (out / "rounds").exists():
        shutil.rmtree(out / "rounds")


def _remove_rounds_after(out: Path, last: int) -> None:
    rounds = out / "rounds"
    for p in rounds.iterdir() if rounds.exists() else ():
        m = re.fullmatch(r"(?:global_)?r(\d+)(?:\.safetensors)?", p.name)
        if m and int(m.group(1)) > last:
            shutil.rmtree(p) if p.is_dir() else p.unlink()


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
    """Read a ``metrics.jsonl``.

    Raises:
        LorafedError: A line that is not a JSON object (naming the line).
    """
    rows = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LorafedError(f"{path}: line {i} is not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise LorafedError(f"{path}: line {i} is not a JSON object")
        rows.append(row)
    return rows
