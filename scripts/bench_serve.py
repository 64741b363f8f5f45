"""Serving benchmark: ``lorafed serve`` (torch and onnxruntime backends) against ``transformers.pipeline``.

For each export (clothing reviews, retail intents), the script starts ``serve(DIR, backend=B)`` in a
subprocess on a free 127.0.0.1 port, waits for ``/health``, and at each client concurrency (1, 8,
32) sends ``/predict`` requests of ``--texts-per-request`` short texts from that many client threads
(a real HTTP client, httpx), bounded by ``--requests`` and ``--seconds`` per measurement, after a
warm-up. Each cell is repeated ``--repeats`` times; the report gives medians (and ranges) of
requests/s, texts/s and the p50/p99 latency. The server is stopped with SIGTERM and must exit cleanly.

The reference runs the same requests through plain
``transformers.pipeline("text-classification", model=DIR, truncation=True)`` in this process, one
request's texts as one batch at a time (``batch_size=k``), measured the same way (requests of k
texts per second, per-call latency). It has no HTTP in the way, so the comparison favours it.

Targets (``targets`` in the JSON): at concurrency 8, served texts/s >= 2x the pipeline's, and p99
latency < 1 s, per export and backend. The machine's core count is recorded: the targets are meant
for 2 cores and short texts.

Exports: ``--clothing DIR --intents DIR`` (folders written by ``lorafed export``, ideally
``--format onnx``), or, when absent, built here from the configs with an *untrained* adapter (LoRA
B = 0, a fresh head): throughput does not depend on training. ``--tiny`` runs a smoke version on a
random hidden-32 BERT (what the test runs).

Example::

    env PYTHONPATH=. python scripts/bench_serve.py                      # builds untrained exports, ~6 min
    env PYTHONPATH=. python scripts/bench_serve.py --clothing exp/clothing --intents exp/intents
    env PYTHONPATH=. python scripts/bench_serve.py --tiny --out /tmp/serve
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lorafed.measure import command_line, met_word, pythonpath_env, summarize, target, write_results  # noqa: E402

SHORT_TEXTS = {
    "clothing": [
        "love this soft dress, fits perfectly",
        "awful itchy fabric, returned it the next day",
        "the color is okay but the size runs small",
        "cute top, true to size and very flattering",
        "cheap material, the seams came apart after one wash",
        "great jeans for the price, would buy again",
        "too long for me and the straps kept slipping",
        "beautiful print, comfortable all day",
    ],
    "intents": [
        "where is my order?",
        "I want to return these shoes",
        "can I change my delivery address",
        "how do I cancel my purchase",
        "do you have this in a larger size?",
        "my refund has not arrived yet",
        "I need to speak to a human agent",
        "what payment methods do you accept",
    ],
}
SHORT_TEXTS["tiny"] = SHORT_TEXTS["clothing"]
CONFIGS = {
    "clothing": ROOT / "configs" / "clothing_recommend.yaml",
    "intents": ROOT / "configs" / "retail_intents.yaml",
}
SPEEDUP_TARGET = 2.0
P99_TARGET_S = 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def onnx_ok() -> bool:
    """Whether onnxruntime imports here."""
    from lorafed.serve.onnx import onnxruntime_available

    return onnxruntime_available()


def build_export(out: Path, base: str, labels: Sequence[str], lora: Any, data: Any, seed: int = 0) -> Path:
    """Export an untrained adapter (LoRA B = 0, fresh head) of ``base`` to ``out`` (onnx format when possible)."""
    from lorafed.config import ModelConfig
    from lorafed.model.backbone import load_client_model, lora_config_dict
    from lorafed.serve.export import EXPORT_INFO, export_adapter
    from lorafed.wire.adapter import get_adapter_state
    from lorafed.wire.payload import Payload, PayloadMeta

    fmt = "onnx" if onnx_ok() else "merged"
    if (out / EXPORT_INFO).is_file() and (fmt == "merged" or (out / "model.onnx").is_file()):
        return out
    client = load_client_model(ModelConfig(base, "fp32", lora), tuple(labels), seed=seed, precision="fp32")
    tensors = {k: v.detach().clone() for k, v in get_adapter_state(client.model).items()}
    meta = PayloadMeta(client.fingerprint, lora_config_dict(lora), tuple(labels), 1, 0, "untrained", kind="global")
    export_adapter(Payload(tensors, meta), out, base, fmt, data=data, source="untrained adapter (bench_serve)")
    return out


def build_from_config(name: str, folder: Path) -> Path:
    """An untrained export for ``configs/<name>`` (labels: the data file's distinct labels)."""
    from lorafed.config import load_config
    from lorafed.data.clean import _label_str
    from lorafed.data.read import read_table

    cfg = load_config(CONFIGS[name])
    labels = cfg.data.labels
    if labels is None:
        frame = read_table(
            str((ROOT / cfg.data.path).resolve() if not Path(cfg.data.path).is_absolute() else cfg.data.path)
        )
        labels = tuple(sorted({s for s in (_label_str(v) for v in frame[cfg.data.label_column].tolist()) if s}))
    return build_export(folder / name, cfg.model.name_or_path, labels, cfg.model.lora, cfg.data)


def build_tiny(folder: Path) -> Path:
    """An export of an untrained adapter on the tests' random hidden-32 BERT."""
    from lorafed.config import DataConfig, LoraSettings

    sys.path.insert(0, str(ROOT / "scripts"))
    from _tiny import make_tiny

    model_dir, _ = make_tiny(folder, rows=30)
    lora = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=("query", "value"))
    data = DataConfig(path="reviews.csv", text_column="review", label_column="label", max_length=32)
    return build_export(folder / "tiny-export", str(model_dir), ("bad", "good", "meh"), lora, data)


def _cell(fn: Any, requests: int, seconds: float, concurrency: int, texts_for: Any) -> dict[str, Any]:
    """Run ``fn(texts) -> status`` from ``concurrency`` threads, ``requests`` times or until ``seconds``."""
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    lock = threading.Lock()
    counter = iter(range(requests))
    stop_at = time.monotonic() + seconds

    def worker() -> None:
        call = fn()
        while time.monotonic() < stop_at:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            status = call(texts_for(i))
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                statuses[status] += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies)
    n = len(latencies)
    return {
        "requests": n,
        "seconds": wall,
        "requests_per_s": n / wall if wall > 0 else 0.0,
        "p50_s": float(np.percentile(lat, 50)) if n else None,
        "p99_s": float(np.percentile(lat, 99)) if n else None,
        "statuses": dict(statuses),
    }


def _summary(runs: list[dict[str, Any]], k: int) -> dict[str, Any]:
    rps = summarize([r["requests_per_s"] for r in runs])
    return {
        "requests_per_s": rps,
        "texts_per_s": summarize([r["requests_per_s"] * k for r in runs]),
        "p50_s": summarize([r["p50_s"] for r in runs if r["p50_s"] is not None] or [float("nan")]),
        "p99_s": summarize([r["p99_s"] for r in runs if r["p99_s"] is not None] or [float("nan")]),
        "requests": sum(r["requests"] for r in runs),
        "statuses": dict(sum((Counter(r["statuses"]) for r in runs), Counter())),
        "runs": runs,
    }


def bench_pipeline(model_dir: Path, texts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """The same requests through ``transformers.pipeline`` in this process, one request's texts per call."""
    from transformers import pipeline

    clf = pipeline("text-classification", model=str(model_dir), truncation=True)
    k = args.texts_per_request

    def texts_for(i: int) -> list[str]:
        return [texts[(i + j) % len(texts)] for j in range(k)]

    def fn() -> Any:
        def call(batch: list[str]) -> str:
            out = clf(batch, batch_size=len(batch), top_k=None)
            return "200" if len(out) == len(batch) else "bad"

        return call

    _cell(fn, max(4, args.warmup), args.seconds, 1, texts_for)
    runs = [_cell(fn, args.requests, args.seconds, 1, texts_for) for _ in range(args.repeats)]
    return {"concurrency": 1, **_summary(runs, k)}


def bench_server(model_dir: Path, backend: str, texts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Start ``serve(model_dir, backend)`` and measure it at each concurrency; stop it with SIGTERM."""
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    code = (
        "from lorafed.serve.http import serve; "
        f"serve({str(model_dir)!r}, port={port}, log_level='warning', backend={backend!r})"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env=pythonpath_env(ROOT))
    k = args.texts_per_request
    out: dict[str, Any] = {"backend": backend, "by_concurrency": {}}
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server ({backend}) exited with {proc.returncode} before answering")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server ({backend}) did not become healthy within 180 s")
            time.sleep(0.2)
        out["served_backend"] = httpx.get(f"{url}/metadata", timeout=5).json().get("backend")

        def texts_for(i: int) -> list[str]:
            return [texts[(i + j) % len(texts)] for j in range(k)]

        def fn() -> Any:
            client = httpx.Client(base_url=url, timeout=60)

            def call(batch: list[str]) -> str:
                try:
                    return str(client.post("/predict", json={"texts": batch}).status_code)
                except httpx.HTTPError as exc:
                    return type(exc).__name__

            return call

        for c in args.concurrency:
            _cell(fn, max(args.warmup, 2 * c), args.seconds, c, texts_for)
            runs = [_cell(fn, args.requests, args.seconds, c, texts_for) for _ in range(args.repeats)]
            out["by_concurrency"][str(c)] = {"concurrency": c, **_summary(runs, k)}
        out["server_batches"] = httpx.get(f"{url}/health", timeout=5).json().get("batches")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    out["sigterm_exit_code"] = rc
    out["clean_exit"] = rc in (0, -signal.SIGTERM)  # uvicorn shuts down gracefully, then re-raises the signal
    return out


def judge(models: dict[str, Any], focus: int) -> list[dict[str, Any]]:
    """Targets at concurrency ``focus``: texts/s >= 2x the pipeline's, p99 < 1 s, per export and backend."""
    out = []
    for name, m in models.items():
        ref = m["pipeline"]["texts_per_s"]["median"]
        for backend, b in m["servers"].items():
            cell = b["by_concurrency"].get(str(focus))
            if cell is None:
                continue
            speedup = cell["texts_per_s"]["median"] / ref if ref > 0 else float("inf")
            out.append(
                target(
                    f"{name} {backend}: texts/s at concurrency {focus} >= {SPEEDUP_TARGET:g}x pipeline",
                    round(speedup, 3),
                    speedup >= SPEEDUP_TARGET,
                    export=name,
                    backend=backend,
                    served_texts_per_s=cell["texts_per_s"]["median"],
                    pipeline_texts_per_s=ref,
                )
            )
            p99 = cell["p99_s"]["median"]
            out.append(
                target(
                    f"{name} {backend}: p99 latency at concurrency {focus} < {P99_TARGET_S:g} s",
                    round(p99, 4),
                    p99 < P99_TARGET_S,
                    export=name,
                    backend=backend,
                )
            )
    return out


def faster_backend(models: dict[str, Any], focus: int) -> str | None:
    """The backend with the higher median texts/s at ``focus`` on every export (``None`` if they disagree)."""
    winners = set()
    for m in models.values():
        cells = {b: s["by_concurrency"].get(str(focus)) for b, s in m["servers"].items()}
        cells = {b: c for b, c in cells.items() if c}
        if len(cells) < 2:
            return None
        winners.add(max(cells, key=lambda b: cells[b]["texts_per_s"]["median"]))
    return winners.pop() if len(winners) == 1 else None


def markdown(result: dict[str, Any]) -> list[str]:
    """The report."""
    s = result["setup"]
    lines = [
        "# Serving benchmark",
        "",
        f"{s['cores']} cores ({s['machine']}), torch {s['torch']}, onnxruntime {s['onnxruntime']}, "
        f"transformers {s['transformers']}; {s['texts_per_request']} short texts per request, "
        f"<= {s['requests']} requests or {s['seconds']:g} s per measurement, median of {s['repeats']} "
        f"(range in brackets). Exports: {s['exports']}.",
        "",
        "| export | engine | concurrency | requests/s | texts/s | p50 ms | p99 ms | non-200 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]

    def row(name: str, engine: str, c: int, cell: dict[str, Any]) -> str:
        bad = sum(v for k, v in cell["statuses"].items() if k != "200")
        return (
            f"| {name} | {engine} | {c} | {cell['requests_per_s']['median']:.1f} | "
            f"{cell['texts_per_s']['median']:.1f} ({cell['texts_per_s']['min']:.0f}-{cell['texts_per_s']['max']:.0f})"
            f" | {cell['p50_s']['median'] * 1000:.1f} | {cell['p99_s']['median'] * 1000:.1f} | {bad} |"
        )

    for name, m in result["models"].items():
        lines.append(row(name, "transformers.pipeline (in-process)", 1, m["pipeline"]))
        for backend, b in m["servers"].items():
            for c, cell in b["by_concurrency"].items():
                lines.append(row(name, f"lorafed serve --backend {backend}", int(c), cell))
    lines += ["", "## Targets", ""]
    lines += [f"- {t['target']}: {t['value']} ({met_word(t['met'])})" for t in result["targets"]]
    lines += [
        "",
        f"Faster backend at concurrency {result['focus_concurrency']}: {result['faster_backend'] or 'not decided'} "
        "(`lorafed serve --backend auto` takes onnx whenever the export has model.onnx).",
        "",
        "Reproduce:",
        "",
        f"    {result['command']}",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0 when every request answered 200 and every server stopped cleanly."""
    raw = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clothing", help="clothing export folder (default: build an untrained one)")
    ap.add_argument("--intents", help="intents export folder (default: build an untrained one)")
    ap.add_argument("--build-dir", default=str(ROOT / "results" / "serve_exports"), help="where built exports go")
    ap.add_argument("--tiny", action="store_true", help="smoke run on a random hidden-32 BERT")
    ap.add_argument("--backends", default=None, help="comma-separated (default: torch,onnx when onnxruntime imports)")
    ap.add_argument("--concurrency", default=None, help="comma-separated client threads (default 1,8,32)")
    ap.add_argument("--texts-per-request", type=int, default=4)
    ap.add_argument("--requests", type=int, default=None, help="requests per measurement (default 300)")
    ap.add_argument("--seconds", type=float, default=None, help="time cap per measurement (default 5)")
    ap.add_argument("--repeats", type=int, default=None, help="repeats per cell (default 3)")
    ap.add_argument("--warmup", type=int, default=8, help="warm-up requests before each cell (at least 2x threads)")
    ap.add_argument("--out", default=str(ROOT / "results" / "serve"), help="writes OUT.json and OUT.md")
    args = ap.parse_args(raw)
    tiny = args.tiny
    args.concurrency = [int(c) for c in (args.concurrency or ("1,8" if tiny else "1,8,32")).split(",")]
    args.requests = args.requests or (12 if tiny else 300)
    args.seconds = args.seconds or (3.0 if tiny else 5.0)
    args.repeats = args.repeats or (1 if tiny else 3)
    if tiny:
        args.warmup = min(args.warmup, 4)
    backends = (args.backends or ("torch,onnx" if onnx_ok() else "torch")).split(",")
    if min(args.concurrency) < 1 or args.requests < 1 or args.texts_per_request < 1 or args.repeats < 1:
        ap.error("--concurrency, --requests, --texts-per-request and --repeats must be >= 1")
    if "onnx" in backends and not onnx_ok():
        ap.error("--backends onnx needs onnxruntime (pip install 'lorafed[onnx]')")

    t_start = time.perf_counter()
    exports: dict[str, Path] = {}
    if tiny:
        tmp = tempfile.TemporaryDirectory(prefix="bench-serve-")
        exports["tiny"] = build_tiny(Path(tmp.name))
        how = "tiny random BERT, untrained adapter (built here)"
    else:
        built = []
        for name in ("clothing", "intents"):
            given = getattr(args, name)
            if given:
                exports[name] = Path(given)
            else:
                exports[name] = build_from_config(name, Path(args.build_dir))
                built.append(name)
        how = (
            ("untrained adapters exported from the configs (" + ", ".join(built) + ")" if built else "given folders")
            + "; "
            + ", ".join(f"{k}: {v}" for k, v in exports.items())
        )
    for name, d in exports.items():
        if "onnx" in backends and not (d / "model.onnx").is_file():
            ap.error(f"{name} export {d} has no model.onnx; export it with --format onnx or pass --backends torch")

    import torch
    import transformers

    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    models: dict[str, Any] = {}
    ok = True
    for name, d in exports.items():
        texts = SHORT_TEXTS[name]
        print(f"[{name}] pipeline reference ...", file=sys.stderr, flush=True)
        entry: dict[str, Any] = {"dir": str(d), "pipeline": bench_pipeline(d, texts, args), "servers": {}}
        for backend in backends:
            print(f"[{name}] lorafed serve --backend {backend} ...", file=sys.stderr, flush=True)
            srv = bench_server(d, backend, texts, args)
            entry["servers"][backend] = srv
            ok = ok and srv["clean_exit"] and srv["served_backend"] == backend
            ok = ok and all(set(c["statuses"]) == {"200"} for c in srv["by_concurrency"].values())
        models[name] = entry
    focus = 8 if 8 in args.concurrency else max(args.concurrency)
    result = {
        "setup": {
            "cores": os.cpu_count(),
            "machine": platform.machine(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "transformers": transformers.__version__,
            "onnxruntime": ort_version,
            "texts_per_request": args.texts_per_request,
            "requests": args.requests,
            "seconds": args.seconds,
            "repeats": args.repeats,
            "concurrency": args.concurrency,
            "backends": backends,
            "exports": how,
            "tiny": tiny,
            "reference": "transformers.pipeline('text-classification', model=DIR, truncation=True), in-process, "
            "one request's texts per call (batch_size=k), sequential",
        },
        "models": models,
        "focus_concurrency": focus,
        "faster_backend": faster_backend(models, focus),
        "targets": judge(models, focus),
        "all_ok": ok,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "command": command_line("bench_serve.py", raw),
    }
    json_path, md_path = write_results(args.out, result, markdown(result))
    print("\n".join(markdown(result)))
    print(f"written {json_path} and {md_path} in {result['wall_s']} s", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
