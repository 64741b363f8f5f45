"""Payload files: round trip, header contents, and refusals with named reasons."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from lorafed.errors import PayloadError, PayloadValidationError
from lorafed.server.validate import UpdateSpec, validate_update
from lorafed.wire.payload import FORMAT_VERSION, PayloadMeta, save_payload
from lorafed.wire.reader import load_payload, read_meta

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["query", "value"]}


def _meta(**kw) -> PayloadMeta:
    base = {
        "base_fingerprint": "sha256:" + "ab" * 32,
        "lora": LORA,
        "labels": ("neg", "pos"),
        "num_examples": 17,
        "round": 3,
        "client_id": "shopA",
    }
    base.update(kw)
    return PayloadMeta(**base)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "m.q.lora_A.weight": torch.randn(4, 8, generator=g),
        "m.q.lora_B.weight": torch.randn(8, 4, generator=g),
        "m.classifier.weight": torch.randn(2, 8, generator=g),
    }


def _spec(tensors: dict[str, torch.Tensor], **kw) -> UpdateSpec:
    base = {
        "base_fingerprint": "sha256:" + "ab" * 32,
        "lora": LORA,
        "labels": ("neg", "pos"),
        "tensors": {k: (tuple(v.shape), "float32") for k, v in tensors.items()},
        "round": 3,
    }
    base.update(kw)
    return UpdateSpec(**base)


def test_round_trip_keeps_tensors_and_header(tmp_path: Path) -> None:
    t = _tensors()
    path = save_payload(tmp_path / "u.safetensors", t, _meta())
    p = load_payload(path)
    assert p.meta == _meta() and p.meta.format_version == FORMAT_VERSION
    for k, v in t.items():
        torch.testing.assert_close(p.tensors[k], v, rtol=0, atol=0)
    assert read_meta(path) == p.meta
    validate_update(p, _spec(t))


def test_payload_from_another_base_is_refused_with_reason(tmp_path: Path) -> None:
    t = _tensors()
    p = load_payload(save_payload(tmp_path / "u.safetensors", t, _meta(base_fingerprint="sha256:" + "cd" * 32)))
    with pytest.raises(
        PayloadValidationError, match=r"client 'shopA'.*base_fingerprint.*trained on another base model"
    ):
        validate_update(p, _spec(t), "u.safetensors")


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"lora": {**LORA, "r": 8}}, r"lora config r: expected \{'r': 4\}, received \{'r': 8\}"),
        ({"labels": ("pos", "neg")}, r"labels: expected \['neg', 'pos'\], received \['pos', 'neg'\]"),
        ({"round": 2}, r"round: expected 3, received 2"),
        ({"num_examples": 0}, r"num_examples: expected an integer in \[1, "),
    ],
)
def test_header_mismatches_are_named(tmp_path: Path, change: dict, pattern: str) -> None:
    t = _tensors()
    p = load_payload(save_payload(tmp_path / "u.safetensors", t, _meta(**change)))
    with pytest.raises(PayloadValidationError, match=pattern):
        validate_update(p, _spec(t))


def test_tensor_problems_are_named(tmp_path: Path) -> None:
    t = _tensors()
    spec = _spec(t)
    missing = dict(t)
    missing.pop("m.classifier.weight")
    with pytest.raises(PayloadValidationError, match=r"tensor m.classifier.weight: expected present, received missing"):
        validate_update(load_payload(save_payload(tmp_path / "a.safetensors", missing, _meta())), spec)
    shaped = {**t, "m.q.lora_A.weight": torch.zeros(5, 8)}
    with pytest.raises(PayloadValidationError, match=r"lora_A.weight shape: expected \(4, 8\), received \(5, 8\)"):
        validate_update(load_payload(save_payload(tmp_path / "b.safetensors", shaped, _meta())), spec)
    nan = {**t, "m.q.lora_B.weight": torch.full((8, 4), float("nan"))}
    with pytest.raises(PayloadValidationError, match=r"lora_B.weight values: expected finite, received 32 NaN/Inf"):
        validate_update(load_payload(save_payload(tmp_path / "c.safetensors", nan, _meta())), spec)


def test_pickles_and_junk_are_refused_before_parsing(tmp_path: Path) -> None:
    pk = tmp_path / "evil.safetensors"
    pk.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(PayloadError, match="Python pickle, not safetensors; refused without loading"):
        load_payload(pk)
    ts = tmp_path / "torch.safetensors"
    torch.save({"x": torch.ones(1)}, ts)
    with pytest.raises(PayloadError, match=r"zip archive \(torch.save format\)"):
        load_payload(ts)
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    with pytest.raises(PayloadError, match="truncated"):
        load_payload(short)
    good = save_payload(tmp_path / "g.safetensors", _tensors(), _meta()).read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(PayloadError, match=r"cut\.safetensors: truncated"):
        load_payload(cut)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.ones(1)}, plain)
    with pytest.raises(PayloadError, match="not a lorafed payload"):
        load_payload(plain)


def test_an_honest_payload_whose_header_length_starts_like_a_pickle_loads(tmp_path: Path) -> None:
    """A 640-byte header is stored as 80 02 00 ..., a pickle's first two bytes: it is still safetensors."""
    from safetensors.torch import load_file

    t = {"m.q.lora_A.weight": torch.arange(32.0).reshape(4, 8)}
    hits = []
    for n in range(1, 700, 3):  # a longer label name, a longer header: 480 bytes and up, in steps of 8
        labels = ("neg", "pos", "l" * n)
        path = save_payload(tmp_path / f"u{n}.safetensors", t, _meta(labels=labels))
        first = path.read_bytes()[:2]
        if first in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
            hits.append(first)
            got = load_payload(path)
            assert got.meta.labels == labels
            torch.testing.assert_close(got.tensors["m.q.lora_A.weight"], load_file(path)["m.q.lora_A.weight"])
    assert {b"\x80\x02", b"\x80\x03"} <= set(hits)  # 640- and 896-byte headers
    # A pickle still is refused, whatever its protocol.
    for protocol in (2, 3, 4, 5):
        pk = tmp_path / f"p{protocol}.safetensors"
        pk.write_bytes(pickle.dumps({"x": list(range(100))}, protocol=protocol))
        with pytest.raises(PayloadError, match="Python pickle, not safetensors"):
            load_payload(pk)
