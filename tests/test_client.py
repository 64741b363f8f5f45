"""Client training on its own file, and the aggregate command's validation and refusals."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from lorafed.cli import main
from lorafed.client.local import run_client_round
from lorafed.config import save_config
from lorafed.errors import ConfigError, PayloadError
from lorafed.wire.payload import Payload, save_payload
from lorafed.wire.reader import load_payload
from tests.helpers_adapter import random_adapter

QUIET = {"progress": False}


def _two_class_file(path: Path, n: int = 30) -> Path:
    """A client that only has 'good' and 'bad' rows (no 'meh')."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["review", "label"])
        for i in range(n):
            w.writerow([f"{'love great dress' if i % 2 else 'awful ripped top'} {i}", "good" if i % 2 else "bad"])
    return path


def test_client_cli_uses_the_global_label_list_and_counts_training_rows(tiny_config, tmp_path, capsys) -> None:
    data = _two_class_file(tmp_path / "shopA.csv")
    cfg = tmp_path / "fed.yaml"
    save_config(tiny_config("data.labels=[bad,good,meh]"), cfg)
    out = tmp_path / "u.safetensors"
    assert main(["client", "train", "--config", str(cfg), "--data", str(data), "--client-id", "shopA",
                 "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    assert "update written to" in capsys.readouterr().out
    u = load_payload(out)
    assert u.meta.labels == ("bad", "good", "meh") and u.meta.round == 1 and u.meta.client_id == "shopA"
    head = next(v for k, v in u.tensors.items() if k.endswith("classifier.weight"))
    assert head.shape[0] == 3  # the federation's 3 labels, although this file has 2
    # A company's own file trains on every row but the validation slice: 30 - round(30 x 0.1) = 27.
    assert tiny_config().data.val_fraction == 0.1 and u.meta.num_examples == 27
    assert "val_accuracy" in u.meta.metrics
    # Next round from that adapter used as global: labels come from its header, round = 2.
    g = save_payload(tmp_path / "g1.safetensors", u.tensors, replace(u.meta, kind="global", client_id="server"))
    nxt = run_client_round(tiny_config(f"data.path={data}"), "shopA", g, **QUIET)
    assert nxt.meta.round == 2 and nxt.meta.labels == ("bad", "good", "meh")
    assert any(not torch.equal(nxt.tensors[k], u.tensors[k]) for k in u.tensors)


def test_client_errors(tiny_config, tmp_path, capsys) -> None:
    data = _two_class_file(tmp_path / "c.csv")
    with pytest.raises(ConfigError, match=r"data\.labels: required when no global adapter"):
        run_client_round(tiny_config(f"data.path={data}"), "c", **QUIET)
    with pytest.raises(ConfigError, match="client id 'a b'"):
        run_client_round(tiny_config(f"data.path={data}", "data.labels=[bad,good,meh]"), "a b", **QUIET)
    u = run_client_round(tiny_config(f"data.path={data}", "data.labels=[bad,good,meh]"), "c", **QUIET)
    g = save_payload(tmp_path / "g.safetensors", u.tensors, replace(u.meta, round=3))
    with pytest.raises(ConfigError, match="is from round 3, so this is round 4"):
        run_client_round(tiny_config(f"data.path={data}"), "c", g, round_=2, **QUIET)
    with pytest.raises(ConfigError, match="differs from the global adapter's labels"):
        run_client_round(tiny_config(f"data.path={data}", "data.labels=[good,bad,meh]"), "c", g, **QUIET)
    alien = save_payload(tmp_path / "alien.safetensors", u.tensors, replace(u.meta, base_fingerprint="sha256:ff"))
    with pytest.raises(PayloadError, match=r"does not fit this client's config.*base_fingerprint"):
        run_client_round(tiny_config(f"data.path={data}"), "c", alien, **QUIET)
    cfg = tmp_path / "fed.yaml"
    save_config(tiny_config(), cfg)
    assert main(["client", "train", "--config", str(cfg), "--data", str(data), "--client-id", "c",
                 "--out", str(tmp_path / "x.safetensors")]) == 2  # fmt: skip
    assert "data.labels: required" in capsys.readouterr().err


def _update(model_dir: Path, seed: int, n: int, round_: int = 4) -> Payload:
    p = random_adapter(model_dir, seed, num_examples=n)
    return Payload(p.tensors, replace(p.meta, round=round_, client_id=f"shop{seed}", kind="update"))


def test_aggregate_cli_validates_rejects_and_averages(tiny_model_dir, tmp_path, capsys) -> None:
    glob = random_adapter(tiny_model_dir, 0)  # header round 3
    gpath = save_payload(tmp_path / "global_r3.safetensors", glob.tensors, glob.meta)
    ups = tmp_path / "updates"
    good = [_update(tiny_model_dir, s, n) for s, n in ((1, 30), (2, 10))]
    files = [save_payload(ups / f"shop{i + 1}.safetensors", u.tensors, u.meta) for i, u in enumerate(good)]
    nan = _update(tiny_model_dir, 3, 5)
    key = next(iter(nan.tensors))
    nan.tensors[key].view(-1)[0] = float("nan")
    files.append(save_payload(ups / "shop3.safetensors", nan.tensors, nan.meta))
    stale = _update(tiny_model_dir, 4, 5, round_=2)
    files.append(save_payload(ups / "shop4.safetensors", stale.tensors, stale.meta))
    (ups / "shop5.safetensors").write_bytes(b"\x80\x04pickled")
    files.append(ups / "shop5.safetensors")
    out = tmp_path / "global_r4.safetensors"
    cfg = tmp_path / "fed.yaml"
    cfg.write_text("data: {path: unused.csv}\npartition: {num_clients: 3}\nfederation: {min_clients: 3}\n")
    args = ["aggregate", *map(str, files), "--global", str(gpath), "--out", str(out)]
    assert main([*args, "--config", str(cfg)]) == 2
    captured = capsys.readouterr()
    assert not out.exists()
    assert "fewer than federation.min_clients=3; nothing was written" in captured.err
    assert f"rejected {files[2]}: " in captured.out and "NaN/Inf" in captured.out
    assert f"rejected {files[3]}: " in captured.out and "round: expected 4, received 2" in captured.out
    assert f"rejected {files[4]}: " in captured.out and "pickle" in captured.out
    assert main([*args, "--config", str(cfg), "federation.min_clients=2", "--report", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    assert f"accepted {files[0]}: client 'shop1', round 4, 30 examples, share 0.7500" in printed
    result = load_payload(out)
    assert result.meta.round == 4 and result.meta.num_examples == 40 and result.meta.kind == "global"
    for k in glob.tensors:
        expected = np.average([u.tensors[k].numpy() for u in good], axis=0, weights=[30, 10])
        assert np.allclose(result.tensors[k].numpy(), expected, atol=1e-6)
    assert main(["aggregate", str(files[0]), "--global", str(gpath), "--out", str(files[0])]) == 2
    assert "is one of the update files" in capsys.readouterr().err


def test_aggregate_with_config_needs_labels(tiny_config, tmp_path, capsys) -> None:
    cfg = tmp_path / "fed.yaml"
    save_config(tiny_config(), cfg)
    assert main(["aggregate", "x.safetensors", "--config", str(cfg), "--out", str(tmp_path / "g.safetensors")]) == 2
    assert "data.labels: required" in capsys.readouterr().err


def test_client_train_sends_the_round_tensors_of_ffa(tiny_config, synthetic_csv) -> None:
    """FFA-LoRA: a client's update carries B and the head only (A stays at the shared seeded init)."""
    cfg = tiny_config("federation.aggregation=ffa", "data.labels=[bad, good, meh]", f"data.path={synthetic_csv}")
    update = run_client_round(cfg, "shopA", None, 1, progress=False)
    assert update.tensors and not any(".lora_A." in k for k in update.tensors)
    assert any(".lora_B." in k for k in update.tensors)


def test_aggregate_cli_applies_the_config_server_settings(tiny_model_dir, tmp_path, capsys) -> None:
    """robust=median is numpy's coordinate-wise median of the clients' tensors (an independent oracle)."""
    glob = random_adapter(tiny_model_dir, 0)
    gpath = save_payload(tmp_path / "global_r3.safetensors", glob.tensors, glob.meta)
    ups = [_update(tiny_model_dir, s, n) for s, n in ((1, 30), (2, 10), (3, 5))]
    files = [str(save_payload(tmp_path / f"u{i}.safetensors", u.tensors, u.meta)) for i, u in enumerate(ups)]
    cfg = tmp_path / "fed.yaml"
    cfg.write_text("data: {path: unused.csv}\n")
    out = tmp_path / "global_r4.safetensors"
    base = ["aggregate", *files, "--global", str(gpath), "--config", str(cfg), "--out", str(out)]
    assert main([*base, "federation.robust=median"]) == 0
    assert "share 0.3333" in capsys.readouterr().out
    result = load_payload(out)
    assert result.meta.metrics["robust"] == "median" and result.meta.round == 4
    for k in glob.tensors:
        expected = np.median([u.tensors[k].numpy() for u in ups], axis=0)
        assert np.allclose(result.tensors[k].numpy(), expected, atol=1e-6)
    # clip_update_norm: every delta from the global adapter is scaled to norm <= 1 before averaging.
    assert main([*base, "federation.clip_update_norm=1.0", "federation.weighting=uniform"]) == 0
    result = load_payload(out)
    deltas = []
    for u in ups:
        d = {k: u.tensors[k].numpy() - glob.tensors[k].numpy() for k in glob.tensors}
        norm = np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in d.values()))
        deltas.append({k: v * min(1.0, 1.0 / norm) for k, v in d.items()})
    for k in glob.tensors:
        expected = glob.tensors[k].numpy() + np.mean([d[k] for d in deltas], axis=0)
        assert np.allclose(result.tensors[k].numpy(), expected, atol=1e-5)
    # A server optimizer's state is written beside the output and read back beside the next --global.
    opt = tmp_path / "global_r4.server_opt.safetensors"
    assert main([*base, "federation.server_optimizer=fedadam"]) == 0
    assert opt.is_file() and "fedadam state written to" in capsys.readouterr().out
    from lorafed.server.server_opt import load_server_opt

    assert load_server_opt(opt).step == 1
    ups5 = [Payload(u.tensors, replace(u.meta, round=5)) for u in ups]
    files5 = [str(save_payload(tmp_path / f"v{i}.safetensors", u.tensors, u.meta)) for i, u in enumerate(ups5)]
    out5 = tmp_path / "global_r5.safetensors"
    assert main(["aggregate", *files5, "--global", str(out), "--config", str(cfg), "--out", str(out5),
                 "federation.server_optimizer=fedadam"]) == 0  # fmt: skip
    assert load_server_opt(tmp_path / "global_r5.server_opt.safetensors").step == 2


def test_aggregate_cli_round_one_from_the_config_and_removed_flags(tiny_config, tmp_path, capsys) -> None:
    cfg = tmp_path / "fed.yaml"
    save_config(tiny_config("data.labels=[bad,good,meh]"), cfg)
    out = str(tmp_path / "g.safetensors")
    assert main(["aggregate", "x.safetensors", "--config", str(cfg), "--expect-round", "2", "--out", out]) == 2
    assert "only round 1 can be aggregated" in capsys.readouterr().err
    assert main(["aggregate", "x.safetensors", "--config", str(cfg), "--min-clients", "3", "--out", out]) == 2
    assert "--min-clients was removed; pass federation.min_clients=N" in capsys.readouterr().err
    assert (
        main(["aggregate", "x.safetensors", "--global", "g.safetensors", "federation.robust=median", "--out", out]) == 2
    )
    assert "need --config" in capsys.readouterr().err


def test_client_train_writes_the_configured_transport(tiny_config, tmp_path) -> None:
    data = _two_class_file(tmp_path / "shopA.csv")
    update = run_client_round(
        tiny_config(f"data.path={data}", "data.labels=[bad,good,meh]", "federation.transport=int8"),
        "shopA",
        None,
        **QUIET,
    )
    path = save_payload(tmp_path / "u.safetensors", update.tensors, update.meta)
    sent = load_payload(path)
    assert sent.meta.dtype == "int8"
    decoded = sent.decoded()
    for k, v in update.tensors.items():
        assert sent.tensors[k].dtype == torch.int8
        bound = v.abs().max().item() / 254 + 1e-12  # absmax per tensor: half a quantization step
        assert (decoded[k] - v).abs().max().item() <= bound * (1 + 1e-5)
