"""``train.autocast``: bfloat16 matmuls where the hardware runs them natively, and the context for them.

``auto`` (the default) resolves to ``bf16`` where the device has native bfloat16 arithmetic and
to ``none`` elsewhere: on a CPU, AVX512-BF16 or AMX (an x86 CPU without them emulates bf16 and
runs slower than fp32); on CUDA, ``torch.cuda.is_bf16_supported()``. With bf16 the matmuls run
in bfloat16 while LoRA weights, their gradients, the optimizer and the loss stay fp32. On the
clothing job (2 cores with AVX512-BF16) it is 1.2-1.5x the samples/s of fp32 at the same final
macro-F1 (``results/speed.md``). Every reader of ``train.autocast`` (training, DP training,
evaluation, personalisation, the benchmarks) goes through :func:`resolve_autocast`, which logs
what ``auto`` chose once per process and device.

``torch.backends.cpu.get_cpu_capability()`` does not help here: it reports the vector ISA
torch's own kernels use (``AVX512`` on a CPU with AVX512-BF16 too), so the CPU probes of
``torch.cpu`` are asked first and ``/proc/cpuinfo``'s flags (``avx512_bf16``, ``amx_bf16``)
second.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Literal

import torch

logger = logging.getLogger(__name__)

AutocastMode = Literal["auto", "none", "bf16"]
"""What ``train.autocast`` accepts."""

#: ``/proc/cpuinfo`` flags of native bf16 arithmetic, and how the log names them.
_CPU_FLAGS = {"avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16"}


def cpu_bf16_features(cpuinfo: str | None = None) -> list[str]:
    """The native bf16 instruction sets of this CPU (``[]``: none, bf16 would be emulated).

    Args:
        cpuinfo: The text of ``/proc/cpuinfo`` to read instead of asking torch (for tests);
            ``None`` asks torch's CPU probes, then reads ``/proc/cpuinfo`` if they are absent.
    """
    if cpuinfo is None:
        probes = {"AVX512-BF16": "_is_avx512_bf16_supported", "AMX": "_is_amx_tile_supported"}
        found: list[str] = []
        asked = False
        for name, probe in probes.items():
            fn = getattr(torch.cpu, probe, None)
            if fn is None:
                continue
            asked = True
            try:
                if fn():
                    found.append(name)
            except RuntimeError:
                continue
        if asked:
            return found
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return []
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return [name for flag, name in _CPU_FLAGS.items() if flag in flags]


def native_bf16(device: str) -> tuple[bool, str]:
    """Whether ``device`` (``cpu``, ``cuda``...) computes bf16 natively, and the evidence in words."""
    if device == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return ok, "torch.cuda.is_bf16_supported()" if ok else "this GPU has no native bf16"
    if device == "cpu":
        found = cpu_bf16_features()
        return bool(found), f"this CPU has {' and '.join(found)}" if found else "this CPU has no AVX512-BF16 or AMX"
    return False, f"no bf16 autocast on {device}"


@functools.lru_cache(maxsize=8)
def _auto_choice(device: str) -> str:
    """What ``auto`` means on ``device``, decided (and logged) once per process."""
    ok, why = native_bf16(device)
    choice = "bf16" if ok else "none"
    logger.info("train.autocast auto: %s on %s (%s)", choice, device, why)
    return choice


def resolve_autocast(mode: str, device: str = "cpu") -> str:
    """``none`` or ``bf16``: ``mode`` itself, or what ``auto`` resolves to on ``device``.

    Raises:
        ValueError: ``mode`` is not one of ``auto``, ``none``, ``bf16`` (the config loader
            refuses such values first).
    """
    if mode == "auto":
        return _auto_choice(device)
    if mode not in ("none", "bf16"):
        raise ValueError(f"autocast: expected auto, none or bf16, got {mode!r}")
    return mode


def model_device(model: Any) -> str:
    """The device type of the model's first parameter (``cpu`` for a model without parameters)."""
    param = next(iter(model.parameters()), None)
    return param.device.type if param is not None else "cpu"


def autocast_context(model: Any, mode: str) -> torch.autocast:
    """The forward's autocast context: bfloat16 matmuls when ``mode`` resolves to ``bf16``, else a disabled one."""
    device = model_device(model)
    return torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=resolve_autocast(mode, device) == "bf16")
