"""The ServerApp: the shared round loop over Flower's Grid (Message API).

Run config (``[tool.flwr.app.config]`` of the generated app, see :mod:`lorafed.engine.flower.app_dir`):
``config-yaml`` (the lorafed config), ``out-dir``, ``num-nodes`` (nodes to wait for),
``node-timeout`` (seconds to wait for them), ``round-timeout`` (seconds a round waits for
replies when ``federation.client_timeout_s`` is not set), ``pull-interval`` (seconds between
reply polls), ``server-eval`` (score each global adapter on the config's test rows; needs the
data on the server machine), and the common settings Flower users set with
``flwr run --run-config``: ``num-server-rounds``, ``fraction-train``, ``local-steps``,
``learning-rate`` (each overrides its lorafed key when set).

Writes to ``out-dir`` the run record every engine writes (:mod:`lorafed.engine.record`); the
updates are named by the client id of their header, and replies are tied to the Flower node
that sent them. Each round is logged, so ``flwr log`` shows the federation's progress.

With ``federation.signing.registry`` (and the server's ``server_key``) each global adapter goes out
with the server's signature (``global-signature`` in the ``config`` record) and each reply's
``signature`` (in its ``client`` record) is verified for the client id its update claims.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import yaml
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from lorafed.config import RunConfig, config_to_dict, parse_config, save_config
from lorafed.engine.cohort import evaluate_state, prepare_cohort
from lorafed.engine.flower.app_dir import RUN_CONFIG_OVERRIDES
from lorafed.engine.flower.records import payload_record, record_bytes
from lorafed.engine.loop import Dispatched, Federated, run_rounds, start
from lorafed.engine.record import RunRecord
from lorafed.errors import AggregationError, LorafedError
from lorafed.logs import ensure_handler
from lorafed.server.fold import Incoming
from lorafed.server.step import RoundPolicy
from lorafed.wire.sign import Signing, server_signing

logger = logging.getLogger(__name__)
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


def resolve_run_config(run_config: dict[str, Any]) -> RunConfig:
    """The lorafed config of a Flower run: ``config-yaml`` with the common Flower keys applied.

    Raises:
        ConfigError: The YAML or an override is invalid.
    """
    overrides = []
    for key, dotted in RUN_CONFIG_OVERRIDES.items():
        value = run_config.get(key)
        unset = value is None or value == "" or (isinstance(value, int | float) and value in (0, -1))
        if not unset:
            overrides.append(f"{dotted}={value}")
    return parse_config(str(run_config["config-yaml"]), "run config config-yaml", overrides)


class FlowerGrid:
    """The :class:`~lorafed.engine.loop.Transport` of a Flower deployment.

    Args:
        grid: Flower's Grid.
        nodes: The node ids, by client index.
        config_yaml: The resolved config, sent to every node with each round.
        timeout: Seconds a round waits for its replies.
        interval: Seconds between reply polls.
        signing: The server's keys (``None``: nothing signed).
    """

    def __init__(
        self,
        grid: Grid,
        nodes: list[int],
        config_yaml: str,
        timeout: float,
        interval: float,
        signing: Signing | None = None,
    ) -> None:
        self.signing = signing
        self.grid = grid
        self.nodes = nodes
        self.config_yaml = config_yaml
        self.timeout = timeout
        self.interval = interval

    def dispatch(
        self, round_: int, clients: list[int], global_bytes: bytes, global_state: dict[str, torch.Tensor]
    ) -> Dispatched:
        index = {self.nodes[k]: k for k in clients}
        conf: dict[str, Any] = {"round": round_, "config-yaml": self.config_yaml}
        if self.signing is not None:
            conf["global-signature"] = self.signing.sign_global(global_bytes)
        msgs = [
            Message(
                content=RecordDict(
                    {
                        "global": payload_record(global_bytes),
                        "config": ConfigRecord(conf),
                    }
                ),
                dst_node_id=nid,
                message_type="train",
                group_id=str(round_),
            )
            for nid in index
        ]
        out = Dispatched()
        replied: set[int] = set()
        for rep in send_and_receive(self.grid, msgs, self.timeout, self.interval):
            nid = rep.metadata.src_node_id
            if nid not in index or nid in replied:
                continue  # not a node asked this round, or a second reply: never averaged
            replied.add(nid)
            if rep.has_error():
                out.failures.append({"client": f"node-{nid}", "reason": f"raised: {rep.error.reason}"})
                continue
            try:
                out.replies.append(
                    (index[nid], Incoming(f"node-{nid}", record_bytes(rep, "update"), signature=_signature(rep)))
                )
            except LorafedError as exc:
                out.failures.append({"client": f"node-{nid}", "reason": str(exc)})
        for nid in index:
            if nid not in replied:
                out.failures.append(
                    {"client": f"node-{nid}", "reason": f"timed out: no reply within {self.timeout:g} s"}
                )
        return out


def _signature(rep: Message) -> bytes | None:
    """The ``signature`` a reply's ``client`` record carries, or ``None``."""
    rec = rep.content.config_records.get("client")
    sig = rec.get("signature") if rec is not None else None
    return bytes(sig) if isinstance(sig, bytes) else None


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation described by the run config."""
    ensure_handler()  # lorafed's log lines reach 'flwr log'
    rc = dict(context.run_config)
    config = resolve_run_config(rc)
    out = Path(str(rc["out-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    fed = prepare_cohort(config)
    nodes = wait_for_nodes(grid, int(rc["num-nodes"]), float(rc["node-timeout"]))
    logger.info("%d node(s) connected: %s", len(nodes), nodes)
    fcfg = config.federation
    signing = server_signing(fcfg.signing)
    record = RunRecord(out)
    record.fresh()
    evaluate = functools.partial(evaluate_state, fed) if bool(rc["server-eval"]) else None
    loop = Federated(
        fcfg,
        RoundPolicy(fcfg, len(nodes), config.seed, signing.registry.clients if signing else None),
        record,
        fed.identity,
        fed.spec,
        [f"node-{n}" for n in nodes],
        evaluate,
        signing,
    )
    timeout = fcfg.client_timeout_s if fcfg.client_timeout_s is not None else float(rc["round-timeout"])
    yaml_text = yaml.safe_dump(config_to_dict(config), sort_keys=False)
    transport = FlowerGrid(grid, nodes, yaml_text, timeout, float(rc["pull-interval"]), signing)
    t0 = time.perf_counter()
    start(loop, fed.initial_state)
    run_rounds(loop, transport, fed.initial_state, 1, fcfg.rounds)
    record.finish(
        {
            "run": config.name,
            "engine": "flower",
            "nodes": nodes,
            "final": record.rows[-1],
            "wall_seconds": time.perf_counter() - t0,
        }
    )
