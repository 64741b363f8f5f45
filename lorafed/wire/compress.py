"""Transport encodings of adapter tensors: what travels on the wire, and back to fp32.

Pure functions over ``Mapping[str, Tensor]``; no I/O. :mod:`lorafed.wire.payload` applies
:func:`encode` when it writes a payload and :mod:`lorafed.server.step` applies :func:`decode`
after validation, so the validator sees (and checks) exactly the tensors that were sent.

Encodings (the payload header's ``dtype`` field):

- ``float32``, ``float16``, ``bfloat16``: every tensor cast to that dtype.
- ``int8``: symmetric absmax quantization per tensor: ``scale = max|x| / 127``,
  ``q = round(x / scale)`` in [-127, 127], decoded as ``q * scale``. The error of every
  element is at most ``scale / 2``. The scale travels as a float32 tensor of shape ``(1,)``
  named ``<tensor>:scale``.
- ``int8_block``: the same per block of ``block_size`` consecutive elements of the flattened
  tensor (the last block may be short); ``<tensor>:scale`` has shape ``(ceil(numel / block_size),)``.
  An outlier then only coarsens its own block.

Peft keys never contain ``:``, so scale names cannot collide with adapter tensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal, get_args

import torch

if TYPE_CHECKING:
    from lorafed.config import FederationConfig

#: Payload encodings on the wire.
Transport = Literal["float32", "float16", "bfloat16", "int8", "int8_block"]


TRANSPORTS: tuple[str, ...] = get_args(Transport)
FLOAT_TRANSPORTS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
QUANTIZED = ("int8", "int8_block")
SCALE_SUFFIX = ":scale"
#: Largest magnitude of a symmetric int8 code; -128 is never produced and is refused on input.
QMAX = 127

Spec = Mapping[str, tuple[tuple[int, ...], str]]


def update_wire(fcfg: FederationConfig) -> tuple[str, int | None]:
    """The ``(dtype, block_size)`` a client update's header records for ``fcfg.transport``."""
    return fcfg.transport, fcfg.transport_block_size if fcfg.transport == "int8_block" else None


def scale_name(name: str) -> str:
    """Wire name of the scale tensor of ``name``."""
    return name + SCALE_SUFFIX


def num_blocks(numel: int, block_size: int) -> int:
    """Blocks of ``block_size`` needed for ``numel`` elements (at least one)."""
    return max(1, math.ceil(numel / block_size))


def encode(tensors: Mapping[str, torch.Tensor], transport: str, block_size: int = 64) -> dict[str, torch.Tensor]:
    """Encode adapter tensors for the wire.

    Args:
        tensors: Name -> floating-point tensor.
        transport: One of :data:`TRANSPORTS`.
        block_size: Elements per scale for ``int8_block``.

    Returns:
        Name -> wire tensor (contiguous), plus ``<name>:scale`` tensors for the int8 encodings.

    Raises:
        ValueError: Unknown transport or ``block_size < 1`` (a programming error: the config
            layer validates both before they get here).
    """
    if transport in FLOAT_TRANSPORTS:
        dtype = FLOAT_TRANSPORTS[transport]
        return {k: v.detach().to(dtype).contiguous() for k, v in tensors.items()}
    if transport not in QUANTIZED:
        raise ValueError(f"unknown transport {transport!r}; expected one of {TRANSPORTS}")
    if transport == "int8_block" and block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    out: dict[str, torch.Tensor] = {}
    for name, value in tensors.items():
        x = value.detach().to(torch.float32).reshape(-1)
        bs = max(x.numel(), 1) if transport == "int8" else block_size
        q, scale = _quantize_blocks(x, bs)
        out[name] = q.reshape(value.shape).contiguous()
        out[scale_name(name)] = scale
    return out


def _quantize_blocks(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax-quantize a flat fp32 tensor in blocks; returns (int8 codes, fp32 scales)."""
    n = x.numel()
    nb = num_blocks(n, block_size)
    padded = torch.zeros(nb * block_size, dtype=torch.float32)
    padded[:n] = x
    blocks = padded.view(nb, block_size)
    scale = blocks.abs().amax(dim=1) / QMAX
    # An all-zero block has scale 0: divide by 1 instead, its codes are 0 either way.
    q = torch.round(blocks / torch.where(scale > 0, scale, 1.0).unsqueeze(1)).clamp_(-QMAX, QMAX)
    return q.to(torch.int8).reshape(-1)[:n], scale.contiguous()


def decode(wire: Mapping[str, torch.Tensor], transport: str, block_size: int = 64) -> dict[str, torch.Tensor]:
    """Decode wire tensors back to fp32 adapter tensors (scale tensors are consumed).

    The inverse of :func:`encode` up to its rounding error. Call it on validated payloads
    only (:func:`lorafed.server.validate.validate_update` checks codes and scales first).
    """
    if transport in FLOAT_TRANSPORTS:
        return {k: v if v.dtype == torch.float32 else v.to(torch.float32) for k, v in wire.items()}
    if transport not in QUANTIZED:
        raise ValueError(f"unknown transport {transport!r}; expected one of {TRANSPORTS}")
    out: dict[str, torch.Tensor] = {}
    for name, q in wire.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        scale = wire[scale_name(name)]
        if transport == "int8":
            out[name] = q.to(torch.float32) * scale
            continue
        out[name] = _dequantize_blocks(q, scale.reshape(-1), block_size, name)
    return out


def _dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, block_size: int, name: str) -> torch.Tensor:
    """``q * scale`` per block, in O(numel) memory whatever ``block_size`` says (no padding).

    Raises:
        ValueError: ``block_size < 1`` or a scale count that does not fit ``numel`` (validation
            refuses both before decoding; this guards direct callers).
    """
    n = q.numel()
    if block_size < 1 or scale.numel() != num_blocks(n, block_size):
        raise ValueError(f"tensor {name}: {scale.numel()} scales do not fit {n} elements in blocks of {block_size}")
    flat = q.reshape(-1).to(torch.float32)
    full = n // block_size
    out = torch.empty(n, dtype=torch.float32)
    if full:
        cut = full * block_size
        torch.mul(flat[:cut].view(full, block_size), scale[:full].unsqueeze(1), out=out[:cut].view(full, block_size))
    if n > full * block_size:
        torch.mul(flat[full * block_size :], scale[full], out=out[full * block_size :])
    return out.reshape(q.shape)


def wire_spec(spec: Spec, transport: str, block_size: int = 64) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype) of the wire tensors that encode tensors of ``spec``.

    Raises:
        ValueError: Unknown transport.
    """
    if transport in FLOAT_TRANSPORTS:
        return {k: (tuple(shape), transport) for k, (shape, _) in spec.items()}
    if transport not in QUANTIZED:
        raise ValueError(f"unknown transport {transport!r}; expected one of {TRANSPORTS}")
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, (shape, _) in spec.items():
        numel = math.prod(shape)
        out[name] = (tuple(shape), "int8")
        out[scale_name(name)] = ((1,) if transport == "int8" else (num_blocks(numel, block_size),), "float32")
    return out


def wire_bytes(spec: Spec, transport: str, block_size: int = 64) -> int:
    """Bytes of tensor data (headers excluded) that ``spec`` occupies under ``transport``."""
    sizes = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}
    return sum(math.prod(shape) * sizes[dtype] for shape, dtype in wire_spec(spec, transport, block_size).values())
