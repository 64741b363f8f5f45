"""model.whitening: the fit (numpy oracle), the pooler it sets, headers, refusals, export and the CLI."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_overrides

from lorafed.config import ConfigError, LoraSettings, ModelConfig
from lorafed.errors import ModelError
from lorafed.model.backbone import load_client_model, model_header
from lorafed.model.whitening import fit_from_texts, fit_whitening, load_whitening, save_whitening
from lorafed.wire.adapter import get_adapter_state
from lorafed.wire.payload import Payload, PayloadMeta

LABELS = ("bad", "good", "meh")
LORA = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=("query", "value"))
WORDS = [
    "great",
    "lovely",
    "soft",
    "awful",
    "cheap",
    "torn",
    "okay",
    "plain",
    "fine",
    "dress",
    "top",
    "size",
    "color",
    "fabric",
]


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 9)))) for _ in range(n)]


def _mean_cfg(model_dir: Path, whitening: str | None = None) -> ModelConfig:
    return ModelConfig(str(model_dir), "fp32", LORA, pooling="mean", whitening=whitening)


@pytest.fixture
def whitening_file(tiny_model_dir, tmp_path) -> Path:
    out = tmp_path / "whitening.safetensors"
    fit_from_texts(_mean_cfg(tiny_model_dir), _texts(200), None, "pair", 32, out, progress=False)
    return out


def test_fit_is_the_scaled_inverse_square_root_of_the_shrunk_covariance() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 6)) @ np.diag([10.0, 3.0, 1.0, 0.3, 0.1, 0.01]) + 5.0  # anisotropic, off-centre
    mu, t = fit_whitening(x, shrinkage=0.01)
    cov = np.cov(x.T)
    ridge = 0.01 * np.linalg.eigvalsh(cov).max()
    inverse = np.linalg.inv(cov + ridge * np.eye(6))  # independent of the eigendecomposition path
    assert np.allclose(mu, x.mean(0))
    assert np.allclose(t, t.T)
    tt = t @ t
    assert np.allclose(tt / tt.trace(), inverse / inverse.trace(), rtol=1e-8, atol=1e-12)
    assert np.linalg.norm((x - mu) @ t, axis=1).mean() == pytest.approx(1.0)
    # without shrinkage to speak of, the whitened rows are uncorrelated with equal variance
    _, t0 = fit_whitening(x, shrinkage=1e-12)
    w = np.cov(((x - mu) @ t0).T)
    assert np.allclose(w / w[0, 0], np.eye(6), atol=1e-6)
    with pytest.raises(ModelError, match="shrinkage must be > 0"):
        fit_whitening(x, 0.0)
    with pytest.raises(ModelError, match="NaN"):
        fit_whitening(np.full((3, 2), np.nan))


def test_the_pooler_reads_tanh_of_the_whitened_mean(tiny_model_dir, whitening_file) -> None:
    """Oracle (numpy): z = LayerNorm(1000 x masked mean of the base's token states + [CLS]'s state), as
    the pooling layer computes it (:mod:`lorafed.model.pooling`), then tanh(T (z - mu))."""
    from transformers import AutoModel

    w = load_whitening(whitening_file)
    assert w.meta["rows"] == "200" and w.meta["num_layers"] == "None"
    cm = load_client_model(_mean_cfg(tiny_model_dir, str(whitening_file)), LABELS, 0, with_lora=False)
    texts = _texts(12, seed=5)
    batch = dict(cm.tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt"))
    base = AutoModel.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        hidden = base(**batch).last_hidden_state.double().numpy()
        pooled = cm.model.eval().bert(**batch).pooler_output.double().numpy()
    m = batch["attention_mask"].numpy()[..., None].astype(np.float64)
    mean = 1000.0 * (hidden * m).sum(1) / m.sum(1) + hidden[:, 0]
    z = (mean - mean.mean(1, keepdims=True)) / np.sqrt(mean.var(1, keepdims=True) + 1e-12)
    t, mu = w.transform.double().numpy(), w.mean.double().numpy()
    expected = np.tanh((z - mu) @ t.T)
    assert np.abs(pooled - expected).max() < 1e-4
    plain = np.tanh(0.05 * z)  # the unwhitened pooler's feature: far from it
    assert np.abs(pooled - plain).max() > 0.1
    # on the rows it was fitted on, the whitened feature is centred with mean norm 1
    fit = _texts(200)
    batch = dict(cm.tokenizer(fit, padding=True, truncation=True, max_length=32, return_tensors="pt"))
    with torch.no_grad():
        pre = np.arctanh(cm.model.bert(**batch).pooler_output.double().numpy())
    assert np.abs(pre.mean(0)).max() < 0.02
    assert np.linalg.norm(pre, axis=1).mean() == pytest.approx(1.0, abs=0.02)


def test_headers_carry_the_digest_and_the_server_refuses_another_whitening(
    tiny_model_dir, whitening_file, tmp_path
) -> None:
    from lorafed.errors import PayloadValidationError
    from lorafed.server.validate import UpdateSpec, validate_update
    from lorafed.wire.adapter import adapter_spec

    cfg = _mean_cfg(tiny_model_dir, str(whitening_file))
    header = model_header(cfg)
    assert header["whitening"] == load_whitening(whitening_file).digest
    assert "whitening" not in model_header(_mean_cfg(tiny_model_dir))  # unchanged without one
    other = tmp_path / "other.safetensors"
    fit_from_texts(_mean_cfg(tiny_model_dir), _texts(200, seed=9), None, "pair", 32, other, progress=False)
    assert model_header(dataclasses.replace(cfg, whitening=str(other)))["whitening"] != header["whitening"]
    cm = load_client_model(cfg, LABELS, 0)
    state = get_adapter_state(cm.model)
    spec = UpdateSpec(cm.fingerprint, header, LABELS, adapter_spec(state), round=1)
    ok = PayloadMeta(cm.fingerprint, header, LABELS, 10, 1, "c0")
    validate_update(Payload(state, ok), spec)
    for lora in (model_header(dataclasses.replace(cfg, whitening=str(other))), model_header(_mean_cfg(tiny_model_dir))):
        with pytest.raises(PayloadValidationError, match="lora"):
            validate_update(Payload(state, dataclasses.replace(ok, lora=lora)), spec)


def test_bad_whitening_files_are_refused_with_the_reason(tiny_model_dir, whitening_file, tmp_path, tiny_config) -> None:
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ModelError, match="not a safetensors file"):
        load_whitening(tmp_path / "junk.safetensors")
    with pytest.raises(ModelError, match="no such file"):
        load_whitening(tmp_path / "missing.safetensors")
    w = load_whitening(whitening_file)
    bad = {
        "nan": (w.mean.numpy() * np.nan, w.transform.numpy(), "NaN"),
        "shape": (w.mean.numpy()[:5], w.transform.numpy(), "expected \\[H\\] and \\[H, H\\]"),
    }
    for name, (mean, transform, reason) in bad.items():
        save_whitening(tmp_path / f"{name}.safetensors", mean, transform, {})
        with pytest.raises(ModelError, match=reason):
            load_whitening(tmp_path / f"{name}.safetensors")
    from safetensors.torch import save_file

    save_file({"mean": w.mean, "transform": w.transform}, str(tmp_path / "foreign.safetensors"), {"format": "pt"})
    with pytest.raises(ModelError, match="expected 'lorafed-whitening'"):
        load_whitening(tmp_path / "foreign.safetensors")
    layered = ModelConfig(
        str(tiny_model_dir), "fp32", LORA, pooling="mean", num_layers=1, whitening=str(whitening_file)
    )
    with pytest.raises(ModelError, match=r"model\.num_layers None, the model has model\.num_layers 1"):
        load_client_model(layered, LABELS, 0)
    with pytest.raises(ConfigError, match=r"needs model\.pooling mean"):
        tiny_config(f"model.whitening={whitening_file}")


def test_cli_whiten_then_simulate_and_export_plainly(tiny_config, synthetic_csv, tmp_path) -> None:
    """``lorafed whiten`` on the CSV's text, a 1-round federation with it, and an export plain transformers loads."""
    from transformers import AutoModelForSequenceClassification

    from lorafed.cli import main
    from lorafed.engine.inprocess import simulate
    from lorafed.serve.export import ExportError, export_adapter
    from lorafed.wire.reader import load_payload

    cfg = tiny_config("model.pooling=mean")
    out = tmp_path / "w.safetensors"
    args = ["whiten", "--config", str(ROOT / "configs" / "tiny.yaml"), "--data", str(synthetic_csv), "--out", str(out)]
    args += ["--no-progress", *tiny_overrides(synthetic_csv, Path(cfg.model.name_or_path)), "model.pooling=mean"]
    assert main(args) == 0
    assert load_whitening(out).meta["rows"] == "240"
    cfg = tiny_config("model.pooling=mean", f"model.whitening={out}", "federation.rounds=1", "train.max_steps=2")
    run = tmp_path / "run"
    simulate(cfg, run, progress=False)
    digest = load_whitening(out).digest
    updates = sorted((run / "rounds" / "r1").glob("*.safetensors"))
    assert updates and all(load_payload(p).meta.lora["whitening"] == digest for p in updates)
    glob = load_payload(run / "rounds" / "global_r1.safetensors")
    with pytest.raises(ExportError, match="pass its file with --whitening"):
        export_adapter(glob, tmp_path / "x", cfg.model.name_or_path, with_onnx=False)
    with pytest.raises(ExportError, match="use --format merged"):
        export_adapter(glob, tmp_path / "x", cfg.model.name_or_path, "peft", whitening=str(out))
    cls = Payload(glob.decoded(), dataclasses.replace(glob.meta, lora={**glob.meta.lora, "pooling": "cls"}))
    with pytest.raises(ExportError, match=r"lora\.whitening without lora\.pooling 'mean'"):
        export_adapter(cls, tmp_path / "x", cfg.model.name_or_path, with_onnx=False, whitening=str(out))
    report = export_adapter(glob, tmp_path / "export", cfg.model.name_or_path, with_onnx=False, whitening=str(out))
    assert report.max_abs_diff <= 1e-4
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export").eval()
    w = load_whitening(out)
    assert torch.equal(plain.bert.pooler.dense.weight, w.transform)


def test_unlabeled_texts_clean_as_training_does() -> None:
    """Blank or missing texts left out and counted, text stripped, a missing pair "", non-strings refused."""
    import pandas as pd

    from lorafed.data.clean import unlabeled_texts
    from lorafed.errors import DataError

    frame = pd.DataFrame({"t": [" soft dress ", None, "  ", "torn"], "p": ["a", "b", "c", None]})
    texts, pairs, skipped = unlabeled_texts(frame, "f.csv", "t", "p")
    assert (texts, pairs, skipped) == (["soft dress", "torn"], ["a", ""], 2)
    assert unlabeled_texts(frame, "f.csv", "t")[1] is None
    with pytest.raises(DataError, match="column not found"):
        unlabeled_texts(frame, "f.csv", "text")
    with pytest.raises(DataError, match="must hold strings"):
        unlabeled_texts(pd.DataFrame({"t": ["ok", ["a", "list"]]}), "f.parquet", "t")
