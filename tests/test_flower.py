"""Flower deployment engine: SuperLink + 3 SuperNodes on 127.0.0.1 give the simulator's adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import DP_MEAN_HEAD, ROOT, tiny_overrides, whitened

from lorafed.engine.inprocess import simulate
from lorafed.wire.reader import load_payload

pytest.importorskip("flwr")


def _overrides(csv: Path, model_dir: Path) -> list[str]:
    return [
        *tiny_overrides(csv, model_dir),
        "partition.num_clients=3",
        "federation.rounds=2",
        "federation.min_clients=3",
        "train.max_steps=3",
    ]


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("isolation", "recipe"),
    [("subprocess", []), ("process", []), ("process", DP_MEAN_HEAD)],
    ids=["subprocess", "process", "process-record-dp-mean-head"],
)
def test_flower_deployment_matches_the_simulation(
    isolation, recipe, tiny_config, synthetic_csv, tiny_model_dir, tmp_path
) -> None:
    """Stock isolation (a flwr-clientapp per message) and the warm one (lorafed.engine.flower.warm_exec).

    Both run secure, as the default ``lorafed flower run`` does: TLS and SuperNode authentication.
    The warm one also with record-level DP of the head on whitened mean pooling (seeded noise).
    """
    recipe = whitened(recipe, tiny_model_dir, tmp_path / "whitening.safetensors")
    over = [*_overrides(synthetic_csv, tiny_model_dir), *recipe]
    out = tmp_path / "flower"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "lorafed", "flower", "run", "--config", str(ROOT / "configs" / "tiny.yaml"),
           "--nodes", "3", "--out", str(out), "--timeout", "150", "federation.client_timeout_s=60",
           "--isolation", isolation, *over]  # fmt: skip
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wall = time.monotonic() - t0
    # Every listener was on 127.0.0.1, and nothing we started survives.
    listening = proc.stdout.split("listening: ")[1].splitlines()[0].split(", ")
    assert listening and all(addr.startswith("127.0.0.1:") for addr in listening), listening
    # Secure by default: the SuperLink spoke HTTPS with node auth, every node was registered first.
    assert "(TLS + SuperNode auth)" in proc.stdout and "WARNING: --insecure" not in proc.stderr
    logs = out / "flower" / "logs"
    link_log = (logs / "superlink.log").read_text()
    assert "Uvicorn running on https://127.0.0.1:" in link_log
    assert "SuperNode authentication is disabled" not in link_log
    assert link_log.count("[ControlServicer.RegisterNode] Created node_id=") == 3
    assert link_log.count("[Fleet.ActivateNode] Activated node_id=") == 3
    assert {p.pid for p in psutil.Process().children(recursive=True)} - before == set()
    sim = tmp_path / "sim"
    simulate(tiny_config(*over), sim, progress=False)
    for r in (1, 2):
        a = load_payload(out / "rounds" / f"global_r{r}.safetensors").tensors
        b = load_payload(sim / "rounds" / f"global_r{r}.safetensors").tensors
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    # The updates averaged in round 2, named by their client ids, as the simulator names them.
    assert sorted(p.name for p in (out / "rounds" / "r2").glob("*.safetensors")) == sorted(
        p.name for p in (sim / "rounds" / "r2").glob("*.safetensors")
    )
    if isolation == "process":  # each node's executor ran both rounds' tasks itself
        for i in range(3):
            log = (out / "flower" / "logs" / f"warm_exec{i}.log").read_text()
            assert log.count(" done in ") == 2, log[-2000:]
    fl_rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    sim_rows = [json.loads(x) for x in (sim / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in fl_rows] == [0, 1, 2]
    for a, b in zip(fl_rows, sim_rows, strict=True):
        assert set(a) == set(b)  # one metrics.jsonl schema in every engine
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=1e-9)
        assert a["test_loss"] == pytest.approx(b["test_loss"], abs=1e-5)
    if recipe:  # each client's spent epsilon, as the simulator's clients spent it
        assert fl_rows[-1]["record_epsilon"] and fl_rows[-1]["record_epsilon"] == sim_rows[-1]["record_epsilon"]
        ups = [load_payload(p) for p in (out / "rounds" / "r2").glob("*.safetensors")]
        assert ups and all(u.meta.lora["whitening"].startswith("sha256:") for u in ups)  # whitened in Flower too
    print(f"flower run wall {wall:.1f} s")
