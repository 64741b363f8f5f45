"""The quality benchmark's runners on the tiny federation: same budget, real payload bytes, targets."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import tiny_overrides

from lorafed.engine.federation import prepare_federation

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "scripts" / "bench_quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_methods_share_the_budget_and_ffa_uploads_less(bench, tiny_config, tmp_path) -> None:
    base = tiny_config()
    fed = prepare_federation(base)
    fedavg = bench.run_federated(fed, base, tmp_path / "fedavg")
    ffa = bench.run_federated(fed, tiny_config("federation.aggregation=ffa"), tmp_path / "ffa")
    cen = bench.run_centralized(fed, base)
    loc = bench.run_local(fed, base, own_rows=10)
    budget = base.federation.rounds * 2 * base.train.max_steps * base.train.batch_size
    assert fedavg["samples"] == ffa["samples"] == cen["samples"] == loc["samples"] == budget
    assert [p["round"] for p in fedavg["curve"]] == [1, 2]
    assert ffa["bytes_per_client_round"] < fedavg["bytes_per_client_round"]
    assert fedavg["curve"][-1]["bytes_up_cum"] == pytest.approx(2 * 2 * fedavg["bytes_per_client_round"])
    assert set(loc["clients"]) == set(fed.partition.client_ids)
    assert loc["worst_global_macro_f1"] <= loc["mean_global_macro_f1"]
    assert all(c["own_rows"] <= 10 for c in loc["clients"].values())


def test_targets_are_judged_from_the_numbers(bench) -> None:
    def s(f1: float, std: float = 0.0) -> dict:
        return {"macro_f1": {"mean": f1, "std": std}}

    summary = {
        "centralized": s(0.80),
        "local-only": {"mean_global_macro_f1": {"mean": 0.70}},
        "fedavg": s(0.785),
        "ffa": s(0.795),
    }
    c_summary = {"fedavg": s(0.50, 0.01), "ffa": s(0.56, 0.01), "rolora": s(0.505)}
    t = bench.check_targets({"a": {"summary": summary}, "c": {"summary": c_summary}})
    assert [(x["setting"], x["best"], x["met"]) for x in t] == [
        ("a", "ffa", True),
        ("a", "ffa", True),
        ("c", "ffa", True),
    ]
    assert t[0]["value"] == pytest.approx(-0.5)
    assert t[1]["value"] == pytest.approx(9.5)
    c_summary["ffa"] = s(0.51, 0.01)
    assert not bench.check_targets({"c": {"summary": c_summary}})[0]["met"]


def test_main_writes_json_markdown_and_plots(bench, tiny_model_dir, synthetic_csv, tmp_path, monkeypatch) -> None:
    tiny = [*tiny_overrides(synthetic_csv, tiny_model_dir), "federation.rounds=2"]
    monkeypatch.setitem(bench.SETTINGS, "a", {"title": "(a) tiny", "config": "tiny.yaml"})
    monkeypatch.setitem(bench.PROFILES, "quick", {"seeds": [0, 1], "own_test_rows": 8, "overrides": {"a": tiny}})
    assert bench.main(["--quick", "--settings", "a", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "quality.json").read_text())
    summary = report["settings"]["a"]["summary"]
    assert set(summary) == {"centralized", "local-only", *bench.FEDERATED}
    f1 = [report["settings"]["a"]["seeds"][s]["ffa"]["macro_f1"] for s in ("0", "1")]
    assert summary["ffa"]["macro_f1"]["mean"] == pytest.approx(sum(f1) / 2)
    assert summary["ffa"]["macro_f1"]["std"] == pytest.approx(abs(f1[0] - f1[1]) / 2**0.5)
    md = (tmp_path / "quality.md").read_text()
    assert "| ffa |" in md and "local-only (worst client, own test slice)" in md and "## Targets" in md
    assert (tmp_path / "quality_a.png").read_bytes().startswith(b"\x89PNG")
