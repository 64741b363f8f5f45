"""A cross-silo federation of separate client processes, each on its own file, and `lorafed aggregate`.

A company's client trains on all of its file but a validation slice (no test rows are held
back), so its rows differ from a simulated partition client's; what must hold is that the same
client on the same file gives the same update in every process, that `client train` reports
the validation slice, and that `aggregate` is numpy's sample-weighted average of the updates.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from lorafed.cli import main
from lorafed.client.local import run_client_round, write_client_files
from lorafed.config import save_config
from lorafed.wire.payload import save_payload
from lorafed.wire.reader import load_payload
from tests.conftest import ROOT

FED = ("data.labels=[bad,good,meh]", "partition.num_clients=3", "federation.rounds=2", "federation.min_clients=3")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _weighted_oracle(paths: list[Path]) -> dict[str, np.ndarray]:
    ups = [load_payload(p) for p in paths]
    weights = [u.meta.num_examples for u in ups]
    return {
        k: np.average(np.stack([u.decoded()[k].numpy() for u in ups]), axis=0, weights=weights) for k in ups[0].tensors
    }


def test_client_processes_and_aggregate(tiny_config, tmp_path: Path) -> None:
    config = tiny_config(*FED)
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
    for cid, path in files.items():
        meta = load_payload(upd / f"{cid}.safetensors").meta
        n = len(pd.read_csv(path))
        assert meta.round == 1 and meta.client_id == cid
        # every row trains but the validation slice (val_fraction 0.1, at least 1 row): no test rows kept back
        assert meta.num_examples == n - max(round(n * config.data.val_fraction), 1)
        assert "val_accuracy" in meta.metrics
        # the same client on the same file gives the same update in this process
        again = run_client_round(tiny_config(*FED, f"data.path={path}"), cid, None, progress=False)
        for k, v in load_payload(upd / f"{cid}.safetensors").decoded().items():
            np.testing.assert_allclose(v.numpy(), again.tensors[k].numpy(), rtol=0, atol=1e-6)
    g1 = tmp_path / "global_r1.safetensors"
    paths = sorted(upd.glob("*.safetensors"))
    args = ["--config", str(cfg_path), "--expect-round", "1", "--out", str(g1)]
    assert main(["aggregate", *map(str, paths), *args]) == 0
    for k, want in _weighted_oracle(paths).items():
        np.testing.assert_allclose(load_payload(g1).tensors[k].numpy(), want, rtol=1e-6, atol=1e-7)
    assert load_payload(g1).meta.kind == "global" and load_payload(g1).meta.round == 1

    # Round 2 from --global, through the library.
    upd2 = tmp_path / "updates_r2"
    for cid, path in files.items():
        u = run_client_round(tiny_config(*FED, f"data.path={path}"), cid, g1, progress=False)
        assert u.meta.round == 2
        save_payload(upd2 / f"{cid}.safetensors", u.tensors, u.meta)
    g2 = tmp_path / "global_r2.safetensors"
    paths = sorted(upd2.glob("*.safetensors"))
    assert main(["aggregate", *map(str, paths), "--global", str(g1), "--out", str(g2)]) == 0
    for k, want in _weighted_oracle(paths).items():
        np.testing.assert_allclose(load_payload(g2).tensors[k].numpy(), want, rtol=1e-6, atol=1e-7)
