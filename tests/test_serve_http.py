"""HTTP serving of a tiny merged export: parity with predict_proba, limits, a full queue, metadata, explain.

Also the export's plain-transformers behaviour: ``pipeline("text-classification")`` on the export
truncates like training and matches ``predict_proba`` on a long text; the model card and the peft
export's portable base.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient

from lorafed.config import DataConfig
from lorafed.errors import ModelError
from lorafed.serve.export import export_adapter
from lorafed.serve.http import create_app
from lorafed.serve.infer import load_serving_model, predict_proba
from lorafed.serve.limits import ServeError, ServeLimits
from tests.helpers_adapter import LABELS, random_adapter

TEXTS = ["love this soft dress", "awful itchy top, returned it", "plain okay size", "great color but tight"]


def _data(pair_mode: str = "pair", max_length: int = 24) -> DataConfig:
    return DataConfig(
        path="reviews.csv",
        text_column="review",
        label_column="label",
        text_pair_column="title",
        pair_mode=pair_mode,
        max_length=max_length,
    )


@pytest.fixture(scope="module")
def export_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A merged export of a random adapter (title/review pairs, max_length 24), from a fake run folder."""
    run = tmp_path_factory.mktemp("run")
    (run / "rounds").mkdir()
    adapter = random_adapter(tiny_model_dir, seed=7)
    src = run / "rounds" / f"global_r{adapter.meta.round}.safetensors"
    row = {"round": adapter.meta.round, "accuracy": 0.75, "macro_f1": 0.7, "test_loss": 0.6, "clients": ["a", "b"]}
    (run / "metrics.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
    out = tmp_path_factory.mktemp("exp") / "merged"
    export_adapter(adapter, out, str(tiny_model_dir), data=_data(), source=str(src))
    return out


@pytest.fixture(scope="module")
def client(export_dir: Path):
    with TestClient(create_app(export_dir, ServeLimits(max_texts=8, max_text_chars=400, max_body_bytes=4000))) as c:
        yield c


def test_predict_matches_predict_proba(client, export_dir) -> None:
    sm = load_serving_model(export_dir)
    res = client.post("/predict", json={"texts": TEXTS})
    assert res.status_code == 200, res.text
    body = res.json()
    want = predict_proba(sm, TEXTS)
    assert body["labels"] == list(LABELS)
    for pred, p in zip(body["predictions"], want, strict=True):
        got = np.array([pred["probabilities"][lab] for lab in LABELS])
        assert np.abs(got - p).max() <= 1e-5
        assert pred["label"] == LABELS[int(p.argmax())] and pred["score"] == pytest.approx(float(p.max()), abs=1e-6)
    pairs = [[t, f"title {i}"] for i, t in enumerate(TEXTS)]
    res = client.post("/predict", json={"pairs": pairs})
    assert res.status_code == 200, res.text
    want = predict_proba(sm, TEXTS, [p[1] for p in pairs])
    got = np.array([[r["probabilities"][lab] for lab in LABELS] for r in res.json()["predictions"]])
    assert np.abs(got - want).max() <= 1e-5


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(export_dir) -> None:
    sm = load_serving_model(export_dir)
    app = create_app(export_dir, ServeLimits(max_batch=16, max_wait_ms=200), sm=sm)
    want = predict_proba(sm, TEXTS)
    results: dict[int, dict] = {}
    with TestClient(app) as c:

        def ask(i: int) -> None:
            results[i] = c.post("/predict", json={"texts": [TEXTS[i]]}).json()

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(TEXTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        batches = app.state.batcher.batches
    assert len(results) == len(TEXTS)
    for i, p in enumerate(want):
        got = np.array([results[i]["predictions"][0]["probabilities"][lab] for lab in LABELS])
        assert np.abs(got - p).max() <= 1e-5
    assert batches < len(TEXTS)  # at least two requests shared a forward pass


def test_every_batch_runs_on_one_model_thread(export_dir) -> None:
    sm = load_serving_model(export_dir)
    app = create_app(export_dir, ServeLimits(max_batch=1, max_wait_ms=0), sm=sm)
    batcher = app.state.batcher
    seen: list[tuple[int, str]] = []
    real = batcher.run_batch

    def spy(jobs):
        seen.append((threading.get_ident(), threading.current_thread().name))
        return real(jobs)

    batcher.run_batch = spy
    with TestClient(app) as c:
        for text in TEXTS:
            assert c.post("/predict", json={"texts": [text]}).status_code == 200
    assert len(seen) == len(TEXTS)  # max_batch 1: one batch per request
    assert len({ident for ident, _ in seen}) == 1 and seen[0][1].startswith("lorafed-model")
    assert threading.get_ident() not in {ident for ident, _ in seen}


def test_limits_answer_413_and_422_naming_the_limit(client) -> None:
    res = client.post("/predict", content=b'{"texts": ["' + b"a" * 5000 + b'"]}')
    assert res.status_code == 413
    assert res.json()["error"]["limit"] == "max_body_bytes" and "max_body_bytes" in res.json()["error"]["message"]
    res = client.post("/predict", json={"texts": ["x"] * 9})
    assert res.status_code == 422 and res.json()["error"]["limit"] == "max_texts"
    assert res.json()["error"]["allowed"] == 8 and res.json()["error"]["received"] == 9
    res = client.post("/predict", json={"texts": ["y" * 401]})
    assert res.status_code == 422 and res.json()["error"]["limit"] == "max_text_chars"
    res = client.post("/predict", json={"pairs": [["ok", "z" * 401]]})
    assert res.status_code == 422 and res.json()["error"]["limit"] == "max_text_chars"
    res = client.post("/predict", json={"texts": ["a"] * 5, "explain": True})
    assert res.status_code == 422 and res.json()["error"]["limit"] == "max_explain_texts"
    for bad in (b"not json", b"[1]", b'{"texts": []}', b'{"texts": [1]}', b'{"texts": ["a"], "pairs": []}'):
        res = client.post("/predict", content=bad)
        assert res.status_code == 422 and "error" in res.json(), bad
    res = client.post("/predict", json={"texts": ["   "]})
    assert res.status_code == 422 and res.json()["error"]["code"] == "empty_text"


def test_full_queue_answers_503_at_once(export_dir) -> None:
    sm = load_serving_model(export_dir)
    app = create_app(export_dir, ServeLimits(max_batch=1, max_wait_ms=0, max_queue=1), sm=sm)
    batcher = app.state.batcher
    entered, release = threading.Event(), threading.Event()
    real = batcher.run_batch

    def slow(jobs):
        entered.set()
        release.wait(30)
        return real(jobs)

    batcher.run_batch = slow
    codes: list[int] = []
    with TestClient(app) as c:
        first = threading.Thread(target=lambda: codes.append(c.post("/predict", json={"texts": ["a"]}).status_code))
        first.start()
        assert entered.wait(30)  # the worker holds request 1
        second = threading.Thread(target=lambda: codes.append(c.post("/predict", json={"texts": ["b"]}).status_code))
        second.start()
        deadline = time.monotonic() + 30
        while batcher.queue.qsize() < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        t0 = time.monotonic()
        res = c.post("/predict", json={"texts": ["c"]})
        assert time.monotonic() - t0 < 5
        assert res.status_code == 503 and res.json()["error"]["limit"] == "max_queue"
        assert res.headers["retry-after"] == "1"
        release.set()
        first.join(30)
        second.join(30)
    assert codes == [200, 200]


def test_health_metadata_and_page(client, tiny_model_dir, export_dir) -> None:
    res = client.get("/health")
    assert res.status_code == 200 and res.json()["status"] == "ok"
    meta = client.get("/metadata").json()
    assert meta["labels"] == list(LABELS)
    assert meta["base_model"] == str(tiny_model_dir)
    assert meta["base_fingerprint"].startswith("sha256:") and meta["adapter_fingerprint"].startswith("sha256:")
    assert meta["rounds"] == 3
    assert meta["final_metrics"] == {"accuracy": 0.75, "macro_f1": 0.7, "test_loss": 0.6}
    assert meta["input"]["pair_mode"] == "pair" and meta["input"]["max_length"] == 24
    # The default export carries model.onnx (when the onnx packages are installed), so auto serves onnxruntime.
    has_onnx = (export_dir / "model.onnx").is_file()
    assert meta["backend"] == ("onnx" if has_onnx else "torch")
    assert meta["backend_reason"].startswith("auto: the export has " + ("model.onnx" if has_onnx else "no model.onnx"))
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<form" in page.text and "http://" not in page.text and "https://" not in page.text


def test_explain_returns_token_attributions(client, export_dir) -> None:
    text = "love this soft dress"
    res = client.post("/predict", json={"texts": [text], "explain": True})
    assert res.status_code == 200, res.text
    pred = res.json()["predictions"][0]
    attr = pred["attributions"]
    assert attr["label"] == pred["label"] and attr["method"].startswith("integrated_gradients")
    assert [w["word"] for w in attr["words"]] == text.split()
    assert all(text[w["start"] : w["end"]] == w["word"] for w in attr["words"])
    # Completeness: attributions add up to p(text) - p(baseline) (approximately, 16 steps).
    from lorafed.serve.explain import token_attributions

    sm = load_serving_model(export_dir)
    full = token_attributions(sm, text, steps=64)
    total = sum(t["score"] for t in full["tokens"])
    base_ids = sm.tokenizer([text], return_tensors="pt")
    ids = base_ids["input_ids"].clone()
    ids[0, 1:-1] = sm.tokenizer.pad_token_id
    import torch

    with torch.no_grad():
        p0 = torch.softmax(sm.model(input_ids=ids, attention_mask=base_ids["attention_mask"]).logits, -1)[0]
    label = LABELS.index(full["label"])
    assert total == pytest.approx(full["probability"] - float(p0[label]), abs=2e-2)


def test_export_behaves_like_training_in_plain_transformers(export_dir) -> None:
    from transformers import pipeline

    cfg = json.loads((export_dir / "config.json").read_text())
    assert cfg["lorafed"]["text"]["pair_mode"] == "pair" and cfg["lorafed"]["text"]["max_length"] == 24
    tok_cfg = json.loads((export_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["model_max_length"] == 24
    long_text = " ".join(["the fabric is soft but the size runs small and the color faded"] * 20)
    sm = load_serving_model(export_dir)
    want = predict_proba(sm, [long_text])[0]
    clf = pipeline("text-classification", model=str(export_dir), device="cpu")
    got = {d["label"]: d["score"] for d in clf(long_text, truncation=True, top_k=None)}
    assert np.abs(np.array([got[lab] for lab in LABELS]) - want).max() <= 1e-5
    got = {d["label"]: d["score"] for d in clf({"text": long_text, "text_pair": "title"}, truncation=True, top_k=None)}
    want = predict_proba(sm, [long_text], ["title"])[0]
    assert np.abs(np.array([got[lab] for lab in LABELS]) - want).max() <= 1e-5
    # Without lorafed_export.json the rule still comes from config.json.
    (export_dir / "lorafed_export.json").rename(export_dir / "info.bak")
    try:
        assert load_serving_model(export_dir).text["max_length"] == 24
    finally:
        (export_dir / "info.bak").rename(export_dir / "lorafed_export.json")
    card = (export_dir / "README.md").read_text()
    needles = ("bad", "good", "meh", "text-classification", "`review`", "`title`", "after 3 round", "accuracy 0.7500")
    for needle in needles:
        assert needle in card, needle


def test_peft_export_names_portable_base(tiny_model_dir, tmp_path) -> None:
    from lorafed.config import PACKAGED_BACKBONE
    from lorafed.serve.export import PACKAGED_HUB_ID, portable_base

    assert portable_base(PACKAGED_BACKBONE) == PACKAGED_HUB_ID
    out = tmp_path / "peft"
    export_adapter(random_adapter(tiny_model_dir, seed=2), out, str(tiny_model_dir), fmt="peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_model_dir)
    assert "PeftModel.from_pretrained" in (out / "README.md").read_text()


def test_bad_limits_and_model_dir_are_named_errors(tmp_path) -> None:
    with pytest.raises(ServeError, match="max_batch=0"):
        ServeLimits(max_batch=0)
    with pytest.raises(ModelError, match=r"no config\.json"):
        create_app(tmp_path)


def test_hand_written_attributions_match_captum(export_dir, monkeypatch) -> None:
    from lorafed.serve import explain

    pytest.importorskip("captum")
    sm = load_serving_model(export_dir)
    via_captum = explain.token_attributions(sm, "great color but tight", steps=8)
    monkeypatch.setattr(explain, "captum_available", lambda: False)
    by_hand = explain.token_attributions(sm, "great color but tight", steps=8)
    assert by_hand["method"] == "integrated_gradients (by hand)"
    got = np.array([t["score"] for t in by_hand["tokens"]])
    want = np.array([t["score"] for t in via_captum["tokens"]])
    assert np.abs(got - want).max() <= 1e-5
