"""Command-line verbs at the end of a federation: ``combine``, ``export``, ``predict``, ``evaluate``, ``serve``.

Why one module of ~300 lines: the four verbs after a federation share their argument
handling; most of the length is each verb's --help text and example.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lorafed.cli.common import add_output, add_overrides, add_verb, optional_config, output_folder
from lorafed.errors import LorafedError

_MERGE_MATH = """\
math (w_i = weights normalised to sum 1, s_i = alpha_i / r_i, delta_i = s_i B_i A_i):
  fedavg  tensor FedAvg: A = sum_i w_i A_i, B = sum_i w_i B_i, each separately (what FedAvg
          does). The merged delta B A is NOT sum_i w_i delta_i. Needs equal r and alpha.
  cat     exact: A = [A_1; ...; A_k] (rows), B = [w_1 s_1 B_1 | ... | w_k s_k B_k] (columns),
          so B A = sum_i w_i delta_i exactly; r = sum_i r_i and alpha = r (scaling 1).
  svd     exact up to truncation: sum_i w_i delta_i = U S V^T cut to rank --rank (default: the
          largest input r): B = U_k S_k^1/2, A = S_k^1/2 V_k^T, alpha = r = k; prints each
          module's relative Frobenius error ||S_>k|| / ||S||.
  The classification head (a full weight) is the weighted mean sum_i w_i H_i in every mode.
"""


def add_parsers(sub: Any) -> None:
    """Register ``combine``, ``export``, ``predict``, ``evaluate`` and ``serve``."""
    srv = add_verb(
        sub,
        "serve",
        help="serve an exported model over HTTP: /predict, /health, /metadata and a shopping-guide page at /",
        description=(
            "Start an HTTP service (FastAPI on uvicorn) for a merged export. POST /predict takes "
            '{"texts": [...]} or {"pairs": [[text, second], ...]} in the input rule training used, and answers '
            'labels with probabilities; add "explain": true for per-word attributions. Requests are gathered '
            "into micro-batches; limits on body size, texts per request and text length answer 413/422 with "
            "the limit named, and a full queue answers 503. Binds 127.0.0.1 unless --host says otherwise; "
            "stops cleanly on SIGTERM or Ctrl-C."
        ),
        example=(
            "lorafed serve --model results/clothing_recommend/merged\n"
            "curl -s localhost:8000/predict -H 'content-type: application/json' "
            '-d \'{"texts": ["Runs small, lovely fabric"]}\'\n'
            "open http://127.0.0.1:8000/ for the shopping-guide page"
        ),
    )
    srv.add_argument("--model", required=True, help="a merged export folder (lorafed export)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    srv.add_argument("--max-batch", type=int, default=32, help="texts per forward pass (micro-batch size)")
    srv.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a micro-batch waits to fill")
    srv.add_argument("--max-queue", type=int, default=256, help="requests waiting before 503")
    srv.add_argument(
        "--backend",
        choices=["auto", "torch", "onnx"],
        default="auto",
        help="inference engine: onnx runs model.onnx through onnxruntime; auto (default) takes onnx when the "
        "export has model.onnx (lorafed export writes it unless --no-onnx) and onnxruntime is installed, else "
        "torch; the choice and its reason are logged at start and shown in /metadata",
    )
    srv.set_defaults(func=cmd_serve)

    merge = add_verb(
        sub,
        "combine",
        help="combine several adapters into one, with weights (tensor FedAvg or exact delta merge)",
        description=(
            "Merge lorafed adapters trained on the same base, labels and target modules, for example the "
            "global adapters of two runs. The weights default to each adapter's num_examples."
        ),
        notes=_MERGE_MATH,
        example=(
            "lorafed combine runA/global_r3.safetensors runB/global_r3.safetensors "
            "--mode cat --weights 0.7,0.3 --out merged.safetensors\n"
            "lorafed combine a.safetensors b.safetensors c.safetensors --mode svd --rank 8 --out merged.safetensors"
        ),
    )
    merge.add_argument("adapters", nargs="+", help="adapter files (.safetensors)")
    merge.add_argument("--out", required=True, help="where to write the merged adapter")
    merge.add_argument("--mode", required=True, choices=["fedavg", "cat", "svd"], help="merge math (see below)")
    merge.add_argument("--weights", help="comma-separated weights, one per adapter (default: num_examples)")
    merge.add_argument("--rank", type=int, help="target rank of --mode svd")
    merge.set_defaults(func=_cmd_combine)

    export = add_verb(
        sub,
        "export",
        help="merge an adapter into its fp32 base and save a transformers model (or a peft adapter)",
        description=(
            "Reload the base in fp32 (never int8), apply the adapter, check on a fixed sample that the "
            "exported model's logits equal the adapter model's within 1e-4 (printed), and write "
            "--format merged (the default: a plain transformers directory with config id2label/label2id, "
            "safetensors weights and tokenizer, which AutoModelForSequenceClassification loads; in fp32 it "
            "also holds model.onnx, checked against torch within 1e-4, which lorafed serve runs through "
            "onnxruntime, about 1.5x faster than its torch backend; --no-onnx leaves it out) or --format peft "
            "(adapter_model.safetensors + adapter_config.json, with the head; loads with "
            "AutoPeftModelForSequenceClassification or PeftModel, given the labels as in the folder's "
            "README.md). Without the onnx and onnxruntime packages a merged export is torch-only, with one "
            "warning saying how to get them. The base must have the fingerprint recorded in the adapter's header."
        ),
        example=(
            "lorafed export --adapter results/run/rounds/global_r3.safetensors "
            "--config configs/clothing_recommend.yaml --out merged/\n"
            "lorafed predict --model merged/ --input new_reviews.csv --out predictions.jsonl\n"
            "lorafed serve --model merged/                     # onnxruntime, from merged/model.onnx\n"
            "lorafed export --adapter global_r3.safetensors --config CONFIG --out torch-only/ --no-onnx"
        ),
    )
    export.add_argument("--adapter", required=True, help="the adapter to export (.safetensors)")
    add_output(export, None, "output directory")
    export.add_argument("--config", help="run config: gives the base (model.name_or_path) and the text columns")
    add_overrides(export)
    export.add_argument("--base", help="base model directory or name (default: the config's, else the packaged MiniLM)")
    export.add_argument(
        "--whitening",
        help="the whitening file an adapter trained with model.whitening names in its header (default: the "
        "config's); it is written into the exported pooler",
    )
    export.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="saved weight dtype (merged)")
    export.add_argument(
        "--format",
        dest="fmt",
        choices=["merged", "onnx", "peft"],
        default="merged",
        help="what to write (default merged: with model.onnx in fp32 when onnx and onnxruntime are installed); "
        "onnx: the same, but fail instead of writing a torch-only export (model.onnx: opset 17, dynamic batch "
        "and sequence, onnxruntime logits checked against torch within 1e-4)",
    )
    export.add_argument(
        "--no-onnx",
        dest="with_onnx",
        action="store_false",
        help="--format merged without model.onnx (torch-only: a faster export, but lorafed serve then runs torch, "
        "~1.5x slower than onnxruntime)",
    )
    export.add_argument("--sample", help="CSV/JSONL/Parquet whose first 32 texts join the parity sample")
    export.set_defaults(func=_cmd_export)

    predict = add_verb(
        sub,
        "predict",
        help="classify the texts of a file (or stdin) with an exported model; writes JSONL",
        description=(
            "Classify each text of --input with a model written by 'lorafed export' (merged format) and "
            "write one JSON line per row: the row number, the predicted label and every label's probability."
        ),
        example=(
            "lorafed predict --model merged/ --input new_reviews.csv --out predictions.jsonl\n"
            "echo 'the zip broke after one wash' | lorafed predict --model merged/ --input -"
        ),
    )
    evaluate = add_verb(
        sub,
        "evaluate",
        help="score an exported model on a labelled file: accuracy, macro-F1, per-class, confusion PNG",
        description=(
            "Score a model written by 'lorafed export' on a labelled file: accuracy, macro-F1, per-class "
            "precision/recall/F1, written to OUT/metrics.json with a confusion matrix OUT/confusion.png."
        ),
        example="lorafed evaluate --model merged/ --input held_out.csv --label-column rating --out eval/",
    )
    for name, p in (("predict", predict), ("evaluate", evaluate)):
        p.add_argument("--model", required=True, help="a directory written by 'lorafed export' (merged format)")
        p.add_argument(
            "--input",
            required=True,
            help="CSV, JSONL or Parquet file" + (", or - (one text per line)" if name == "predict" else ""),
        )
        p.add_argument(
            "--text-column", help="the text column (default: the export's, else 'text', else the only column)"
        )
        p.add_argument("--pair-column", help="second text column (default: the export's, if the file has it)")
        p.add_argument("--batch-size", type=int, default=64, help="inference batch size")
    predict.add_argument("--out", default="-", help="JSONL output file, or - for stdout (default)")
    predict.add_argument(
        "--strict",
        action="store_true",
        help="refuse a file with rows that have no text (default: skip them, listed on stderr; 'row' in the "
        "output keeps the file's row numbers)",
    )
    predict.add_argument(
        "--backend", choices=["auto", "torch", "onnx"], default="auto", help="inference engine (as for serve)"
    )
    predict.set_defaults(func=_cmd_predict)
    evaluate.add_argument("--label-column", help="the gold label column (default: the export's, else 'label')")
    add_output(evaluate, None, "folder for metrics.json and confusion.png")
    evaluate.set_defaults(func=_cmd_evaluate)


def _cmd_combine(args: argparse.Namespace) -> int:
    from lorafed.serve.combine import combine_payloads
    from lorafed.wire.payload import save_payload
    from lorafed.wire.reader import load_payload

    weights = None
    if args.weights:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError as exc:
            raise LorafedError(f"--weights {args.weights!r}: expected comma-separated numbers") from exc
    if args.rank is not None and args.mode != "svd":
        raise LorafedError(f"--rank applies to --mode svd, not --mode {args.mode}")
    payloads = [load_payload(p) for p in args.adapters]
    tensors, meta, result = combine_payloads(payloads, args.adapters, args.mode, weights, args.rank)
    path = save_payload(args.out, tensors, meta)
    ws = ", ".join(f"{w:.4f}" for w in meta.metrics["weights"])  # type: ignore[union-attr]
    print(f"merged {len(payloads)} adapters ({args.mode}, weights {ws}): r={result.r}, alpha={meta.lora['alpha']}")
    if result.truncation:
        worst = max(result.truncation, key=result.truncation.__getitem__)
        print(
            f"svd truncation to rank {result.r}: relative Frobenius error max {result.truncation[worst]:.3e} "
            f"({worst}), mean {sum(result.truncation.values()) / len(result.truncation):.3e}"
        )
    print(f"written to {path}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from lorafed.config import PACKAGED_BACKBONE
    from lorafed.serve.export import export_adapter
    from lorafed.wire.reader import load_payload

    if not args.with_onnx and args.fmt != "merged":
        raise LorafedError(f"--no-onnx applies to --format merged, not --format {args.fmt}")
    config = optional_config(args.config, args.overrides)
    base = args.base or (config.model.name_or_path if config else PACKAGED_BACKBONE)
    texts: list[str] = []
    if args.sample:
        from lorafed.data.read import read_table

        frame = read_table(args.sample)
        col = config.data.text_column if config else "text"
        if col not in frame.columns:
            raise LorafedError(
                f"{args.sample}: text column {col!r} not found (columns: {', '.join(map(str, frame.columns))})"
            )
        texts = [str(t) for t in frame[col].dropna().tolist()[:32] if str(t).strip()]
    payload = load_payload(args.adapter)
    out = output_folder(args.out, None, args.overwrite)
    report = export_adapter(
        payload,
        out,
        base,
        args.fmt,
        args.dtype,
        texts,
        config.data if config else None,
        args.adapter,
        with_onnx=args.with_onnx,
        whitening=args.whitening or (config.model.whitening if config else None),
    )
    print(
        f"parity ({report.sample_rows} sequences): max |{report.format} - adapter| logit difference "
        f"{report.max_abs_diff:.3e} (tolerance 1e-4)"
    )
    if report.onnx_max_abs_diff is not None:
        print(f"onnxruntime vs torch: max logit difference {report.onnx_max_abs_diff:.3e} (tolerance 1e-4)")
        print("model.onnx written: lorafed serve runs it through onnxruntime")
    elif report.onnx_skipped:
        print(f"no model.onnx ({report.onnx_skipped}): torch-only export")
    if report.cast_max_abs_diff is not None:
        print(f"after casting to {report.dtype}: max logit difference {report.cast_max_abs_diff:.3e}")
    print(f"{report.format} model ({len(report.labels)} labels, {report.dtype}) written to {report.out}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from lorafed.files import atomic_write_text
    from lorafed.serve.infer import load_serving_model, predict_proba, prediction_records, read_rows, skipped_message

    _check_batch(args.batch_size)
    sm = load_serving_model(args.model, args.backend)
    got = read_rows(args.input, sm, args.text_column, args.pair_column, strict=args.strict)
    if got.skipped:
        print(skipped_message(got.skipped), file=sys.stderr)
    probs = predict_proba(sm, got.texts, got.pairs, args.batch_size)
    lines = "".join(json.dumps(r) + "\n" for r in prediction_records(probs, sm.labels, got.rows))
    if args.out == "-":
        sys.stdout.write(lines)
    else:
        atomic_write_text(args.out, lines)
        print(f"{len(got.texts)} predictions written to {args.out}", file=sys.stderr)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from lorafed.data.clean import _label_str
    from lorafed.errors import DataError
    from lorafed.files import atomic_write_json
    from lorafed.plots import plot_confusion
    from lorafed.serve.infer import format_report, load_serving_model, predict_proba, read_texts, score_labels

    _check_batch(args.batch_size)
    if args.input == "-":
        raise LorafedError("--input -: evaluate needs a labelled file, not stdin")
    out = output_folder(args.out, None, args.overwrite)
    sm = load_serving_model(args.model)
    frame, texts, pairs = read_texts(args.input, sm, args.text_column, args.pair_column)
    col = args.label_column or sm.text.get("label_column") or "label"
    if col not in frame.columns:
        raise DataError(
            f"label column not found (columns: {', '.join(map(str, frame.columns))}); pass --label-column",
            path=args.input,
            field=col,
        )
    gold = [_label_str(v) or "" for v in frame[col].tolist()]
    probs = predict_proba(sm, texts, pairs, args.batch_size)
    scores = score_labels(probs, gold, sm.labels, args.input, col)
    atomic_write_json(
        out / "metrics.json",
        {**asdict(scores), "labels": list(scores.labels), "model": str(args.model), "input": args.input},
    )
    plot_confusion(scores.confusion, scores.labels, out / "confusion.png")
    print(format_report(scores))
    print(f"metrics.json and confusion.png written to {out}")
    return 0


def _check_batch(batch_size: int) -> None:
    if batch_size < 1:
        raise LorafedError(f"--batch-size: must be >= 1, got {batch_size}")


def cmd_serve(args: argparse.Namespace) -> int:
    """``lorafed serve``."""
    from lorafed.serve.http import serve
    from lorafed.serve.limits import ServeLimits

    limits = ServeLimits(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue)
    serve(args.model, host=args.host, port=args.port, limits=limits, backend=args.backend)
    return 0
