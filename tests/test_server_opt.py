"""FedAdam / FedYogi against a numpy transcription of Reddi et al. (2021), Algorithm 2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from lorafed.config import FederationConfig
from lorafed.errors import AggregationError, PayloadError
from lorafed.server.server_opt import ServerOptSettings, ServerOptState, load_server_opt, save_server_opt, server_step
from lorafed.server.step import next_global


def _numpy_reference(kind: str, x0: np.ndarray, targets: list[np.ndarray], s: ServerOptSettings) -> np.ndarray:
    x, m, v = x0.astype(np.float64), np.zeros_like(x0, dtype=np.float64), np.full(x0.shape, s.tau**2)
    for t in targets:
        d = t - x
        m = s.beta1 * m + (1 - s.beta1) * d
        if kind == "fedyogi":
            v = v - (1 - s.beta2) * d**2 * np.sign(v - d**2)
        else:
            v = s.beta2 * v + (1 - s.beta2) * d**2
        x = x + s.lr * m / (np.sqrt(v) + s.tau)
    return x


@pytest.mark.parametrize("kind", ["fedadam", "fedyogi"])
def test_server_step_matches_numpy(kind: str) -> None:
    rng = np.random.default_rng(0)
    s = ServerOptSettings(kind, lr=0.05, beta1=0.9, beta2=0.99, tau=1e-3)  # type: ignore[arg-type]
    x0 = rng.normal(size=(5, 3)) * 0.01
    # Round averages that move both ways, so Yogi's sign(v - d^2) takes both values.
    targets = [x0 + rng.normal(size=x0.shape) * scale for scale in (0.1, 0.001, 0.05, 1e-5)]
    state = {"w": torch.tensor(x0, dtype=torch.float32)}
    opt = ServerOptState()
    for t in targets:
        state, opt = server_step(state, {"w": torch.tensor(t, dtype=torch.float32)}, opt, s)
    assert opt.step == len(targets)
    np.testing.assert_allclose(state["w"].numpy(), _numpy_reference(kind, x0, targets, s), rtol=1e-4, atol=1e-6)


def test_yogi_and_adam_differ_when_the_delta_shrinks() -> None:
    s_adam = ServerOptSettings("fedadam", lr=0.1)
    s_yogi = ServerOptSettings("fedyogi", lr=0.1)
    g = {"w": torch.zeros(4)}
    out = {}
    for s in (s_adam, s_yogi):
        state, opt = server_step(g, {"w": torch.ones(4)}, ServerOptState(), s)
        state, opt = server_step(state, {"w": state["w"] + 1e-4}, opt, s)
        out[s.kind] = opt.v["w"][0].item()
    assert out["fedyogi"] > out["fedadam"]  # Yogi decays v additively, Adam multiplicatively


def test_only_sent_tensors_move_and_other_moments_are_kept() -> None:
    g = {"a": torch.zeros(2), "b": torch.zeros(2)}
    s = ServerOptSettings("fedadam", lr=0.1)
    state, opt = server_step(g, {"a": torch.ones(2)}, ServerOptState(), s)
    assert torch.equal(state["b"], g["b"]) and set(opt.m) == {"a"}
    state2, opt2 = server_step(state, {"b": torch.ones(2)}, opt, s)
    assert torch.equal(state2["a"], state["a"]) and torch.equal(opt2.m["a"], opt.m["a"])
    assert set(opt2.v) == {"a", "b"}


def test_state_round_trips_through_safetensors() -> None:
    s = ServerOptSettings("fedyogi")
    _, opt = server_step({"k.w": torch.zeros(3)}, {"k.w": torch.ones(3)}, ServerOptState(), s)
    back = ServerOptState.from_tensors(st_load(st_save(opt.to_tensors())))
    assert back.step == 1 and torch.equal(back.m["k.w"], opt.m["k.w"]) and torch.equal(back.v["k.w"], opt.v["k.w"])


def test_bad_state_and_inputs_are_refused() -> None:
    with pytest.raises(AggregationError, match="tensor 'step' missing"):
        ServerOptState.from_tensors({"m/w": torch.zeros(1)})
    with pytest.raises(AggregationError, match="unexpected tensor 'x/w'"):
        ServerOptState.from_tensors({"step": torch.tensor([1]), "x/w": torch.zeros(1)})
    s = ServerOptSettings()
    with pytest.raises(AggregationError, match="tensor c is not in the global adapter"):
        server_step({"w": torch.zeros(1)}, {"c": torch.zeros(1)}, ServerOptState(), s)
    with pytest.raises(AggregationError, match=r"tensor w shape \(2,\) != \(1,\)"):
        server_step({"w": torch.zeros(1)}, {"w": torch.zeros(2)}, ServerOptState(), s)


def test_next_global_without_optimizer_is_the_average_over_the_global() -> None:
    g = {"a": torch.zeros(2), "b": torch.ones(2)}
    state, opt = next_global(g, {"a": torch.full((2,), 2.0)}, FederationConfig())
    assert opt is None and state["a"].tolist() == [2.0, 2.0] and state["b"].tolist() == [1.0, 1.0]
    state, opt = next_global(g, {"a": torch.full((2,), 2.0)}, FederationConfig(server_optimizer="fedadam"))
    assert opt is not None and opt.step == 1 and 0 < state["a"][0].item() < 2.0


def test_simulate_with_fedyogi_saves_a_resumable_state(tiny_config, tmp_path) -> None:
    from lorafed.engine.inprocess import simulate
    from lorafed.wire.reader import load_payload

    simulate(tiny_config("federation.server_optimizer=fedyogi"), tmp_path / "run", progress=False)
    opt = load_server_opt(tmp_path / "run" / "rounds" / "server_opt_r2.safetensors")
    g1 = load_payload(tmp_path / "run" / "rounds" / "global_r1.safetensors").tensors
    assert opt.step == 2 and set(opt.m) == set(opt.v) == set(g1)


def test_load_server_opt_refuses_missing_and_foreign_files(tmp_path) -> None:
    with pytest.raises(PayloadError, match="server optimizer state not found"):
        load_server_opt(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # a pickle header
    with pytest.raises(PayloadError, match="not a safetensors file"):
        load_server_opt(bad)
    path = save_server_opt(tmp_path / "ok.safetensors", ServerOptState(m={"w": torch.ones(2)}, v={}, step=3))
    assert load_server_opt(path).step == 3
