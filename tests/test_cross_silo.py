"""A cross-silo round run as separate client processes equals the in-process simulation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lorafed.cli import main
from lorafed.client.round import run_client_round, write_client_files
from lorafed.config import save_config
from lorafed.engine.inprocess import simulate
from lorafed.wire.payload import load_payload, save_payload
from tests.conftest import ROOT

FED = ("data.labels=[bad,good,meh]", "partition.num_clients=3", "federation.rounds=2", "federation.min_clients=3")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _max_diff(a: Path, b: Path) -> float:
    ta, tb = load_payload(a).tensors, load_payload(b).tensors
    assert ta.keys() == tb.keys()
    return max(float((ta[k] - tb[k]).abs().max()) for k in ta)


def test_client_processes_and_aggregate_equal_the_simulation(tiny_config, tmp_path: Path) -> None:
    config = tiny_config(*FED)
    sim_dir = tmp_path / "sim"
    simulate(config, sim_dir, progress=False)
    files = write_client_files(config, tmp_path / "silo")
    cfg_path = tmp_path / "federation.yaml"
    save_config(config, cfg_path)

    # Round 1: three client processes from the seeded fresh adapter (no --global), in parallel.
    upd = tmp_path / "updates_r1"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "lorafed", "client", "train", "--config", str(cfg_path), "--data", str(path),
             "--client-id", cid, "--out", str(upd / f"{cid}.safetensors"), "--no-progress"],
            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for cid, path in files.items()
    ]  # fmt: skip
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert "update written to" in out
    for cid in files:
        assert _max_diff(upd / f"{cid}.safetensors", sim_dir / "rounds" / "r1" / f"{cid}.safetensors") <= 1e-6
        meta = load_payload(upd / f"{cid}.safetensors").meta
        assert meta.round == 1 and meta.client_id == cid
        assert meta.num_examples == load_payload(sim_dir / "rounds" / "r1" / f"{cid}.safetensors").meta.num_examples
    g1 = tmp_path / "global_r1.safetensors"
    paths = sorted(map(str, upd.glob("*.safetensors")))
    args = ["--config", str(cfg_path), "--expect-round", "1", "--min-clients", "3", "--out", str(g1)]
    assert main(["aggregate", *paths, *args]) == 0
    assert _max_diff(g1, sim_dir / "rounds" / "global_r1.safetensors") <= 1e-6
    assert load_payload(g1).meta.kind == "global" and load_payload(g1).meta.round == 1

    # Round 2 from --global, through the library and the in-process CLI (same code as the processes).
    upd2 = tmp_path / "updates_r2"
    for cid, path in files.items():
        client_cfg = tiny_config(*FED, f"data.path={path}")
        u = run_client_round(client_cfg, cid, g1, progress=False)
        assert u.meta.round == 2
        save_payload(upd2 / f"{cid}.safetensors", u.tensors, u.meta)
    g2 = tmp_path / "global_r2.safetensors"
    paths = sorted(map(str, upd2.glob("*.safetensors")))
    assert main(["aggregate", *paths, "--global", str(g1), "--min-clients", "3", "--out", str(g2)]) == 0
    assert _max_diff(g2, sim_dir / "rounds" / "global_r2.safetensors") <= 1e-6
