"""Smoke run of scripts/bench_perf.py --quick on the tiny model: every section runs and reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, tiny_overrides


def test_bench_perf_quick_writes_json_markdown_and_plot(
    tmp_path: Path, tiny_model_dir: Path, synthetic_csv: Path
) -> None:
    out = tmp_path / "perf"
    sets = tiny_overrides(synthetic_csv, tiny_model_dir)
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_perf.py"), "--quick", "--out", str(out)]
    cmd += ["--config", str(ROOT / "configs" / "tiny.yaml")] + [x for s in sets for x in ("--set", s)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, timeout=300)
    res = json.loads((out / "perf.json").read_text())
    comm = res["comm"]
    by = {(r["payload"], r["transport"]): r for r in comm["payloads"]}
    # Sizes are real files: fp32 carries 4 bytes per adapter parameter, int8 ~1, B-only fewer parameters.
    assert 4 * comm["adapter_params"] < by[("A+B+head", "float32")]["bytes"] < 4 * comm["adapter_params"] + 16_384
    # (On the tiny model the scales' header entries outweigh int8's saving over fp16; not so on MiniLM.)
    assert by[("A+B+head", "int8")]["bytes"] < by[("A+B+head", "float32")]["bytes"]
    assert by[("A+B+head", "float16")]["bytes"] < by[("A+B+head", "float32")]["bytes"]
    assert by[("B+head (A frozen)", "float32")]["bytes"] < by[("A+B+head", "float32")]["bytes"]
    assert comm["full_model_bytes"] > 4 * comm["full_model_params"]
    assert [r["transport"] for r in res["quality"]["runs"]] == ["float32", "int8"]
    assert res["speed"]["engine_samples_per_s"]["median"] > 0 and res["speed"]["torch_threads"] == 1
    rows = res["aggregation"]["rows"]
    assert [r["n"] for r in rows] == [2, 4] and all(r["files_vs_bound"] > 0 for r in rows)
    md = (out / "perf.md").read_text()
    assert "## Aggregation at scale" in md and "bench_perf.py --quick" in md
    assert (out / "perf_aggregation.png").stat().st_size > 1000
