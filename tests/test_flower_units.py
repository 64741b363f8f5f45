"""Flower glue that needs no running deployment: node config, app directory, run-config TOML."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tomllib
from types import SimpleNamespace

import psutil
import pytest
from conftest import ROOT

from lorafed.config import parse_config
from lorafed.engine.flower.app_dir import DEFAULT_RUN_CONFIG, GLUE_MODULE, write_app_dir, write_run_config
from lorafed.engine.flower.client_app import node_identity
from lorafed.errors import ConfigError


def test_node_identity_from_partition_or_own_file() -> None:
    assert node_identity(SimpleNamespace(node_config={"partition-id": 2}, node_id=9)) == (2, "", "")
    own = SimpleNamespace(node_config={"data-path": "/d.csv", "client-id": "shopA", "partition-id": 5}, node_id=9)
    assert node_identity(own) == (0, "/d.csv", "shopA")
    anon = SimpleNamespace(node_config={"data-path": "/d.csv"}, node_id=9)
    assert node_identity(anon) == (0, "/d.csv", "node9")
    with pytest.raises(ConfigError, match="set partition-id=K"):
        node_identity(SimpleNamespace(node_config={}, node_id=1))


def test_app_dir_and_run_config_round_trip_the_yaml(tmp_path) -> None:
    app = write_app_dir(tmp_path / "app")
    py = tomllib.loads((app / "pyproject.toml").read_text())
    assert py["project"]["dependencies"] == []
    assert py["tool"]["flwr"]["app"]["components"]["serverapp"] == f"{GLUE_MODULE}:serverapp"
    assert set(py["tool"]["flwr"]["app"]["config"]) == set(DEFAULT_RUN_CONFIG)
    text = 'name: "quote\\" and ü"\ndata:\n  path: /x.csv\n'
    rc = tomllib.loads(write_run_config(tmp_path / "rc.toml", {"config-yaml": text, "num-nodes": 3}).read_text())
    assert rc["config-yaml"] == text and rc["num-nodes"] == 3
    assert parse_config(rc["config-yaml"]).name == 'quote" and ü'
    with pytest.raises(KeyError, match="unknown run-config keys"):
        write_run_config(tmp_path / "bad.toml", {"rounds": 3})


def test_flower_run_refuses_bad_node_counts_before_starting_anything(capsys) -> None:

    from lorafed.cli import main

    assert main(["flower", "run", "--config", str(ROOT / "configs" / "clothing_recommend.yaml")]) == 2
    assert "--nodes: required with partition.scheme natural" in capsys.readouterr().err
    assert main(["flower", "run", "--config", str(ROOT / "configs" / "tiny.yaml"), "--nodes", "0"]) == 2
    assert "--nodes: must be >= 1, got 0" in capsys.readouterr().err


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_deployment_process_dies_with_a_killed_parent(tmp_path) -> None:
    """``kill -9`` of the process that started a deployment: its processes get SIGTERM (Linux), none keeps running.

    A timed-out test once left a SuperLink, three SuperNodes and their executors polling for half an hour.
    """
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux only")
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from lorafed.engine.flower.deploy import LocalDeployment\n"
        f"dep = LocalDeployment(Path({str(tmp_path)!r}), [])\n"
        "(dep.workdir / 'logs').mkdir(parents=True, exist_ok=True)\n"
        "proc, _ = dep._start('child', [sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        "print(proc.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env, text=True)
    child = int(parent.stdout.readline())
    try:
        assert _running(child)
        parent.kill()
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _running(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(child), "the deployment's process outlived the killed parent"
    finally:
        if _running(child):
            psutil.Process(child).kill()
