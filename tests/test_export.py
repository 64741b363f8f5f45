"""Export: merged parity, a clean-subprocess load with transformers only, peft format, predict/evaluate."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lorafed.cli import main
from lorafed.errors import ModelError, PayloadValidationError
from lorafed.serve.export import ExportError, export_adapter, load_adapter_model, parity_inputs
from lorafed.wire.payload import Payload, save_payload
from tests.helpers_adapter import LABELS, random_adapter


@pytest.fixture(scope="module")
def adapter(tiny_model_dir: Path) -> Payload:
    return random_adapter(tiny_model_dir, seed=1)


def _adapter_logits(payload: Payload, base: Path, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    client = load_adapter_model(payload, str(base))
    with torch.no_grad():
        return client.model(**batch).logits


def test_merged_export_matches_adapter_and_loads_without_lorafed(adapter, tiny_model_dir, tmp_path) -> None:
    out = tmp_path / "merged"
    report = export_adapter(adapter, out, str(tiny_model_dir))
    assert report.max_abs_diff <= 1e-4
    assert {"config.json", "model.safetensors", "tokenizer.json", "lorafed_export.json"} <= {
        p.name for p in out.iterdir()
    }
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["id2label"] == {str(i): lab for i, lab in enumerate(LABELS)}
    assert cfg["label2id"] == {lab: i for i, lab in enumerate(LABELS)}
    # Oracle: the un-merged adapter model's logits, computed here; the clean process must reproduce them.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = parity_inputs(tok.vocab_size, tok, rows=5, length=12, seed=3)
    expected = _adapter_logits(adapter, tiny_model_dir, batch)
    np.save(tmp_path / "ids.npy", batch["input_ids"].numpy())
    np.save(tmp_path / "mask.npy", batch["attention_mask"].numpy())
    code = (
        "import sys, json, numpy as np, torch\n"
        "from transformers import AutoModelForSequenceClassification\n"
        f"m = AutoModelForSequenceClassification.from_pretrained({str(out)!r})\n"
        f"ids = torch.from_numpy(np.load({str(tmp_path / 'ids.npy')!r}))\n"
        f"mask = torch.from_numpy(np.load({str(tmp_path / 'mask.npy')!r}))\n"
        "with torch.no_grad(): logits = m(input_ids=ids, attention_mask=mask).logits\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('lorafed', 'peft'))\n"
        "print(json.dumps({'logits': logits.tolist(), 'bad': bad, 'labels': m.config.id2label}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["bad"] == []
    assert got["labels"] == {str(i): lab for i, lab in enumerate(LABELS)}
    assert float((torch.tensor(got["logits"]) - expected).abs().max()) <= 1e-4


def test_peft_export_loads_with_peftmodel(adapter, tiny_model_dir, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "peft"
    report = export_adapter(adapter, out, str(tiny_model_dir), fmt="peft")
    assert report.max_abs_diff <= 1e-4
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    model = PeftModel.from_pretrained(base, str(out)).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = parity_inputs(tok.vocab_size, tok, rows=4, length=10, seed=5)
    with torch.no_grad():
        got = model(**batch).logits
    assert float((got - _adapter_logits(adapter, tiny_model_dir, batch)).abs().max()) <= 1e-4


def test_export_cli_fp16_predict_and_evaluate(adapter, tiny_model_dir, tmp_path, capsys) -> None:
    src = save_payload(tmp_path / "global.safetensors", adapter.tensors, adapter.meta)
    out = tmp_path / "merged16"
    assert (
        main(["export", "--adapter", str(src), "--out", str(out), "--base", str(tiny_model_dir), "--dtype", "fp16"])
        == 0
    )
    text = capsys.readouterr().out
    assert "logit difference" in text and "after casting to fp16" in text
    # Running it twice replaces the earlier export.
    assert main(["export", "--adapter", str(src), "--out", str(out), "--base", str(tiny_model_dir), "--overwrite"]) == 0
    capsys.readouterr()
    rows = tmp_path / "rows.csv"
    rows.write_text(
        "text,label\nlove this soft dress,good\nawful itchy top,bad\nplain okay size,meh\n", encoding="utf-8"
    )
    preds = tmp_path / "preds.jsonl"
    assert main(["predict", "--model", str(out), "--input", str(rows), "--out", str(preds)]) == 0
    records = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [r["row"] for r in records] == [1, 2, 3]
    # Oracle: the adapter model's own probabilities on the same texts.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    enc = dict(tok(["love this soft dress", "awful itchy top", "plain okay size"], padding=True, return_tensors="pt"))
    probs = torch.softmax(_adapter_logits(adapter, tiny_model_dir, enc), dim=-1)
    for rec, p in zip(records, probs, strict=True):
        assert rec["label"] == LABELS[int(p.argmax())]
        assert np.allclose([rec["probabilities"][lab] for lab in LABELS], p.numpy(), atol=1e-5)
    report_dir = tmp_path / "eval"
    assert main(["evaluate", "--model", str(out), "--input", str(rows), "--out", str(report_dir)]) == 0
    metrics = json.loads((report_dir / "metrics.json").read_text())
    gold = [0 + 1, 0, 2]  # good, bad, meh as ids of LABELS
    pred = [int(p.argmax()) for p in probs]
    assert metrics["accuracy"] == pytest.approx(np.mean([g == q for g, q in zip(gold, pred, strict=True)]))
    assert sum(map(sum, metrics["confusion"])) == 3
    assert (report_dir / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert "macro-F1" in capsys.readouterr().out


def test_export_refuses_wrong_base_and_foreign_folder(adapter, tiny_model_dir, tmp_path) -> None:
    from dataclasses import replace

    wrong = Payload(adapter.tensors, replace(adapter.meta, base_fingerprint="sha256:" + "0" * 64))
    with pytest.raises(ModelError, match="was trained on base sha256:0000"):
        export_adapter(wrong, tmp_path / "x", str(tiny_model_dir))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not an earlier lorafed export"):
        export_adapter(adapter, foreign, str(tiny_model_dir))
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ExportError, match="peft adapters are exported in fp32"):
        export_adapter(adapter, tmp_path / "p", str(tiny_model_dir), fmt="peft", dtype="bf16")
    key = next(k for k in adapter.tensors if "lora_A" in k)
    short = Payload({k: v for k, v in adapter.tensors.items() if k != key}, adapter.meta)
    with pytest.raises(PayloadValidationError, match="missing"):
        export_adapter(short, tmp_path / "y", str(tiny_model_dir))


def test_predict_rejects_peft_dir_and_missing_column(adapter, tiny_model_dir, tmp_path, capsys, monkeypatch) -> None:
    peft_dir = tmp_path / "peft"
    export_adapter(adapter, peft_dir, str(tiny_model_dir), fmt="peft")
    rows = tmp_path / "rows.csv"
    rows.write_text("body,extra\nhello,1\n", encoding="utf-8")
    assert main(["predict", "--model", str(peft_dir), "--input", str(rows)]) == 2
    assert "peft adapter directory" in capsys.readouterr().err
    merged = tmp_path / "merged"
    export_adapter(adapter, merged, str(tiny_model_dir))
    assert main(["predict", "--model", str(merged), "--input", str(rows)]) == 2
    assert "text column None not found" in capsys.readouterr().err
    assert main(["predict", "--model", str(merged), "--input", str(rows), "--text-column", "body"]) == 0
    assert json.loads(capsys.readouterr().out)["row"] == 1
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\n\nsecond line\n"))
    assert main(["predict", "--model", str(merged), "--input", "-"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["row"] for r in lines] == [1, 2] and all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 for r in lines)
    labelled = tmp_path / "lab.csv"
    labelled.write_text("text,label\nhello,unknown\n", encoding="utf-8")
    assert main(["evaluate", "--model", str(merged), "--input", str(labelled), "--out", str(tmp_path / "e")]) == 2
    assert "label 'unknown' is not one of the model's labels" in capsys.readouterr().err


def test_predict_skips_rows_without_text_or_refuses_with_strict(adapter, tiny_model_dir, tmp_path, capsys) -> None:
    merged = tmp_path / "merged"
    export_adapter(adapter, merged, str(tiny_model_dir))
    rows = tmp_path / "rows.csv"
    rows.write_text("text,id\nlove it,a\n,b\nhate it,c\n   ,d\nfine,e\n", encoding="utf-8")
    assert main(["predict", "--model", str(merged), "--input", str(rows)]) == 0
    captured = capsys.readouterr()
    assert "skipped 2 rows with no text: rows 2, 4" in captured.err
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["row"] for r in records] == [1, 3, 5]  # the file's row numbers, not positions
    # Oracle: the same texts alone give the same probabilities.
    from lorafed.serve.infer import load_serving_model, predict_proba

    want = predict_proba(load_serving_model(merged), ["love it", "hate it", "fine"])
    got = np.array([[r["probabilities"][lab] for lab in LABELS] for r in records])
    assert np.abs(got - want).max() <= 1e-6
    assert main(["predict", "--model", str(merged), "--input", str(rows), "--strict"]) == 2
    err = capsys.readouterr().err
    assert "row 2" in err and "empty or missing text (and 1 more such row(s))" in err


TEXTS = ["love this soft dress", "awful itchy top, returned it", "plain okay size", "great color but tight " * 5]


def _np_softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_default_export_has_onnx_that_onnxruntime_runs_like_the_adapter(adapter, tiny_model_dir, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from transformers import AutoTokenizer

    from lorafed.serve.infer import load_serving_model

    out = tmp_path / "merged"
    report = export_adapter(adapter, out, str(tiny_model_dir))  # the default: merged, fp32
    assert report.format == "merged" and report.onnx_skipped == ""
    assert report.onnx_max_abs_diff is not None and report.onnx_max_abs_diff <= 1e-4
    assert (out / "model.onnx").is_file()
    assert json.loads((out / "lorafed_export.json").read_text())["onnx_max_abs_diff"] <= 1e-4
    # Oracle: onnxruntime called directly on the tokenizer's output vs the un-merged adapter model.
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    enc = tok(TEXTS, padding=True, truncation=True, max_length=128, return_tensors="np")
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {i.name: enc[i.name].astype(np.int64) for i in sess.get_inputs()})[0]
    want = _adapter_logits(adapter, tiny_model_dir, {k: torch.from_numpy(v) for k, v in enc.items()}).numpy()
    assert np.abs(got - want).max() <= 1e-4
    sm = load_serving_model(out)  # auto
    assert sm.backend == "onnx" and "has model.onnx" in sm.backend_reason
    assert np.abs(sm.onnx(enc) - want).max() <= 1e-4


def test_no_onnx_flag_and_missing_packages_give_a_torch_only_export(
    adapter, tiny_model_dir, tmp_path, capsys, caplog, monkeypatch
) -> None:
    import logging

    from lorafed.serve import export as export_mod
    from lorafed.serve.infer import load_serving_model
    from lorafed.serve.onnx import OnnxError

    src = save_payload(tmp_path / "global.safetensors", adapter.tensors, adapter.meta)
    base = ["--adapter", str(src), "--base", str(tiny_model_dir)]
    out = tmp_path / "plain"
    with caplog.at_level(logging.INFO, logger="lorafed"):
        assert main(["export", *base, "--out", str(out), "--no-onnx"]) == 0
    assert not (out / "model.onnx").exists()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # asked for: nothing to warn about
    assert "model.onnx" not in capsys.readouterr().out
    sm = load_serving_model(out)
    assert sm.backend == "torch" and "no model.onnx" in sm.backend_reason
    assert main(["export", *base, "--out", str(tmp_path / "p"), "--format", "peft", "--no-onnx"]) == 2
    assert "--no-onnx applies to --format merged" in capsys.readouterr().err

    # Without the onnx packages the default export still succeeds, torch-only, with one warning naming the fix.
    monkeypatch.setattr(export_mod, "missing_onnx_packages", lambda: ["onnx", "onnxruntime"])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lorafed"):
        report = export_adapter(adapter, tmp_path / "noort", str(tiny_model_dir))
    assert not (tmp_path / "noort" / "model.onnx").exists() and report.onnx_max_abs_diff is None
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1
    assert (
        "torch-only" in warned[0] and "pip install 'lorafed[onnx]'" in warned[0] and "onnx and onnxruntime" in warned[0]
    )
    assert "onnx and onnxruntime not installed" in report.onnx_skipped
    with pytest.raises(OnnxError, match=r"--format onnx needs onnx and onnxruntime; pip install 'lorafed\[onnx\]'"):
        export_adapter(adapter, tmp_path / "x", str(tiny_model_dir), "onnx")


def test_failed_onnx_graph_is_never_shipped(adapter, tiny_model_dir, tmp_path, caplog, monkeypatch) -> None:
    import logging

    from lorafed.serve import export as export_mod
    from lorafed.serve.onnx import OnnxError

    def broken(model, tok, path, batches, tolerance):
        Path(path).write_bytes(b"half a graph")
        raise OnnxError("parity check failed: onnxruntime logits differ from torch's by 0.5 > 0.0001")

    monkeypatch.setattr(export_mod, "export_onnx", broken)
    with caplog.at_level(logging.WARNING, logger="lorafed"):
        report = export_adapter(adapter, tmp_path / "m", str(tiny_model_dir))
    assert not (tmp_path / "m" / "model.onnx").exists() and (tmp_path / "m" / "model.safetensors").is_file()
    assert "the ONNX export failed (parity check failed" in report.onnx_skipped
    assert any("torch-only" in r.getMessage() for r in caplog.records)
    with pytest.raises(OnnxError, match="parity check failed"):
        export_adapter(adapter, tmp_path / "o", str(tiny_model_dir), "onnx")
    report = export_adapter(adapter, tmp_path / "h", str(tiny_model_dir), dtype="fp16")  # fp32 only: no attempt
    assert "fp32 exports only" in report.onnx_skipped and not (tmp_path / "h" / "model.onnx").exists()


def test_peft_export_loads_with_auto_peft_and_matches_predict(adapter, tiny_model_dir, tmp_path, capsys) -> None:
    """AutoPeftModelForSequenceClassification on the peft export gives lorafed predict's probabilities.

    Both sides are fp32 (export reloads the base in fp32, never int8), so they differ only by the
    rounding of the merge (W + s B A summed once vs. applied as two matmuls): ~1e-7 in the logits,
    well inside 1e-5. The oracle is plain transformers on the merged export with a numpy softmax.
    """
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    peft_dir, merged = tmp_path / "peft", tmp_path / "merged"
    export_adapter(adapter, peft_dir, str(tiny_model_dir), fmt="peft")
    export_adapter(adapter, merged, str(tiny_model_dir), with_onnx=False)
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_model_dir) and "classifier" in cfg["modules_to_save"]
    id2label = dict(enumerate(LABELS))
    # peft builds the base from the base's own config, which has no labels: the saved 3-way head does not fit
    # a default 2-way one. The model card gives the label maps that fix it (num_labels follows from id2label).
    with pytest.raises(RuntimeError, match="size mismatch"):
        AutoPeftModelForSequenceClassification.from_pretrained(str(peft_dir))
    card = (peft_dir / "README.md").read_text()
    assert "AutoPeftModelForSequenceClassification.from_pretrained" in card
    assert "id2label = {0: 'bad', 1: 'good', 2: 'meh'}" in card and "label2id=label2id" in card
    label2id = {lab: i for i, lab in id2label.items()}
    model = AutoPeftModelForSequenceClassification.from_pretrained(
        str(peft_dir), id2label=id2label, label2id=label2id
    ).eval()
    assert model.config.id2label == id2label and model.config.num_labels == 3
    assert model.config.label2id == {"bad": 0, "good": 1, "meh": 2}
    tok = AutoTokenizer.from_pretrained(peft_dir)
    enc = tok(TEXTS, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        got = _np_softmax(model(**enc).logits.numpy())

    oracle_model = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    oracle_enc = AutoTokenizer.from_pretrained(merged)(TEXTS, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        oracle = _np_softmax(oracle_model(**oracle_enc).logits.numpy())
    assert np.abs(got - oracle).max() <= 1e-5

    rows = tmp_path / "rows.csv"
    rows.write_text("text\n" + "".join(f'"{t}"\n' for t in TEXTS), encoding="utf-8")
    assert main(["predict", "--model", str(merged), "--input", str(rows)]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    predicted = np.array([[r["probabilities"][lab] for lab in LABELS] for r in records])
    assert np.abs(got - predicted).max() <= 1e-5
    assert [r["label"] for r in records] == [id2label[int(i)] for i in got.argmax(axis=1)]
