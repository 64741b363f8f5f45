"""Record-level DP-SGD in each client (lorafed.client.dp) and the membership-inference audit script."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lorafed.client.dp import clip_and_weight_rows, clip_groups, epsilon_spent, make_private, plan_record_dp
from lorafed.client.train import fixed_class_weights
from lorafed.config import load_config
from lorafed.errors import ConfigError, PrivacyBudgetError

ROOT = Path(__file__).resolve().parents[1]
DP = ["train.record_dp.enabled=true", "train.record_dp.noise_seed=7"]


@pytest.mark.parametrize(
    ("q", "z", "steps", "delta"),
    [(0.01, 1.1, 1000, 1e-5), (0.1, 2.0, 300, 1e-6)],
)
def test_opacus_rdp_epsilon_matches_dp_accounting(q: float, z: float, steps: int, delta: float) -> None:
    """Opacus' RDP accountant (what lorafed reports) against Google's dp_accounting RDP accountant.

    Two independent implementations of the sampled Gaussian mechanism's RDP and of the
    RDP -> (epsilon, delta) conversion, on the same Rényi orders, agree within 1 %.
    """
    rdp = pytest.importorskip("dp_accounting.rdp")
    from dp_accounting import dp_event
    from opacus.accountants import RDPAccountant

    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # Opacus' default orders
    ref = rdp.RdpAccountant(orders)
    ref.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), steps)
    expected = ref.get_epsilon(delta)
    acc = RDPAccountant()
    acc.history = [(z, q, steps)]
    assert acc.get_epsilon(delta, alphas=orders) == pytest.approx(expected, rel=0.01)
    assert epsilon_spent(z, q, steps, delta) == pytest.approx(expected, rel=0.01)
    # the PRV accountant is tighter than RDP, never looser
    assert epsilon_spent(z, q, steps, delta, "prv") <= epsilon_spent(z, q, steps, delta) + 1e-6


def test_epsilon_grows_with_steps_and_is_zero_before_training() -> None:
    assert epsilon_spent(1.0, 0.1, 0, 1e-5) == 0.0
    assert epsilon_spent(0.0, 0.1, 5, 1e-5) == math.inf
    assert epsilon_spent(1.0, 0.1, 10, 1e-5) < epsilon_spent(1.0, 0.1, 20, 1e-5)


def per_row_grads(lin: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """By hand, in float64: each row's cross-entropy gradient of ``lin``'s weight, (p - y) x^T, and bias, p - y."""
    w, b = lin.weight.detach().numpy().astype(np.float64), lin.bias.detach().numpy().astype(np.float64)
    xs = x.numpy().astype(np.float64)
    logits = xs @ w.T + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    err = p - np.eye(w.shape[0])[y.numpy()]  # d ce_i / d logits_i
    return err[:, :, None] * xs[:, None, :], err


def test_per_sample_clipping_matches_a_hand_computed_linear_model() -> None:
    """With z = 0 the DP gradient is sum_i clip_C(g_i) / expected batch, g_i by hand for softmax regression."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    x = torch.tensor([[0.1, -0.2, 0.3], [4.0, 1.0, -3.0], [-0.5, 0.5, 0.0], [10.0, -10.0, 5.0]])
    y = torch.tensor([0, 1, 1, 0])
    clip, expected_batch = 0.8, 5.0
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    gsm, dp_opt = make_private(lin, opt, noise_multiplier=0.0, clip_norm=clip, expected_batch_size=expected_batch)
    lin.train()
    torch.nn.functional.cross_entropy(gsm(x), y).backward()
    assert dp_opt.pre_step()

    g_w, g_b = per_row_grads(lin, x, y)
    norms = np.sqrt((g_w**2).sum((1, 2)) + (g_b**2).sum(1))
    assert (norms > clip).sum() >= 2  # the test clips some examples and not others
    assert (norms < clip).sum() >= 1
    factor = np.minimum(1.0, clip / (norms + 1e-6))
    np.testing.assert_allclose(lin.weight.grad_sample.numpy(), g_w, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        lin.weight.grad.numpy(), (factor[:, None, None] * g_w).sum(0) / expected_batch, rtol=1e-4
    )
    np.testing.assert_allclose(lin.bias.grad.numpy(), (factor[:, None] * g_b).sum(0) / expected_batch, rtol=1e-4)
    clipped = np.sqrt((((factor[:, None, None] * g_w) ** 2).sum((1, 2))) + ((factor[:, None] * g_b) ** 2).sum(1))
    assert clipped.max() <= clip + 1e-6
    gsm.cleanup()
    assert not hasattr(lin.weight, "grad_sample")


def test_class_weights_scale_each_clipped_row_by_hand() -> None:
    """sum_i (w_yi / max w) clip_C(g_i) / expected batch, g_i by hand: the weight survives the clip.

    Every row here is clipped (C = 0.05), so a weight inside the loss would be undone; the
    weights 4 and 1 keep their ratio only if applied after the clip.
    """
    torch.manual_seed(1)
    lin = torch.nn.Linear(2, 2)
    x = torch.tensor([[1.0, 2.0], [-3.0, 0.5], [0.5, -1.0]])
    y = torch.tensor([1, 0, 1])
    clip, expected_batch = 0.05, 3.0
    gsm, dp_opt = make_private(lin, torch.optim.SGD(lin.parameters(), lr=0.1), 0.0, clip, expected_batch)
    lin.train()
    torch.nn.functional.cross_entropy(gsm(x), y).backward()
    weights = torch.tensor([4.0, 1.0])  # label 0 weighs 4: scaled to 1, label 1 to 0.25
    clip_and_weight_rows(dp_opt.params, clip, (weights / weights.max())[y])
    assert dp_opt.pre_step()

    g_w, g_b = per_row_grads(lin, x, y)
    norms = np.sqrt((g_w**2).sum((1, 2)) + (g_b**2).sum(1))
    assert (norms > clip).all()
    factor = clip / norms * np.array([0.25, 1.0, 0.25])
    # rtol 1e-3: the two bias rows of a 2-class head cancel to a small sum (float32 vs float64)
    np.testing.assert_allclose(
        lin.weight.grad.numpy(), (factor[:, None, None] * g_w).sum(0) / expected_batch, rtol=1e-3
    )
    np.testing.assert_allclose(lin.bias.grad.numpy(), (factor[:, None] * g_b).sum(0) / expected_batch, rtol=1e-3)
    gsm.cleanup()


def test_class_weights_config_and_vector(tiny_config) -> None:
    """Fixed weights pass under DP (balanced is refused), resolve by label name, and are checked."""
    cfg = tiny_config(*DP, "train.record_dp.noise_multiplier=1.0", 'train.class_weights={"a": 2.0}')
    assert cfg.train.class_weights == {"a": 2.0}
    model = SimpleNamespace(config=SimpleNamespace(num_labels=3, label2id={"a": 0, "b": 1, "c": 2}))
    assert fixed_class_weights({"c": 0.5, "a": 2.0}, model).tolist() == [2.0, 1.0, 0.5]
    with pytest.raises(ConfigError, match=r"\['z'\] are not labels of this model"):
        fixed_class_weights({"z": 1.0}, model)
    with pytest.raises(ConfigError, match="every weight must be > 0"):
        tiny_config('train.class_weights={"a": 0}')
    with pytest.raises(ConfigError, match="not both"):
        tiny_config('train.class_weights={"a": 2}', "train.class_weighting=balanced")


def test_config_checks(tiny_config) -> None:
    with pytest.raises(ConfigError, match="exactly one of noise_multiplier and target_epsilon"):
        tiny_config("train.record_dp.enabled=true")
    with pytest.raises(ConfigError, match="class_weighting: must be none"):
        tiny_config(*DP, "train.record_dp.noise_multiplier=1.0", "train.class_weighting=balanced")
    with pytest.raises(ConfigError, match=r"record_dp\.delta"):
        tiny_config(*DP, "train.record_dp.noise_multiplier=1.0", "train.record_dp.delta=2")


def test_length_bucketing_is_refused_with_the_key_to_set() -> None:
    """The clothing config buckets by length; adding record_dp overrides names the fix, which then loads."""
    path = ROOT / "configs" / "clothing_recommend.yaml"
    dp = ["train.record_dp.enabled=true", "train.record_dp.target_epsilon=8", "train.class_weighting=none"]
    with pytest.raises(ConfigError) as info:
        load_config(path, dp)
    problems = [p for p in info.value.problems if "length_bucketing" in p]
    assert len(problems) == 1 and "train.record_dp.enabled" in problems[0]
    assert problems[0].endswith("set train.length_bucketing=false")
    cfg = load_config(path, [*dp, "train.length_bucketing=false"])
    assert cfg.train.record_dp.enabled and not cfg.train.length_bucketing
    with pytest.raises(ConfigError, match=r"set train\.class_weighting=none"):
        load_config(path, [*dp[:2], "train.length_bucketing=false"])


def _one_full_batch_step(tiny_config, *overrides: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One DP step with q = 1 (every row), z = 0 and no per-row clipping; return (update, plain gradient).

    The plain gradient is the oracle: torch autograd of the batch-mean loss, without Opacus.
    """
    from lorafed.client.dp import RecordDPPlan, train_local_dp
    from lorafed.engine.cohort import prepare_cohort

    fed = prepare_cohort(tiny_config(*overrides))
    model, cfg = fed.client.model, fed.config.train
    pos = fed.splits[0].train[:6]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    model.eval()  # dropout off: what train_local_dp runs with backbone_dropout false and lora dropout 0
    model.zero_grad(set_to_none=True)
    batch = fed.rows.batch(pos)
    labels = batch.pop("labels")
    torch.nn.functional.cross_entropy(model(**batch).logits.float(), labels).backward()
    grad = {n: params[n].grad.detach().double().numpy().copy() for n in names}
    model.zero_grad(set_to_none=True)
    before = {n: params[n].detach().double().numpy().copy() for n in names}
    plan = RecordDPPlan(0.0, 1e6, 1.0, 1, 1e-5, math.inf, noise_seed=0, num_rows=len(pos))
    train_local_dp(model, fed.rows, pos, cfg, 0, plan, progress=False)
    update = {n: params[n].detach().double().numpy() - before[n] for n in names}
    return update, grad


def test_sgd_optimizer_is_honoured_under_dp(tiny_config) -> None:
    """train.optimizer=sgd under DP: one step is -lr x the mean gradient (AdamW's first step is -lr x sign)."""
    lr = 0.05
    over = [*DP, "train.record_dp.noise_multiplier=1.0", f"train.learning_rate={lr}", "train.max_grad_norm=null"]
    update, grad = _one_full_batch_step(tiny_config, *over, "train.optimizer=sgd", "train.momentum=0.0")
    for n in grad:
        np.testing.assert_allclose(update[n], -lr * grad[n], rtol=1e-3, atol=1e-7)
    update, grad = _one_full_batch_step(tiny_config, *over)  # AdamW: each coordinate moves by about lr
    big = np.concatenate([np.abs(g).ravel() for g in grad.values()]) > 1e-4
    moved = np.concatenate([np.abs(u).ravel() for u in update.values()])
    np.testing.assert_allclose(moved[big], lr, rtol=1e-2)


def test_max_grad_norm_clips_the_noisy_gradient(tiny_config) -> None:
    """train.max_grad_norm under DP clips the (here noiseless) mean gradient: the SGD step has norm lr x max."""
    lr, cap = 0.05, 1e-3
    over = [*DP, "train.record_dp.noise_multiplier=1.0", f"train.learning_rate={lr}", "train.optimizer=sgd"]
    update, grad = _one_full_batch_step(tiny_config, *over, "train.momentum=0.0", f"train.max_grad_norm={cap}")
    g = np.concatenate([v.ravel() for v in grad.values()])
    u = np.concatenate([v.ravel() for v in update.values()])
    assert np.linalg.norm(g) > 10 * cap  # the cap binds
    assert np.linalg.norm(u) == pytest.approx(lr * cap, rel=1e-3)
    # fp32 weights of size ~0.1 carry ~1e-8 of rounding on each coordinate's update
    np.testing.assert_allclose(u, -lr * cap * g / np.linalg.norm(g), rtol=1e-3, atol=1e-8)


def test_max_grad_norm_below_the_noise_warns(tiny_config, caplog) -> None:
    """The noise alone (z C sqrt(d) / B) above train.max_grad_norm: a warning with its norm; none with null."""
    import dataclasses
    import logging

    from lorafed.client.dp import RecordDPPlan, _warn_clipped_noise, train_local_dp
    from lorafed.engine.cohort import prepare_cohort

    fed = prepare_cohort(tiny_config(*DP, "train.record_dp.noise_multiplier=1.0", "train.max_grad_norm=0.5"))
    model, cfg = fed.client.model, fed.config.train
    pos = fed.splits[0].train[:10]
    d = sum(p.numel() for p in model.parameters() if p.requires_grad)
    z = 2.0
    plan = RecordDPPlan(z, 1.0, 1.0, 1, 1e-5, math.inf, noise_seed=0, num_rows=len(pos))  # q = 1: B = 10
    expected = z * 1.0 * math.sqrt(d) / len(pos)
    assert expected > 0.5
    _warn_clipped_noise.cache_clear()
    with caplog.at_level(logging.WARNING, logger="lorafed.client.dp"):
        train_local_dp(model, fed.rows, pos, cfg, 0, plan, progress=False)
    assert f"norm ~{expected:.2f}" in caplog.text and "train.max_grad_norm=null" in caplog.text
    caplog.clear()
    _warn_clipped_noise.cache_clear()
    with caplog.at_level(logging.WARNING, logger="lorafed.client.dp"):
        train_local_dp(model, fed.rows, pos, dataclasses.replace(cfg, max_grad_norm=None), 0, plan, progress=False)
        train_local_dp(
            model, fed.rows, pos, dataclasses.replace(cfg, max_grad_norm=expected * 1.01), 0, plan, progress=False
        )
    assert "the noise alone" not in caplog.text


def test_plan_calibrates_to_target_and_stops_at_budget(tiny_config) -> None:
    """A target epsilon is met after federation.rounds rounds; the next round is refused."""
    cfg = tiny_config(*DP, "train.record_dp.target_epsilon=4.0", "federation.rounds=3")
    plan = plan_record_dp(cfg.train, 100, cfg.federation.rounds)
    assert plan.sample_rate == pytest.approx(8 / 100)
    assert plan.steps_per_round == 3
    assert plan.delta == pytest.approx(1 / 1000)  # delta: null -> 1 / (10 n)
    assert plan.max_epsilon == 4.0  # max_epsilon: null -> target_epsilon
    eps3 = plan.check_budget(3, "c0")
    assert 3.9 < eps3 <= 4.0
    with pytest.raises(PrivacyBudgetError, match=r"client 'c0' refuses round 4: its privacy budget would be exceeded"):
        plan.check_budget(4, "c0")


def test_client_refuses_round_past_budget_before_training(tiny_config) -> None:
    from lorafed.engine.cohort import prepare_cohort

    cfg = tiny_config(*DP, "train.record_dp.noise_multiplier=0.5", "train.record_dp.max_epsilon=0.1")
    fed = prepare_cohort(cfg)
    before = {k: v.clone() for k, v in fed.initial_state.items()}
    with pytest.raises(PrivacyBudgetError, match="privacy budget would be exceeded") as info:
        fed.client_update(fed.initial_state, 0, 1, progress=False)
    assert info.value.epsilon > 0.1 and info.value.round == 1
    assert all(torch.equal(before[k], fed.initial_state[k]) for k in before)


@pytest.mark.parametrize(
    ("aggregation", "precision", "round_"),
    [("fedavg", "fp32", 1), ("ffa", "int8", 1), ("rolora", "int8", 2), ("head", "int8", 1)],
)
def test_dp_client_step_reports_epsilon_and_differs(tiny_config, aggregation: str, precision: str, round_: int) -> None:
    """A DP round through client_step on the tiny model (int8 backbone too, every aggregation mode)."""
    from lorafed.engine.cohort import prepare_cohort

    base = [f"federation.aggregation={aggregation}", f"model.precision={precision}"]
    plain = prepare_cohort(tiny_config(*base))
    ref = plain.client_update(plain.initial_state, 0, round_, progress=False)
    fed = prepare_cohort(tiny_config(*base, *DP, "train.record_dp.noise_multiplier=1.0"))
    upd = fed.client_update(fed.initial_state, 0, round_, progress=False)

    n = len(fed.splits[0].train)
    m = upd.meta.metrics
    assert m["delta"] == pytest.approx(1 / (10 * n))
    assert m["epsilon"] == pytest.approx(epsilon_spent(1.0, 8 / n, 3 * round_, 1 / (10 * n)))
    assert m["dp_steps"] == 3 * round_ and m["noise_multiplier"] == 1.0
    assert upd.result.steps == 3 and upd.result.privacy == {k: m[k] for k in upd.result.privacy}
    assert set(upd.tensors) == set(ref.tensors)
    assert any(not torch.allclose(upd.tensors[k], ref.tensors[k]) for k in ref.tensors)
    trained = [k for k in upd.tensors if not torch.equal(upd.tensors[k], fed.initial_state[k])]
    assert trained  # the DP step moved the round's tensors
    # Opacus' hooks and per-sample attributes are gone: the shared model trains the next client cleanly
    model = fed.client.model
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "summed_grad") for p in model.parameters())
    assert not hasattr(model, "autograd_grad_sample_hooks")
    again = fed.client_update(fed.initial_state, 0, round_, progress=False)
    assert all(torch.equal(again.tensors[k], upd.tensors[k]) for k in upd.tensors)  # noise_seed: reproducible


def test_int8_backbone_has_no_trainable_tensors_outside_lora_and_head(tiny_config) -> None:
    """Opacus hooks only modules with trainable tensors: in the int8 model those are LoRA and the head."""
    from lorafed.model.backbone import load_client_model

    cfg = tiny_config("model.precision=int8")
    model = load_client_model(cfg.model, ("a", "b", "c"), 0).model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
    gsm, _ = make_private(
        model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1), 1.0, 1.0, 4
    )
    hooked = {type(m).__name__ for m in model.modules() if m._forward_hooks}
    assert hooked == {"Linear"}  # lora_A, lora_B and the head's Linear; no int8 layer
    gsm.cleanup()
    assert not any(m._forward_hooks for m in model.modules())


def test_audit_script_tiny(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("audit_privacy", ROOT / "scripts" / "audit_privacy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--tiny", "--out", str(tmp_path / "audit")])
    result = json.loads((tmp_path / "audit.json").read_text())
    settings = [r["setting"] for r in result["rows"]]
    assert settings == ["no DP", "epsilon 8", "epsilon 3", "epsilon 1"]
    for row in result["rows"]:
        for target in ("global", "client_update"):
            assert 0.0 <= row[target]["auc"] <= 1.0 and 0.0 <= row[target]["tpr_at_1pct_fpr"] <= 1.0
        assert row["macro_f1"] is not None
    eps = [r["epsilon_spent"] for r in result["rows"][1:]]
    assert eps[0] <= 8.0 and eps[1] <= 3.0 and eps[2] <= 1.0
    assert (tmp_path / "audit.md").read_text().count("|") > 10
    rows = result["rows"]
    strongest = [max(r["global"]["auc"], r["global_lira"]["auc"]) for r in rows]
    auc8 = strongest[1]
    assert [t["value"] for t in result["targets"]] == [strongest[0], auc8]
    assert all(r["global_lira"]["shadows"] == 2 and 0 <= r["global_lira"]["auc"] <= 1 for r in rows)
    assert result["targets"][1]["met"] == (auc8 <= 0.55)
    assert (tmp_path / "audit.png").stat().st_size > 0


def test_dp_record_accuracy_script_tiny(tmp_path: Path) -> None:
    """scripts/dp_record_accuracy.py --tiny: every level of both settings, epsilon within target, targets judged."""
    spec = importlib.util.spec_from_file_location("dp_record_accuracy", ROOT / "scripts" / "dp_record_accuracy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--tiny", "--seeds", "1", "--out", str(tmp_path / "dprec")]) == 0
    result = json.loads((tmp_path / "dprec.json").read_text())
    assert list(result["settings"]) == ["a", "b"]
    assert result["settings"]["a"]["recipe"][-1].startswith("model.whitening=<fitted on the validation rows")
    for s in result["settings"].values():
        assert "train.length_bucketing=false" in s["overrides"] and "train.class_weighting=none" in s["overrides"]
        assert list(s["summary"]) == ["no DP", "eps 8", "eps 3", "eps 1"]
        runs = s["seeds"]["0"]
        for name, target in (("eps 8", 8.0), ("eps 3", 3.0), ("eps 1", 1.0)):
            assert 0 < runs[name]["epsilon_max"] <= target
            assert runs[name]["failed_clients"] == 0 and 1 <= runs[name]["rounds_run"] <= s["rounds_cap"]
            cost = s["summary"][name]["cost_points"]["mean"]
            assert cost == pytest.approx(100 * (runs["no DP"]["macro_f1"] - runs[name]["macro_f1"]))
        assert s["summary"]["eps 1"]["noise_multiplier"][0] > s["summary"]["eps 8"]["noise_multiplier"][0]
    targets = result["targets"]
    assert [t["target"] for t in targets] == [
        "epsilon 8 costs <= 2 points on clothing",
        "epsilon 3 costs <= 4 points on clothing",
    ]
    for t, limit in zip(targets, (2.0, 4.0), strict=True):
        assert t["met"] == (t["value"] <= limit)
    assert (tmp_path / "dprec.md").read_text().count("| eps ") == 6
    assert (tmp_path / "dprec.png").stat().st_size > 0


def test_dp_record_accuracy_levels_and_merge(tmp_path: Path) -> None:
    """--levels runs a subset; --merge adds a later command's runs to the report and judges both targets."""
    spec = importlib.util.spec_from_file_location("dp_record_accuracy", ROOT / "scripts" / "dp_record_accuracy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "dprec"
    common = ["--tiny", "--settings", "a", "--seeds", "1", "--out", str(out)]
    assert mod.main([*common, "--levels", "none,8"]) == 0
    first = json.loads(out.with_suffix(".json").read_text())
    assert list(first["settings"]["a"]["summary"]) == ["no DP", "eps 8"]
    assert [t["target"] for t in first["targets"]] == ["epsilon 8 costs <= 2 points on clothing"]
    assert mod.main([*common, "--levels", "3,plain", "--merge"]) == 0
    merged = json.loads(out.with_suffix(".json").read_text())
    s = merged["settings"]["a"]
    assert list(s["summary"]) == ["no DP", "eps 8", "eps 3", "no DP, plain LoRA"]
    runs = s["seeds"]["0"]
    assert runs["no DP"] == first["settings"]["a"]["seeds"]["0"]["no DP"]  # kept from the first command
    assert "cost_points" not in s["summary"]["no DP, plain LoRA"]
    same_recipe, against_plain = merged["targets"][:2], merged["targets"][2:]
    for name, t in zip(("eps 8", "eps 3"), same_recipe, strict=True):
        assert t["value"] == pytest.approx(100 * (runs["no DP"]["macro_f1"] - runs[name]["macro_f1"]))
    for name, t in zip(("eps 8", "eps 3"), against_plain, strict=True):
        assert "against plain LoRA" in t["target"]
        assert t["value"] == pytest.approx(100 * (runs["no DP, plain LoRA"]["macro_f1"] - runs[name]["macro_f1"]))
    assert len(merged["command"]) == 2 and "--merge" in merged["command"][1]
    text = out.with_suffix(".md").read_text()
    assert text.count("| eps ") == 2 and "| no DP, plain LoRA |" in text and "Without DP the recipe is" in text
    with pytest.raises(SystemExit):
        mod.main([*common, "--levels", "2"])
    # Another recipe (--set) is refused by --merge unless --replace, which starts (a) over.
    other = [*common, "--levels", "none", "--set", "train.learning_rate=0.002", "--merge"]
    with pytest.raises(SystemExit):
        mod.main(other)
    # So is another round cap or patience: runs stopped at another cap do not share a table.
    for key in ("rounds", "patience"):
        before = mod.TINY["a"][key]
        mod.TINY["a"][key] = before + 1
        try:
            with pytest.raises(SystemExit):
                mod.main([*common, "--levels", "none", "--merge"])
        finally:
            mod.TINY["a"][key] = before
    assert mod.main([*other, "--replace"]) == 0
    replaced = json.loads(out.with_suffix(".json").read_text())
    s = replaced["settings"]["a"]
    # The recipe's runs start over; the plain reference does not depend on the recipe and is kept,
    # with the command that ran it.
    assert list(s["summary"]) == ["no DP", "no DP, plain LoRA"] and "train.learning_rate=0.002" in s["recipe"]
    assert s["seeds"]["0"]["no DP, plain LoRA"] == runs["no DP, plain LoRA"]
    assert s["seeds"]["0"]["no DP"] != runs["no DP"]
    assert len(replaced["command"]) == 2 and "3,plain" in replaced["command"][0]
    assert "--replace" in replaced["command"][1]
    # --first-seed adds seed 1 to seed 0's runs; the mean is then over both seeds.
    seed1 = [a if a != "1" else "2" for a in other[:-1]] + ["--first-seed", "1", "--merge"]
    assert seed1[seed1.index("--seeds") + 1] == "2"
    t0 = time.perf_counter()
    assert mod.main(seed1) == 0
    elapsed = time.perf_counter() - t0
    report = json.loads(out.with_suffix(".json").read_text())
    # The wall time adds this command's to the earlier ones' once (it once doubled at every merge).
    assert replaced["wall_seconds"] < report["wall_seconds"] <= replaced["wall_seconds"] + elapsed
    both = report["settings"]["a"]
    assert sorted(both["seeds"]) == ["0", "1"] and both["seeds"]["0"] == s["seeds"]["0"]
    f1 = [both["seeds"][k]["no DP"]["macro_f1"] for k in ("0", "1")]
    assert both["summary"]["no DP"]["macro_f1"]["mean"] == pytest.approx(sum(f1) / 2)


def test_per_role_clipping_bounds_each_group_by_hand() -> None:
    """``per_role``: each group is clipped to C / sqrt(k) on its own, then weighted; numpy oracle."""
    rng = np.random.default_rng(3)
    lora = torch.nn.Parameter(torch.zeros(2, 3))
    head = torch.nn.Parameter(torch.zeros(4))
    g_lora = rng.normal(scale=0.02, size=(3, 2, 3)).astype(np.float32)  # small rows: some under the bound
    g_lora[0] *= 100.0  # one large row: clipped
    g_head = rng.normal(scale=2.0, size=(3, 4)).astype(np.float32)  # every row clipped
    lora.grad_sample = torch.from_numpy(g_lora.copy())
    head.grad_sample = torch.from_numpy(g_head.copy())
    clip = 0.5
    weights = np.array([1.0, 0.25, 1.0], dtype=np.float32)
    clip_and_weight_rows([lora, head], clip, torch.from_numpy(weights), groups=[0, 1])

    bound = clip / np.sqrt(2)
    n_lora = np.sqrt((g_lora**2).sum((1, 2)))
    n_head = np.sqrt((g_head**2).sum(1))
    assert (n_lora < bound).sum() == 2 and (n_head > bound).all()
    f_lora = np.minimum(1.0, bound / n_lora) * weights
    f_head = np.minimum(1.0, bound / n_head) * weights
    np.testing.assert_allclose(lora.grad_sample.numpy(), f_lora[:, None, None] * g_lora, rtol=1e-5)
    np.testing.assert_allclose(head.grad_sample.numpy(), f_head[:, None] * g_head, rtol=1e-5)
    total = np.sqrt((lora.grad_sample.numpy() ** 2).sum((1, 2)) + (head.grad_sample.numpy() ** 2).sum(1))
    assert total.max() <= clip * (1 + 1e-5)  # the row's sensitivity is unchanged


def test_clip_groups_follow_the_tensor_roles() -> None:
    """One group per role present, in a fixed order; ``flat`` gives no groups."""
    names = [
        "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.default.weight",
        "base_model.model.classifier.modules_to_save.default.weight",
        "base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.default.weight",
        "base_model.model.classifier.modules_to_save.default.bias",
    ]
    assert clip_groups(names, "flat") is None
    groups = clip_groups(names, "per_role")
    assert groups[0] == groups[2] and groups[1] == groups[3] and groups[0] != groups[1]


def test_per_role_clipping_is_a_config_choice(tiny_config) -> None:
    """``train.record_dp.clipping`` takes flat or per_role and refuses anything else."""
    cfg = tiny_config(*DP, "train.record_dp.noise_multiplier=1.0", "train.record_dp.clipping=per_role")
    assert cfg.train.record_dp.clipping == "per_role"
    with pytest.raises(ConfigError, match="clipping"):
        tiny_config(*DP, "train.record_dp.noise_multiplier=1.0", "train.record_dp.clipping=layer")


def test_dp_signal_tiny_measures_every_role_and_run(tmp_path) -> None:
    """``scripts/dp_signal.py --tiny``: signal and noise per role and clipping, and one curve per run."""
    spec = importlib.util.spec_from_file_location("dp_signal", ROOT / "scripts" / "dp_signal.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--tiny", "--rows", "12", "--out", str(tmp_path / "sig")]) == 0
    report = json.loads((tmp_path / "sig.json").read_text())
    assert set(report["signal"]) == set(mod.SETS) and set(report["curves"]) == set(mod.RUNS)
    head = report["signal"]["head only"]
    assert set(head["roles"]) == {"head"}
    row = head["roles"]["head"]["flat"]
    # noise per step = z C sqrt(d) / B, by hand from the reported plan
    expected = head["z"] * 1.0 * math.sqrt(head["roles"]["head"]["d"]) / head["expected_batch"]  # C = 1 (config)
    assert row["clip_norm"] == 1.0 and row["noise"] == pytest.approx(expected)
    assert 0.0 <= row["signal"] <= 1.0
    per_role = head["roles"]["head"]["per_role"]
    assert per_role["noise"] == pytest.approx(expected * 0.05)  # the same z at C = 0.05
    assert all(len(c) == 2 for c in report["curves"].values())
    assert (tmp_path / "sig.md").is_file() and (tmp_path / "sig.png").is_file()


def test_dp_signal_mean_norm_counts_only_what_rows_share() -> None:
    """The unbiased mean norm: sqrt of the mean pairwise product, by hand on three rows."""
    spec = importlib.util.spec_from_file_location("dp_signal", ROOT / "scripts" / "dp_signal.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    g = np.array([[1.0, 0.0], [1.0, 2.0], [1.0, -2.0]])
    # pairs: (1,2) 1, (1,3) 1, (2,3) 1 - 4 = -3 -> mean (1 + 1 - 3) / 3 < 0 -> 0
    assert mod.mean_norm(g) == 0.0
    g = np.array([[2.0, 1.0], [2.0, -1.0], [2.0, 0.0]])
    # pairs: 4 - 1 = 3, 4, 4 -> mean 11 / 3
    assert mod.mean_norm(g) == pytest.approx(math.sqrt(11 / 3))


def test_importing_opacus_leaves_the_root_logger_alone() -> None:
    """Opacus' import-time ``logging.basicConfig`` doubled every log line of a Flower node; not any more."""
    code = (
        "import logging\n"
        "from lorafed.client.dp import calibrate_noise\n"
        "calibrate_noise(8.0, 1e-5, 0.01, 100)\n"
        "import opacus.utils.module_utils\n"  # the module that calls basicConfig: it ran inside lorafed
        "print(len(logging.getLogger().handlers))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "0"
