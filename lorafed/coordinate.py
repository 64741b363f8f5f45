"""File-drop federation: no server process, only a shared folder (or object store) and a coordinator.

Layout of the drop (names relative to its root)::

    global_r0.safetensors          the initial adapter, published by the coordinator
    round_N/<client>.safetensors   updates of round N, trained from global_r{N-1} (written atomically)
    global_rN.safetensors          the adapter after N rounds, published atomically
    done.json                      written after the last round; clients stop

:func:`coordinate` waits for round N's updates, validates each as it arrives, aggregates with the
shared :class:`~lorafed.rounds.RoundPolicy` once ``min_clients`` valid updates are in or the
deadline has passed (with at least one), and publishes the next global adapter. Updates that arrive
after a round was aggregated are ignored. :func:`poll_and_train` is the client side.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorafed.adapter import adapter_spec, get_adapter_state
from lorafed.config import RunConfig, save_config
from lorafed.errors import AggregationError, LorafedError, PayloadError, PayloadValidationError
from lorafed.io import append_jsonl, atomic_write_bytes, atomic_write_json
from lorafed.lora_modes import round_keys, select
from lorafed.model import load_client_model, lora_config_dict
from lorafed.payload import PayloadMeta, payload_from_bytes, payload_to_bytes
from lorafed.rounds import RoundPolicy
from lorafed.storage import Storage
from lorafed.validate import UpdateSpec, validate_update

Log = Callable[[str], None]
DONE = "done.json"


def global_name(round_: int) -> str:
    """Name of the adapter after ``round_`` rounds."""
    return f"global_r{round_}.safetensors"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name.rsplit("/", 1)[-1])[:128]


def coordinate(
    config: RunConfig,
    storage: Storage,
    out_dir: str | Path,
    min_clients: int,
    deadline_s: float,
    rounds: int | None = None,
    num_clients: int | None = None,
    poll_s: float = 0.5,
    log: Log = print,
) -> dict[str, Any]:
    """Run ``rounds`` rounds over ``storage``; keep a local copy of everything in ``out_dir``.

    Args:
        config: The federation's config (model, LoRA, labels, federation.dp...).
        storage: The drop.
        out_dir: Local record: config.yaml, metrics.jsonl, rounds/ (updates and global adapters).
        min_clients: Aggregate as soon as this many valid updates arrived.
        deadline_s: Or this many seconds after a round opened, if at least one is valid.
        rounds: Rounds to run (default ``federation.rounds``).
        num_clients: N, the clients expected to take part (the DP divisor is fraction * N);
            default ``min_clients``.
        poll_s: Seconds between listings of the drop.

    Raises:
        AggregationError: A round's deadline passed without any valid update.
    """
    if storage.exists(global_name(0)) or storage.exists(DONE):
        raise LorafedError(f"the drop already holds a federation ({global_name(0)} or {DONE}); use an empty one")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    rounds = config.federation.rounds if rounds is None else rounds
    labels = config.data.labels
    if labels is None:
        from lorafed.data import load_labeled

        labels = load_labeled(config.data, config.seed).label_names
    client = load_client_model(config.model, labels, config.seed)
    state = get_adapter_state(client.model)
    spec = UpdateSpec(client.fingerprint, lora_config_dict(config.model.lora), tuple(labels), adapter_spec(state))
    fcfg = dataclasses.replace(config.federation, rounds=rounds, min_clients=1)
    policy = RoundPolicy(fcfg, num_clients or min_clients, config.seed)

    def publish(r: int, n: int) -> None:
        meta = PayloadMeta(
            spec.base_fingerprint, dict(spec.lora), spec.labels, max(n, 1), r, "coordinator", kind="global"
        )
        data = payload_to_bytes(state, meta)
        atomic_write_bytes(out / "rounds" / global_name(r), data)
        storage.write(global_name(r), data)

    publish(0, 1)
    log(f"published {global_name(0)}; waiting for round 1 ({min_clients} clients, deadline {deadline_s:g} s)")
    for r in range(1, rounds + 1):
        t0 = time.monotonic()
        sent = select(state, round_keys(fcfg.aggregation, r, state))  # ffa/rolora: a subset
        round_spec = dataclasses.replace(spec, round=r, tensors=adapter_spec(sent))
        local = out / "rounds" / f"r{r}"
        seen: set[str] = set()
        valid: list[Path] = []
        rejected: list[str] = []
        while True:
            for name in storage.list(f"round_{r}"):
                if name in seen:
                    continue
                seen.add(name)
                path = atomic_write_bytes(local / _safe(name), storage.read(name))
                try:
                    validate_update(payload_from_bytes(path.read_bytes(), name), round_spec, name)
                    valid.append(path)
                except (PayloadError, PayloadValidationError) as exc:
                    rejected.append(str(exc))
                    log(f"round {r}: rejected {name}: {exc}")
            late = time.monotonic() - t0 > deadline_s
            if len(valid) >= min_clients or (late and valid):
                break
            if late:
                raise AggregationError(
                    f"round {r}: no valid update within the {deadline_s:g} s deadline; rejected: {rejected or 'none'}"
                )
            time.sleep(poll_s)
        t_wait = time.monotonic() - t0
        result = policy.aggregate(valid, round_spec, state, r)
        state = result.state
        publish(r, result.outcome.num_examples)
        row: dict[str, Any] = {
            "round": r,
            "clients": [m.client_id for _, m in result.outcome.accepted],
            "rejected": rejected + [reason for _, reason in result.outcome.rejected],
            "by_deadline": len(valid) < min_clients,
            "bytes_up": result.outcome.bytes_in,
            "seconds": {"wait": round(t_wait, 3), "aggregate": round(time.monotonic() - t0 - t_wait, 3)},
        }
        if result.privacy:
            row["privacy"] = result.privacy
        append_jsonl(out / "metrics.jsonl", row)
        log(f"round {r}: aggregated {len(row['clients'])} update(s), published {global_name(r)}")
    summary = {"run": config.name, "engine": "file-drop", "rounds": rounds, "final": global_name(rounds)}
    storage.write(DONE, json.dumps(summary).encode())
    atomic_write_json(out / "summary.json", summary)
    return summary


def latest_global(storage: Storage) -> int:
    """The highest N with ``global_rN`` published, or -1."""
    n = -1
    while storage.exists(global_name(n + 1)):
        n += 1
    return n


def poll_and_train(
    config: RunConfig,
    storage: Storage,
    client: int,
    data_path: str | None = None,
    client_id: str | None = None,
    poll_s: float = 0.5,
    timeout_s: float = 3600.0,
    log: Log = print,
) -> int:
    """Client side: for each newly published global adapter, train and drop an update; return rounds done.

    Joins at the latest published round. Stops at ``done.json``, after ``federation.rounds``
    rounds, or when nothing new is published for ``timeout_s`` seconds.

    Raises:
        LorafedError: No global adapter appeared within ``timeout_s``, or a global adapter that
            does not fit this client's model or labels.
    """
    from lorafed.simulate import prepare_federation, single_client_config, train_client

    cfg = single_client_config(config, data_path) if data_path else config
    fed = prepare_federation(cfg, log=lambda _: None)
    k = 0 if data_path else client
    if not 0 <= k < len(fed.partition.client_ids):
        raise LorafedError(f"--client: expected 0..{len(fed.partition.client_ids) - 1}, got {client}")
    cid = client_id or fed.partition.client_ids[k]
    done = 0
    waited_since = time.monotonic()
    r = max(latest_global(storage), 0) + 1
    while r <= config.federation.rounds and not storage.exists(DONE):
        if not storage.exists(global_name(r - 1)):
            if time.monotonic() - waited_since > timeout_s:
                raise LorafedError(f"no {global_name(r - 1)} in the drop within {timeout_s:g} s")
            time.sleep(poll_s)
            continue
        glob = payload_from_bytes(storage.read(global_name(r - 1)), global_name(r - 1))
        validate_update(glob, fed.spec(None), global_name(r - 1))
        tensors, res = train_client(fed, glob.decoded(), k, r, progress=False, client_id=cid)
        meta = fed.meta(cid, r, res.num_examples, loss=res.mean_loss, steps=res.steps)
        storage.write(f"round_{r}/{_safe(cid)}.safetensors", payload_to_bytes(tensors, meta))
        log(f"{cid}: round {r} update dropped (loss {res.mean_loss:.4f})")
        done += 1
        r += 1
        waited_since = time.monotonic()
    return done
