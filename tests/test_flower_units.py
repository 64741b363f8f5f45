"""Flower glue that needs no running deployment: node config, app directory, run-config TOML."""

from __future__ import annotations

import tomllib
from types import SimpleNamespace

import pytest

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
    from conftest import ROOT

    from lorafed.cli import main

    assert main(["flower", "run", "--config", str(ROOT / "configs" / "clothing_recommend.yaml")]) == 2
    assert "--nodes: required with partition.scheme natural" in capsys.readouterr().err
    assert main(["flower", "run", "--config", str(ROOT / "configs" / "tiny.yaml"), "--nodes", "0"]) == 2
    assert "--nodes: must be >= 1, got 0" in capsys.readouterr().err
