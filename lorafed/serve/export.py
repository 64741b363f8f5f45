"""Export of a trained adapter for serving: a merged transformers model, or a peft adapter directory.

The base is reloaded in fp32 (never int8: merging into quantized weights would round the
update away), the adapter is applied, and the merge is checked: on a fixed sample, the merged
model's logits must equal the adapter model's within ``tolerance``. Only then is the directory
written (to a temporary sibling, renamed into place, so a crash never leaves half an export).

* ``merged``: ``W + (alpha/r) B @ A`` folded into every adapted weight, the trained head in place;
  a plain transformers directory (config with id2label/label2id, safetensors weights, tokenizer)
  that ``AutoModelForSequenceClassification.from_pretrained`` loads without lorafed or peft. An fp32
  merged export also gets ``model.onnx`` (as ``onnx`` below) unless ``with_onnx=False``
  (``--no-onnx``): ``lorafed serve`` runs that through onnxruntime, 2.4x / 3.1x the transformers
  pipeline at concurrency 8 against 1.55x / 1.73x for the torch backend (``results/serve.md``).
  When ``onnx``/``onnxruntime`` do not import, or the graph fails its check, the export is written
  without it (torch-only) and one warning says so and how to get it.
* ``onnx``: the ``merged`` directory plus ``model.onnx`` (dynamic batch and sequence axes, opset 17),
  whose onnxruntime logits are checked against the merged torch model's within ``tolerance``;
  unlike the default, a missing package or a failed check is an error.
* ``peft``: ``adapter_model.safetensors`` + ``adapter_config.json`` (+ tokenizer) for
  ``PeftModel.from_pretrained`` on the base model.

Both carry ``lorafed_export.json`` (labels, base fingerprint, parity figures, text columns, the
federation summary when the adapter came from a run folder) and a model card ``README.md``. The
saved tokenizer truncates to the training ``max_length`` (``model_max_length``), and a merged
export's ``config.json`` carries the input rule as ``lorafed`` (``text``: columns, ``pair_mode``,
``max_length``), so ``transformers.pipeline("text-classification", model=DIR)`` called with
``truncation=True`` sees the text as training did. A peft export's ``adapter_config.json`` names a
portable base (the hub id, or the packaged name) instead of a local path.

Why one module over 300 lines: the merged and peft exports share the reload, merge and
parity check, which must not differ between the two formats (the model card is in
:mod:`lorafed.serve.card`, ONNX in :mod:`lorafed.serve.onnx`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from lorafed.config import PACKAGED_BACKBONE, DataConfig, LoraSettings, ModelConfig
from lorafed.errors import LorafedError, ModelError, PayloadValidationError
from lorafed.files import atomic_write_json
from lorafed.model.backbone import ClientModel, _quiet_loading, load_client_model
from lorafed.model.whitening import whitening_digest
from lorafed.serve import card
from lorafed.serve.onnx import ONNX_FILE, ONNX_INSTALL, OnnxError, export_onnx, missing_onnx_packages
from lorafed.wire.adapter import adapter_spec, get_adapter_state, set_adapter_state
from lorafed.wire.payload import Payload

logger = logging.getLogger(__name__)

ExportFormat = Literal["merged", "peft", "onnx"]
ExportDtype = Literal["fp32", "fp16", "bf16"]
_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: Written into every export; its presence also marks a folder that a new export may replace.
EXPORT_INFO = "lorafed_export.json"
#: The hub id the packaged backbone was copied from (named in peft exports and model cards).
PACKAGED_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
#: Largest |merged - adapter| logit difference accepted (fp32 on both sides).
PARITY_TOLERANCE = 1e-4


class ExportError(LorafedError):
    """The export cannot be written or fails its parity check."""


@dataclass
class ExportReport:
    """What an export wrote and how closely it matches the adapter model.

    Attributes:
        out: The directory written.
        format: ``merged`` or ``peft``.
        dtype: Weight dtype of the saved model.
        max_abs_diff: Largest |logit| difference, exported fp32 model vs adapter model.
        cast_max_abs_diff: Same after casting to ``dtype`` (``None`` for fp32).
        sample_rows: Sequences in the parity sample.
        labels: The label list.
        base_fingerprint: The base the adapter was trained on.
        text: Text columns and tokenization settings for ``lorafed predict`` (if known).
        base: Portable name of the base (hub id, packaged name, or the path as given).
        adapter_fingerprint: ``sha256:`` of the adapter's tensors (names, shapes, fp32 bytes).
        federation: Rounds, clients' examples and final metrics, when the adapter's run folder has them.
        onnx_max_abs_diff: Largest |logit| difference, onnxruntime vs the merged torch model (``None``:
            no ``model.onnx`` in the export).
        onnx_skipped: Why a ``merged`` export has no ``model.onnx`` (empty when it has one, or was not asked to).
    """

    out: str
    format: str
    dtype: str
    max_abs_diff: float
    cast_max_abs_diff: float | None
    sample_rows: int
    labels: list[str]
    base_fingerprint: str
    text: dict[str, Any] = field(default_factory=dict)
    base: str = ""
    adapter_fingerprint: str = ""
    federation: dict[str, Any] = field(default_factory=dict)
    onnx_max_abs_diff: float | None = None
    onnx_skipped: str = ""


def portable_base(base: str) -> str:
    """The name of ``base`` to write into an export: the packaged backbone becomes its hub id.

    A hub id is kept; a local directory is kept as given (lorafed cannot know where it came from).
    """
    return PACKAGED_HUB_ID if base == PACKAGED_BACKBONE else base


def adapter_fingerprint(payload: Payload) -> str:
    """``sha256:`` over the adapter's tensor names, shapes and fp32 values (independent of transport)."""
    h = hashlib.sha256()
    for key, tensor in sorted(payload.decoded().items()):
        t = tensor.detach().to(torch.float32).contiguous().cpu()
        h.update(f"{key}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return "sha256:" + h.hexdigest()


def federation_summary(payload: Payload, source: str) -> dict[str, Any]:
    """What the export can tell about the federation behind ``payload``.

    From the header: kind, round, examples. When ``source`` is ``<run>/rounds/global_rN.safetensors``
    and ``<run>/metrics.jsonl`` exists, also that round's test metrics (accuracy, macro-F1, loss).
    """
    m = payload.meta
    out: dict[str, Any] = {"kind": m.kind, "rounds": int(m.round), "num_examples": int(m.num_examples)}
    if m.metrics:
        out["header_metrics"] = dict(m.metrics)
    path = Path(source)
    metrics = path.parent.parent / "metrics.jsonl"
    if path.parent.name == "rounds" and metrics.is_file():
        try:
            rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, ValueError):
            rows = []
        for row in rows:
            if row.get("round") == m.round:
                out["final_metrics"] = {k: row.get(k) for k in ("accuracy", "macro_f1", "test_loss")}
                out["clients"] = row.get("clients", [])
    return out


def load_adapter_model(
    payload: Payload, base: str, source: str = "adapter", whitening: str | None = None
) -> ClientModel:
    """Load the base in fp32, add LoRA as the header describes, and load the adapter tensors.

    Args:
        payload: The adapter.
        base: The base model it was trained on.
        source: Name of the adapter, for messages.
        whitening: The whitening file (``model.whitening``), needed when the header names one
            (``lora.whitening``); it must have that digest.

    Raises:
        ExportError: The header is incomplete, or names a whitening that is not given or differs.
        ModelError: The base cannot be loaded or is not the one the adapter was trained on.
        PayloadValidationError: The adapter's tensors do not fit the model it describes.
    """
    m = payload.meta
    try:
        lora = LoraSettings(
            r=int(m.lora["r"]),
            alpha=m.lora["alpha"],
            dropout=float(m.lora.get("dropout", 0.0)),
            target_modules=tuple(m.lora["target_modules"]),
            layers=tuple(int(i) for i in m.lora["layers"]) if m.lora.get("layers") is not None else None,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ExportError(f"{source}: header lora {m.lora} lacks r, alpha or target_modules ({exc})") from exc
    pooling = m.lora.get("pooling", "cls")
    if pooling not in ("cls", "mean"):
        raise ExportError(f"{source}: header lora.pooling {pooling!r}: expected 'cls' or 'mean'")
    num_layers = m.lora.get("num_layers")
    if num_layers is not None and (not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1):
        raise ExportError(f"{source}: header lora.num_layers {num_layers!r}: expected an integer >= 1")
    want_whitening = m.lora.get("whitening")
    if want_whitening is not None and pooling != "mean":
        raise ExportError(f"{source}: header lora.whitening without lora.pooling 'mean' (got {pooling!r})")
    if want_whitening is not None:
        if whitening is None:
            raise ExportError(
                f"{source} was trained with the whitening {str(want_whitening)[:23]}... (header lora.whitening); "
                "pass its file with --whitening, or a --config whose model.whitening is that file"
            )
        got = whitening_digest(whitening)
        if got != want_whitening:
            raise ExportError(
                f"{source} was trained with the whitening {str(want_whitening)[:23]}..., but {whitening} is "
                f"{str(got)[:23]}..."
            )
    elif whitening is not None:
        logger.info("%s has no whitening in its header; %s is not used", source, whitening)
    client = load_client_model(
        ModelConfig(
            name_or_path=base,
            precision="fp32",
            lora=lora,
            pooling=pooling,
            num_layers=num_layers,
            whitening=whitening if want_whitening is not None else None,
        ),
        m.labels,
        0,
        precision="fp32",
    )
    if client.fingerprint != m.base_fingerprint:
        raise ModelError(
            f"{source} was trained on base {m.base_fingerprint[:23]}..., but {base} is {client.fingerprint[:23]}...; "
            "pass the adapter's base with --base or --config"
        )
    want = adapter_spec(get_adapter_state(client.model))
    got = adapter_spec(payload.decoded())
    for key, (shape, _) in want.items():
        if key not in got:
            raise PayloadValidationError(m.client_id, f"tensor {key}", "present", "missing", source)
        if got[key][0] != shape:
            raise PayloadValidationError(m.client_id, f"tensor {key} shape", shape, got[key][0], source)
    set_adapter_state(client.model, payload.decoded(), m.client_id)
    client.model.eval()
    return client


def parity_inputs(
    vocab_size: int, tokenizer: Any, rows: int = 16, length: int = 32, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A fixed batch of random token sequences of varied lengths (with [CLS]/[SEP] and padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(999 if vocab_size > 2000 else 1, vocab_size, (rows, length), generator=g)
    lengths = torch.randint(4, length + 1, (rows,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids[:, 0] = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else ids[:, 0]
    if tokenizer.sep_token_id is not None:
        ids[torch.arange(rows), lengths - 1] = tokenizer.sep_token_id
    ids = ids.masked_fill(mask == 0, int(tokenizer.pad_token_id or 0))
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def text_inputs(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenize ``texts`` as one padded batch."""
    return dict(tokenizer(list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt"))


@torch.no_grad()
def logits_of(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """fp32 logits of ``model`` on ``batch``."""
    model.eval()
    return model(**batch).logits.float()


def export_adapter(
    payload: Payload,
    out: str | Path,
    base: str,
    fmt: ExportFormat = "merged",
    dtype: ExportDtype = "fp32",
    sample_texts: Sequence[str] = (),
    data: DataConfig | None = None,
    source: str = "adapter",
    tolerance: float = PARITY_TOLERANCE,
    with_onnx: bool = True,
    whitening: str | None = None,
) -> ExportReport:
    """Export ``payload`` (an adapter) as a merged model or a peft directory at ``out``.

    Args:
        payload: The adapter (global, client or merged).
        out: Output directory; replaced if it holds a previous lorafed export, refused otherwise.
        base: Base model (directory, hub id or ``packaged:all-MiniLM-L6-v2``).
        fmt: ``merged`` (plus ``model.onnx`` when it can be written, see ``with_onnx``), ``onnx`` (merged plus
            ``model.onnx``, required) or ``peft``.
        dtype: Weight dtype of a merged export (``peft`` and ``onnx`` exports are fp32).
        sample_texts: Texts added to the parity sample (besides 16 random token sequences).
        data: The run's data section; its text columns become ``lorafed predict``'s defaults.
        source: Name of the adapter, for messages.
        tolerance: Largest accepted |logit| difference.
        with_onnx: For ``merged`` in fp32: also write ``model.onnx`` when ``onnx`` and ``onnxruntime`` import
            and its logits pass the check; otherwise the export is torch-only and a warning says why.
            ``False`` skips it. Ignored by ``onnx`` (always written) and ``peft`` (never).
        whitening: The whitening file the header names, if any (see :func:`load_adapter_model`); it is
            written into the exported pooler, so the export needs nothing else.

    Raises:
        ExportError: The parity check fails, ``out`` is a foreign non-empty folder, or peft/onnx + non-fp32.
        OnnxError: ``onnx`` format without onnx/onnxruntime, or the ONNX logits differ from torch's.
        ModelError, PayloadValidationError: See :func:`load_adapter_model`.
    """
    out = Path(out)
    _check_destination(out)
    if fmt == "peft" and dtype != "fp32":
        raise ExportError(f"--dtype {dtype}: peft adapters are exported in fp32; use --format merged to cast")
    if fmt == "onnx" and dtype != "fp32":
        raise ExportError(f"--dtype {dtype}: onnx exports are fp32; use --format merged to cast")
    if fmt == "onnx" and missing_onnx_packages():
        raise OnnxError(f"--format onnx needs {' and '.join(missing_onnx_packages())}; {ONNX_INSTALL}")
    onnx_skipped = _onnx_skip_reason(fmt, dtype, with_onnx)
    built = [k for k in ("pooling", "num_layers", "whitening") if k in payload.meta.lora]
    if fmt == "peft" and built:
        raise ExportError(
            f"{source}: header lora.{', lora.'.join(built)}: a peft adapter loads onto the plain base, which lacks "
            "what these build (the pooling layer, the kept layers, the whitened pooler); use --format merged"
        )
    client = load_adapter_model(payload, base, source, whitening)
    model, tok = client.model, client.tokenizer
    max_length = data.max_length if data is not None else 128
    batches = [parity_inputs(model.config.vocab_size, tok)]
    if sample_texts:
        batches.append(text_inputs(tok, sample_texts, max_length))
    reference = [logits_of(model, b) for b in batches]
    rows = sum(int(b["input_ids"].shape[0]) for b in batches)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        cast_diff = onnx_diff = None
        if fmt in ("merged", "onnx"):
            merged = model.merge_and_unload()
            diff = _max_diff(merged, batches, reference)
            _require_parity(diff, tolerance, "merged")
            if fmt == "onnx" or (with_onnx and not onnx_skipped):
                # a second shape, so a graph frozen to the traced sizes fails the check
                shapes = [*batches, parity_inputs(model.config.vocab_size, tok, rows=3, length=9, seed=1)]
                try:
                    onnx_diff = export_onnx(merged, tok, tmp / ONNX_FILE, shapes, tolerance)
                except OnnxError as exc:
                    if fmt == "onnx":
                        raise
                    (tmp / ONNX_FILE).unlink(missing_ok=True)  # never ship a graph that failed its check
                    onnx_skipped = f"the ONNX export failed ({exc})"
            if onnx_skipped and fmt == "merged" and with_onnx:
                logger.log(
                    logging.INFO if dtype != "fp32" else logging.WARNING,
                    "no %s in this export: %s; it is torch-only, so lorafed serve will run the slower torch "
                    "backend (--no-onnx skips ONNX without this message)",
                    ONNX_FILE,
                    onnx_skipped,
                )
            if dtype != "fp32":
                merged = merged.to(_TORCH_DTYPES[dtype])
                cast_diff = _max_diff(merged, batches, reference)
            merged.save_pretrained(tmp)
        else:
            with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5 (FutureWarning)
                warnings.filterwarnings("ignore", category=FutureWarning)
                model.save_pretrained(str(tmp))
            diff = _max_diff(_reload_peft(client, tmp, payload.meta.labels), batches, reference)
            _require_parity(diff, tolerance, "peft")
        tok.model_max_length = max_length  # plain transformers then truncates as training did
        tok.save_pretrained(tmp)
        text: dict[str, Any] = {}
        if data is not None:
            text = {
                "text_column": data.text_column,
                "text_pair_column": data.text_pair_column,
                "pair_mode": data.pair_mode,
                "label_column": data.label_column,
                "max_length": data.max_length,
            }
        report = ExportReport(
            str(out),
            fmt,
            dtype,
            diff,
            cast_diff,
            rows,
            list(payload.meta.labels),
            payload.meta.base_fingerprint,
            text,
            portable_base(base),
            adapter_fingerprint(payload),
            federation_summary(payload, source),
            onnx_diff,
            onnx_skipped if fmt == "merged" and with_onnx else "",
        )
        if fmt in ("merged", "onnx"):
            _annotate_config(tmp, report, max_length)
        else:
            _portable_adapter_config(tmp, report.base)
        atomic_write_json(tmp / EXPORT_INFO, {**asdict(report), "adapter": source, "lora": payload.meta.lora})
        (tmp / "README.md").write_text(card.model_card(report, payload.meta.lora), encoding="utf-8")
        _publish(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return report


def _onnx_skip_reason(fmt: str, dtype: str, with_onnx: bool) -> str:
    """Why a ``merged`` export will not get ``model.onnx`` ("" when it will try to write one)."""
    if fmt != "merged" or not with_onnx:
        return ""
    if dtype != "fp32":
        return f"model.onnx is written for fp32 exports only, not --dtype {dtype}"
    missing = missing_onnx_packages()
    if missing:
        return f"{' and '.join(missing)} not installed ({ONNX_INSTALL} adds it)"
    return ""


def _annotate_config(tmp: Path, report: ExportReport, max_length: int) -> None:
    """Store the input rule in ``config.json`` as ``lorafed`` (kept by ``from_pretrained``)."""
    path = tmp / "config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["lorafed"] = {
        "text": {"pair_mode": "pair", "max_length": max_length, **report.text},
        "base": report.base,
        "base_fingerprint": report.base_fingerprint,
        "adapter_fingerprint": report.adapter_fingerprint,
    }
    atomic_write_json(path, cfg)


def _portable_adapter_config(tmp: Path, base: str) -> None:
    """Name a portable base in ``adapter_config.json`` (peft writes the resolved local directory)."""
    path = tmp / "adapter_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["base_model_name_or_path"] = base
    atomic_write_json(path, cfg)


def _max_diff(model: Any, batches: list[dict[str, torch.Tensor]], reference: list[torch.Tensor]) -> float:
    worst = 0.0
    for batch, ref in zip(batches, reference, strict=True):
        worst = max(worst, float((logits_of(model, batch) - ref).abs().max()))
    return worst


def _require_parity(diff: float, tolerance: float, what: str) -> None:
    if not diff <= tolerance:
        raise ExportError(
            f"parity check failed: {what} model logits differ from the adapter model's by {diff:.3g} > {tolerance:g}"
        )


def _reload_peft(client: ClientModel, adapter_dir: Path, labels: Sequence[str]) -> Any:
    """Load the written peft directory the way a user would, on a fresh fp32 base."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    with _quiet_loading():  # the fresh head is reported "missing" (expected: the adapter carries it)
        base = AutoModelForSequenceClassification.from_pretrained(
            client.model_dir,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={lab: i for i, lab in enumerate(labels)},
            dtype=torch.float32,
        )
        return PeftModel.from_pretrained(base, str(adapter_dir))


def _check_destination(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / EXPORT_INFO).is_file())):
        raise ExportError(f"{out} exists and is not an earlier lorafed export; choose another --out or remove it")


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished export into place, replacing an earlier export."""
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
