"""Transport encodings: round trips against a numpy oracle, and validation of what is on the wire."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
from safetensors.torch import save, save_file

from lorafed.errors import PayloadError, PayloadValidationError
from lorafed.server.fold import aggregate_files
from lorafed.server.validate import UpdateSpec, validate_update
from lorafed.wire.compress import TRANSPORTS, decode, encode, scale_name, wire_bytes, wire_spec
from lorafed.wire.payload import Payload, PayloadMeta, payload_to_bytes, save_payload
from lorafed.wire.reader import load_payload, payload_from_bytes

LORA = {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["query"]}


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "m.lora_A.weight": torch.randn(2, 37, generator=g),
        "m.lora_B.weight": torch.randn(37, 2, generator=g) * 1e-3,
        "m.classifier.bias": torch.zeros(3),  # all zero: scale 0 must decode to zeros
        "m.classifier.weight": torch.randn(3, 37, generator=g) * 50,
    }


def _oracle(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy absmax int8: codes, scales and decoded values, block by block over the flat array."""
    flat = x.astype(np.float32).reshape(-1)
    codes, scales, dec = [], [], []
    for s in range(0, max(len(flat), 1), block):
        b = flat[s : s + block]
        scale = np.float32(np.abs(b).max() / np.float32(127)) if len(b) else np.float32(0)
        q = np.clip(np.round(b / scale), -127, 127) if scale > 0 else np.zeros_like(b)
        codes.append(q.astype(np.int8))
        scales.append(scale)
        dec.append(q.astype(np.float32) * scale)
    return np.concatenate(codes).reshape(x.shape), np.array(scales, np.float32), np.concatenate(dec).reshape(x.shape)


@pytest.mark.parametrize(("transport", "block"), [("int8", None), ("int8_block", 16), ("int8_block", 64)])
def test_int8_round_trip_matches_numpy_oracle_within_half_a_step(transport: str, block: int | None) -> None:
    state = _state()
    wire = encode(state, transport, block or 0)
    back = decode(wire, transport, block or 0)
    assert set(back) == set(state)
    for name, x in state.items():
        size = x.numel() if block is None else block
        codes, scales, dec = _oracle(x.numpy(), size)
        np.testing.assert_array_equal(wire[name].numpy(), codes)
        np.testing.assert_allclose(wire[scale_name(name)].numpy(), scales, rtol=1e-6)
        np.testing.assert_allclose(back[name].numpy(), dec, rtol=1e-6, atol=0)
        # Every element within half a quantization step of its block's scale.
        err = np.abs(back[name].numpy() - x.numpy()).reshape(-1)
        step = np.repeat(scales, size)[: x.numel()]
        assert np.all(err <= step / 2 * (1 + 1e-5) + 1e-12), name
    assert torch.equal(back["m.classifier.bias"], torch.zeros(3))


def test_blockwise_confines_an_outlier_to_its_block() -> None:
    x = {"t": torch.linspace(-1, 1, 256)}
    x["t"][3] = 1000.0
    per_tensor = (decode(encode(x, "int8"), "int8")["t"] - x["t"]).abs()
    blockwise = (decode(encode(x, "int8_block", 32), "int8_block", 32)["t"] - x["t"]).abs()
    assert per_tensor[32:].max() > 0.9  # one scale for all: values below 1000/254 round to 0
    assert blockwise[32:].max() <= 1 / 127 / 2 + 1e-6


@pytest.mark.parametrize(("transport", "np_dtype"), [("float16", np.float16), ("float32", np.float32)])
def test_float_transports_cast_like_numpy(transport: str, np_dtype: type) -> None:
    state = _state()
    back = decode(encode(state, transport), transport)
    for name, x in state.items():
        np.testing.assert_array_equal(back[name].numpy(), x.numpy().astype(np_dtype).astype(np.float32))


def test_bfloat16_keeps_eight_bits_of_mantissa() -> None:
    x = {"t": torch.randn(1000, generator=torch.Generator().manual_seed(3))}
    back = decode(encode(x, "bfloat16"), "bfloat16")["t"]
    assert torch.all((back - x["t"]).abs() <= x["t"].abs() * 2**-8)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_wire_spec_and_bytes_describe_what_encode_produces(transport: str) -> None:
    state = _state()
    spec = {k: (tuple(v.shape), "float32") for k, v in state.items()}
    wire = encode(state, transport, 16)
    assert wire_spec(spec, transport, 16) == {
        k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in wire.items()
    }
    assert wire_bytes(spec, transport, 16) == sum(v.numel() * v.element_size() for v in wire.values())


def test_unknown_transport_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown transport 'int4'"):
        encode(_state(), "int4")
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        encode(_state(), "int8_block", 0)


# --- payload files and validation ---------------------------------------------------------------


def _meta(dtype: str, block_size: int | None = None, client: str = "c1") -> PayloadMeta:
    return PayloadMeta("sha256:x", LORA, ("a", "b", "c"), 10, 1, client, dtype=dtype, block_size=block_size)


def _spec() -> UpdateSpec:
    return UpdateSpec("sha256:x", LORA, ("a", "b", "c"), {k: (tuple(v.shape), "float32") for k, v in _state().items()})


@pytest.mark.parametrize(("transport", "block"), [(t, 16 if t == "int8_block" else None) for t in TRANSPORTS])
def test_compressed_payload_round_trips_through_bytes_and_validates(transport: str, block: int | None) -> None:
    data = payload_to_bytes(_state(), _meta(transport, block))
    payload = payload_from_bytes(data)
    assert payload.meta.dtype == transport and payload.meta.block_size == block
    validate_update(payload, _spec())
    expected = decode(encode(_state(), transport, block or 0), transport, block or 0)
    for name, value in payload.decoded().items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)


def test_int8_payload_is_about_a_quarter_of_fp32() -> None:
    big = {"w": torch.randn(64, 64)}
    fp32 = len(payload_to_bytes(big, _meta("float32")))
    int8 = len(payload_to_bytes(big, _meta("int8")))
    assert int8 < fp32 / 3.5


def _wire(transport: str = "int8", block: int | None = None) -> dict[str, torch.Tensor]:
    return encode(_state(), transport, block or 0)


@pytest.mark.parametrize(
    ("bad_scale", "match"),
    [
        (float("nan"), r"m\.lora_A\.weight:scale values: expected finite, received 1 NaN/Inf"),
        (float("inf"), r"m\.lora_A\.weight:scale values: expected finite"),
        (-0.5, r"m\.lora_A\.weight:scale values: expected scales in \[0, .*\], received min -0\.5"),
        (1e37, r"m\.lora_A\.weight:scale values: expected scales in \[0, "),
    ],
)
def test_corrupted_scale_is_rejected(bad_scale: float, match: str) -> None:
    wire = _wire()
    wire["m.lora_A.weight:scale"] = torch.tensor([bad_scale])
    with pytest.raises(PayloadValidationError, match=match):
        validate_update(Payload(wire, _meta("int8")), _spec())


def test_corrupted_block_scale_is_rejected_from_a_file(tmp_path) -> None:
    """A NaN scale written into a real file is refused by the server, and nothing is averaged."""
    good = save_payload(tmp_path / "good.safetensors", _state(1), _meta("int8_block", 16, "good"))
    wire = load_payload(good).tensors
    wire["m.lora_B.weight:scale"][2] = float("nan")
    md = asdict(_meta("int8_block", 16, "bad"))
    md["labels"] = list(md["labels"])
    save_file(wire, tmp_path / "bad.safetensors", metadata={"lorafed": json.dumps(md)})
    out = aggregate_files([good, tmp_path / "bad.safetensors"], _spec())
    assert [p for p, _ in out.accepted] == [str(good)]
    assert "m.lora_B.weight:scale values: expected finite, received 1 NaN/Inf" in out.rejected[0][1]
    torch.testing.assert_close(out.state["m.lora_B.weight"], load_payload(good).decoded()["m.lora_B.weight"])


def test_wire_shape_dtype_and_names_are_checked() -> None:
    wire = _wire("int8_block", 16)
    wire["m.lora_A.weight:scale"] = wire["m.lora_A.weight:scale"][:-1]
    with pytest.raises(
        PayloadValidationError, match=r"m\.lora_A\.weight:scale shape: expected \(5,\), received \(4,\)"
    ):
        validate_update(Payload(wire, _meta("int8_block", 16)), _spec())
    wire = _wire()
    del wire["m.classifier.bias:scale"]
    with pytest.raises(PayloadValidationError, match=r"tensor m\.classifier\.bias:scale: expected present"):
        validate_update(Payload(wire, _meta("int8")), _spec())
    wire = _wire()
    wire["m.lora_A.weight"] = wire["m.lora_A.weight"].float()
    with pytest.raises(PayloadValidationError, match=r"lora_A\.weight dtype: expected int8 \(transport int8\)"):
        validate_update(Payload(wire, _meta("int8")), _spec())
    fp16 = encode(_state(), "float16")
    with pytest.raises(
        PayloadValidationError, match=r"dtype: expected float32 \(transport float32\), received float16"
    ):
        validate_update(Payload(fp16, _meta("float32")), _spec())


def test_int8_code_below_minus_127_is_rejected() -> None:
    wire = _wire()
    wire["m.lora_B.weight"][0, 0] = -128
    with pytest.raises(PayloadValidationError, match=r"lora_B\.weight values: expected int8 codes in \[-127, 127\]"):
        validate_update(Payload(wire, _meta("int8")), _spec())


def test_unknown_transport_in_a_header_is_rejected() -> None:
    with pytest.raises(PayloadValidationError, match=r"dtype \(transport\): expected one of .*received 'int4'"):
        validate_update(Payload(_wire(), _meta("int4")), _spec())
    with pytest.raises(PayloadError, match="unsupported transport dtype 'int4'"):
        payload_to_bytes(_state(), _meta("int4"))


def test_int8_block_needs_a_block_size() -> None:
    with pytest.raises(PayloadError, match="int8_block needs block_size >= 1, got None"):
        payload_to_bytes(_state(), _meta("int8_block"))
    md = {
        "base_fingerprint": "sha256:x",
        "lora": LORA,
        "labels": ["a", "b", "c"],
        "num_examples": 1,
        "round": 1,
        "client_id": "c",
        "dtype": "int8_block",
        "kind": "update",
        "format_version": 1,
    }
    data = save(_wire("int8_block", 16), metadata={"lorafed": json.dumps(md)})
    with pytest.raises(PayloadError, match="metadata field block_size: expected an integer >= 1, got None"):
        payload_from_bytes(data)


def test_server_averages_decoded_updates_of_mixed_transports(tmp_path) -> None:
    """Each client may pick its transport; the server averages what they decode to (np.average oracle)."""
    paths, decoded = [], []
    for i, (transport, block) in enumerate([("float32", None), ("int8", None), ("int8_block", 16), ("bfloat16", None)]):
        meta = PayloadMeta(
            "sha256:x", LORA, ("a", "b", "c"), 10 * (i + 1), 1, f"c{i}", dtype=transport, block_size=block
        )
        paths.append(save_payload(tmp_path / f"c{i}.safetensors", _state(i), meta))
        decoded.append(decode(encode(_state(i), transport, block or 0), transport, block or 0))
    out = aggregate_files(paths, _spec())
    assert not out.rejected
    for name in _state():
        want = np.average(np.stack([d[name].numpy() for d in decoded]), axis=0, weights=[10, 20, 30, 40])
        np.testing.assert_allclose(out.state[name].numpy(), want, rtol=1e-5, atol=1e-6)


def test_transport_config_is_checked(tiny_config) -> None:
    from lorafed.errors import ConfigError

    assert tiny_config("federation.transport=int8_block").federation.transport == "int8_block"
    with pytest.raises(ConfigError, match=r"federation\.transport: 'int4' is not one of"):
        tiny_config("federation.transport=int4")
    with pytest.raises(ConfigError, match=r"federation\.transport_block_size: must be >= 8, got 4"):
        tiny_config("federation.transport_block_size=4")


def test_simulation_sends_int8_updates(tiny_config, tmp_path) -> None:
    from lorafed.engine.inprocess import simulate
    from lorafed.engine.record import read_metrics

    base = ("federation.rounds=1", "train.max_steps=2", "partition.num_clients=2")
    s32 = simulate(tiny_config(*base), tmp_path / "f32", progress=False)
    s8 = simulate(tiny_config(*base, "federation.transport=int8"), tmp_path / "i8", progress=False)
    up32 = read_metrics(tmp_path / "f32" / "metrics.jsonl")[1]["bytes_up"]
    up8 = read_metrics(tmp_path / "i8" / "metrics.jsonl")[1]["bytes_up"]
    assert up8 < up32 and math.isfinite(s8["final"]["macro_f1"]) and s32["final"]["macro_f1"] >= 0
    update = next((tmp_path / "i8" / "rounds" / "r1").glob("*.safetensors"))
    p = load_payload(update)
    assert p.meta.dtype == "int8" and all(t.dtype in (torch.int8, torch.float32) for t in p.tensors.values())
    assert any(k.endswith(":scale") for k in p.tensors)


def test_corrupted_tensor_offsets_are_refused(tmp_path) -> None:
    """The zero-copy reader checks what safetensors checks: offsets tile the data exactly."""
    data = bytearray(payload_to_bytes(_state(), _meta("float32")))
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    name = "m.lora_A.weight"
    b, e = header[name]["data_offsets"]
    header[name]["data_offsets"] = [b, e + 4]
    raw = json.dumps(header).encode()
    bad = len(raw).to_bytes(8, "little") + raw + bytes(data[8 + n :])
    with pytest.raises(PayloadError, match=r"tensor 'm\.lora_A\.weight' of shape \(2, 37\) \(296 bytes\) claims"):
        payload_from_bytes(bad, source="x.safetensors")
    header[name]["data_offsets"] = [b, e]
    header[name]["shape"] = [2, "37"]
    raw = json.dumps(header).encode()
    with pytest.raises(PayloadError, match=r"tensor 'm\.lora_A\.weight': bad shape or offsets"):
        payload_from_bytes(len(raw).to_bytes(8, "little") + raw + bytes(data[8 + n :]))
    with pytest.raises(PayloadError, match="4 bytes after the last tensor"):
        payload_from_bytes(bytes(data) + b"\0\0\0\0")
