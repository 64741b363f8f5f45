"""Config loading: overrides, type checks, and every problem reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafed.config import load_config
from lorafed.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["clothing_recommend", "retail_intents", "tiny"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.name == name
    assert cfg.model.lora.target_modules == ("query", "value")


def test_overrides_are_parsed_as_yaml() -> None:
    cfg = load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            "federation.rounds=7",
            "train.learning_rate=1e-4",
            "model.lora.target_modules=[query,key,value]",
            "data.max_rows=null",
            "data.labels=[a, b]",
        ],
    )
    assert cfg.federation.rounds == 7
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    assert cfg.model.lora.target_modules == ("query", "key", "value")
    assert cfg.data.max_rows is None
    assert cfg.data.labels == ("a", "b")


def test_defaults_are_the_documented_ones() -> None:
    cfg = load_config(None, ["data.path=x.csv"])
    assert (cfg.model.lora.r, cfg.model.lora.alpha, cfg.model.precision) == (8, 16, "int8")


def test_all_problems_are_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            ROOT / "configs" / "tiny.yaml",
            ["federation.rouns=3", "model.precision=int4", "train.batch_size=0", "train.learning_rate=fast"],
        )
    msg = str(info.value)
    assert len(info.value.problems) == 4
    assert "did you mean 'federation.rounds'" in msg
    assert "model.precision: 'int4' is not one of" in msg
    assert "train.learning_rate: expected a number, got 'fast'" in msg
    assert "train.batch_size: must be >= 1, got 0" in msg


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(ROOT / "configs" / "tiny.yaml", ["rounds"])
