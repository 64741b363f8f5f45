"""The command line: bad input gives one clear message and exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import tiny_overrides

from lorafed.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def _base(csv: Path, model_dir: Path, tmp_path: Path) -> list[str]:
    return [*tiny_overrides(csv, model_dir), f"output_dir={tmp_path / 'results'}"]


def _run(capsys, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err


def test_missing_column(capsys, synthetic_csv: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    code, err = _run(
        capsys,
        ["simulate", "--config", TINY, *_base(synthetic_csv, tiny_model_dir, tmp_path), "data.label_column=stars"],
    )
    assert code == 2
    assert "reviews.csv, column 'stars': column not found; the file has: review, title, label, shop" in err


def test_unknown_file_type(capsys, tiny_model_dir: Path, tmp_path: Path) -> None:
    odd = tmp_path / "reviews.xls"
    odd.write_bytes(b"\xd0\xcf\x11\xe0")
    code, err = _run(capsys, ["simulate", "--config", TINY, *_base(odd, tiny_model_dir, tmp_path)])
    assert code == 2 and "unknown file type '.xls'" in err


def test_empty_after_filtering(capsys, tiny_model_dir: Path, tmp_path: Path) -> None:
    csv = tmp_path / "blank.csv"
    pd.DataFrame({"review": ["", None, " "], "label": ["a", "b", "a"]}).to_csv(csv, index=False)
    code, err = _run(capsys, ["simulate", "--config", TINY, *_base(csv, tiny_model_dir, tmp_path)])
    assert code == 2 and "no rows left after filtering (3 read" in err


def test_one_class_label_column(capsys, tiny_model_dir: Path, tmp_path: Path) -> None:
    csv = tmp_path / "one.csv"
    pd.DataFrame({"review": [f"text {i}" for i in range(30)], "label": ["yes"] * 30}).to_csv(csv, index=False)
    code, err = _run(capsys, ["simulate", "--config", TINY, *_base(csv, tiny_model_dir, tmp_path)])
    assert code == 2 and "column 'label': only one class ('yes') in 30 rows; a classifier needs at least 2" in err


def test_bad_config_lists_every_problem(capsys, synthetic_csv: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    code, err = _run(
        capsys,
        [
            "simulate",
            "--config",
            TINY,
            *_base(synthetic_csv, tiny_model_dir, tmp_path),
            "federation.rounds=-1",
            "train.lr=1",
        ],
    )
    assert (
        code == 2
        and "2 problem(s)" in err
        and "federation.rounds: must be >= 0" in err
        and "unknown key train.lr" in err
    )


def test_payload_from_another_base_model(capsys, synthetic_csv: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    """A payload trained on one base is refused, by name, when checked against another base."""
    import shutil

    from safetensors.torch import load_file, save_file

    base = _base(synthetic_csv, tiny_model_dir, tmp_path)
    assert (
        main(
            [
                "simulate",
                "--config",
                TINY,
                *base,
                "federation.rounds=1",
                "train.max_steps=1",
                "--out",
                str(tmp_path / "run"),
                "--no-progress",
            ]
        )
        == 0
    )
    other = tmp_path / "other-base"
    shutil.copytree(tiny_model_dir, other)
    w = load_file(other / "model.safetensors")
    w = {k: v * 1.01 if v.is_floating_point() else v for k, v in w.items()}
    save_file(w, other / "model.safetensors", metadata={"format": "pt"})
    payload = str(next((tmp_path / "run" / "rounds" / "r1").glob("*.safetensors")))
    capsys.readouterr()
    assert main(["inspect", payload, "--config", TINY, *base]) == 0
    code, err = _run(capsys, ["inspect", payload, "--config", TINY, *base, f"model.name_or_path={other}"])
    assert code == 2
    assert "rejected: base_fingerprint: expected sha256:" in err and "trained on another base model" in err


def test_console_entry_exits_2_and_help_teaches(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    missing = subprocess.run(
        [sys.executable, "-m", "lorafed", "simulate", "--config", str(tmp_path / "none.yaml")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert missing.returncode == 2 and "config file not found" in missing.stderr
    helped = subprocess.run(
        [sys.executable, "-m", "lorafed", "simulate", "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    assert helped.returncode == 0 and "federation.rounds=5" in helped.stdout and "round 0" in helped.stdout


@pytest.mark.parametrize("verb", ["simulate", "partition", "inspect"])
def test_every_verb_has_help(verb: str, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main([verb, "--help"])
    assert info.value.code == 0 and len(capsys.readouterr().out) > 200


def _leaf_parsers(parser) -> dict[str, object]:
    """Every verb's parser, by its full name (``client train``, ``flower run``...)."""
    import argparse

    out: dict[str, object] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                inner = _leaf_parsers(sub)
                out.update({f"{name} {k}": v for k, v in inner.items()} if inner else {name: sub})
    return out


def test_every_verb_teaches_with_an_example() -> None:
    from lorafed.cli import build_parser

    leaves = _leaf_parsers(build_parser())
    assert len(leaves) >= 15 and {"client train", "flower run", "config show", "aggregate"} <= set(leaves)
    for name, parser in leaves.items():
        text = parser.format_help()  # type: ignore[attr-defined]
        assert "example:\n  lorafed " in text or "example:\n  #" in text, name
        assert "--quiet" in text and "--verbose" in text, name


def test_version_and_removed_flags(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and "lorafed 0." in capsys.readouterr().out
    assert main(["coordinate", "--dir", "d", "--config", TINY, "--rounds", "3"]) == 2
    assert "--rounds was removed; pass federation.rounds=N" in capsys.readouterr().err
    assert main(["export", "--adapter", "a", "--out", "o", "--set", "train.max_steps=1"]) == 2
    assert "--set was removed" in capsys.readouterr().err


def test_simulate_logs_rounds_and_table_quiet_hides_them(capsys, synthetic_csv, tiny_model_dir, tmp_path) -> None:
    base = ["--config", TINY, *_base(synthetic_csv, tiny_model_dir, tmp_path), "federation.rounds=1"]
    assert main(["simulate", *base, "train.max_steps=1", "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "round 0 (untrained): accuracy" in err and "round 1: 2 client(s), accuracy" in err
    assert main(["simulate", *base, "--out", str(tmp_path / "a"), "--no-progress"]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main(["--quiet", "simulate", *base, "--out", str(tmp_path / "a"), "--overwrite", "--no-progress"]) == 0
    assert "round 1:" not in capsys.readouterr().err


def test_config_show_prints_the_resolved_config(capsys, synthetic_csv, tiny_model_dir, tmp_path) -> None:
    import yaml

    assert main(["config", "show", "--config", TINY, *_base(synthetic_csv, tiny_model_dir, tmp_path),
                 "federation.rounds=7"]) == 0  # fmt: skip
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["federation"]["rounds"] == 7 and shown["federation"]["server_tau"] == 0.001
    assert shown["model"]["lora"]["target_modules"] == ["query", "value"]
    assert main(["config", "show", "--config", TINY, "federation.min_clients=5"]) == 2
    assert "federation.min_clients=5 is more than partition.num_clients=2" in capsys.readouterr().err
