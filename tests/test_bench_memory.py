"""The memory benchmark's measurement and report on the tiny model (in-process, a few seconds)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "scripts" / "bench_memory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_measurements_and_reports_on_the_tiny_model(bench, tiny_model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    variants = ["fp32", "bnb int8", "int8 linear+emb", "int8 linear+emb +ckpt"]
    rows = [bench.measure(str(tiny_model_dir), v, steps=1, warmup=1, batch=3, length=10) for v in variants]
    for r in rows:
        assert isinstance(r["peak_train_mb"], float) and len(r["step_s"]["runs"]) == 1 and len(r["train_losses"]) == 2
        assert set(r["breakdown_mb"]) == {
            "model_resident",
            "saved_activations",
            "saved_dequantized_weights",
            "inputs_held_by_bnb",
            "grads_and_optimizer",
            "other_transient_and_allocator",
        }
    by = {r["variant"]: r for r in rows}
    assert by["int8 linear+emb"]["model_tensors"]["int8_mb"] > 0 and by["fp32"]["model_tensors"]["int8_mb"] == 0
    # The profile's point: bitsandbytes holds its layers' float inputs for backward, lorafed's int8 does not,
    # and neither keeps an fp32 weight copy.
    assert by["bnb int8"]["breakdown_mb"]["inputs_held_by_bnb"] > 0
    assert by["int8 linear+emb"]["breakdown_mb"]["inputs_held_by_bnb"] == 0
    assert all(r["breakdown_mb"]["saved_dequantized_weights"] == 0 for r in rows)
    # Checkpointing replays the same dropout masks: same losses as without it.
    assert by["int8 linear+emb +ckpt"]["train_losses"] == pytest.approx(by["int8 linear+emb"]["train_losses"], abs=1e-5)

    report = {
        "command": "flock /tmp/lorafed-heavy.lock env PYTHONPATH=. python scripts/bench_memory.py",
        "batch": 4,
        "length": 16,
        "warmup": 1,
        "steps": "2",
        "machine": "test",
        "targets": {"memory_ratio": 0.6, "time_ratio": 1.2},
        "notes": bench.NOTES,
        "models": {"tiny": bench.summarize(rows, 2)},
        "cuda": [],
    }
    bench.write_reports(report, tmp_path, with_plot=False)
    saved = json.loads((tmp_path / "memory.json").read_text())
    tiny = saved["models"]["tiny"]
    assert saved["command"].startswith("flock /tmp/lorafed-heavy.lock")
    assert [r["variant"] for r in tiny["variants"]] == variants
    assert tiny["variants"][0]["memory_ratio"] == 1.0 and tiny["variants"][0]["time_ratio"] == 1.0
    assert all("initial_logits" not in r for r in tiny["variants"])
    assert {t["variant"] for t in tiny["targets"]} == {"bnb int8", "int8 linear+emb", "int8 linear+emb +ckpt"}
    assert [c["to"] for c in tiny["changes"]] == ["bnb int8", "int8 linear+emb +ckpt"]
    md = (tmp_path / "memory.md").read_text()
    assert "Reproduce: `flock /tmp/lorafed-heavy.lock" in md and "No GPU here" in md
    assert md.count("met") >= 6 and "Where the memory goes" in md
    assert bench.main(["--render", str(tmp_path / "memory.json"), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "memory.md").read_text() == md and (tmp_path / "again" / "memory.png").is_file()


def test_targets_are_judged_from_the_ratios(bench) -> None:
    def row(variant: str, precision: str, mem: float, t: float) -> dict:
        return {"variant": variant, "precision": precision, "memory_ratio": mem, "time_ratio": t}

    t = bench.judge_targets([row("fp32", "fp32", 1, 1), row("a", "int8", 0.59, 1.3), row("b", "int8", 0.61, 1.2)])
    assert [(x["variant"], x["metric"], x["value"], x["met"]) for x in t] == [
        ("a", "memory_ratio", 0.59, True),
        ("a", "time_ratio", 1.3, False),
        ("b", "memory_ratio", 0.61, False),
        ("b", "time_ratio", 1.2, True),
    ]
    assert t[0]["target"] == "peak memory <= 0.6x fp32"


def test_measure_helpers(tmp_path: Path) -> None:
    from lorafed import measure

    s = measure.summarize([3.0, 1.0, 2.0], runs=True)
    assert (s["median"], s["mean"], s["min"], s["max"], s["n"], s["runs"]) == (2.0, 2.0, 1.0, 3.0, 3, [3.0, 1.0, 2.0])
    assert s["std"] == pytest.approx(1.0) and measure.summarize([5.0])["std"] == 0.0
    assert measure.fmt_range(s, scale=10, digits=0) == "20 (10-30)"
    assert len(measure.time_runs(lambda: None, reps=3, warmup=2)) == 3
    assert measure.target("x <= 1", 0.5, True, variant="a") == {
        "target": "x <= 1",
        "value": 0.5,
        "met": True,
        "variant": "a",
    }
    assert measure.rss_bytes() > 0 and measure.peak_rss_bytes() >= measure.rss_bytes() // 2
    before = measure.rss_bytes()
    if measure.reset_peak_rss():
        block = bytes(range(256)) * (1 << 18)  # 64 MiB, written, so resident
        assert measure.peak_rss_bytes() >= before + len(block) // 2
        del block
    j, m = measure.write_results(tmp_path / "out" / "r", {"a": 1}, ["# t", "", "x"])
    assert json.loads(j.read_text()) == {"a": 1} and m.read_text() == "# t\n\nx\n"
    assert measure.command_line("bench_perf.py", ["--quick", "a b"]) == (
        "flock /tmp/lorafed-heavy.lock env PYTHONPATH=. python scripts/bench_perf.py --quick 'a b'"
    )
    assert measure.pythonpath_env("/x")["PYTHONPATH"].split(os.pathsep)[0] == "/x"
