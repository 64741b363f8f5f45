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
