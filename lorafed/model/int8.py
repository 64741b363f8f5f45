"""Frozen int8 linear and embedding layers for LoRA training on CPU, without fp32 weight copies.

bitsandbytes' ``Linear8bitLt`` trains on CPU through ``MatMul8bitFp`` (bitsandbytes 0.50): it
dequantizes the whole weight to fp32 in forward and again in backward, and keeps every layer's
float *input* on its autograd node although the frozen weight needs no gradient (for BERT's
``output.dense`` that is the 4x-wide GELU output). With the glibc churn of those full-size
temporaries, stock int8 training peaks above fp32 (``results/memory.md``). The layers here keep
neither a dequantized weight nor their input:

* :class:`Int8Linear` is an ``nn.Linear`` whose ``weight`` is a frozen int8 tensor with one
  absmax scale per output row. Its autograd function saves only the int8 weight and scales
  (references, no copy) and dequantizes again in backward to compute the input gradient. The
  base is frozen, so no weight gradient is ever computed.
* :class:`Int8Embedding` is an ``nn.Embedding`` with int8 rows; only looked-up rows are
  dequantized (BERT's 30522 x 384 word table: 47 MB in fp32, 12 MB here).

Both subclass the ``torch.nn`` classes, so peft's LoRA wraps them exactly like the float layers
(the adapters stay fp32). Call :func:`quantize_model_int8` *before* ``get_peft_model``. Never
merge an adapter into these layers: export reloads the base in fp32.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

#: Backbone precisions a client can load.
Precision = Literal["int8", "bf16", "fp32"]
#: Who implements ``precision: int8``: this module, or bitsandbytes' LLM.int8.
Int8Backend = Literal["lorafed", "bitsandbytes"]

_INT8_MAX = 127.0
#: Rows quantized at once; bounds the float temporaries (1024 x 3072 x 4 B = 12 MB for bert-base).
_CHUNK_ROWS = 1024


def quantize_rowwise_absmax(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D float tensor to int8 with one absmax scale per row.

    ``scale[i] = max_j |w[i, j]| / 127`` and ``q[i, j] = round(w[i, j] / scale[i])``, so the
    rounding error of each element is at most ``scale[i] / 2``. An all-zero row gets a tiny
    positive scale and zero codes.

    Args:
        weight: Float tensor of shape ``(rows, cols)``.

    Returns:
        ``(q, scale)``: int8 codes shaped like ``weight`` and fp32 scales of shape ``(rows,)``,
        with ``weight ~= q * scale[:, None]``.

    Raises:
        ValueError: ``weight`` is not 2-D or not floating point.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"expected a 2-D float weight, got shape {tuple(weight.shape)} dtype {weight.dtype}")
    rows = weight.shape[0]
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(rows, dtype=torch.float32, device=weight.device)
    with torch.no_grad():
        for start in range(0, rows, _CHUNK_ROWS):
            w = weight[start : start + _CHUNK_ROWS].float()
            s = w.abs().amax(dim=1).clamp_min(1e-12) / _INT8_MAX
            q[start : start + _CHUNK_ROWS] = torch.round(w / s[:, None]).clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
            scale[start : start + _CHUNK_ROWS] = s
    return q, scale


def dequantize_rowwise(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Return ``q * scale[:, None]`` as a new tensor of ``dtype``."""
    return q.to(dtype) * scale.to(dtype)[:, None]


class _Int8LinearFunction(torch.autograd.Function):
    """``y = x @ dequant(W).T + b`` for a frozen int8 ``W``; saves no float copy of ``W``."""

    @staticmethod
    def forward(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # Under autocast F.linear computes in the autocast dtype: dequantize straight to it.
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        return F.linear(x, dequantize_rowwise(q, scale, dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        _, q, scale, bias = inputs
        ctx.save_for_backward(q, scale)  # tensors the module already holds: no extra memory
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, scale = ctx.saved_tensors
        grad_input = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = grad_output @ dequantize_rowwise(q, scale, grad_output.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0)
        return grad_input, None, None, grad_bias


class Int8Linear(nn.Linear):
    """A frozen ``nn.Linear`` holding an int8 ``weight`` and fp32 per-row ``weight_scale``.

    The bias, if any, stays fp32 and frozen. ``state_dict`` keeps the ``weight`` key (int8) and
    adds ``weight_scale``.
    """

    weight_scale: torch.Tensor

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Wrap already quantized data (use :meth:`from_float` or :meth:`from_bnb` to convert).

        Args:
            q: Int8 codes of shape ``(out_features, in_features)``; used without a copy.
            scale: Per-row scales of shape ``(out_features,)``.
            bias: Optional float bias of shape ``(out_features,)``.

        Raises:
            ValueError: ``q`` is not a 2-D int8 tensor or ``scale`` does not match its rows.
        """
        if q.dtype != torch.int8 or q.dim() != 2 or scale.numel() != q.shape[0]:
            raise ValueError(
                f"expected 2-D int8 codes and one scale per row, got {q.dtype} {tuple(q.shape)} "
                f"and {scale.numel()} scales"
            )
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate an fp32 weight
        self.out_features, self.in_features = q.shape
        self.weight = nn.Parameter(q.contiguous(), requires_grad=False)
        self.register_buffer("weight_scale", scale.detach().float().reshape(-1).clone())
        bias_param = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.register_parameter("bias", bias_param)

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Int8Linear:
        """Quantize a float ``nn.Linear`` row-wise (``linear`` is not modified)."""
        q, scale = quantize_rowwise_absmax(linear.weight)
        return cls(q, scale, linear.bias)

    @classmethod
    def from_bnb(cls, module: nn.Module) -> Int8Linear:
        """Convert a bitsandbytes ``Linear8bitLt`` reusing its int8 codes (no float weight is made).

        bitsandbytes keeps ``CB`` (int8, ``(out, in)``) and ``SCB`` (per-row absmax), with
        ``W ~= CB * SCB[:, None] / 127``: the same row-wise scheme as :func:`quantize_rowwise_absmax`.

        Raises:
            ValueError: ``module`` holds no int8 codes (e.g. it was built with ``has_fp16_weights``).
        """
        weight = module.weight
        cb, scb = getattr(weight, "CB", None), getattr(weight, "SCB", None)
        if cb is None and weight.dtype == torch.int8:
            cb, scb = weight.data, getattr(getattr(module, "state", None), "SCB", None)
        if cb is None or scb is None or cb.dtype != torch.int8:
            raise ValueError(f"{type(module).__name__} holds no int8 weight and SCB; was it loaded with load_in_8bit?")
        return cls(cb, scb.float() / _INT8_MAX, module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute ``x @ dequant(weight).T + bias`` in ``x.dtype``."""
        return _Int8LinearFunction.apply(x, self.weight, self.weight_scale, self.bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized weight as a new ``(out_features, in_features)`` tensor."""
        return dequantize_rowwise(self.weight, self.weight_scale, dtype)

    def extra_repr(self) -> str:
        """Shape, bias and storage, as printed by ``repr(model)``."""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


class Int8Embedding(nn.Embedding):
    """A frozen ``nn.Embedding`` with int8 rows and one absmax scale per row.

    A lookup gathers int8 rows and their scales and multiplies, so the float table is never built.
    """

    weight_scale: torch.Tensor

    def __init__(self, embedding: nn.Embedding) -> None:
        """Quantize ``embedding`` row-wise (it is not modified).

        Raises:
            ValueError: ``embedding.max_norm`` is set (it renormalises the table in place).
        """
        if embedding.max_norm is not None:
            raise ValueError(f"Int8Embedding does not support max_norm (got {embedding.max_norm})")
        nn.Module.__init__(self)
        q, scale = quantize_rowwise_absmax(embedding.weight)
        self.num_embeddings, self.embedding_dim = q.shape
        self.padding_idx = embedding.padding_idx
        self.max_norm = None
        self.norm_type = embedding.norm_type
        self.scale_grad_by_freq = embedding.scale_grad_by_freq
        self.sparse = embedding.sparse
        self.weight = nn.Parameter(q, requires_grad=False)
        self.register_buffer("weight_scale", scale)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Look up rows of ``input`` (integer ids of any shape) as fp32 ``(*input.shape, dim)``."""
        rows = F.embedding(input, self.weight)
        scales = F.embedding(input, self.weight_scale.unsqueeze(1))
        return rows.to(scales.dtype) * scales

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized table as a new tensor."""
        return dequantize_rowwise(self.weight, self.weight_scale, dtype)

    def extra_repr(self) -> str:
        """Shape and storage, as printed by ``repr(model)``."""
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


def _is_bnb_int8(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Linear8bitLt" and cls.__module__.startswith("bitsandbytes")


def _skipped(name: str, skip_modules: tuple[str, ...]) -> bool:
    return any(skip in name.split(".") or name.endswith("." + skip) or name == skip for skip in skip_modules)


def quantize_model_int8(
    model: nn.Module,
    skip_modules: Iterable[str] = ("classifier", "pooler"),
    linear: bool = True,
    embeddings: bool = True,
) -> nn.Module:
    """Replace the linear and embedding layers of ``model`` in place by frozen int8 ones.

    Float ``nn.Linear`` layers are quantized row-wise (absmax); bitsandbytes ``Linear8bitLt``
    layers are converted reusing their int8 codes. Each float weight is dropped as soon as its
    layer is replaced, so conversion needs one layer's worth of extra memory.

    Args:
        model: The model to change in place.
        skip_modules: Module names (a dotted-path component or suffix) kept in float, e.g. the
            trained head.
        linear: Quantize ``nn.Linear`` / convert ``Linear8bitLt`` layers.
        embeddings: Quantize ``nn.Embedding`` layers.

    Returns:
        ``model``.
    """
    skip = tuple(skip_modules)
    todo: list[tuple[nn.Module, str, nn.Module]] = []
    for name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if _skipped(full, skip) or isinstance(child, (Int8Linear, Int8Embedding)):
                continue
            is_linear = _is_bnb_int8(child) or isinstance(child, nn.Linear)
            if (linear and is_linear) or (embeddings and isinstance(child, nn.Embedding)):
                todo.append((parent, child_name, child))
    for parent, child_name, child in todo:
        if isinstance(child, nn.Embedding):
            new: nn.Module = Int8Embedding(child)
        elif _is_bnb_int8(child):
            new = Int8Linear.from_bnb(child)
        else:
            new = Int8Linear.from_float(child)
        new.train(child.training)
        setattr(parent, child_name, new)
        child._parameters.clear()  # drop our reference to the float weight now, not at the end
    del todo
    _own_float_tensors(model)
    release_freed_memory()
    return model


def _own_float_tensors(model: nn.Module) -> None:
    """Give the float tensors left (LayerNorm, biases, head) storage of their own.

    transformers hands out tensors that are views into one mmap of the safetensors file; while
    any of them is alive the mapping stays, and every fp32 page read during quantization stays
    resident (MiniLM: ~90 MB), which would undo what int8 saves.
    """
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.data = tensor.data.clone()


def release_freed_memory() -> None:
    """Ask glibc to hand freed heap memory back to the OS (``malloc_trim``); a no-op elsewhere.

    Quantization frees ~4 bytes per weight in small pieces that glibc otherwise keeps, and
    they would count in the process's resident memory for the rest of the run.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # None on musl
    except OSError:
        return
    if trim is not None:
        trim(0)
