"""scripts/bench_speed.py on the tiny model: its measuring children, its targets and its report."""

from __future__ import annotations

import importlib
import statistics
import sys
from pathlib import Path

import pytest
import torch

from lorafed.measure import write_results
from lorafed.threads import CENSUS_ENV, cores_available
from tests.conftest import ROOT, tiny_overrides


@pytest.fixture
def bench():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        yield importlib.import_module("bench_speed")
    finally:
        sys.path.remove(str(ROOT / "scripts"))


@pytest.fixture
def spec(tiny_model_dir: Path, synthetic_csv: Path, tmp_path: Path) -> dict:
    overrides = [*tiny_overrides(synthetic_csv, tiny_model_dir), f"output_dir={tmp_path / 'out'}"]
    overrides.append("train.autocast=auto")
    return {
        "config": str(ROOT / "configs" / "tiny.yaml"),
        "overrides": overrides,
        "steps": 1,
        "repeats": 2,
        "final_steps": 2,
        "window": 0.05,
        "barrier_timeout": 60.0,
        "threads": 1,
    }


def test_children_targets_and_report(bench, spec: dict, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(CENSUS_ENV, str(tmp_path / "census"))
    before = torch.get_num_threads()
    solo = bench.child({**spec, "kind": "solo"})
    (tmp_path / "go").touch()  # the barrier is already open: the child starts at once
    win = bench.child({**spec, "kind": "window", "ready": str(tmp_path / "ready"), "go": str(tmp_path / "go")})
    torch.set_num_threads(before)
    assert (tmp_path / "ready").is_file()
    rates = solo["autocast"]["rates"]
    assert set(rates) == {"none", "auto"} and all(len(r) == 2 and min(r) > 0 for r in rates.values())
    for mode in ("none", "auto"):
        final = solo["autocast"]["final"][mode]
        assert 0 <= final["macro_f1"] <= 1 and final["test_rows"] > 0
    alone, other = solo["window"], win["window"]
    assert alone["steps"] >= 1 and alone["threads"] == 1 and "train.num_threads=1" in alone["log"]

    slower = {**other, "samples_per_s": other["samples_per_s"] / 4}
    res: dict = {}
    res["autocast"], t_auto = bench.summarize_autocast(solo)
    res["threads"], t_threads = bench.summarize_threads(solo, [slower, slower], [other, slower])
    res["targets"] = [*t_auto, *t_threads]
    speed, same, share = res["targets"]
    ratio = statistics.median(rates["auto"]) / statistics.median(rates["none"])
    assert speed["value"] == pytest.approx(ratio, abs=1e-3)
    assert speed["met"] == (speed["value"] >= 1.5)
    delta = res["autocast"]["final"]["auto"]["macro_f1"] - res["autocast"]["final"]["none"]["macro_f1"]
    assert same["value"] == pytest.approx(delta, abs=1e-3) and same["met"] == (abs(delta) <= 0.02)
    # each of two: the slower one decides
    assert share["value"] == pytest.approx(slower["samples_per_s"] / alone["samples_per_s"], abs=1e-3)
    assert share["old_behaviour_share"] == pytest.approx(share["value"], abs=1e-3)
    assert all(set(t) >= {"target", "met", "value"} for t in res["targets"])

    res["setup"] = {
        "config": "configs/tiny.yaml",
        "overrides": [],
        "cores": 2,
        "cpu": "x86_64",
        "bf16_features": [],
        "torch": torch.__version__,
        "steps": 1,
        "repeats": 2,
        "final_steps": 2,
        "window": 0.05,
        "auto_is": "none",
    }
    res["command"] = "python scripts/bench_speed.py --tiny"
    _, md = write_results(tmp_path / "speed", res, bench.markdown(res))
    text = md.read_text()
    assert "## Targets" in text and "| `auto` |" in text and "two at once, auto (thread policy)" in text
    assert text.count("| two at once,") == 4


def test_a_pair_of_processes_shares_the_cores(bench, spec: dict, tmp_path: Path) -> None:
    """Two real processes under auto: each gets cores // 2 threads and says so in its log."""
    env = bench._env(tmp_path / "census")
    pair = bench.run_pair({**spec, "window": 0.2}, 0, tmp_path, env, "policy")
    share = max(1, cores_available() // 2)
    assert [w["threads"] for w in pair] == [share, share]
    assert all(w["samples_per_s"] > 0 for w in pair)
    line = f"torch threads: {share} of {cores_available()} cores (2 lorafed processes on this machine)"
    assert pair[0]["log"] == line
    assert list((tmp_path / "census").iterdir()) == []  # both left the census at exit


def test_convergence_part_pairs_the_seeds(bench, spec: dict, tmp_path: Path, monkeypatch) -> None:
    """Part 3 trains each seed under both modes to its best-validation round; the target is the median paired gap."""
    monkeypatch.setenv(CENSUS_ENV, str(tmp_path / "census"))
    before = torch.get_num_threads()
    conv = {**spec, "kind": "converge", "seeds": 2, "rounds": 2, "patience": 3, "convergence_overrides": []}
    runs = bench.child(conv)["convergence"]
    torch.set_num_threads(before)
    assert set(runs) == {"0", "1"}
    for r in runs.values():
        for mode in ("none", "auto"):
            m = r[mode]
            assert 0 <= m["macro_f1"] <= 1 and m["rounds_run"] == 2 and len(m["curve"]) == 3
            assert 0 <= m["best_round"] <= 2

    # the summary on hand-made numbers: paired differences -0.03, +0.01, +0.005 -> median +0.005
    made = {
        str(i): {"none": {"macro_f1": n}, "auto": {"macro_f1": a}}
        for i, (n, a) in enumerate([(0.80, 0.77), (0.70, 0.71), (0.90, 0.905)])
    }
    summary, (tgt,) = bench.summarize_convergence(made)
    assert tgt["value"] == pytest.approx(0.005, abs=1e-9) and tgt["met"]
    assert summary["macro_f1"]["none"]["median"] == pytest.approx(0.80)
    assert summary["macro_f1"]["auto"]["median"] == pytest.approx(0.77)
    assert bench._part_of(tgt) == "convergence"
    made["1"]["auto"]["macro_f1"] = 0.60  # differences -0.03, -0.10, +0.005 -> median -0.03: not met
    _, (tgt,) = bench.summarize_convergence(made)
    assert tgt["value"] == pytest.approx(-0.03, abs=1e-9) and not tgt["met"]
