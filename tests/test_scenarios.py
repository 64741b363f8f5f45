"""Scenarios: personalization (finetune, local_head, prior), personalized payloads and export, cold start, the bench."""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from lorafed.client import personalize as pmod
from lorafed.client.personalize import personalize, personalize_local, personalize_report, sample_rows
from lorafed.config import PersonalizeConfig
from lorafed.data.tokens import Split
from lorafed.engine.cohort import prepare_cohort
from lorafed.engine.cold_start import cold_start, federation_without
from lorafed.engine.inprocess import simulate
from lorafed.engine.record import read_metrics
from lorafed.engine.scenarios import client_site, final_global, measure_personalization, personalize_all
from lorafed.errors import ConfigError
from lorafed.serve.export import export_adapter
from lorafed.server.validate import validate_update
from lorafed.wire.reader import load_payload
from lorafed.wire.roles import tensor_role
from tests.conftest import ROOT, write_synthetic_csv


def test_personalize_config_section(tiny_config) -> None:
    cfg = tiny_config("personalize.method=local_head", "personalize.steps=7", "personalize.learning_rate=0.01")
    assert cfg.personalize == PersonalizeConfig("local_head", 7, 0.01, 5, 2)
    assert tiny_config().personalize.method == "none"
    with pytest.raises(ConfigError) as exc:
        tiny_config(
            "personalize.method=fedrep",
            "personalize.steps=0",
            "personalize.eval_every=0",
            "personalize.confidence=1",
            "personalize.bootstrap=10",
            "personalize.max_epochs=0",
            "personalize.cross_fit=1",
        )
    text = str(exc.value)
    assert "personalize.method" in text and "personalize.steps" in text and "personalize.eval_every" in text
    for key in ("confidence", "bootstrap", "max_epochs", "cross_fit"):
        assert f"personalize.{key}" in text


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    """A 3-shop natural federation (2 rounds) on synthetic reviews, run once."""
    from lorafed.config import load_config
    from tests.conftest import tiny_overrides

    tmp = tmp_path_factory.mktemp("scn")
    csv_path = write_synthetic_csv(tmp / "reviews.csv", n=300)
    cfg = load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            *tiny_overrides(csv_path, tiny_model_dir),
            "partition.scheme=natural",
            "partition.column=shop",
            "train.learning_rate=0.01",
            "personalize.method=finetune",
            "personalize.steps=4",
            "personalize.eval_every=2",
        ],
    )
    fed = prepare_cohort(cfg)
    simulate(cfg, tmp / "run", progress=False, fed=fed)
    return cfg, fed, tmp / "run", tmp


def test_local_head_trains_the_head_only(tiny_run) -> None:
    _, fed, run, _ = tiny_run
    _, glob = final_global(fed, run)
    site = client_site(fed, 0, Split(fed.splits[0].train, np.empty(0, np.int64), fed.splits[0].test))
    unjudged = {"max_epochs": None, "cross_fit": 0}
    res = personalize_report(site, glob, PersonalizeConfig("local_head", 4, 0.05, 2, None, **unjudged))
    assert res.steps == 4 and res.best_step == 4 and res.selection == "last"  # nothing to judge on
    changed = {k for k in glob if not torch.equal(glob[k], res.tensors[k])}
    assert changed and all(tensor_role(k) == "head" for k in changed)
    assert all(torch.equal(glob[k], res.tensors[k]) for k in glob if tensor_role(k) != "head")
    tuned = personalize(site, glob, PersonalizeConfig("finetune", 4, 0.05, 2, None, **unjudged))
    assert {tensor_role(k) for k in glob if not torch.equal(glob[k], tuned[k])} == {"lora_A", "lora_B", "head"}
    assert all(torch.equal(glob[k], v) for k, v in personalize(site, glob, PersonalizeConfig()).items())


def _scripted_predictions(monkeypatch, script: list[float]) -> list[int]:
    """Each prediction call returns the truth on the first ``fraction`` of its rows, a wrong label on the rest."""
    calls = iter(script)
    sizes: list[int] = []

    def fake(model, rows, positions, batch_size, autocast="none"):
        y = rows.labels[np.asarray(positions)].numpy()
        right = round(next(calls) * len(y))
        pred = np.where(np.arange(len(y)) < right, y, (y + 1) % 3)  # the tiny data's 3 labels
        sizes.append(len(y))
        return np.eye(3)[pred]

    monkeypatch.setattr("lorafed.metrics.predict_logits", fake)
    return sizes


def _f1(y: np.ndarray, fraction: float) -> float:
    right = round(fraction * len(y))
    return float(f1_score(y, np.where(np.arange(len(y)) < right, y, (y + 1) % 3), average="macro"))


def test_checkpoint_choice_follows_validation(tiny_run, monkeypatch) -> None:
    _, fed, run, _ = tiny_run
    _, glob = final_global(fed, run)
    site = client_site(fed, 0)
    y = fed.rows.labels[np.asarray(site.split.val)].numpy()
    assert len(y) >= 8 and len(fed.identity.labels) == 3
    # global half right; checkpoints of 2 steps: 0.4, all right, 0.9, 0.95 (patience 2 stops after 8 steps)
    _scripted_predictions(monkeypatch, [0.5, 0.4, 1.0, 0.9, 0.95, 1.0])
    res = personalize_report(site, glob, PersonalizeConfig("finetune", 20, 0.01, 2, 2, max_epochs=None))
    assert (res.best_step, res.steps, res.selection) == (4, 8, "validation")
    assert res.val_global == pytest.approx(_f1(y, 0.5)) and res.val_best == pytest.approx(1.0)
    assert res.gain_bound is not None and res.gain_bound > 0
    _scripted_predictions(monkeypatch, [0.7, 0.7, 0.6])  # a tie keeps the global adapter
    res = personalize_report(site, glob, PersonalizeConfig("finetune", 4, 0.01, 2, None, max_epochs=None))
    assert res.best_step == 0 and all(torch.equal(glob[k], res.tensors[k]) for k in glob)


def test_local_steps_are_capped_at_max_epochs() -> None:
    p = PersonalizeConfig("finetune", 20, max_epochs=3.0)
    # ceil(3 x rows / 16): 75/16 -> 5, 150/16 -> 10, 300/16 -> 19, 600/16 -> 38 capped at 20
    assert [pmod.local_steps(p, n, 16) for n in (25, 50, 100, 200)] == [5, 10, 19, 20]
    assert pmod.local_steps(PersonalizeConfig("finetune", 20, max_epochs=None), 25, 16) == 20
    assert pmod.local_steps(p, 1, 16) == 1


def test_bootstrap_gains_match_sklearn_on_each_resample() -> None:
    rng = np.random.default_rng(5)
    y, a, b = rng.integers(0, 4, 30), rng.integers(0, 4, 30), rng.integers(0, 4, 30)
    gains = pmod.bootstrap_macro_f1_gains(y, a, b, 4, 50, seed=11)
    idx = np.random.default_rng(11).integers(0, 30, size=(50, 30))  # the resamples, drawn as documented
    want = [f1_score(y[i], b[i], average="macro") - f1_score(y[i], a[i], average="macro") for i in idx]
    assert gains.shape == (50,) and np.allclose(gains, want)


def test_adoption_needs_confidence_with_bonferroni() -> None:
    # y = 0 0 1 1; the global predicts 0 everywhere (macro-F1 (2/3 + 0) / 2 = 1/3), the candidate is right.
    # A resample of four class-0 rows (probability 1/16 = 0.0625) scores both 1: a gain of 0, else > 0.
    y, old, new = np.array([0, 0, 1, 1]), np.zeros(4, np.int64), np.array([0, 0, 1, 1])
    p = PersonalizeConfig("finetune", min_gain=0.0, bootstrap=20_000)
    tight = pmod.choose_adapter(y, old, [new], 2, dataclasses.replace(p, confidence=0.95), seed=1)
    assert tight.global_score == pytest.approx(1 / 3) and tight.scores == [1.0]
    assert tight.index is None and tight.bound == 0.0  # the 5% quantile falls in the mass 0.0625 at 0
    loose = pmod.choose_adapter(y, old, [new], 2, dataclasses.replace(p, confidence=0.9), seed=1)
    assert loose.index == 0 and loose.bound > 0  # the 10% quantile is above it
    # two candidates: each is tested at 0.1 / 2 = 0.05 (Bonferroni), so the same one is refused
    two = pmod.choose_adapter(y, old, [old, new], 2, dataclasses.replace(p, confidence=0.9), seed=1)
    assert two.index is None and two.scores == [pytest.approx(1 / 3), 1.0]
    # without the test, min_gain alone decides: a gain of 2/3 passes 0.5, not 0.7; ties go to the earliest
    free = dataclasses.replace(p, confidence=None)
    assert pmod.choose_adapter(y, old, [new, new], 2, dataclasses.replace(free, min_gain=0.5), seed=1).index == 0
    assert pmod.choose_adapter(y, old, [new], 2, dataclasses.replace(free, min_gain=0.7), seed=1).index is None


def test_cross_fit_decides_without_validation_rows(tiny_run, monkeypatch) -> None:
    _, fed, run, _ = tiny_run
    _, glob = final_global(fed, run)
    train = fed.splits[0].train
    site = client_site(fed, 0, Split(train, np.empty(0, np.int64), fed.splits[0].test))
    p = PersonalizeConfig("finetune", 4, 0.05, 4, None, min_gain=0.0, max_epochs=None, cross_fit=2)
    # calls: fold 1 out-of-fold, fold 2 out-of-fold, then the global adapter on every train row
    sizes = _scripted_predictions(monkeypatch, [1.0, 1.0, 0.0])
    res = personalize_report(site, glob, p)
    assert sorted(sizes[:2]) == [len(train) // 2, len(train) - len(train) // 2] and sizes[2] == len(train)
    assert (res.selection, res.best_step, res.steps) == ("cross_fit", 4, 12)  # 2 folds x 4 steps, then 4 on all
    assert res.val_global == 0.0 and res.val_best == 1.0
    assert any(not torch.equal(glob[k], res.tensors[k]) for k in glob)
    _scripted_predictions(monkeypatch, [0.0, 0.0, 1.0])  # the tuned adapters are wrong out of fold: keep the global
    res = personalize_report(site, glob, p)
    assert (res.best_step, res.steps) == (0, 8) and all(torch.equal(glob[k], res.tensors[k]) for k in glob)
    few = Split(train[:3], np.empty(0, np.int64), fed.splits[0].test)  # 3 rows: too few for 2 folds of 2
    res = personalize_report(client_site(fed, 0, few), glob, p)
    assert (res.best_step, res.steps) == (0, 0) and all(torch.equal(glob[k], res.tensors[k]) for k in glob)


def test_personalize_all_writes_payloads_that_export(tiny_run, tiny_model_dir, tmp_path) -> None:
    cfg, fed, run, _ = tiny_run
    done = personalize_all(cfg, run, fed=fed)
    assert set(done) == set(fed.partition.client_ids)
    final_round = read_metrics(run / "metrics.jsonl")[-1]["round"]
    for cid, res in done.items():
        p = load_payload(run / "personalized" / f"{cid}.safetensors")
        assert p.meta.kind == "personalized" and p.meta.client_id == cid and p.meta.round == final_round
        assert p.meta.metrics["method"] == "finetune" and p.meta.metrics["steps"] == res.steps
        validate_update(p, fed.spec(None))  # same base, LoRA config, labels and tensors as the federation
        for k, v in p.decoded().items():
            assert torch.equal(v, res.tensors[k])
    summary = json.loads((run / "personalized" / "summary.json").read_text())
    assert summary["personalize"]["method"] == "finetune" and set(summary["clients"]) == set(done)
    cid = fed.partition.client_ids[0]
    payload = load_payload(run / "personalized" / f"{cid}.safetensors")
    report = export_adapter(payload, tmp_path / "export", str(tiny_model_dir))
    assert report.max_abs_diff <= 1e-4 and report.federation["kind"] == "personalized"


def test_measure_personalization_against_sklearn(tiny_run) -> None:
    _, fed, run, _ = tiny_run
    _, glob = final_global(fed, run)
    pers = {cid: personalize(client_site(fed, k), glob) for k, cid in enumerate(fed.partition.client_ids)}
    res = measure_personalization(fed, glob, pers, local_only=True, local_rounds=1)
    from lorafed.metrics import predict_logits
    from lorafed.wire.adapter import set_adapter_state

    for k, cid in enumerate(fed.partition.client_ids):
        test = fed.splits[k].test
        y = fed.rows.labels[torch.as_tensor(test)].numpy()
        for key, state in (("global", glob), ("personalized", pers[cid])):
            set_adapter_state(fed.client.model, state)
            pred = predict_logits(fed.client.model, fed.rows, test, 64).argmax(1)
            expected = f1_score(y, pred, average="macro", labels=range(len(fed.data.label_names)), zero_division=0)
            assert res["clients"][cid][key] == pytest.approx(expected, abs=1e-9), (cid, key)
            held = set(fed.rows.labels[torch.as_tensor(fed.splits[k].train)].tolist())
            wrong = pred != y
            unheld = np.array([c not in held for c in pred.tolist()], dtype=bool)
            got = res["clients"][cid]["errors"][key]
            assert got == {"wrong": int(wrong.sum()), "into_unheld": int((wrong & unheld).sum())}, (cid, key)
        assert 0 <= res["clients"][cid]["local_only"] <= 1
    rows = res["clients"].values()
    assert res["mean"]["personalized"] == pytest.approx(np.mean([r["personalized"] for r in rows]))
    assert res["gained"] == sum(r["personalized"] > r["global"] for r in rows)
    assert res["max_drop"] == pytest.approx(max(0.0, max(r["global"] - r["personalized"] for r in rows)))


def test_personalize_local_on_a_companys_own_file(tiny_run, tmp_path) -> None:
    cfg, fed, run, _ = tiny_run
    import dataclasses

    own = write_synthetic_csv(tmp_path / "mine.csv", n=60, seed=5, with_group=False)
    local_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(own)))
    out = tmp_path / "mine.safetensors"
    glob = run / "rounds" / "global_r2.safetensors"
    res = personalize_local(local_cfg, "shop-z", glob, out, progress=False)
    p = load_payload(out)
    assert p.meta.kind == "personalized" and p.meta.client_id == "shop-z" and p.meta.num_examples == res.num_examples
    assert res.val_global is not None  # its validation slice picked the checkpoint
    assert res.selection == "validation" and p.meta.metrics["selection"] == "validation"
    assert p.meta.metrics["best_step"] == res.best_step
    validate_update(p, fed.spec(None))


def test_sample_rows_are_nested_and_seeded() -> None:
    pos = np.arange(100, 200)
    a, b = sample_rows(pos, 10, 3), sample_rows(pos, 20, 3)
    assert len(a) == 10 and set(a) <= set(b) and set(b) <= set(pos.tolist())
    assert np.array_equal(a, sample_rows(pos, 10, 3)) and not np.array_equal(a, sample_rows(pos, 10, 4))


def test_federation_without_and_cold_start(tiny_run, monkeypatch) -> None:
    cfg, fed, _, tmp = tiny_run
    import lorafed.engine.cold_start as cs

    seen: list[tuple[int, float | None]] = []
    real_report = cs.personalize_report

    def spy(site, state, p, **kw):
        seen.append((p.steps, p.learning_rate))
        return real_report(site, state, p, **kw)

    monkeypatch.setattr(cs, "personalize_report", spy)
    others, k = federation_without(fed, "north")
    assert "north" not in others.partition.client_ids and fed.partition.client_ids[k] == "north"
    assert not set(fed.splits[k].test) & set(others.test_positions.tolist())
    with pytest.raises(ConfigError, match="not in the partition"):
        federation_without(fed, "west")
    res = cold_start(cfg, "north", tmp / "cold", (5, 10, 10_000), fed=fed, local_steps=2, alone_steps=3)
    row = read_metrics(tmp / "cold" / "federation" / "metrics.jsonl")[-1]
    assert "north" not in row["clients"] and len(row["clients"]) == 2
    assert [p["rows"] for p in res["curve"]] == [5, 10, 10_000]
    assert res["curve"][-1]["rows_used"] == len(fed.splits[k].train)
    assert len({p["global"] for p in res["curve"]}) == 1
    assert all(0 <= p[key] <= 1 for p in res["curve"] for key in ("global", "global_tuned", "alone"))
    assert (tmp / "cold" / "cold_start.png").stat().st_size > 1000
    # training alone (3 steps, from the untrained adapter) runs at the training learning rate
    alone_lrs = {lr for steps, lr in seen if steps == 3}
    assert alone_lrs == {cfg.train.learning_rate}


def test_methods_are_defined_once() -> None:
    import typing

    assert set(typing.get_args(pmod.PersonalizeMethod)) == set(pmod.METHOD_ROLES)


def test_bench_scenarios_tiny(tmp_path) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_scenarios

    assert bench_scenarios.main(["--tiny", "--out", str(tmp_path / "results"), "--work", str(tmp_path / "w")]) == 0
    result = json.loads((tmp_path / "results" / "scenarios.json").read_text())
    assert result["mode"] == "tiny" and set(result["settings"]) == {"a", "b"}
    assert result["targets"] and all({"target", "met", "value"} <= set(t) for t in result["targets"])
    for key, s in result["settings"].items():
        assert s["command"].endswith(f"scripts/bench_scenarios.py --tiny --settings {key}")
        assert set(s["personalization"]["methods"]) == {"finetune", "local_head", "prior"}
        diag = s["personalization"]["diagnostics"]["prior, unguarded"]
        assert (diag["method"], diag["min_gain"], diag["confidence"]) == ("prior", 0.0, None)
        assert (
            set(diag["tau"]) == set(diag["clients"])
            and "prior, unguarded (diagnostic)" in (tmp_path / "results" / "scenarios.md").read_text()
        )
        assert (tmp_path / "results" / f"scenarios_cold_{key}.png").is_file()
    md = (tmp_path / "results" / "scenarios.md").read_text()
    assert "cold start" in md and "Reproduce:" in md
    hetero = result["settings"]["a"]["hetero"]
    assert sorted(hetero["ranks"].values()) == [2, 4, 8] and hetero["global_rank"] == 4
    assert set(hetero["runs"]) == {"same", "mixed"} and 0 <= hetero["runs"]["mixed"]["truncation_max"] < 1
    mixed = hetero["runs"]["mixed"]  # one server cut and one start cut to rank 2 per round run
    assert len(mixed["truncation"]) == len(mixed["start_cut"]["2"]) == mixed["rounds_run"] >= 1
    assert mixed["start_cut"]["2"][0] == 0  # round 1 starts from the untrained global: B = 0, no change to cut
    assert hetero["gap"] == mixed["macro_f1"] - hetero["runs"]["same"]["macro_f1"]  # one seed in --tiny
    assert set(hetero["ablation_runs"]) == {"ranks 2 and 4 only"} and "ranks 2 and 4 only" in md
    cont = result["settings"]["a"]["continued"]
    assert cont["new"] == ["east"] and cont["clients"]["east"]["new"] and not cont["clients"]["north"]["new"]
    assert cont["lineage_length"] == 5  # rounds 0-2 with two shops, 3-4 with three: one chain
    assert "b" not in result["settings"] or "hetero" not in result["settings"]["b"]
    names = {t["target"] for t in result["targets"]}
    assert any("mixed LoRA ranks" in n for n in names) and any("continued iteration" in n for n in names)
    # one part again: it replaces that part and keeps the others of the earlier report
    args = ["--tiny", "--parts", "continue", "--settings", "a", "--out", str(tmp_path / "results")]
    assert bench_scenarios.main([*args, "--work", str(tmp_path / "w2")]) == 0
    again = json.loads((tmp_path / "results" / "scenarios.json").read_text())
    assert set(again["settings"]["a"]) >= {"personalization", "cold_start", "hetero", "continued"}
    assert again["settings"]["a"]["command"].endswith("--tiny --parts continue --settings a")
    assert "personalization" in again["settings"]["b"]


def test_personalize_verb_writes_one_adapter_per_client(tiny_config, tmp_path, capsys) -> None:
    from lorafed.cli import main
    from lorafed.config import save_config
    from lorafed.engine.inprocess import simulate
    from lorafed.wire.reader import load_payload

    cfg = tiny_config("federation.rounds=1", "partition.num_clients=2", "federation.min_clients=2")
    run = tmp_path / "run"
    simulate(cfg, run, progress=False)
    save_config(cfg, tmp_path / "cfg.yaml")
    assert main(["personalize", str(run), "--config", str(tmp_path / "cfg.yaml")]) == 2  # method none
    assert "personalize.method is none" in capsys.readouterr().err
    args = ["personalize", str(run), "--config", str(tmp_path / "cfg.yaml"), "personalize.method=local_head"]
    assert main([*args, "personalize.steps=2", "personalize.eval_every=1"]) == 0
    files = sorted(p.name for p in (run / "personalized").glob("*.safetensors"))
    assert files == ["client0.safetensors", "client1.safetensors"]
    assert load_payload(run / "personalized" / "client0.safetensors").meta.kind == "personalized"


def test_local_learning_rate_defaults_to_a_tenth_of_training() -> None:
    """``personalize.learning_rate: null`` takes a tenth of ``train.learning_rate``; a set value wins."""
    assert pmod.personal_learning_rate(PersonalizeConfig("finetune"), 1e-2) == pytest.approx(1e-3)
    assert pmod.personal_learning_rate(PersonalizeConfig("finetune"), 3e-3) == pytest.approx(3e-4)
    assert pmod.personal_learning_rate(PersonalizeConfig("finetune", learning_rate=5e-4), 1e-2) == 5e-4


def _np_log_prior(y: np.ndarray, num_labels: int, smoothing: float) -> np.ndarray:
    """The oracle: log of the smoothed label frequencies, by hand."""
    counts = np.array([(y == c).sum() for c in range(num_labels)], dtype=np.float64)
    return np.log((counts + smoothing) / (len(y) + smoothing * num_labels))


def test_log_prior_by_hand() -> None:
    # counts [2, 1, 0] + 1 = [3, 2, 1] over 3 + 3 = 6
    assert np.allclose(pmod.log_prior(np.array([0, 0, 1]), 3, 1.0), np.log([3 / 6, 2 / 6, 1 / 6]))
    # counts [0, 4] + 0.5 over 4 + 1
    assert np.allclose(pmod.log_prior(np.array([1, 1, 1, 1]), 2, 0.5), np.log([0.5 / 5, 4.5 / 5]))


def test_prior_head_bias_errors() -> None:
    from lorafed.errors import ModelError

    state = {"classifier.weight": torch.zeros(3, 4), "classifier.bias": torch.zeros(3)}
    assert pmod.head_bias_key(state, 3) == "classifier.bias"
    with pytest.raises(ModelError, match=r"exactly one head bias of shape \[5\]"):
        pmod.head_bias_key(state, 5)
    shifted = pmod.prior_adjusted(state, np.array([1.0, -2.0, 0.5]))
    assert torch.equal(shifted["classifier.bias"], torch.tensor([1.0, -2.0, 0.5]))
    assert shifted["classifier.weight"] is state["classifier.weight"] and torch.equal(
        state["classifier.bias"], torch.zeros(3)
    )


def _bias_logits(monkeypatch, z: np.ndarray) -> None:
    """Prediction gives the fixed logits ``z[positions]`` plus the model's current head bias."""
    from lorafed.wire.adapter import get_adapter_state

    def fake(model, rows, positions, batch_size, autocast="none"):
        state = get_adapter_state(model)
        bias = state[pmod.head_bias_key(state, z.shape[1])].numpy().astype(np.float64)
        return z[np.asarray(positions)] + bias

    monkeypatch.setattr("lorafed.metrics.predict_logits", fake)


def test_prior_tau_is_chosen_by_the_adoption_rule(tiny_run, monkeypatch) -> None:
    _, fed, run, _ = tiny_run
    _, glob = final_global(fed, run)
    site = client_site(fed, 0)
    k = len(fed.identity.labels)
    labels = fed.rows.labels.numpy()
    train, val = np.asarray(site.split.train), np.asarray(site.split.val)
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2.0, size=(len(labels), k))  # noisy logits: the prior can fix some rows
    _bias_logits(monkeypatch, z)
    key = pmod.head_bias_key(glob, k)
    b = glob[key].numpy().astype(np.float64)
    lp = _np_log_prior(labels[train], k, 1.0)
    taus = (0.5, 1.0, 2.0, 8.0)
    y = labels[val]
    g = f1_score(y, (z[val] + b).argmax(1), average="macro")
    scores = [f1_score(y, (z[val] + b + t * lp).argmax(1), average="macro") for t in taus]
    # no guard: the best validation score wins (earliest on ties) if it is not below the global's
    p = PersonalizeConfig("prior", min_gain=0.0, confidence=None, prior_taus=taus)
    res = personalize_report(site, glob, p)
    best = max(range(len(taus)), key=lambda i: (scores[i], -i))
    assert scores[best] >= g  # the data must exercise adoption
    assert res.tau == taus[best] and res.adopted and res.steps == 0 and res.selection == "validation"
    assert res.val_global == pytest.approx(g) and res.val_best == pytest.approx(scores[best])
    assert np.allclose(res.tensors[key].numpy(), b + taus[best] * lp, atol=1e-6)
    assert all(torch.equal(glob[n], v) for n, v in res.tensors.items() if n != key)
    assert res.header_metrics()["tau"] == taus[best]
    # under the min_gain rule (prior_margin null), a gain no candidate can reach keeps the global adapter
    res = personalize_report(site, glob, dataclasses.replace(p, min_gain=1.0, prior_margin=None))
    assert res.tau is None and not res.adopted and all(torch.equal(glob[n], res.tensors[n]) for n in glob)


def test_prior_cross_fit_uses_out_of_fold_priors(tiny_run, monkeypatch) -> None:
    _, fed, run, _ = tiny_run
    _, glob = final_global(fed, run)
    k = len(fed.identity.labels)
    labels = fed.rows.labels.numpy()
    own = np.asarray(fed.splits[0].train)
    # a skewed client: every train row of label 0, a few of label 1, none of label 2
    train = np.sort(np.concatenate([own[labels[own] == 0], own[labels[own] == 1][:3]]))
    site = client_site(fed, 0, Split(train, np.empty(0, np.int64), fed.splits[0].test))
    b = glob[pmod.head_bias_key(glob, k)].numpy().astype(np.float64)
    # logits that lean to label 2, which this client never holds: its prior undoes that
    lean = np.array([0.0, 0.0, 1.5])
    z = np.eye(k)[labels] + np.random.default_rng(1).normal(0, 1.0, size=(len(labels), k)) + lean - b
    _bias_logits(monkeypatch, z)
    p = PersonalizeConfig("prior", min_gain=0.0, confidence=None, prior_taus=(1.0,), cross_fit=2)
    res = personalize_report(site, glob, p)
    perm, folds = pmod._folds(site, len(train), 2)
    oof = np.empty(len(train), dtype=np.int64)
    for held in folds:
        lp = _np_log_prior(labels[train[np.setdiff1d(perm, held)]], k, 1.0)
        oof[held] = (z[train[held]] + b + lp).argmax(1)
    y = labels[train]
    g, best = f1_score(y, (z[train] + b).argmax(1), average="macro"), f1_score(y, oof, average="macro")
    assert best > g + 0.05  # the data exercise adoption
    assert (res.selection, res.tau, res.adopted) == ("cross_fit", 1.0, True)
    assert res.val_global == pytest.approx(g) and res.val_best == pytest.approx(best)
    key = pmod.head_bias_key(glob, k)
    assert np.allclose(res.tensors[key].numpy(), b + _np_log_prior(labels[train], k, 1.0), atol=1e-6)
    # unjudged (cross_fit 0): tau 1 with the prior of every train row
    res = personalize_report(site, glob, dataclasses.replace(p, cross_fit=0))
    assert (res.tau, res.selection) == (1.0, "last")
    assert np.allclose(res.tensors[key].numpy(), b + _np_log_prior(labels[train], k, 1.0), atol=1e-6)


def test_prior_adapter_exports_and_loads_in_plain_transformers(tiny_run, tiny_model_dir, tmp_path) -> None:
    """A prior-adjusted adapter exports and loads in plain transformers; its logits shift by tau * log(prior)."""
    from transformers import AutoModelForSequenceClassification

    from lorafed.client.personalize import personalized_meta
    from lorafed.wire.payload import save_payload

    _, fed, run, _ = tiny_run
    r, glob = final_global(fed, run)
    train = np.asarray(fed.splits[1].train)
    site = client_site(fed, 1, Split(train, np.empty(0, np.int64), fed.splits[1].test))
    p = PersonalizeConfig("prior", cross_fit=0, prior_smoothing=0.5)  # unjudged: tau = 1
    res = personalize_report(site, glob, p)
    assert res.tau == 1.0
    k = len(fed.identity.labels)
    expected_shift = res.tau * _np_log_prior(fed.rows.labels.numpy()[train], k, 0.5)
    logits = {}
    for name, state, meta in (
        ("global", glob, fed.identity.meta("server", r, 1)),
        ("prior", res.tensors, personalized_meta(fed.identity, site.client_id, r, res)),
    ):
        save_payload(tmp_path / f"{name}.safetensors", state, meta)
        export_adapter(
            load_payload(tmp_path / f"{name}.safetensors"), tmp_path / name, str(tiny_model_dir), with_onnx=False
        )
        model = AutoModelForSequenceClassification.from_pretrained(tmp_path / name).eval()
        ids = torch.randint(5, 100, (6, 10), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits[name] = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.double().numpy()
    assert np.allclose(logits["prior"] - logits["global"], expected_shift[None, :], atol=1e-5)
    assert np.abs(expected_shift).max() > 0.5  # a shift the check can see


def test_errors_into_unheld_labels_by_hand() -> None:
    from lorafed.engine.scenarios import _errors

    cm = [[5, 1, 2], [0, 3, 0], [1, 0, 4]]  # off the diagonal: 1 + 2 + 1 = 4; into label 2: 2
    assert _errors(cm, np.array([False, False, True])) == {"wrong": 4, "into_unheld": 2}
    assert _errors(cm, np.array([True, False, False])) == {"wrong": 4, "into_unheld": 1}


def test_prior_margin_is_a_non_inferiority_rule() -> None:
    # 40 rows, 20 per class; the global adapter is right everywhere (macro-F1 1).
    y = np.array([0, 1] * 20)
    same = y.copy()
    p = PersonalizeConfig("prior", min_gain=0.02, confidence=0.95, bootstrap=2000)
    # A candidate no worse on any row: every resample's gain is 0, a bound of 0 > -0.01: adopted.
    ok = pmod.choose_adapter(y, y, [same], 2, p, seed=3, margin=0.01)
    assert ok.index == 0 and ok.bound == 0.0 and ok.scores == [1.0]
    # The superiority rule (min_gain 0.02) refuses the same candidate: nothing to gain on these rows.
    assert pmod.choose_adapter(y, y, [same], 2, p, seed=3).index is None
    # One row worse: below the global's score, refused whatever the bound.
    worse = y.copy()
    worse[0] = 1
    assert pmod.choose_adapter(y, y, [worse], 2, p, seed=3, margin=0.5).index is None
    # Equal scores, different rows: the global errs on row 0 (a 0 called 1), the candidate on row 1
    # (a 1 called 0); the same macro-F1 on all rows, but the paired gain swings in the resamples.
    old, new = y.copy(), y.copy()
    old[0], new[1] = 1, 0
    assert f1_score(y, new, average="macro") == pytest.approx(f1_score(y, old, average="macro"))
    idx = np.random.default_rng(3).integers(0, 40, size=(2000, 40))  # the resamples, drawn as documented
    gains = [f1_score(y[i], new[i], average="macro") - f1_score(y[i], old[i], average="macro") for i in idx]
    bound = float(np.quantile(gains, 0.05))
    assert bound < -0.01  # by sklearn on the same resamples: the swing is larger than the margin
    tie = pmod.choose_adapter(y, old, [new], 2, p, seed=3, margin=0.01)
    assert tie.index is None and tie.bound == pytest.approx(bound)
    assert pmod.choose_adapter(y, old, [new], 2, p, seed=3, margin=-bound + 1e-6).index == 0
