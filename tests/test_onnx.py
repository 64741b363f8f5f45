"""ONNX export and the onnxruntime serving backend, on a tiny merged export; the serving benchmark's --tiny run.

Oracles: the merged torch model's logits (loaded by plain transformers), and
``predict_proba`` on the torch backend; the ONNX graph must agree within 1e-4 at batch and
sequence sizes other than the traced ones.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from lorafed.cli import main
from lorafed.config import DataConfig
from lorafed.errors import ModelError
from lorafed.serve.export import ExportError, export_adapter, parity_inputs
from lorafed.serve.infer import load_serving_model, predict_proba, resolve_backend
from lorafed.serve.onnx import ONNX_FILE, OnnxClassifier
from lorafed.wire.payload import save_payload
from tests.helpers_adapter import LABELS, random_adapter

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["love this soft dress", "awful itchy top, returned it", "plain okay size", "great color but tight " * 6]


@pytest.fixture(scope="module")
def onnx_export(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An onnx-format export (title put in front of the review, max_length 24) of a random adapter."""
    data = DataConfig(
        path="r.csv", text_column="review", label_column="label", text_pair_column="title", pair_mode="prefix",
        max_length=24,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("onnx") / "export"
    report = export_adapter(random_adapter(tiny_model_dir, seed=11), out, str(tiny_model_dir), "onnx", data=data)
    assert report.onnx_max_abs_diff is not None and report.onnx_max_abs_diff <= 1e-4
    return out


def test_onnx_export_matches_torch_at_new_shapes(onnx_export: Path) -> None:
    import onnx
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    names = {p.name for p in onnx_export.iterdir()}
    assert {ONNX_FILE, "config.json", "model.safetensors", "tokenizer.json", "lorafed_export.json"} <= names
    info = json.loads((onnx_export / "lorafed_export.json").read_text())
    assert info["format"] == "onnx" and info["onnx_max_abs_diff"] <= 1e-4
    graph = onnx.load(str(onnx_export / ONNX_FILE))
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
    assert dims["input_ids"] == ["batch", "sequence"] and dims["attention_mask"] == ["batch", "sequence"]
    assert "ONNX" in (onnx_export / "README.md").read_text()

    model = AutoModelForSequenceClassification.from_pretrained(onnx_export).eval()
    tok = AutoTokenizer.from_pretrained(onnx_export)
    clf = OnnxClassifier(onnx_export / ONNX_FILE, threads=1)
    for rows, length, seed in ((1, 5, 0), (7, 40, 1), (2, 6, 2)):  # none is the traced 16 x 32
        batch = parity_inputs(tok.vocab_size, tok, rows=rows, length=length, seed=seed)
        with torch.no_grad():
            want = model(**batch).logits.numpy()
        got = clf({k: v.numpy() for k, v in batch.items()})
        assert got.shape == (rows, len(LABELS))
        assert np.abs(got - want).max() <= 1e-4


def test_onnx_backend_probabilities_match_torch(onnx_export: Path, tmp_path: Path) -> None:
    torch_sm = load_serving_model(onnx_export, "torch")
    onnx_sm = load_serving_model(onnx_export, "onnx")
    assert (torch_sm.backend, onnx_sm.backend) == ("torch", "onnx") and onnx_sm.onnx is not None
    assert load_serving_model(onnx_export).backend == "onnx"  # auto: model.onnx + onnxruntime
    titles = ["", "Nice", "Returned", "Meh"]
    for pairs in (None, titles):
        want = predict_proba(torch_sm, TEXTS, pairs, batch_size=3)
        got = predict_proba(onnx_sm, TEXTS, pairs, batch_size=3)
        assert got.shape == (len(TEXTS), len(LABELS))
        assert np.abs(got - want).max() <= 1e-4
    assert resolve_backend(tmp_path, "auto") == "torch"  # no model.onnx here
    with pytest.raises(ModelError, match=r"no model\.onnx"):
        resolve_backend(tmp_path, "onnx")
    with pytest.raises(ModelError, match="not one of"):
        resolve_backend(tmp_path, "tensorrt")


def test_auto_backend_says_why(onnx_export: Path, tmp_path: Path, monkeypatch) -> None:
    from lorafed.serve import infer

    assert infer.choose_backend(onnx_export) == (
        "onnx",
        "auto: the export has model.onnx and onnxruntime is installed (faster than torch on CPU)",
    )
    backend, why = infer.choose_backend(tmp_path)
    assert backend == "torch" and why.startswith("auto: the export has no model.onnx (re-export without --no-onnx")
    monkeypatch.setattr(infer, "onnxruntime_available", lambda: False)
    backend, why = infer.choose_backend(onnx_export)
    assert backend == "torch" and "has model.onnx but onnxruntime is not installed" in why
    assert "pip install 'lorafed[onnx]'" in why


def test_http_onnx_backend_matches_torch(onnx_export: Path) -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from lorafed.serve.http import create_app

    want = predict_proba(load_serving_model(onnx_export, "torch"), TEXTS)
    with TestClient(create_app(onnx_export, backend="onnx")) as c:
        meta = c.get("/metadata").json()
        assert meta["backend"] == "onnx" and meta["backend_reason"] == "--backend onnx was asked for"
        res = c.post("/predict", json={"texts": TEXTS})
        assert res.status_code == 200, res.text
        got = np.array([[p["probabilities"][lab] for lab in LABELS] for p in res.json()["predictions"]])
    assert np.abs(got - want).max() <= 1e-4
    with TestClient(create_app(onnx_export, backend="torch")) as c:
        assert c.get("/metadata").json()["backend"] == "torch"
    with TestClient(create_app(onnx_export)) as c:  # auto: the export has model.onnx
        meta = c.get("/metadata").json()
        assert meta["backend"] == "onnx" and "has model.onnx and onnxruntime is installed" in meta["backend_reason"]


def test_export_cli_onnx_and_refusals(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    adapter = random_adapter(tiny_model_dir, seed=3)
    src = save_payload(tmp_path / "g.safetensors", adapter.tensors, adapter.meta)
    out = tmp_path / "exp"
    argv = ["export", "--adapter", str(src), "--out", str(out), "--base", str(tiny_model_dir), "--format", "onnx"]
    assert main(argv) == 0
    assert "onnxruntime vs torch: max logit difference" in capsys.readouterr().out
    assert (out / ONNX_FILE).is_file()
    with pytest.raises(ExportError, match="onnx exports are fp32"):
        export_adapter(adapter, tmp_path / "x", str(tiny_model_dir), "onnx", dtype="fp16")
    rows = tmp_path / "rows.csv"
    rows.write_text("text\nlove it\nhate it\n", encoding="utf-8")
    preds = tmp_path / "p.jsonl"
    assert main(["predict", "--model", str(out), "--input", str(rows), "--out", str(preds), "--backend", "onnx"]) == 0
    assert [json.loads(x)["row"] for x in preds.read_text().splitlines()] == [1, 2]


def test_bench_serve_tiny(tmp_path: Path) -> None:
    pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    stem = tmp_path / "serve"
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_serve.py"), "--tiny", "--out", str(stem)],
        capture_output=True,
        text=True,
        timeout=540,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(stem.with_suffix(".json").read_text())
    assert result["all_ok"] and result["setup"]["tiny"]
    tiny = result["models"]["tiny"]
    assert set(tiny["servers"]) == {"torch", "onnx"}
    for backend, srv in tiny["servers"].items():
        assert srv["served_backend"] == backend and srv["clean_exit"]
        for c in ("1", "8"):
            cell = srv["by_concurrency"][c]
            assert cell["requests"] >= 1 and set(cell["statuses"]) == {"200"}
            assert cell["p50_s"]["median"] <= cell["p99_s"]["median"]
    assert tiny["pipeline"]["texts_per_s"]["median"] > 0
    names = [t["target"] for t in result["targets"]]
    assert len(names) == 4 and all(set(t) >= {"target", "met", "value"} for t in result["targets"])
    assert "bench_serve.py --tiny" in result["command"]
    md = stem.with_suffix(".md").read_text()
    assert "transformers.pipeline" in md and "## Targets" in md
