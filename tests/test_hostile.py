"""A hostile corpus: every malformed, oversized or inflated update is refused by name, never a traceback.

Payloads are tiny and fabricated (no model): each case builds bytes with
:func:`lorafed.wire.payload.payload_to_bytes` or by hand, and asserts the named error and its reason.
Aggregation-level cases also check that the honest updates of the same round are still averaged
(numpy's weighted average of the honest tensors is the oracle).
"""

from __future__ import annotations

import errno
import json
import os
import random
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lorafed.config import DataConfig
from lorafed.data.clean import load_labeled
from lorafed.data.read import read_table
from lorafed.engine.filedrop import FileDrop
from lorafed.engine.storage import LocalStorage
from lorafed.errors import AggregationError, DataError, LorafedError, PayloadError, PayloadValidationError, StorageError
from lorafed.files import atomic_write_bytes
from lorafed.server.aggregate import WeightedMean
from lorafed.server.fold import Incoming, cap_shares, fold_updates
from lorafed.server.validate import UpdateSpec, validate_update
from lorafed.wire.adapter import adapter_spec
from lorafed.wire.payload import ModelIdentity, payload_to_bytes
from lorafed.wire.reader import header_from_bytes, payload_from_bytes

LORA = {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["query", "value"]}
LABELS = ("bad", "good")
FP = "sha256:" + "ab" * 32
IDENTITY = ModelIdentity(FP, LORA, LABELS)
A = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
B = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"


def tensors(seed: int = 0, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {A: torch.randn(2, 8, generator=g) * scale, B: torch.randn(8, 2, generator=g) * scale}


REFERENCE = {k: torch.zeros_like(v) for k, v in tensors().items()}
SPEC = UpdateSpec(FP, LORA, LABELS, adapter_spec(tensors()), round=3, max_num_examples=10_000)


def good(client: str = "c1", n: int = 10, seed: int = 0, **kw) -> bytes:
    """An honest update's bytes."""
    return payload_to_bytes(tensors(seed, kw.pop("scale", 1.0)), IDENTITY.meta(client, 3, n, **kw))


def split(data: bytes) -> tuple[dict, bytes]:
    """(safetensors header as a dict, data section) of payload bytes."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def build(header: dict | str, body: bytes) -> bytes:
    """Payload bytes from a header (dict or raw JSON text) and a data section."""
    text = header if isinstance(header, str) else json.dumps(header)
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw + body


def with_meta(data: bytes, **fields) -> bytes:
    """``data`` with lorafed metadata fields replaced (a value of ``...`` deletes the field)."""
    header, body = split(data)
    meta = json.loads(header["__metadata__"]["lorafed"])
    for k, v in fields.items():
        if v is ...:
            meta.pop(k, None)
        else:
            meta[k] = v
    header["__metadata__"]["lorafed"] = json.dumps(meta)
    return build(header, body)


def with_meta_text(data: bytes, field: str, text: str) -> bytes:
    """``data`` with one lorafed metadata field replaced by raw JSON ``text`` (deep nesting, huge ints)."""
    header, body = split(data)
    meta = json.loads(header["__metadata__"]["lorafed"])
    meta[field] = "@@"
    header["__metadata__"]["lorafed"] = json.dumps(meta).replace('"@@"', text)
    return build(header, body)


def validate(data: bytes) -> None:
    validate_update(payload_from_bytes(data, "hostile.safetensors"), SPEC, "hostile.safetensors")


def honest_round(extra: list[Incoming], **kw) -> None:
    """Fold three honest updates with the hostile ones; the hostile ones are rejected, the rest averaged."""
    honest = [(f"h{i}", 5 + 3 * i, 10 + i) for i in range(3)]
    ups = [Incoming(f"{c}.safetensors", good(c, n, s)) for c, n, s in honest] + extra
    out = fold_updates(ups, SPEC, reference=REFERENCE, **kw)
    assert sorted(m.client_id for _, m in out.accepted) == ["h0", "h1", "h2"]
    assert {s for s, _ in out.rejected} == {u.source for u in extra}
    assert all(u.source in reason for u, (_, reason) in zip(extra, out.rejected, strict=True))
    assert out.state is not None
    for name in SPEC.tensors:
        want = np.average(
            np.stack([tensors(s)[name].numpy() for _, _, s in honest]), axis=0, weights=[n for _, n, _ in honest]
        )
        np.testing.assert_allclose(out.state[name].numpy(), want, rtol=1e-6, atol=1e-7)


# --- 1. deep nesting -------------------------------------------------------------------------------------

DEPTHS = [17, 60, 999, 5_000, 200_000]


@pytest.mark.parametrize("depth", DEPTHS)
def test_deep_safetensors_header(depth: int) -> None:
    header, body = split(good())
    text = json.dumps(header)[:-1] + ', "x": ' + "[" * depth + "]" * depth + "}"
    with pytest.raises(PayloadError, match="corrupted header: JSON nested"):
        payload_from_bytes(build(text, body), "deep.safetensors")


@pytest.mark.parametrize("field", ["lora", "metrics", "labels"])
@pytest.mark.parametrize("depth", [17, 60, 999, 5_000, 50_000])
def test_deep_lorafed_metadata(field: str, depth: int) -> None:
    data = with_meta_text(good(), field, '{"a": ' * depth + "1" + "}" * depth)
    with pytest.raises(PayloadError, match=r"deep\.safetensors: lorafed metadata: JSON nested"):
        header_from_bytes(data, "deep.safetensors")


# --- 2. huge integers ------------------------------------------------------------------------------------

META_INTS = ["num_examples", "round", "format_version", "block_size"]


@pytest.mark.parametrize("field", META_INTS)
def test_integer_beyond_python_digit_limit(field: str) -> None:
    data = with_meta_text(good(dtype="int8_block", block_size=4), field, "9" * 5000)
    with pytest.raises(PayloadError, match="lorafed metadata: unreadable JSON value"):
        payload_from_bytes(data, "huge.safetensors")


@pytest.mark.parametrize(
    ("field", "error", "match"),
    [
        ("num_examples", PayloadValidationError, "num_examples: expected an integer in .* an integer of about"),
        ("round", PayloadValidationError, "round: expected 3, received an integer of about"),
        ("format_version", PayloadError, "format_version: expected 1, got an integer of about"),
        ("block_size", PayloadError, "block_size: expected an integer >= 1, got an integer of about"),
    ],
)
def test_integer_of_thousands_of_digits(field: str, error: type, match: str) -> None:
    data = with_meta(good(dtype="int8_block", block_size=4), **{field: 10**4000})
    with pytest.raises(error, match=match):
        validate(data)


@pytest.mark.parametrize("key", ["shape", "data_offsets"])
@pytest.mark.parametrize("digits", [30, 4000, 5000])
def test_huge_integers_in_tensor_entries(key: str, digits: int) -> None:
    header, body = split(good())
    text = json.dumps(header).replace(f'"{key}": [', f'"{key}": [{"7" * digits}, ', 1)
    with pytest.raises(PayloadError, match="corrupted"):
        payload_from_bytes(build(text, body), "huge.safetensors")


# --- 3. block sizes --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("block_size", "error", "match"),
    [
        (0, PayloadError, "block_size: expected an integer >= 1, got 0"),
        (-64, PayloadError, "block_size: expected an integer >= 1, got -64"),
        (2**31 + 1, PayloadError, "block_size: expected an integer >= 1"),
        (2**40, PayloadError, "block_size: expected an integer >= 1"),
        (2**31, PayloadValidationError, r"block_size: expected an integer in \[1, 65536\]"),
        (10**6, PayloadValidationError, r"block_size: expected an integer in \[1, 65536\]"),
        (65537, PayloadValidationError, r"block_size: expected an integer in \[1, 65536\]"),
        (3, PayloadValidationError, r"lora_A.weight:scale shape: expected \(6,\), received \(4,\)"),
        (6, PayloadValidationError, r"lora_A.weight:scale shape: expected \(3,\), received \(4,\)"),
        (True, PayloadError, "block_size: expected an integer >= 1, got True"),
        ("64", PayloadError, "block_size: expected an integer >= 1, got '64'"),
        (64.0, PayloadError, "block_size: expected an integer >= 1, got 64.0"),
    ],
)
def test_block_size_refused_before_decoding(block_size: object, error: type, match: str) -> None:
    data = with_meta(good(dtype="int8_block", block_size=4), block_size=block_size)
    with pytest.raises(error, match=match):
        validate(data)


def test_block_size_65536_on_tiny_tensors_decodes_in_small_memory() -> None:
    payload = payload_from_bytes(good(dtype="int8_block", block_size=65536))
    validate_update(payload, SPEC)
    for name, value in payload.decoded().items():
        torch.testing.assert_close(value, tensors()[name], atol=0.05, rtol=0.05)


# --- 4. shapes and offsets -------------------------------------------------------------------------------


def _edit_entry(**entry) -> bytes:
    header, body = split(good())
    header[A] = {**header[A], **entry}
    return build(header, body)


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"shape": [-2, -8]}, "bad shape or offsets"),
        ({"shape": [2.0, 8]}, "bad shape or offsets"),
        ({"shape": [True, 16]}, "bad shape or offsets"),
        ({"shape": ["2", 8]}, "bad shape or offsets"),
        ({"shape": [0, 2**63]}, "bad shape or offsets"),
        ({"shape": [2**64, 0]}, "bad shape or offsets"),
        ({"shape": [1] * 20 + [16]}, "bad shape or offsets"),
        ({"shape": [2**32, 2**32]}, "corrupted safetensors data"),
        ({"shape": 16}, "corrupted safetensors header"),
        ({"shape": None}, "corrupted safetensors header"),
        ({"data_offsets": [-64, 0]}, "corrupted safetensors data"),
        ({"data_offsets": [64, 0]}, "corrupted safetensors data"),
        ({"data_offsets": [0, 2**62]}, "corrupted safetensors data"),
        ({"data_offsets": [0, 64, 128]}, "corrupted safetensors header"),
        ({"data_offsets": ["0", "64"]}, "bad shape or offsets"),
        ({"data_offsets": [0.0, 64.0]}, "bad shape or offsets"),
        ({"data_offsets": {"a": 1, "b": 2}}, "bad shape or offsets"),
        ({"dtype": "F128"}, "corrupted safetensors header"),
        ({"dtype": ["F32"]}, "corrupted safetensors header"),
        ({"dtype": None}, "corrupted safetensors header"),
    ],
)
def test_bad_shapes_and_offsets(entry: dict, match: str) -> None:
    with pytest.raises(PayloadError, match=match):
        payload_from_bytes(_edit_entry(**entry), "shape.safetensors")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[]", "not a JSON object"),
        ("null", "not a JSON object"),
        ('{"__metadata__": {"lorafed": 5}}', "expected a JSON string"),
        ('{"__metadata__": ["lorafed"]}', "not a lorafed payload"),
        ('{"__metadata__": {"lorafed": "[1, 2]"}}', "not a JSON object"),
        ('{"__metadata__": {"lorafed": "{\\"format_version\\": true}"}}', "format_version"),
        ('{"x": 5, "__metadata__": {}}', "not a lorafed payload"),
        ('{"\\ud800": 1}', "not a lorafed payload|corrupted"),
        ('{"a": NaN}', "not a lorafed payload"),
    ],
)
def test_malformed_headers(text: str, match: str) -> None:
    with pytest.raises(PayloadError, match=match):
        payload_from_bytes(build(text, b""), "odd.safetensors")


def test_tensor_entry_that_is_not_an_object() -> None:
    header, body = split(good())
    header[A] = [1, 2, 3]
    with pytest.raises(PayloadError, match="corrupted safetensors header"):
        payload_from_bytes(build(header, body))


# --- 5. non-finite and near-limit values -----------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_non_finite_values(value: float, dtype: str) -> None:
    t = tensors()
    t[B][0, 0] = value
    data = payload_to_bytes(t, IDENTITY.meta("c1", 3, 10, dtype=dtype))
    with pytest.raises(PayloadValidationError, match="values: expected finite"):
        validate(data)


@pytest.mark.parametrize(
    ("scale", "match"),
    [(-1.0, "scales in"), (3.0e38, "scales in"), (float("nan"), "finite"), (float("inf"), "finite")],
)
@pytest.mark.parametrize("dtype", ["int8", "int8_block"])
def test_bad_scales(scale: float, match: str, dtype: str) -> None:
    payload = payload_from_bytes(good(dtype=dtype, block_size=4 if dtype == "int8_block" else None))
    payload.tensors[A + ":scale"][0] = scale
    with pytest.raises(PayloadValidationError, match=match):
        validate_update(payload, SPEC)


def test_int8_code_minus_128() -> None:
    payload = payload_from_bytes(good(dtype="int8"))
    payload.tensors[A][0, 0] = -128
    with pytest.raises(PayloadValidationError, match="int8 codes in"):
        validate_update(payload, SPEC)


@pytest.mark.parametrize("value", [3.0e38, -3.3e38, 1e30])
def test_near_limit_values_are_refused_by_the_norm_bound(value: float) -> None:
    t = {k: torch.full_like(v, value) for k, v in tensors().items()}
    big = Incoming("big.safetensors", payload_to_bytes(t, IDENTITY.meta("big", 3, 10_000)))
    honest_round([big], max_update_norm=100.0)


@pytest.mark.parametrize("value", [3.0e38, 1e30])
def test_near_limit_values_with_big_weights_never_overflow(value: float) -> None:
    ups = [(torch.full((2, 8), value * s), 10**9 - i) for i, s in enumerate((1.0, -0.5, 0.9))]
    acc = WeightedMean()
    for t, w in ups:
        acc.add({"w": t}, float(w))
    got = acc.result()["w"]
    want = np.average(np.stack([t.double().numpy() for t, _ in ups]), axis=0, weights=[w for _, w in ups])
    assert bool(torch.isfinite(got).all())
    np.testing.assert_allclose(got.numpy(), want.astype(np.float32), rtol=1e-6)


def test_weighted_mean_never_returns_non_finite() -> None:
    acc = WeightedMean()
    acc.add({"w": torch.tensor([float("nan"), 1.0])}, 1.0)
    with pytest.raises(AggregationError, match="not finite: tensor w has 1 NaN/Inf"):
        acc.result()


@pytest.mark.parametrize("norm", [0.0, -1.0, float("nan")])
def test_bad_norm_bound_is_refused(norm: float) -> None:
    with pytest.raises(AggregationError, match="max_update_norm"):
        fold_updates([], SPEC, reference=REFERENCE, max_update_norm=norm)


def test_norm_bound_needs_a_reference() -> None:
    with pytest.raises(AggregationError, match="max_update_norm needs the reference"):
        fold_updates([], SPEC, max_update_norm=1.0)


# --- 6. inflated num_examples ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, -1, 10_001, 10**9, 10**100, 2**63])
def test_num_examples_out_of_range(n: int) -> None:
    bad = Incoming("inflated.safetensors", with_meta(good("x"), num_examples=n))
    honest_round([bad])


@pytest.mark.parametrize("n", [1.5, "10", True, None, [10]])
def test_num_examples_of_the_wrong_type(n: object) -> None:
    bad = Incoming("typed.safetensors", with_meta(good("x"), num_examples=n))
    honest_round([bad])


@pytest.mark.parametrize("share", [0.2, 0.3, 0.5, 0.9, 1.0])
def test_max_share_clips_an_inflated_weight(share: float) -> None:
    claims = {"h0": 5, "h1": 8, "h2": 11, "big": 10_000}
    ups = [Incoming(f"{c}.safetensors", good(c, n, seed=i)) for i, (c, n) in enumerate(claims.items())]
    out = fold_updates(ups, SPEC, max_share=share)
    assert len(out.accepted) == 4 and not out.rejected
    assert max(out.shares.values()) <= max(share, 1 / 4) + 1e-9
    assert ("big" in out.weight_clipped) == (share < 10_000 / sum(claims.values()))
    used = cap_shares({c: float(n) for c, n in claims.items()}, share)
    for name in SPEC.tensors:
        stack = np.stack([tensors(i)[name].numpy() for i in range(4)])
        want = np.average(stack, axis=0, weights=list(used.values()))
        np.testing.assert_allclose(out.state[name].numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("weights", "share", "expected"),
    [
        ({"a": 1.0, "b": 1.0, "c": 98.0}, 0.5, {"a": 1.0, "b": 1.0, "c": 2.0}),
        ({"a": 1.0, "b": 2.0}, 0.4, {"a": 1.0, "b": 1.0}),
        ({"a": 3.0, "b": 3.0, "c": 3.0}, 0.34, {"a": 3.0, "b": 3.0, "c": 3.0}),
        ({"a": 10.0, "b": 10.0, "c": 1.0, "d": 1.0}, 0.3, {"a": 2.0 * 0.3 / 0.4, "b": 2.0 * 0.3 / 0.4}),
    ],
)
def test_cap_shares(weights: dict, share: float, expected: dict) -> None:
    got = cap_shares(weights, share)
    assert list(got) == list(weights)
    for k, v in expected.items():
        assert got[k] == pytest.approx(v)
    assert max(w / sum(got.values()) for w in got.values()) <= max(share, 1 / len(got)) + 1e-12


# --- 7. wrong identities and client ids ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"client_id": ""}, "client_id: expected 1 to 128 printable"),
        ({"client_id": "a/b"}, "client_id: expected"),
        ({"client_id": "..\\x"}, "client_id: expected"),
        ({"client_id": ".."}, "client_id: expected"),
        ({"client_id": "tab\there"}, "client_id: expected"),
        ({"client_id": "x" * 100_000}, "client_id: expected .* received xxxx"),
        ({"client_id": 7}, "metadata field client_id: expected str"),
        ({"base_fingerprint": "sha256:" + "cd" * 32}, "base_fingerprint"),
        ({"labels": ["good", "bad"]}, "labels"),
        ({"labels": ["x"] * 50_000}, r"labels: expected \['bad', 'good'\], received \['x', 'x'"),
        ({"lora": {**LORA, "r": 64}}, "lora config r"),
        ({"round": 2}, "round: expected 3, received 2"),
        ({"dtype": "int4"}, "dtype"),
    ],
)
def test_wrong_identity_is_refused_and_honest_ones_averaged(fields: dict, match: str) -> None:
    data = with_meta(good("x"), **fields)
    with pytest.raises((PayloadError, PayloadValidationError), match=match):
        validate(data)
    honest_round([Incoming("wrong.safetensors", data)])


def test_duplicates_are_refused_and_honest_ones_averaged() -> None:
    dup = [Incoming("d1.safetensors", good("d", 10, 1)), Incoming("d2.safetensors", good("d", 10, 2))]
    honest_round(dup)


# --- 8. truncation and random byte flips -----------------------------------------------------------------


def _cuts() -> list[int]:
    data = good()
    n = 8 + struct.unpack("<Q", data[:8])[0]
    return [0, 1, 4, 7, 8, 9, n // 2, n - 1, n, n + 1, len(data) - 1]


@pytest.mark.parametrize("cut", _cuts())
def test_truncated_payloads(cut: int) -> None:
    with pytest.raises(PayloadError, match=r"truncated|corrupted|bytes after|not a lorafed"):
        payload_from_bytes(good()[:cut], "cut.safetensors")
    honest_round([Incoming("cut.safetensors", good("x")[:cut])])


@pytest.mark.parametrize("seed", range(40))
def test_random_byte_flips_never_raise(seed: int) -> None:
    rng = random.Random(seed)
    data = bytearray(good("x", dtype=rng.choice(["float32", "int8", "int8_block"]), block_size=4))
    n = 8 + struct.unpack("<Q", bytes(data[:8]))[0]
    for _ in range(rng.randint(1, 4)):  # flip header bytes (length prefix included) and sometimes data
        i = rng.randrange(n if rng.random() < 0.8 else len(data))
        data[i] ^= 1 << rng.randrange(8)
    up = Incoming("flip.safetensors", bytes(data))
    honest = [Incoming(f"h{i}.safetensors", good(f"h{i}", 5 + i, 10 + i)) for i in range(3)]
    out = fold_updates([*honest, up], SPEC, reference=REFERENCE, max_update_norm=1e6)
    ids = {m.client_id for _, m in out.accepted}
    assert {"h0", "h1", "h2"} <= ids and out.state is not None
    rejected = dict(out.rejected)
    if "flip.safetensors" in rejected:
        assert "flip.safetensors" in rejected["flip.safetensors"]
        assert "please report" not in rejected["flip.safetensors"]
    assert all(bool(torch.isfinite(v).all()) for v in out.state.values())


# --- 9. file drop: symlinks, odd names, duplicates -------------------------------------------------------


def test_local_storage_refuses_symlinks(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"secret")
    store = LocalStorage(tmp_path / "drop")
    store.write("round_3/h0.safetensors", good("h0"))
    (tmp_path / "drop" / "round_3" / "link.safetensors").symlink_to(secret)
    (tmp_path / "drop" / "round_2").symlink_to(tmp_path)
    assert "round_3/link.safetensors" in store.list("round_3")
    with pytest.raises(StorageError, match="symbolic link"):
        store.read("round_3/link.safetensors")
    with pytest.raises(StorageError, match="symbolic link"):
        store.list("round_2")
    with pytest.raises(StorageError, match="symbolic link"):
        store.write("round_2/x.safetensors", b"x")
    assert secret.read_bytes() == b"secret"


@pytest.mark.parametrize("name", ["../escape", "/etc/passwd", "round_3//x", "round_3/./x", "a\\b", "a\x00b", ""])
def test_local_storage_refuses_names_leaving_the_drop(tmp_path: Path, name: str) -> None:
    store = LocalStorage(tmp_path / "drop")
    with pytest.raises(StorageError, match="not a plain relative name"):
        store.write(name, b"x")
    with pytest.raises(StorageError, match="not a plain relative name"):
        store.read(name)


def test_two_names_for_one_file_never_overwrite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStorage(tmp_path / "drop")
    store.write("round_3/Alice.safetensors", b"alice")
    real = os.listdir
    # Simulate a case-insensitive file system: "alice" reaches the file listed as "Alice".
    (tmp_path / "drop" / "round_3" / "alice.safetensors").hardlink_to(
        tmp_path / "drop" / "round_3" / "Alice.safetensors"
    )
    monkeypatch.setattr(os, "listdir", lambda p: [n for n in real(p) if n != "alice.safetensors"])
    with pytest.raises(StorageError, match="another name"):
        store.write("round_3/alice.safetensors", b"mallory")
    assert (tmp_path / "drop" / "round_3" / "Alice.safetensors").read_bytes() == b"alice"


def test_file_drop_records_links_misnamed_and_duplicate_files(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "drop")
    store.write("global_r0.safetensors", b"g")
    for i in range(2):
        store.write(f"round_3/h{i}.safetensors", good(f"h{i}"))
    store.write("round_3/mallory.safetensors", good("h0"))  # claims h0's id under another name
    (tmp_path / "drop" / "round_3" / "link.safetensors").symlink_to(tmp_path / "drop" / "global_r0.safetensors")
    drop = FileDrop(store, IDENTITY, deadline_s=0.0, poll_s=0.0)
    got = drop.dispatch(3, [0, 1], b"g", {})
    sources = [u.source for _, u in got.replies]
    assert sources == ["round_3/h0.safetensors", "round_3/h1.safetensors"]
    reasons = {f["client"]: f["reason"] for f in got.failures}
    assert "symbolic link" in reasons["round_3/link.safetensors"]
    assert "does not match the client id" in reasons["round_3/mallory.safetensors"]
    out = fold_updates([u for _, u in got.replies], SPEC)
    assert sorted(m.client_id for _, m in out.accepted) == ["h0", "h1"]


# --- 10. files follow the umask; full or read-only disks are named ----------------------------------------


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_atomic_writes_follow_the_umask(tmp_path: Path, umask: int, file_mode: int, dir_mode: int) -> None:
    old = os.umask(umask)
    try:
        p = atomic_write_bytes(tmp_path / "new" / "f.bin", b"x")
    finally:
        os.umask(old)
    assert p.stat().st_mode & 0o777 == file_mode and p.parent.stat().st_mode & 0o777 == dir_mode


@pytest.mark.parametrize(
    ("code", "reason"),
    [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied")],
)
def test_full_or_read_only_disk_is_a_named_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code, reason) -> None:
    dest = tmp_path / "g.safetensors"
    dest.write_bytes(b"old")

    def fail(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(LorafedError, match=f"g.safetensors: cannot write: {reason}"):
        atomic_write_bytes(dest, b"new")
    assert dest.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["g.safetensors"]


# --- 11. data files --------------------------------------------------------------------------------------


def test_csv_labels_that_look_missing_stay_strings(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_text("text,label\na,None\nb,NA\nc,null\nd,\ne,NaN\n")
    frame = read_table(p)
    assert frame["label"].tolist()[:3] == ["None", "NA", "null"] and pd.isna(frame["label"][3])
    data = load_labeled(DataConfig(path=str(p), missing="drop"), 0)
    assert data.label_names == ("NA", "NaN", "None", "null")


@pytest.mark.parametrize(
    ("values", "kind"), [([["a"], ["b"]], "list"), ([b"a", b"b"], "bytes"), ([1, 2], "int"), ([1.5, 2.5], "float")]
)
def test_parquet_text_column_of_non_strings(tmp_path: Path, values: list, kind: str) -> None:
    pytest.importorskip("pyarrow")
    p = tmp_path / "d.parquet"
    pd.DataFrame({"text": values, "label": ["x", "y"]}).to_parquet(p)
    with pytest.raises(DataError, match=f"row 1, column 'text': a text column must hold strings, found {kind}"):
        load_labeled(DataConfig(path=str(p)), 0)


@pytest.mark.parametrize("depth", [5_000, 100_000])
def test_deep_jsonl_line(tmp_path: Path, depth: int) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a", "label": "x"}\n' + '{"text": ' + "[" * depth + "]" * depth + "}\n")
    with pytest.raises(DataError, match="row 2: JSON nested too deep"):
        read_table(p)


def test_jsonl_integer_beyond_the_digit_limit(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a", "label": ' + "9" * 5000 + "}\n")
    with pytest.raises(DataError, match="row 1: unreadable JSON value"):
        read_table(p)
