"""Membership-inference audit of record-level DP: a loss-threshold attack, without DP and at epsilon 8, 3, 1.

For each setting the script runs the federation through the in-process engine and attacks

* the released global adapter (after the last round), and
* one client's update of the last round (the previous global adapter with that client's tensors),

with the loss-threshold attack (Yeom et al. 2018), and the released adapter also with the
likelihood-ratio attack (LiRA, Carlini et al. 2022; ``--shadows`` shadow federations, see
:func:`lira`). Loss threshold: score = -cross-entropy of the true label, so
rows the model was trained on (members: that client's training rows) should score higher than
rows it never saw (non-members: that client's own held-out validation and test rows, so both
sides come from the same department and the attack sees membership, not a shift between
departments; up to ``MAX_ROWS`` of each). It reports the attack's
ROC AUC and its TPR at 1 % FPR (``sklearn.metrics``), next to the global model's macro-F1 and the
epsilon the client reported in its header, in ``<out>.json``, ``<out>.md`` and ``<out>.png``.

Real mode: women's clothing reviews, ``configs/clothing_recommend.yaml`` (6 departments, 5
rounds), with, in every setting, what record-level DP requires (``train.class_weighting=none``,
``train.length_bucketing=false``), the DP recipe (``scripts/_dp_recipe.py``: fixed class weights
from the public prior, the head alone on the whitened mean after layer 4 of reviews up to 128
tokens (the recipe's ``data.max_length``), SGD, batch 256 x 6 steps) and
``federation.max_test_rows=500``. The whitening (``model.whitening``) is fitted on up to 2,000
validation rows of the other clients, never on the attacked client's rows::

    flock /tmp/lorafed-heavy.lock env PYTHONPATH=. python scripts/audit_privacy.py   # -> results/privacy_audit.*

Runtime on 2 cores: the first setting computes every row's feature once (the head-only recipe
keeps them, :mod:`lorafed.model.features`), the others read them; the report has the seconds.
``--time-budget-s`` (default 1,500) starts no setting after it; the results are written after
every setting, so a cut run keeps the settings it ran.

``--tiny`` runs the same code on the tests' tiny random BERT and synthetic reviews in seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lorafed.config import RunConfig, load_config  # noqa: E402
from lorafed.engine.cohort import Cohort, prepare_cohort  # noqa: E402
from lorafed.engine.inprocess import simulate  # noqa: E402
from lorafed.measure import command_line, met_word, target, write_results  # noqa: E402
from lorafed.metrics import predict_logits  # noqa: E402
from lorafed.plots import figure, save_figure  # noqa: E402
from lorafed.wire.adapter import set_adapter_state  # noqa: E402
from lorafed.wire.reader import load_payload  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from _dp_recipe import (  # noqa: E402
    CLOTHING_DP_RECIPE,
    CLOTHING_WHITENING_SHRINKAGE,
    TINY_DP_RECIPE,
    fit_validation_whitening,
)

#: Real mode, every setting: what record-level DP requires (the baseline too), the size cuts, and
#: the DP recipe (scripts/_dp_recipe.py: public class weights, the head on layer 4's mean, its batch), so the no-DP
#: row is the same protocol as the DP rows.
REAL_OVERRIDES = [
    "train.class_weighting=none",
    "train.length_bucketing=false",
    "federation.max_test_rows=500",
    *CLOTHING_DP_RECIPE,
]
#: Members and non-members per attack, at most.
MAX_ROWS = 1000
#: Real mode: the recipe's whitening is fitted on up to this many validation rows of the *other*
#: clients, so neither the attacked client's members nor its non-members shape the feature.
WHITENING_ROWS = 2000
#: (name, target epsilon or None for no DP).
SETTINGS: tuple[tuple[str, float | None], ...] = (
    ("no DP", None),
    ("epsilon 8", 8.0),
    ("epsilon 3", 3.0),
    ("epsilon 1", 1.0),
)


def row_logits(fed: Cohort, state: dict[str, torch.Tensor], positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits under ``state`` (fp32; kept features where the model has them) and the true labels of ``positions``."""
    model = fed.client.model
    set_adapter_state(model, state)
    logits = predict_logits(model, fed.rows, positions, fed.config.train.eval_batch_size)
    labels = fed.rows.labels[torch.as_tensor(np.asarray(positions, dtype=np.int64))]
    return torch.from_numpy(logits).double(), labels


def row_losses(fed: Cohort, state: dict[str, torch.Tensor], positions: np.ndarray) -> np.ndarray:
    """Per-row cross-entropy of the true label under ``state``."""
    logits, labels = row_logits(fed, state, positions)
    return torch.nn.functional.cross_entropy(logits, labels, reduction="none").numpy()


def confidence_logits(fed: Cohort, state: dict[str, torch.Tensor], positions: np.ndarray) -> np.ndarray:
    """LiRA's statistic per row: log(p / (1 - p)) of the true label's probability p (stable form)."""
    logits, labels = row_logits(fed, state, positions)
    true = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return (true - torch.logsumexp(others, dim=1)).numpy()


def attack(member_loss: np.ndarray, nonmember_loss: np.ndarray) -> dict[str, float]:
    """Loss-threshold attack: ROC AUC and TPR at 1 % FPR of score = -loss (members positive)."""
    return attack_scores(-member_loss, -nonmember_loss)


def attack_scores(member_score: np.ndarray, nonmember_score: np.ndarray) -> dict[str, float]:
    """ROC AUC and TPR at 1 % FPR of an attack score (higher: more likely a member; members positive)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.r_[np.ones(len(member_score)), np.zeros(len(nonmember_score))]
    score = np.r_[member_score, nonmember_score]
    fpr, tpr, _ = roc_curve(y, score)
    return {
        "auc": float(roc_auc_score(y, score)),
        "tpr_at_1pct_fpr": float(tpr[fpr <= 0.01].max()) if np.any(fpr <= 0.01) else 0.0,
        "members": len(member_score),
        "nonmembers": len(nonmember_score),
    }


def global_state(run_dir: Path, round_: int) -> dict[str, torch.Tensor]:
    """The global adapter of ``round_`` in ``run_dir``, in fp32."""
    path = run_dir / "rounds" / f"global_r{round_}.safetensors"
    return {key: v.to(torch.float32) for key, v in load_payload(path).decoded().items()}


def lira(
    fed: Cohort,
    config: RunConfig,
    out_dir: Path,
    client: int,
    members: np.ndarray,
    nonmembers: np.ndarray,
    target_phi: np.ndarray,
    shadows: int,
    seed: int,
) -> dict[str, float]:
    """The likelihood-ratio attack (LiRA, Carlini et al. 2022) against the released model.

    The attacker knows the candidate rows (``members`` then ``nonmembers``) and the client's other
    training rows, and reruns the whole federation ``shadows`` times with the same recipe, each
    time with a random half of the candidates in the client's training rows. Per candidate, the
    shadows where it was in and those where it was out give two Gaussians of its confidence logit
    (per-row means, one pooled std each, as the paper does for few shadows); the score of
    ``target_phi`` (the released model's) is the log-likelihood ratio, in over out.
    """
    from scipy.stats import norm

    pool = np.r_[members, nonmembers]
    split = fed.splits[client]
    keep = np.setdiff1d(split.train, members)
    rng = np.random.default_rng(seed + 1)
    phi = np.empty((shadows, len(pool)))
    inside = np.zeros((shadows, len(pool)), dtype=bool)
    for j in range(shadows):
        inside[j] = rng.random(len(pool)) < 0.5
        splits = list(fed.splits)
        splits[client] = dataclasses.replace(split, train=np.sort(np.r_[keep, pool[inside[j]]]))
        run_dir = out_dir / f"shadow{j}"
        summary = simulate(config, run_dir, progress=False, fed=dataclasses.replace(fed, splits=splits))
        phi[j] = confidence_logits(fed, global_state(run_dir, int(summary["final_round"])), pool)

    def fit(mask: np.ndarray) -> tuple[np.ndarray, float]:
        count = mask.sum(0)
        mean = np.where(count > 0, (phi * mask).sum(0) / np.maximum(count, 1), phi[mask].mean())
        return mean, float(np.std((phi - mean)[mask])) + 1e-6

    mu_in, sd_in = fit(inside)
    mu_out, sd_out = fit(~inside)
    score = norm.logpdf(target_phi, mu_in, sd_in) - norm.logpdf(target_phi, mu_out, sd_out)
    out = attack_scores(score[: len(members)], score[len(members) :])
    out["shadows"] = shadows
    return out


def dp_overrides(target: float | None, tiny: bool) -> list[str]:
    """Overrides that turn record-level DP on at ``target`` epsilon (none for ``None``)."""
    if target is None:
        return []
    extra = ["train.record_dp.noise_seed=0"] if tiny else []
    return ["train.record_dp.enabled=true", f"train.record_dp.target_epsilon={target}", *extra]


def audit_setting(
    fed: Cohort, config: RunConfig, out_dir: Path, client: int, seed: int, shadows: int = 0
) -> dict[str, Any]:
    """Run one setting's federation and attack its global adapter and client ``client``'s last update.

    With ``shadows`` > 0, also the likelihood-ratio attack (:func:`lira`) on the global adapter.
    """
    fed = dataclasses.replace(fed, config=config)
    summary = simulate(config, out_dir, progress=False, fed=fed)
    last = int(summary["final_round"])
    cid = fed.partition.client_ids[client]
    split = fed.splits[client]
    rng = np.random.default_rng(seed)
    # The client's own held-out rows: members and non-members from one distribution. (Non-members
    # from the federation's test rows, all departments, gave AUC 0.535-0.539 at every epsilon,
    # epsilon 1 included: the department shift, not membership.)
    held_out = np.setdiff1d(np.concatenate([split.val, split.test]), split.train)
    k = min(len(split.train), len(held_out), MAX_ROWS)
    members = np.sort(rng.choice(split.train, size=k, replace=False))
    nonmembers = np.sort(rng.choice(held_out, size=k, replace=False))
    glob = global_state(out_dir, last)
    prev = global_state(out_dir, last - 1)
    upd = load_payload(out_dir / "rounds" / f"r{last}" / f"{cid}.safetensors")
    local = {**prev, **{key: v.to(torch.float32) for key, v in upd.decoded().items()}}
    extra: dict[str, Any] = {}
    if shadows:
        target_phi = confidence_logits(fed, glob, np.r_[members, nonmembers])
        extra["global_lira"] = lira(fed, config, out_dir, client, members, nonmembers, target_phi, shadows, seed)
    return {
        "client": cid,
        "rounds": last,
        "macro_f1": summary["final"]["macro_f1"],
        "epsilon_spent": upd.meta.metrics.get("epsilon"),
        "delta": upd.meta.metrics.get("delta"),
        "noise_multiplier": upd.meta.metrics.get("noise_multiplier"),
        "global": attack(row_losses(fed, glob, members), row_losses(fed, glob, nonmembers)),
        "client_update": attack(row_losses(fed, local, members), row_losses(fed, local, nonmembers)),
        **extra,
    }


def report(rows: list[dict[str, Any]], mode: str) -> list[str]:
    """The Markdown table."""
    shadows = max((r.get("global_lira", {}).get("shadows", 0) for r in rows), default=0)
    lines = [
        f"# Membership-inference audit of record-level DP ({mode})",
        "",
        "Loss-threshold attack (score = -loss) against the released (global) model and one client's last "
        "update; members: the client's training rows; non-members: the same client's held-out validation and "
        "test rows, as many. AUC 0.5 = the attacker learns nothing.",
    ]
    if shadows:
        lines += [
            "",
            f"LiRA (likelihood-ratio attack, Carlini et al. 2022) against the released model: {shadows} shadow "
            "federations with the same recipe, each training the client on its other rows plus a random half of "
            "the candidates; per candidate, Gaussians of its confidence logit log(p / (1 - p)) in the shadows "
            "that trained on it and in those that did not (per-row means, pooled stds); score = log-likelihood "
            "ratio of the released model's confidence.",
        ]
    lines += [
        "",
        "| setting | epsilon spent (delta) | macro-F1 | global AUC | global TPR@1%FPR | update AUC "
        "| update TPR@1%FPR | LiRA AUC | LiRA TPR@1%FPR |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        eps = "inf" if r["epsilon_spent"] is None else f"{r['epsilon_spent']:.2f} ({r['delta']:.1e})"
        g, u = r["global"], r["client_update"]
        li = r.get("global_lira")
        lira_s = "- | -" if li is None else f"{li['auc']:.3f} | {li['tpr_at_1pct_fpr']:.3f}"
        lines.append(
            f"| {r['setting']} | {eps} | {r['macro_f1']:.3f} | {g['auc']:.3f} | {g['tpr_at_1pct_fpr']:.3f} | "
            f"{u['auc']:.3f} | {u['tpr_at_1pct_fpr']:.3f} | {lira_s} |"
        )
    return lines


def strongest_auc(row: dict[str, Any]) -> float:
    """The released model's highest attack AUC in ``row``: loss threshold or LiRA."""
    return max(row["global"]["auc"], row.get("global_lira", {}).get("auc", 0.0))


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Attack AUC (global, client update) and macro-F1 per setting."""
    fig, ax = figure(figsize=(6, 3.5))
    x = np.arange(len(rows))
    ax.plot(x, [r["global"]["auc"] for r in rows], "o-", label="attack AUC, global")
    ax.plot(x, [r["client_update"]["auc"] for r in rows], "s-", label="attack AUC, client update")
    if all("global_lira" in r for r in rows):
        ax.plot(x, [r["global_lira"]["auc"] for r in rows], "D-", label="LiRA AUC, global")
    ax.plot(x, [r["macro_f1"] for r in rows], "^--", label="macro-F1")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xticks(x, [r["setting"] for r in rows])
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("Membership inference vs record-level DP")
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the audit; return the JSON written."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random BERT and synthetic data (seconds; for tests)")
    ap.add_argument("--out", default=str(ROOT / "results" / "privacy_audit"), help="output path without suffix")
    ap.add_argument("--client", type=int, default=0, help="index of the attacked client")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--time-budget-s", type=float, default=1500, help="start no new setting after this many seconds (0: none)"
    )
    ap.add_argument(
        "--shadows",
        type=int,
        default=None,
        help="shadow federations per setting for the likelihood-ratio attack (default 8; --tiny 2; 0: none)",
    )
    ap.add_argument("--render", action="store_true", help="rewrite the report from <out>.json (no training)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    t0 = time.perf_counter()
    mode = "tiny" if args.tiny else "clothing"
    result: dict[str, Any] = {
        "mode": mode,
        "command": command_line("audit_privacy.py", sys.argv[1:] if argv is None else argv),
        "rows": [],
        "skipped": [],
    }
    if args.render:  # re-render the report of a finished run from its JSON (no training)
        saved = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
        saved.setdefault("command", "flock /tmp/lorafed-heavy.lock env PYTHONPATH=. python scripts/audit_privacy.py")
        save(saved, out, None)
        return saved
    with tempfile.TemporaryDirectory(prefix="audit-") as tmp:
        work = Path(tmp)
        if args.tiny:
            sys.path.insert(0, str(ROOT / "scripts"))
            from _tiny import make_tiny, tiny_overrides

            model_dir, csv = make_tiny(work, rows=240)
            path = ROOT / "configs" / "tiny.yaml"
            base = [*tiny_overrides(model_dir, csv), "federation.rounds=2", *TINY_DP_RECIPE, "train.max_steps=4"]
        else:
            path = ROOT / "configs" / "clothing_recommend.yaml"
            base = list(REAL_OVERRIDES)
        result.update(config=str(path.relative_to(ROOT)), overrides=list(base))
        base.append(f"output_dir={work}")
        fed = prepare_cohort(load_config(path, base))
        if not args.tiny:
            others = np.concatenate([sp.val for i, sp in enumerate(fed.splits) if i != args.client])
            rng = np.random.default_rng(args.seed)
            fit_rows = np.sort(rng.choice(others, size=min(len(others), WHITENING_ROWS), replace=False))
            whitening = work / "whitening.safetensors"
            base.append(fit_validation_whitening(fed, fit_rows, whitening, CLOTHING_WHITENING_SHRINKAGE))
            result["overrides"].append(
                f"model.whitening=<fitted on {len(fit_rows)} validation rows of the other clients, "
                f"shrinkage {CLOTHING_WHITENING_SHRINKAGE}>"
            )
            fed = prepare_cohort(load_config(path, base))
        rows = result["rows"]
        for name, target in SETTINGS:
            if args.time_budget_s and time.perf_counter() - t0 > args.time_budget_s:
                result["skipped"].append(name)
                continue
            cfg = load_config(path, [*base, *dp_overrides(target, args.tiny)])
            shadows = args.shadows if args.shadows is not None else (2 if args.tiny else 8)
            res = audit_setting(fed, cfg, work / name.replace(" ", "_"), args.client, args.seed, shadows)
            rows.append({"setting": name, "target_epsilon": target, **res})
            save(result, out, t0)  # after every setting, so a run cut by the time budget keeps what it measured
        if result["skipped"]:
            save(result, out, t0)
    return result


#: The issue's targets on the released (global) model: attack AUC at epsilon 8; the non-private AUC is reported.
AUC_AT_8 = 0.55


def audit_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``{target, met, value}`` for the attack AUC against the released model."""
    out = []
    for r in rows:
        auc = strongest_auc(r)
        if r["target_epsilon"] == 8.0:
            out.append(
                target(
                    f"membership-inference AUC against the released model <= {AUC_AT_8} at epsilon 8 "
                    "(strongest attack)",
                    auc,
                    auc <= AUC_AT_8,
                )
            )
        elif r["target_epsilon"] is None:
            out.append(
                {
                    "target": "membership-inference AUC against the released model without DP (strongest attack; "
                    "reported)",
                    "met": None,
                    "value": auc,
                }
            )
    return out


def save(result: dict[str, Any], out: Path, t0: float | None) -> None:
    """Write ``<out>.json``, ``.md`` and ``.png`` from the settings run so far (``t0`` None: re-render only)."""
    if t0 is not None:
        result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    result["targets"] = audit_targets(result["rows"])
    lines = report(result["rows"], result["mode"])
    lines += [
        "",
        f"Config `{result['config']}` with `{' '.join(result['overrides'])}`; "
        f"{len(result['rows'])} setting(s) in {result['wall_seconds'] / 60:.1f} min.",
        "",
        *(
            f"- {t['target']}: {t['value']:.3f}" + ("" if t["met"] is None else f" ({met_word(t['met'])})")
            for t in result["targets"]
        ),
        "",
        f"Reproduce: `{result.get('command', 'python scripts/audit_privacy.py')}`",
    ]
    if result["skipped"]:
        lines += ["", f"Skipped (time budget spent): {', '.join(result['skipped'])}."]
    write_results(out, result, lines)
    if result["rows"]:
        plot(result["rows"], out.with_name(out.name + ".png"))


if __name__ == "__main__":
    main()
