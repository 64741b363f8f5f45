"""The quality benchmark on the tiny federation: early stopping, resumed rounds = one run, targets, report."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from lorafed.engine.cohort import prepare_cohort
from lorafed.engine.compare import EarlyStop, val_positions
from lorafed.engine.inprocess import simulate
from lorafed.engine.record import read_metrics

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "scripts" / "bench_quality.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclass looks its module up
    spec.loader.exec_module(mod)
    return mod


def test_early_stop_counts_rounds_without_a_strict_improvement() -> None:
    stop = EarlyStop(patience=2)
    assert [stop.update(r, f) for r, f in enumerate([0.1, 0.3, 0.3, 0.2])] == [False, False, False, True]
    assert (stop.best_at, stop.best) == (1, 0.3)  # the earliest of equal scores
    never = EarlyStop()
    assert not any(never.update(r, 0.0) for r in range(10))


def test_federated_rounds_one_at_a_time_equal_one_run_and_stop_early(bench, tiny_config, tmp_path) -> None:
    base = tiny_config("federation.rounds=3")
    fed = prepare_cohort(base)
    val = val_positions(fed)
    res = bench.run_federated(fed, base, tmp_path / "fedavg", val, rounds=3, patience=None)
    simulate(base, tmp_path / "once", progress=False, fed=fed)
    once = read_metrics(tmp_path / "once" / "metrics.jsonl")
    assert [p["macro_f1"] for p in res["curve"]] == [r["macro_f1"] for r in once]
    assert [p["round"] for p in res["curve"]] == [0, 1, 2, 3] and res["rounds_run"] == 3
    best = max(res["curve"], key=lambda p: (p["val_macro_f1"], -p["round"]))
    assert res["best_round"] == best["round"] and res["macro_f1"] == best["macro_f1"]
    assert res["curve"][-1]["bytes_up_cum"] == pytest.approx(3 * 2 * res["bytes_per_client_round"])
    ffa = bench.run_federated(fed, tiny_config("federation.aggregation=ffa"), tmp_path / "ffa", val, 2, None)
    assert ffa["bytes_per_client_round"] < res["bytes_per_client_round"]
    # With patience p the run stops p rounds after its best validation round (or at the cap).
    short = bench.run_federated(fed, base, tmp_path / "short", val, rounds=3, patience=1)
    assert short["rounds_run"] == min(3, short["best_round"] + 1)
    assert short["curve"] == res["curve"][: short["rounds_run"] + 1]


def test_baselines_stop_on_validation_and_score_the_global_test_rows(bench, tiny_config) -> None:
    fed = prepare_cohort(tiny_config("partition.num_clients=3"))
    val = val_positions(fed)
    cen = bench.run_centralized(fed, val, rounds=3, patience=2)
    best = max(cen["curve"], key=lambda p: (p["val_macro_f1"], -p["round"]))
    assert cen["best_round"] == best["round"] and cen["macro_f1"] == best["macro_f1"]
    assert cen["rounds_run"] == min(3, cen["best_round"] + 2)
    loc = bench.run_local(fed, rounds=2, patience=1, own_val_rows=5)
    assert set(loc["clients"]) == set(fed.partition.client_ids)
    assert all(c["own_val_rows"] <= 5 and c["rounds_run"] <= 2 for c in loc["clients"].values())
    assert loc["worst_macro_f1"] <= loc["macro_f1"]


def test_centralized_keeps_the_learning_rate_best_on_validation(bench, tiny_config) -> None:
    """Each candidate lr is its own run (the same as running it alone); the best validation score is reported."""
    fed = prepare_cohort(tiny_config("partition.num_clients=3"))
    val = val_positions(fed)
    lrs = (3.0, 3e-2)  # lr 3 wrecks the tiny model; 3e-2 is the tiny config's
    cen = bench.run_centralized(fed, val, rounds=2, patience=None, lrs=lrs)
    alone = {lr: bench.run_centralized(fed, val, rounds=2, patience=None, lrs=(lr,)) for lr in lrs}
    assert "lr_search" not in alone[3.0] and alone[3.0]["learning_rate"] == 3.0
    assert [c["learning_rate"] for c in cen["lr_search"]] == list(lrs)
    for c in cen["lr_search"]:
        assert c["macro_f1"] == alone[c["learning_rate"]]["macro_f1"]
        assert c["val_macro_f1"] == alone[c["learning_rate"]]["curve"][c["best_round"]]["val_macro_f1"]
    chosen = max(cen["lr_search"], key=lambda c: c["val_macro_f1"])
    assert cen["learning_rate"] == chosen["learning_rate"] and cen["macro_f1"] == chosen["macro_f1"]
    assert cen["curve"] == alone[chosen["learning_rate"]]["curve"]


def test_targets_are_judged_from_the_numbers(bench) -> None:
    def s(f1: float, n: int = 3, final: float | None = None) -> dict:
        return {"macro_f1": {"mean": f1, "std": 0.0, "n": n}}

    def setting(summary: dict, seeds: dict | None = None) -> dict:
        return {"summary": summary, "seeds": seeds or {}}

    a = {"centralized": s(0.80), "local-only": s(0.70), "fedavg": s(0.785), "ffa": s(0.79), "rolora": s(0.85, 1)}
    d = {"centralized": s(0.80), "fedavg": s(0.785)}
    e_seeds = {
        "0": {
            "round0": {"macro_f1": 0.20},
            "centralized": {"final_macro_f1": 0.5},
            "fedavg": {"final_macro_f1": 0.19},
            "local-only": {"macro_f1": 0.1},
        }
    }
    e = {"centralized": s(0.50), "fedavg": s(0.49)}
    t = bench.check_targets({"a": setting(a), "d": setting(d), "e": setting(e, e_seeds)})
    got = {x["target"]: (x["met"], round(x["value"], 6), x["best"]) for x in t}
    # The best federated method is chosen among those run on every seed (rolora ran one seed only).
    assert got == {
        "(d) IID FedAvg within 1.0 macro-F1 points of centralized": (False, 1.5, "fedavg"),
        "(a) best federated within 1.5 macro-F1 points of centralized": (True, 1.0, "ffa"),
        "(a) best federated >= 3 macro-F1 points above the mean local-only client (global test)": (True, 9.0, "ffa"),
        "(e) best federated within 2.0 macro-F1 points of centralized": (True, 1.0, "fedavg"),
        "(e) no run ends below its round 0 (macro-F1 of the last round)": (False, -1.0, "fedavg"),
    }
    assert all(set(x) >= {"target", "met", "value"} for x in t)


def test_reach_is_the_first_round_at_the_share_of_centralized(bench) -> None:
    curve = [{"round": r, "macro_f1": f, "bytes_up_cum": 1e6 * r} for r, f in enumerate([0.1, 0.6, 0.77, 0.8])]
    per_seed = {
        "0": {"round0": {}, "centralized": {"macro_f1": 0.8, "curve": []}, "fedavg": {"macro_f1": 0.8, "curve": curve}}
    }
    summary = bench.summarize(per_seed)
    r95 = summary["fedavg"]["reach_95"]
    assert r95["level"] == pytest.approx(0.76)
    assert (r95["reached"], r95["of"], r95["rounds"], r95["mb_up"]) == (1, 1, 2, 2.0)
    assert summary["fedavg"]["reach_99"]["rounds"] == 3


def test_main_tiny_writes_json_markdown_and_plots(bench, tmp_path) -> None:
    out = tmp_path / "res"
    assert (
        bench.main(
            ["--tiny", "--settings", "a,d,e", "--methods", "centralized,local-only,fedavg,ffa", "--out", str(out)]
        )
        == 0
    )
    report = json.loads((out / "quality.json").read_text())
    a = report["settings"]["a"]
    assert set(a["summary"]) == {"centralized", "local-only", "fedavg", "ffa"}
    # Seeds 0 and 1 for the baselines, fedavg and the best other method; seed 0 for the rest.
    assert set(a["seeds"]) == {"0", "1"} and set(a["multi_seed"]) == {"centralized", "local-only", "fedavg", "ffa"}
    f1 = [a["seeds"][s]["ffa"]["macro_f1"] for s in ("0", "1")]
    assert a["summary"]["ffa"]["macro_f1"]["mean"] == pytest.approx(sum(f1) / 2)
    assert a["summary"]["ffa"]["macro_f1"]["std"] == pytest.approx(abs(f1[0] - f1[1]) / 2**0.5)
    assert all(len(r["curve"]) - 1 <= 3 for r in a["seeds"]["0"].values() if "curve" in r)
    assert len(report["settings"]["d"]["clients"]) == len(a["clients"]) == 3  # (d): IID over as many clients as (a)
    assert report["settings"]["d"]["config"] == "configs/tiny.yaml"
    assert {t["target"][:3] for t in report["targets"]} == {"(a)", "(d)", "(e)"}
    assert all(isinstance(t["met"], bool) and isinstance(t["value"], float) for t in report["targets"])
    md = (out / "quality.md").read_text()
    assert "| ffa |" in md and "local-only, worst client" in md and "## Targets" in md and "## Profile choices" in md
    for key in ("a", "d", "e"):
        assert (out / f"quality_{key}.png").read_bytes().startswith(b"\x89PNG")


def test_time_budget_skips_runs_and_says_so(bench, tmp_path) -> None:
    argv = ["--tiny", "--settings", "a", "--methods", "centralized,fedavg", "--time-budget-s", "1e-9"]
    assert bench.main([*argv, "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "quality.json").read_text())
    assert report["skipped"] == ["a/seed0/centralized", "a/seed0/fedavg", "a/seed1/centralized", "a/seed1/fedavg"]
    assert "Skipped (time budget spent)" in (tmp_path / "quality.md").read_text()


def test_full_profile_takes_the_winner_of_an_earlier_setting_on_the_same_data(bench) -> None:
    full = bench.PROFILES["full"]
    b, c = bench.make_plans(full, ["b", "c"], None, None, None)
    # (b) runs the baselines, fedavg and fedadam; FFA, RoLoRA and FedProx are ablations (--methods).
    assert b.methods == ["centralized", "local-only", "fedavg", "fedadam"] and b.winner_from is None
    assert (c.methods, c.winner_from) == (["centralized", "local-only", "fedavg"], "b")
    # (c) FedAvgM peaked at round 16 of 30 (results/quality_c_ablation.md); centralized picks its lr on validation.
    assert (c.rounds, c.central_lrs, b.central_lrs) == (20, (1e-2, 2e-3), (1e-2, 2e-3))
    (alone,) = bench.make_plans(full, ["c"], None, None, None)  # (b) not run: every method
    assert alone.methods == bench.ALL_METHODS and alone.winner_from is None
    (chosen,) = bench.make_plans(full, ["c"], ["fedavg", "centralized"], 2, None)
    assert (chosen.methods, chosen.seeds) == (["centralized", "fedavg"], 2)


def test_merge_joins_runs_of_other_methods_into_one_report(bench, tmp_path) -> None:
    """Two runs of (c) with other methods (and a round cap from --rounds) become one report, numbers kept."""
    common = ["--tiny", "--settings", "c", "--seeds", "1", "--rounds", "1"]
    assert bench.main([*common, "--methods", "centralized,fedavg", "--out", str(tmp_path / "x")]) == 0
    assert bench.main([*common, "--methods", "fedavgm-fedrs", "--out", str(tmp_path / "y"), "--name", "y"]) == 0
    parts = [json.loads(p.read_text()) for p in (tmp_path / "x" / "quality.json", tmp_path / "y" / "y.json")]
    assert parts[0]["settings"]["c"]["rounds_cap"] == 1 and parts[1]["name"] == "y"
    argv = ["--merge", str(tmp_path / "x" / "quality.json"), str(tmp_path / "y" / "y.json")]
    assert bench.main([*argv, "--out", str(tmp_path), "--name", "both"]) == 0
    both = json.loads((tmp_path / "both.json").read_text())
    seed0 = both["settings"]["c"]["seeds"]["0"]
    assert set(seed0) == {"round0", "centralized", "fedavg", "fedavgm-fedrs"}
    assert seed0["fedavgm-fedrs"] == parts[1]["settings"]["c"]["seeds"]["0"]["fedavgm-fedrs"]
    assert seed0["fedavg"] == parts[0]["settings"]["c"]["seeds"]["0"]["fedavg"]
    assert both["command"][:2] == [parts[0]["command"], parts[1]["command"]] and "--merge" in both["command"][2]
    cen = seed0["centralized"]["macro_f1"]
    best = max(("fedavg", "fedavgm-fedrs"), key=lambda m: seed0[m]["macro_f1"])
    (target,) = both["targets"]
    assert target["best"] == best and target["value"] == pytest.approx(100 * (cen - seed0[best]["macro_f1"]))
    md = (tmp_path / "both.md").read_text()
    assert "| fedavgm-fedrs |" in md and "| fedavg |" in md and "(both_c.png)" in md
    assert (tmp_path / "both_c.png").read_bytes().startswith(b"\x89PNG")
    only = ["--merge", str(tmp_path / "both.json"), "--settings", "c", "--methods", "fedavg", "--name", "only"]
    assert bench.main([*only, "--out", str(tmp_path)]) == 0
    kept = json.loads((tmp_path / "only.json").read_text())["settings"]["c"]
    assert set(kept["seeds"]["0"]) == {"round0", "fedavg"} and kept["methods"] == ["fedavg"]


def test_merge_replaces_a_setting_run_with_other_overrides(bench, tmp_path) -> None:
    """A later run of (d) with an extra override (--set) replaces the earlier one, facts included, never mixed."""
    common = ["--tiny", "--settings", "d", "--seeds", "1", "--rounds", "1", "--methods", "centralized,fedavg"]
    assert bench.main([*common, "--out", str(tmp_path / "x")]) == 0
    assert bench.main([*common, "--set", "train.learning_rate=0.01", "--out", str(tmp_path / "y")]) == 0
    x, y = (json.loads((tmp_path / p / "quality.json").read_text())["settings"]["d"] for p in ("x", "y"))
    px = bench.protocol(x)  # the tiny files' paths aside; the round cap and patience last
    assert px[-2:] == ["rounds_cap=1", "patience=2"]
    assert bench.protocol(y) == [*px[:-2], "train.learning_rate=0.01", *px[-2:]]
    argv = ["--merge", str(tmp_path / "x" / "quality.json"), str(tmp_path / "y" / "quality.json")]
    assert bench.main([*argv, "--out", str(tmp_path), "--name", "m"]) == 0
    merged = json.loads((tmp_path / "m.json").read_text())
    d = merged["settings"]["d"]
    assert d["overrides"] == y["overrides"] and d["seeds"] == y["seeds"]
    (target,) = merged["targets"]
    seed0 = y["seeds"]["0"]
    assert target["value"] == pytest.approx(100 * (seed0["centralized"]["macro_f1"] - seed0["fedavg"]["macro_f1"]))
    assert "replace earlier runs of another protocol" in merged["choices"]
    y_command = json.loads((tmp_path / "y" / "quality.json").read_text())["command"]
    assert merged["command"][:-1] == [y_command]  # x's command ran only (d), which y's runs replaced
    assert "--merge" in merged["command"][-1]


def test_protocol_is_the_override_that_took_effect_per_key(bench) -> None:
    """A key given twice is its last value, so a redundant --set is the same protocol; another value is not."""
    seed0 = {"overrides": ["data.max_length=64", "federation.max_test_rows=500", "federation.max_test_rows=2000"]}
    later = {"overrides": ["data.max_length=64", "federation.max_test_rows=2000", "federation.max_test_rows=2000"]}
    assert bench.protocol(seed0) == bench.protocol(later) == ["data.max_length=64", "federation.max_test_rows=2000"]
    rows500 = {"overrides": ["data.max_length=64", "federation.max_test_rows=500"]}
    assert bench.protocol(rows500) != bench.protocol(later)
    assert bench.protocol({"overrides": ["data.path=/tmp/x.csv", "seed=1"]}) == ["seed=1"]
    cap10 = {**later, "rounds_cap": 10, "patience": 3}
    assert bench.protocol(cap10) == [
        "data.max_length=64",
        "federation.max_test_rows=2000",
        "rounds_cap=10",
        "patience=3",
    ]
    assert bench.protocol({**cap10, "rounds_cap": 15}) != bench.protocol(cap10)  # another cap, another protocol


def test_first_seed_runs_only_the_later_seeds_and_merges_with_seed_0(bench, tmp_path) -> None:
    """--first-seed 1 of 2 runs seed 1 alone, ffa included (no seed 0 to pick it); K >= seeds is refused.

    Merged with a seed-0 run (and a run whose budget skipped seed 0), each method's mean is over the
    seeds that ran it, 'every seed' lists only the methods on both seeds, and runs held are not skipped.
    """
    common = ["--tiny", "--settings", "a", "--rounds", "1"]
    later = [*common, "--methods", "centralized,ffa", "--seeds", "2"]
    assert bench.main([*later, "--first-seed", "1", "--out", str(tmp_path / "s1")]) == 0
    report = json.loads((tmp_path / "s1" / "quality.json").read_text())
    a1 = report["settings"]["a"]
    assert list(a1["seeds"]) == ["1"] and set(a1["seeds"]["1"]) == {"round0", "centralized", "ffa"}
    assert a1["summary"]["ffa"]["macro_f1"]["n"] == 1 and "--first-seed 1" in report["choices"]
    for bad in ("2", "-1"):
        with pytest.raises(SystemExit):
            bench.main([*later, "--first-seed", bad, "--out", str(tmp_path / "no")])
    assert not (tmp_path / "no").exists()

    first = [*common, "--methods", "centralized,fedavg,ffa", "--seeds", "1"]
    assert bench.main([*first, "--out", str(tmp_path / "s0")]) == 0
    assert bench.main([*first, "--time-budget-s", "1e-9", "--out", str(tmp_path / "none")]) == 0
    parts = [str(tmp_path / d / "quality.json") for d in ("none", "s0", "s1")]
    assert bench.main(["--merge", *parts, "--note", "Seed 1: two methods.", "--out", str(tmp_path)]) == 0
    merged = json.loads((tmp_path / "quality.json").read_text())
    a = merged["settings"]["a"]
    a0 = json.loads((tmp_path / "s0" / "quality.json").read_text())["settings"]["a"]
    assert set(a["seeds"]) == {"0", "1"} and a["multi_seed"] == ["centralized", "ffa"]
    f1 = [a0["seeds"]["0"]["ffa"]["macro_f1"], a1["seeds"]["1"]["ffa"]["macro_f1"]]
    assert a["summary"]["ffa"]["macro_f1"]["mean"] == pytest.approx(sum(f1) / 2)
    assert a["summary"]["fedavg"]["macro_f1"]["n"] == 1
    assert a["skipped"] == [] and merged["skipped"] == []
    assert merged["choices"].endswith(" Seed 1: two methods.")
    assert "every seed: centralized, ffa; the others fewer" in (tmp_path / "quality.md").read_text()


def test_the_label_disjoint_config_is_the_ablations_winner(bench) -> None:
    """The label-disjoint config is (b)'s recipe, the measured winner: the fedavgm overrides change nothing."""
    from lorafed.config import load_config

    path = ROOT / "configs" / "retail_intents_by_category.yaml"
    assert load_config(path) == load_config(path, bench.FEDERATED["fedavgm"])
    assert load_config(path) != load_config(path, bench.FEDERATED["fedavg-lr2e-3"])
    # fedadam brings its own server step, whatever FedAvgM settings the config has
    adam = load_config(path, bench.FEDERATED["fedadam"]).federation
    assert (adam.server_optimizer, adam.server_lr, adam.server_beta1) == ("fedadam", 1e-2, 0.9)
