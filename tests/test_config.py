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


def test_contradictory_settings_are_refused_together() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            None,
            [
                "data.path=x.csv",
                "partition.num_clients=3",
                "federation.min_clients=4",
                "train.max_steps=3",
                "train.warmup_ratio=0.2",
                "data.val_fraction=0.5",
                "data.test_fraction=0.5",
            ],
        )
    text = str(info.value)
    assert "federation.min_clients=4 is more than partition.num_clients=3" in text
    assert "train.warmup_ratio=0.2 of train.max_steps=3 is 0 warm-up steps" in text
    assert "data.val_fraction + data.test_fraction must be < 1" in text
    with pytest.raises(ConfigError, match=r"federation\.robust: must be none with federation\.dp\.enabled"):
        load_config(None, ["data.path=x.csv", "federation.dp.enabled=true", "federation.dp.noise_multiplier=1",
                           "federation.weighting=uniform", "federation.robust=median"])  # fmt: skip
    # Legitimate combinations stay allowed: natural partitions, a small fraction, warm-up with enough steps.
    load_config(
        None, ["data.path=x.csv", "partition.scheme=natural", "partition.column=shop", "federation.min_clients=9"]
    )
    load_config(
        None, ["data.path=x.csv", "partition.num_clients=10", "federation.fraction=0.1", "federation.min_clients=3"]
    )
    load_config(None, ["data.path=x.csv", "train.max_steps=10", "train.warmup_ratio=0.1"])


def test_readme_config_reference_is_generated() -> None:
    from lorafed.config_doc import config_reference, current_section

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert current_section(readme) == config_reference(), "run: python scripts/config_reference.py --write"
    for key in ("`federation.dp.noise_seed`", "`model.lora.r`", "`train.autocast`", "`seed`"):
        assert key in config_reference()
