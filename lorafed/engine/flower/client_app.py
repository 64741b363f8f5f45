"""The ClientApp: load the global payload, run the one client step, reply with the update.

A node is client ``partition-id`` of the config's partition (node config ``partition-id=K``),
or, with ``data-path=FILE``, a company's own file (``client-id=NAME`` names it; the labels come
from the global adapter's header). The global payload is validated against the node's own base
model before training, so a node never trains from an adapter made for another backbone.

Signing (see :mod:`lorafed.wire.sign`) is the node's own choice, never the server's: node config
``signing-registry=FILE`` and ``signing-key=FILE`` (this client's private key) replace whatever
``federation.signing`` the server's config names. With them the node refuses a global adapter the
server did not sign (its signature comes as ``global-signature`` in the ``config`` record) and
replies with its update's signature (``signature`` in the ``client`` record).
"""

from __future__ import annotations

import functools

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from lorafed.client.local import LocalClient
from lorafed.config import RunConfig, parse_config
from lorafed.engine.flower.records import payload_record, record_bytes
from lorafed.errors import ConfigError
from lorafed.logs import ensure_handler
from lorafed.wire.payload import payload_to_bytes
from lorafed.wire.reader import payload_from_bytes

app = ClientApp()


@functools.lru_cache(maxsize=2)
def _local_client(
    config_yaml: str,
    partition_id: int,
    data_path: str,
    client_id: str,
    labels: tuple[str, ...],
    signing: tuple[str, str] = ("", ""),
) -> LocalClient:
    """The node's client (cached: a long-lived executor loads its data and model once)."""
    config = node_config(config_yaml, *signing)
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


def node_config(config_yaml: str, registry: str = "", key: str = "") -> RunConfig:
    """The server's config with this node's own ``federation.signing`` (registry and client key).

    Raises:
        ConfigError: The federation signs (the server's config names a registry) but this node
            has no ``signing-registry`` and ``signing-key``.
    """
    import json

    config = parse_config(config_yaml, "config from the server")
    fed_signs = bool(config.federation.signing.registry or config.federation.signing.generate)
    if fed_signs and not (registry and key):
        raise ConfigError(
            [
                "node config: the federation signs its updates; set signing-registry=FILE (the key registry) and "
                "signing-key=FILE (this client's private key)"
            ]
        )
    return parse_config(
        config_yaml,
        "config from the server",
        [
            f"federation.signing.registry={json.dumps(registry) if registry else 'null'}",
            f"federation.signing.client_key={json.dumps(key) if key else 'null'}",
            "federation.signing.server_key=null",
            "federation.signing.generate=false",
        ],
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training from the global payload in ``msg``."""
    ensure_handler()  # lorafed's log lines reach 'flwr log'
    conf = msg.content.config_records["config"]
    round_ = int(conf["round"])
    source = f"global adapter of round {round_ - 1}"
    gdata = record_bytes(msg, "global")
    glob = payload_from_bytes(gdata, source=source)
    k, data_path, cid = node_identity(context)
    nc = context.node_config
    signing = (str(nc.get("signing-registry", "")), str(nc.get("signing-key", "")))
    local = _local_client(str(conf["config-yaml"]), k, data_path, cid, tuple(glob.meta.labels), signing)
    gsig = conf.get("global-signature")
    state = local.check_global(glob, source, gdata, bytes(gsig) if isinstance(gsig, bytes) else None)
    update = local.step(state, round_, progress=False)
    data = payload_to_bytes(update.tensors, update.meta)
    sig = local.sign(data)
    client = {"client-id": local.client_id, **({"signature": sig} if sig is not None else {})}
    content = RecordDict(
        {
            "update": payload_record(data),
            "metrics": MetricRecord(
                {"num-examples": update.result.num_examples, "train-loss": update.result.mean_loss}
            ),
            "client": ConfigRecord(client),
        }
    )
    return Message(content=content, reply_to=msg)
