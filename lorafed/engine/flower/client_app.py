"""The ClientApp: load the global payload, run the one client step, reply with the update.

A node is client ``partition-id`` of the config's partition (node config ``partition-id=K``),
or, with ``data-path=FILE``, a company's own file (``client-id=NAME`` names it; the labels come
from the global adapter's header). The global payload is validated against the node's own base
model before training, so a node never trains from an adapter made for another backbone.
"""

from __future__ import annotations

import functools

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from lorafed.client.local import LocalClient
from lorafed.config import parse_config
from lorafed.engine.flower.records import payload_record, record_bytes
from lorafed.errors import ConfigError
from lorafed.logs import ensure_handler
from lorafed.wire.payload import payload_to_bytes
from lorafed.wire.reader import payload_from_bytes

app = ClientApp()


@functools.lru_cache(maxsize=2)
def _local_client(
    config_yaml: str, partition_id: int, data_path: str, client_id: str, labels: tuple[str, ...]
) -> LocalClient:
    """The node's client (cached: a long-lived executor loads its data and model once)."""
    config = parse_config(config_yaml, "config from the server")
    if data_path:
        return LocalClient.from_file(config, client_id, data_path, labels)
    return LocalClient.from_partition(config, partition_id)


def node_identity(context: Context) -> tuple[int, str, str]:
    """(partition index, data path, client id) of this node.

    Raises:
        ConfigError: Neither ``partition-id`` nor ``data-path`` in the node config.
    """
    nc = context.node_config
    if nc.get("data-path"):
        return 0, str(nc["data-path"]), str(nc.get("client-id", f"node{context.node_id}"))
    if "partition-id" not in nc:
        raise ConfigError(["node config: set partition-id=K (client K of the config's partition) or data-path=FILE"])
    return int(nc["partition-id"]), "", ""


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training from the global payload in ``msg``."""
    ensure_handler()  # lorafed's log lines reach 'flwr log'
    conf = msg.content.config_records["config"]
    round_ = int(conf["round"])
    source = f"global adapter of round {round_ - 1}"
    glob = payload_from_bytes(record_bytes(msg, "global"), source=source)
    k, data_path, cid = node_identity(context)
    local = _local_client(str(conf["config-yaml"]), k, data_path, cid, tuple(glob.meta.labels))
    update = local.step(local.check_global(glob, source), round_, progress=False)
    content = RecordDict(
        {
            "update": payload_record(payload_to_bytes(update.tensors, update.meta)),
            "metrics": MetricRecord(
                {"num-examples": update.result.num_examples, "train-loss": update.result.mean_loss}
            ),
            "client": ConfigRecord({"client-id": local.client_id}),
        }
    )
    return Message(content=content, reply_to=msg)
