"""The memory benchmark's measurement and report on the tiny model (in-process, a few seconds)."""

from __future__ import annotations

import importlib.util
import json
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
        assert isinstance(r["peak_train_mb"], float) and len(r["step_s"]["all"]) == 1 and len(r["train_losses"]) == 2
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
    assert [(x["variant"], x["memory_met"], x["time_met"]) for x in t] == [("a", True, False), ("b", False, True)]
