"""train.autocast: auto resolves to bf16 only where bf16 is native, in one function (lorafed.autocast)."""

from __future__ import annotations

import logging

import pytest
import torch

from lorafed import autocast as ac
from lorafed.config import TrainConfig

_INTEL_BF16 = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n"
_SAPPHIRE = "flags\t\t: fpu avx512f amx_bf16 amx_tile amx_int8\n"
_PLAIN = "flags\t\t: fpu sse avx2 avx512f avx512_vnni\n"


def test_cpu_features_from_cpuinfo_flags() -> None:
    assert ac.cpu_bf16_features(_INTEL_BF16) == ["AVX512-BF16"]
    assert ac.cpu_bf16_features(_SAPPHIRE) == ["AMX-BF16"]
    assert ac.cpu_bf16_features(_PLAIN) == []
    assert ac.cpu_bf16_features("") == []


def test_auto_resolves_by_the_hardware_and_logs_once(monkeypatch, caplog) -> None:
    ac._auto_choice.cache_clear()
    monkeypatch.setattr(ac, "cpu_bf16_features", lambda: ["AVX512-BF16"])
    with caplog.at_level(logging.INFO, logger="lorafed.autocast"):
        assert ac.resolve_autocast("auto", "cpu") == "bf16"
        assert ac.resolve_autocast("auto", "cpu") == "bf16"
    assert caplog.text.count("train.autocast auto: bf16 on cpu (this CPU has AVX512-BF16)") == 1
    ac._auto_choice.cache_clear()
    monkeypatch.setattr(ac, "cpu_bf16_features", lambda: [])
    assert ac.resolve_autocast("auto", "cpu") == "none"
    assert ac.resolve_autocast("auto", "mps") == "none"
    ac._auto_choice.cache_clear()


def test_explicit_modes_are_kept_and_unknown_refused() -> None:
    assert ac.resolve_autocast("none", "cpu") == "none"
    assert ac.resolve_autocast("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="expected auto, none or bf16, got 'fp16'"):
        ac.resolve_autocast("fp16", "cpu")


def test_context_runs_bf16_matmuls_only_when_resolved_so(monkeypatch) -> None:
    model = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    ac._auto_choice.cache_clear()
    monkeypatch.setattr(ac, "cpu_bf16_features", lambda: ["AMX"])
    with ac.autocast_context(model, "auto"):
        assert model(x).dtype == torch.bfloat16
    with ac.autocast_context(model, "none"):
        assert model(x).dtype == torch.float32
    ac._auto_choice.cache_clear()
    monkeypatch.setattr(ac, "cpu_bf16_features", lambda: [])
    with ac.autocast_context(model, "auto"):
        assert model(x).dtype == torch.float32
    ac._auto_choice.cache_clear()


def test_auto_is_the_default() -> None:
    assert TrainConfig().autocast == "auto"


def test_every_reader_goes_through_resolve(tiny_config, monkeypatch) -> None:
    """Training and evaluation under ``auto`` on a bf16 CPU run the same bf16 numbers as ``bf16``."""
    import dataclasses

    from lorafed.client.train import train_local
    from lorafed.engine.cohort import evaluate_state, prepare_cohort
    from lorafed.wire.adapter import get_adapter_state, set_adapter_state

    ac._auto_choice.cache_clear()
    monkeypatch.setattr(ac, "cpu_bf16_features", lambda: ["AVX512-BF16"])
    fed = prepare_cohort(tiny_config("train.max_steps=3"))
    out = {}
    for mode in ("auto", "bf16", "none"):
        cfg = dataclasses.replace(fed.config, train=dataclasses.replace(fed.config.train, autocast=mode))
        f = dataclasses.replace(fed, config=cfg)
        set_adapter_state(f.client.model, fed.initial_state)
        train_local(f.client.model, f.rows, f.splits[0].train, cfg.train, seed=1, progress=False)
        state = get_adapter_state(f.client.model)
        out[mode] = (state, evaluate_state(f, state).loss)
    ac._auto_choice.cache_clear()
    for key, tensor in out["bf16"][0].items():
        assert torch.equal(out["auto"][0][key], tensor), key
    assert out["auto"][1] == out["bf16"][1]
    assert any(not torch.equal(out["none"][0][k], v) for k, v in out["bf16"][0].items())
