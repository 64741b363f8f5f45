"""File-drop coordinator: 3 client processes and a coordinator process give the simulator's adapter."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DP_MEAN_HEAD, ROOT, tiny_overrides, whitened

from lorafed.engine.cohort import prepare_cohort, train_client
from lorafed.engine.filedrop import coordinate, global_name
from lorafed.engine.inprocess import simulate
from lorafed.engine.storage import FsspecStorage, LocalStorage, open_storage
from lorafed.errors import AggregationError, LorafedError
from lorafed.wire.payload import payload_to_bytes
from lorafed.wire.reader import load_payload, payload_from_bytes


def _over(csv: Path, model_dir: Path, tmp_path: Path) -> list[str]:
    """The fixtures' tiny overrides (fp32, 1 thread, autocast none) and this federation's shape.

    Built on ``tiny_overrides`` so the subprocesses get exactly the in-process simulation's
    settings: a copy of them here lacked ``train.autocast=none`` once the default became
    ``auto``, and the pollers trained in bf16 on an AVX512-BF16 CPU (0.03 from the simulation).
    """
    return [
        *tiny_overrides(csv, model_dir),
        "partition.num_clients=3", "federation.rounds=2", "train.max_steps=3", f"output_dir={tmp_path / 'res'}",
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("recipe", [[], DP_MEAN_HEAD], ids=["lora", "record-dp-mean-head"])
def test_three_client_processes_and_the_coordinator_match_the_simulation(
    recipe, tiny_config, synthetic_csv, tiny_model_dir, tmp_path
) -> None:
    """Also with record-level DP of the head on whitened mean pooling: seeded noise, both in every header."""
    recipe = whitened(recipe, tiny_model_dir, tmp_path / "whitening.safetensors")
    over = [*_over(synthetic_csv, tiny_model_dir, tmp_path), *recipe]
    drop, record = tmp_path / "drop", tmp_path / "record"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    base = [sys.executable, "-m", "lorafed"]
    cfg = ["--config", str(ROOT / "configs" / "tiny.yaml")]
    coord = subprocess.Popen(
        [*base, "coordinate", "--dir", str(drop), *cfg, "federation.min_clients=3",
         "federation.client_timeout_s=120", "--poll-s", "0.2", "--out", str(record), *over],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    poll = [*base, "poll", "--dir", str(drop), *cfg, "--poll-s", "0.2", "--timeout-s", "120", *over]
    clients = [
        subprocess.Popen([*poll, "--client", str(k)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for k in range(3)
    ]
    try:
        outs = [p.communicate(timeout=200)[0].decode() for p in [coord, *clients]]
    finally:
        for p in [coord, *clients]:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    assert [p.returncode for p in [coord, *clients]] == [0, 0, 0, 0], "\n".join(o[-1500:] for o in outs)
    rows = [json.loads(x) for x in (record / "metrics.jsonl").read_text().splitlines()]
    assert [len(r["clients"]) for r in rows] == [0, 3, 3] and not any(r["failed"] for r in rows)
    assert (drop / "done.json").is_file()
    sim = tmp_path / "sim"
    simulate(tiny_config(*over), sim, progress=False)
    for r in (1, 2):
        ups = [load_payload(p) for p in sorted((record / "rounds" / f"r{r}").glob("*.safetensors"))]
        assert len(ups) == 3
        glob = load_payload(drop / global_name(r)).tensors
        for k in ups[0].decoded():  # oracle: numpy's weighted average of what was sent (the head only, under head)
            w = [u.meta.num_examples for u in ups]
            want = np.average(np.stack([u.decoded()[k].numpy() for u in ups]), axis=0, weights=w)
            np.testing.assert_allclose(glob[k].numpy(), want, rtol=1e-6, atol=1e-7)
        b = load_payload(sim / "rounds" / f"global_r{r}.safetensors").tensors
        for k in b:
            torch.testing.assert_close(glob[k], b[k], rtol=0, atol=1e-6)
        if recipe:  # only the head travels; every header says mean pooling and the epsilon spent
            assert all("lora_" not in k for u in ups for k in u.tensors)
            assert all(u.meta.lora["pooling"] == "mean" and float(u.meta.metrics["epsilon"]) > 0 for u in ups)
            assert all(u.meta.lora["whitening"].startswith("sha256:") for u in ups)


def test_deadline_aggregates_the_valid_updates_that_arrived(tiny_config, tmp_path) -> None:
    cfg = tiny_config("partition.num_clients=3", "federation.rounds=1", "train.max_steps=2")
    drop = LocalStorage(tmp_path / "drop")
    fed = prepare_cohort(cfg)

    def two_clients_and_junk() -> None:  # two valid updates, one from another round, one corrupt
        while not drop.exists(global_name(0)):
            threading.Event().wait(0.05)
        glob = payload_from_bytes(drop.read(global_name(0))).tensors
        for k in (0, 1):
            t, res = train_client(fed, glob, k, 1, progress=False)
            meta = fed.identity.meta(f"c{k}", 1, res.num_examples)
            drop.write(f"round_1/c{k}.safetensors", payload_to_bytes(t, meta))
        drop.write("round_1/old.safetensors", payload_to_bytes(glob, fed.identity.meta("old", 7, 5)))
        drop.write("round_1/bad.safetensors", b"\x80\x04junk")

    th = threading.Thread(target=two_clients_and_junk)
    th.start()
    # 3 clients are expected, 2 valid updates suffice (min_clients=2); the deadline closes the round.
    cfg = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, min_clients=2, client_timeout_s=3.0))
    coordinate(cfg, drop, tmp_path / "rec", num_clients=3, poll_s=0.05)
    th.join(timeout=30)
    rows = [json.loads(x) for x in (tmp_path / "rec" / "metrics.jsonl").read_text().splitlines()]
    row = rows[1]
    assert sorted(row["clients"]) == ["c0", "c1"] and len(row["rejected"]) == 2
    assert [f["reason"] for f in row["failed"]] == ["deadline: 2 of 3 expected client update(s) after 3 s"]
    ups = [load_payload(tmp_path / "rec" / "rounds" / "r1" / f"c{k}.safetensors") for k in (0, 1)]
    got = payload_from_bytes(drop.read(global_name(1))).tensors
    weights = [u.meta.num_examples for u in ups]
    for name, value in got.items():  # oracle: numpy's weighted average of the two client tensors
        oracle = np.average(np.stack([u.tensors[name].numpy() for u in ups]), axis=0, weights=weights)
        np.testing.assert_allclose(value.numpy(), oracle, rtol=1e-6, atol=1e-7)


def test_no_valid_update_by_the_deadline_and_a_used_drop_are_errors(tiny_config, tmp_path) -> None:
    cfg = tiny_config("federation.rounds=1")
    drop = LocalStorage(tmp_path / "drop")
    cfg = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, min_clients=1, client_timeout_s=0.3))
    abandoned = r"round 1 abandoned after 1 attempt\(s\): 0 valid update\(s\).*deadline"
    with pytest.raises(AggregationError, match=abandoned):
        coordinate(cfg, drop, tmp_path / "rec", poll_s=0.05)
    with pytest.raises(LorafedError, match="already holds a federation"):
        coordinate(cfg, drop, tmp_path / "rec2")


def test_fsspec_storage_round_trip_and_atomic_names() -> None:
    store = open_storage("memory://lorafed-test-drop")
    assert isinstance(store, FsspecStorage)
    assert store.list("round_1") == [] and not store.exists("round_1/a.safetensors")
    store.write("round_1/b.safetensors", b"bb")
    store.write("round_1/a.safetensors", b"aa")
    assert store.list("round_1") == ["round_1/a.safetensors", "round_1/b.safetensors"]
    assert store.read("round_1/b.safetensors") == b"bb" and store.exists("round_1/a.safetensors")
    store.fs.rm(store.root, recursive=True)
    assert isinstance(open_storage("file:///tmp/x"), LocalStorage)


def test_a_second_poller_with_a_claimed_id_is_refused(tiny_config, tmp_path) -> None:
    from lorafed.engine.filedrop import poll_and_train

    cfg = tiny_config("partition.num_clients=2", "federation.rounds=1", "train.max_steps=1")
    fed = prepare_cohort(cfg)
    drop = LocalStorage(tmp_path / "drop")
    drop.write(global_name(0), payload_to_bytes(fed.initial_state, fed.identity.meta("server", 0, 1, kind="global")))
    drop.write("round_1/client0.safetensors", b"someone else's update")
    with pytest.raises(LorafedError, match=r"client id 'client0' already has an update in round 1"):
        poll_and_train(cfg, drop, client=0, poll_s=0.05, timeout_s=5)
    assert drop.read("round_1/client0.safetensors") == b"someone else's update"  # nothing overwritten
