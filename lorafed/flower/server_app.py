"""The ServerApp: rounds of send-global / receive-updates / validate / aggregate / checkpoint / evaluate.

Run config (``[tool.flwr.app.config]`` of the generated app, see :mod:`lorafed.flower.app_dir`):
``config-yaml`` (the resolved lorafed config), ``out-dir``, ``num-nodes`` (nodes to wait for),
``node-timeout`` and ``round-timeout`` (seconds), ``pull-interval`` (seconds between reply
polls; Flower's own ``send_and_receive`` waits 3 s between polls), ``server-eval`` (evaluate the
global adapter on the config's test rows; needs the data on the server machine).

Writes to ``out-dir`` what the simulator writes: ``config.yaml``, ``metrics.jsonl`` (with
``privacy`` under DP), ``rounds/global_rN.safetensors``, ``rounds/rN/node-<id>.safetensors``
(the replies, named by Flower node id, never by a name the client chose) and ``summary.json``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from lorafed.config import parse_config, save_config
from lorafed.errors import AggregationError, LorafedError
from lorafed.flower.records import payload_record, record_bytes
from lorafed.io import append_jsonl, atomic_write_bytes, atomic_write_json
from lorafed.payload import payload_to_bytes
from lorafed.rounds import RoundPolicy
from lorafed.simulate import evaluate_state, prepare_federation

app = ServerApp()


def wait_for_nodes(grid: Grid, n: int, timeout: float) -> list[int]:
    """Sorted ids of the connected nodes once ``n`` are there.

    Raises:
        AggregationError: Fewer than ``n`` nodes after ``timeout`` seconds.
    """
    end = time.monotonic() + timeout
    while True:
        ids = sorted(grid.get_node_ids())
        if len(ids) >= n:
            return ids
        if time.monotonic() > end:
            raise AggregationError(f"{len(ids)} node(s) connected after {timeout:.0f} s, expected {n}")
        time.sleep(0.2)


def send_and_receive(grid: Grid, messages: Iterable[Message], timeout: float, interval: float) -> list[Message]:
    """Push ``messages`` and pull replies every ``interval`` seconds until all came or ``timeout``."""
    pending = set(grid.push_messages(messages))
    replies: list[Message] = []
    end = time.monotonic() + timeout
    while pending and time.monotonic() < end:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending -= {m.metadata.reply_to_message_id for m in got}
        if pending:
            time.sleep(interval)
    return replies


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation described by the run config."""
    rc = context.run_config
    config = parse_config(str(rc["config-yaml"]), "run config config-yaml")
    out = Path(str(rc["out-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    metrics_path = out / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)
    fed = prepare_federation(config, log=lambda _: None)
    nodes = wait_for_nodes(grid, int(rc["num-nodes"]), float(rc["node-timeout"]))
    policy = RoundPolicy(config.federation, len(nodes), config.seed)
    evaluate = bool(rc["server-eval"])
    yaml_text = str(rc["config-yaml"])
    state = fed.initial_state
    t0 = time.perf_counter()
    row: dict[str, Any] = {"round": 0, **_scores(fed, state, evaluate), "clients": [], "seconds": {}}
    append_jsonl(metrics_path, row)
    blob = payload_to_bytes(state, fed.meta("server", 0, 1, kind="global"))
    atomic_write_bytes(out / "rounds" / "global_r0.safetensors", blob)
    for r in range(1, config.federation.rounds + 1):
        t = time.perf_counter()
        chosen = [nodes[i] for i in policy.choose(r)]
        msgs = [
            Message(
                content=RecordDict(
                    {"global": payload_record(blob), "config": ConfigRecord({"round": r, "config-yaml": yaml_text})}
                ),
                dst_node_id=nid,
                message_type="train",
                group_id=str(r),
            )
            for nid in chosen
        ]
        replies = send_and_receive(grid, msgs, float(rc["round-timeout"]), float(rc["pull-interval"]))
        t_train = time.perf_counter() - t
        paths, errors = _save_replies(replies, out / "rounds" / f"r{r}")
        missing = len(chosen) - len(replies)
        if missing:
            errors.append(f"{missing} node(s) did not reply within {rc['round-timeout']} s")
        t = time.perf_counter()
        try:
            result = policy.aggregate(paths, fed.spec(r), state, r)
        except AggregationError as exc:
            raise AggregationError(f"{exc}; node errors: {'; '.join(errors) or 'none'}") from exc
        state = result.state
        n = max(result.outcome.num_examples, 1)
        blob = payload_to_bytes(state, fed.meta("server", r, n, kind="global"))
        atomic_write_bytes(out / "rounds" / f"global_r{r}.safetensors", blob)
        t_agg = time.perf_counter() - t
        t = time.perf_counter()
        row = {
            "round": r,
            **_scores(fed, state, evaluate),
            "clients": [m.client_id for _, m in result.outcome.accepted],
            "bytes_up": result.outcome.bytes_in,
            "bytes_down": len(blob) * len(chosen),
            "rejected": [reason for _, reason in result.outcome.rejected] + errors,
            "seconds": {"train": round(t_train, 3), "aggregate": round(t_agg, 3), "eval": 0.0},
        }
        row["seconds"]["eval"] = round(time.perf_counter() - t, 3)
        if result.privacy:
            row["privacy"] = result.privacy
        append_jsonl(metrics_path, row)
    atomic_write_json(
        out / "summary.json",
        {
            "run": config.name,
            "engine": "flower",
            "nodes": nodes,
            "final": row,
            "wall_seconds": time.perf_counter() - t0,
        },
    )


def _scores(fed: Any, state: Any, evaluate: bool) -> dict[str, float]:
    if not evaluate:
        return {}
    ev = evaluate_state(fed, state)
    return {"test_loss": ev.loss, "accuracy": ev.accuracy, "macro_f1": ev.macro_f1}


def _save_replies(replies: list[Message], folder: Path) -> tuple[list[Path], list[str]]:
    """Write each good reply's payload to ``folder/node-<id>.safetensors``; collect node errors."""
    paths: list[Path] = []
    errors: list[str] = []
    for rep in replies:
        nid = rep.metadata.src_node_id
        if rep.has_error():
            errors.append(f"node {nid}: {rep.error.reason}")
            continue
        try:
            data = record_bytes(rep, "update")
        except LorafedError as exc:
            errors.append(str(exc))
            continue
        paths.append(atomic_write_bytes(folder / f"node-{nid}.safetensors", data))
    return paths, errors
