"""Client dropout in the simulator: failures and timeouts are recorded and never averaged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lorafed.engine.faults import delay_clients, fail_clients
from lorafed.engine.inprocess import simulate
from lorafed.engine.record import read_metrics
from lorafed.errors import AggregationError
from lorafed.wire.reader import load_payload

THREE = ("partition.num_clients=3", "federation.rounds=1")


def _run(tiny_config, tmp_path: Path, *overrides: str, fn=None) -> tuple[Path, list[dict]]:
    out = tmp_path / "run"
    simulate(tiny_config(*THREE, *overrides), out, progress=False, client_fn=fn)
    return out, read_metrics(out / "metrics.jsonl")


def test_failed_client_is_recorded_and_not_averaged(tiny_config, tmp_path: Path) -> None:
    out, rows = _run(tiny_config, tmp_path, "federation.min_clients=2", fn=fail_clients(["client1"]))
    row = rows[1]
    assert row["clients"] == ["client0", "client2"]
    assert row["failed"] == [
        {
            "client": "client1",
            "reason": "raised RuntimeError: injected failure of client client1 in round 1",
            "attempt": 1,
        }
    ]
    assert not (out / "rounds" / "r1" / "client1.safetensors").exists()
    ups = [load_payload(out / "rounds" / "r1" / f"client{i}.safetensors") for i in (0, 2)]
    glob = load_payload(out / "rounds" / "global_r1.safetensors").tensors
    for name, value in glob.items():
        oracle = np.average(
            np.stack([u.tensors[name].numpy() for u in ups]), axis=0, weights=[u.meta.num_examples for u in ups]
        )
        np.testing.assert_allclose(value.numpy(), oracle, rtol=1e-6, atol=1e-7)


def test_round_retried_then_completes(tiny_config, tmp_path: Path) -> None:
    fn = fail_clients(["client1"], times=1)
    _, rows = _run(tiny_config, tmp_path, "federation.min_clients=3", "federation.round_retries=1", fn=fn)
    assert rows[1]["attempts"] == 2
    assert [f["attempt"] for f in rows[1]["failed"]] == [1]
    assert rows[1]["clients"] == ["client0", "client1", "client2"]


def test_round_abandoned_after_retries(tiny_config, tmp_path: Path) -> None:
    with pytest.raises(
        AggregationError,
        match=r"round 1 abandoned after 2 attempt\(s\): 2 valid update\(s\), fewer than federation.min_clients=3\. "
        r"Failed clients: client1: raised RuntimeError: injected failure",
    ):
        _run(
            tiny_config,
            tmp_path,
            "federation.min_clients=3",
            "federation.round_retries=1",
            fn=fail_clients(["client1"]),
        )
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0]  # nothing of the abandoned round was recorded as done
    assert not (tmp_path / "run" / "rounds" / "global_r1.safetensors").exists()


def test_client_over_the_time_limit_is_dropped(tiny_config, tmp_path: Path) -> None:
    fn = delay_clients(["client2"], 1.5)
    out, rows = _run(tiny_config, tmp_path, "federation.min_clients=2", "federation.client_timeout_s=0.75", fn=fn)
    (failed,) = rows[1]["failed"]
    assert failed["client"] == "client2"
    assert failed["reason"].startswith("timed out: took 1.") and "over client_timeout_s=0.75" in failed["reason"]
    assert rows[1]["clients"] == ["client0", "client1"]
    assert not (out / "rounds" / "r1" / "client2.safetensors").exists()
