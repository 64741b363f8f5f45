"""The ClientApp: load the global payload, train with lorafed's client code, reply with the update.

A node is client ``partition-id`` of the config's partition (node config
``partition-id=K``), or, with ``data-path=FILE``, a one-client federation over its own file
(``client-id=NAME`` names it; the labels must match the server's, so set ``data.labels``).
The global payload is validated against the node's own base model before training, so a node
never trains from an adapter made for another backbone.
"""

from __future__ import annotations

import functools

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from lorafed.config import parse_config
from lorafed.errors import ConfigError
from lorafed.flower.records import payload_record, record_bytes
from lorafed.payload import payload_from_bytes, payload_to_bytes
from lorafed.simulate import Federation, prepare_federation, single_client_config, train_client
from lorafed.validate import validate_update

app = ClientApp()


@functools.lru_cache(maxsize=2)
def _federation(config_yaml: str, data_path: str) -> Federation:
    """The node's prepared data and model (cached: a long-lived executor pays this once)."""
    config = parse_config(config_yaml, "config from the server")
    if data_path:
        config = single_client_config(config, data_path)
    return prepare_federation(config, log=lambda _: None)


def node_client(context: Context, fed: Federation) -> tuple[int, str]:
    """(partition index, client id) of this node; the id also picks the node's seeds.

    Raises:
        ConfigError: A partition-id outside the config's partition.
    """
    nc = context.node_config
    k = int(nc.get("partition-id", 0))
    if nc.get("data-path"):
        return 0, str(nc.get("client-id", f"node{context.node_id}"))
    if "partition-id" not in nc:
        raise ConfigError(["node config: set partition-id=K (client K of the config's partition) or data-path=FILE"])
    n = len(fed.partition.client_ids)
    if not 0 <= k < n:
        raise ConfigError([f"node config partition-id: expected 0..{n - 1} (the config has {n} clients), got {k}"])
    return k, fed.partition.client_ids[k]


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training from the global payload in ``msg``."""
    conf = msg.content.config_records["config"]
    round_ = int(conf["round"])
    fed = _federation(str(conf["config-yaml"]), str(context.node_config.get("data-path", "")))
    k, cid = node_client(context, fed)
    glob = payload_from_bytes(record_bytes(msg, "global"), source=f"global adapter of round {round_ - 1}")
    validate_update(glob, fed.spec(None), "global adapter from the server")
    tensors, res = train_client(fed, glob.decoded(), k, round_, progress=False, client_id=cid)
    meta = fed.meta(cid, round_, res.num_examples, loss=res.mean_loss, steps=res.steps, seconds=res.seconds)
    content = RecordDict(
        {
            "update": payload_record(payload_to_bytes(tensors, meta)),
            "metrics": MetricRecord({"num-examples": res.num_examples, "train-loss": res.mean_loss}),
            "client": ConfigRecord({"client-id": cid}),
        }
    )
    return Message(content=content, reply_to=msg)
