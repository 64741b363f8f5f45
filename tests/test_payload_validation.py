"""The payload validation matrix: every bad update is refused, named, and never averaged."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save

from lorafed.errors import PayloadError, PayloadValidationError
from lorafed.server.fold import aggregate_files
from lorafed.server.validate import UpdateSpec, validate_update
from lorafed.wire.adapter import adapter_spec
from lorafed.wire.payload import PayloadMeta, payload_to_bytes, save_payload
from lorafed.wire.reader import load_payload, read_meta

LORA = {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["query", "value"]}
LABELS = ("bad", "good")
FP = "sha256:" + "ab" * 32


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight": torch.randn(2, 8, generator=g),
        "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight": torch.randn(8, 2, generator=g),
        "base_model.model.classifier.modules_to_save.default.weight": torch.randn(2, 8, generator=g),
    }


SPEC = UpdateSpec(FP, LORA, LABELS, adapter_spec(tensors()), round=3, max_num_examples=10_000)


def meta(client: str = "c1", **kw) -> PayloadMeta:
    base = {
        "base_fingerprint": FP,
        "lora": dict(LORA),
        "labels": LABELS,
        "num_examples": 10,
        "round": 3,
        "client_id": client,
    }
    return PayloadMeta(**{**base, **kw})


def write(tmp_path: Path, name: str, t: dict[str, torch.Tensor] | None = None, **kw) -> Path:
    return save_payload(tmp_path / f"{name}.safetensors", tensors() if t is None else t, meta(name, **kw))


def reject(tmp_path: Path, name: str, t=None, **kw) -> str:
    """Run the server on one bad file and return its rejection message."""
    p = write(tmp_path, name, t, **kw)
    outcome = aggregate_files([p], SPEC)
    assert outcome.state is None and not outcome.accepted
    (src, reason) = outcome.rejected[0]
    assert src == str(p)
    return reason


def test_valid_update_passes(tmp_path: Path) -> None:
    validate_update(load_payload(write(tmp_path, "ok")), SPEC)


def test_wrong_base_fingerprint(tmp_path: Path) -> None:
    msg = reject(tmp_path, "cfp", base_fingerprint="sha256:" + "cd" * 32)
    assert "client 'cfp'" in msg and "base_fingerprint: expected sha256:abab" in msg and "another base" in msg


def test_wrong_lora_config(tmp_path: Path) -> None:
    msg = reject(tmp_path, "clora", lora={**LORA, "r": 4})
    assert "client 'clora'" in msg and "lora config r: expected {'r': 2}, received {'r': 4}" in msg


def test_missing_tensor(tmp_path: Path) -> None:
    t = tensors()
    name = sorted(t)[0]
    del t[name]
    msg = reject(tmp_path, "cmiss", t)
    assert "client 'cmiss'" in msg and f"tensor {name}: expected present, received missing" in msg


def test_extra_tensor(tmp_path: Path) -> None:
    t = {**tensors(), "evil.weight": torch.zeros(2)}
    msg = reject(tmp_path, "cextra", t)
    assert "client 'cextra'" in msg and "tensor evil.weight: expected absent" in msg


def test_wrong_shape(tmp_path: Path) -> None:
    t = tensors()
    name = "base_model.model.classifier.modules_to_save.default.weight"
    t[name] = torch.zeros(3, 8)
    msg = reject(tmp_path, "cshape", t)
    assert "client 'cshape'" in msg and f"tensor {name} shape: expected (2, 8), received (3, 8)" in msg


def test_wrong_dtype(tmp_path: Path) -> None:
    # The header says float32, one tensor is float16: written without payload_to_bytes' cast.
    t = tensors()
    name = sorted(t)[1]
    t[name] = t[name].to(torch.float16)
    header = {**meta("cdtype").__dict__, "labels": list(LABELS)}
    p = tmp_path / "cdtype.safetensors"
    p.write_bytes(st_save(t, metadata={"lorafed": json.dumps(header)}))
    reason = aggregate_files([p], SPEC).rejected[0][1]
    assert "client 'cdtype'" in reason
    assert f"tensor {name} dtype: expected float32 (transport float32), received float16" in reason


def test_integer_tensors_refused(tmp_path: Path) -> None:
    t = {k: v.to(torch.int64) for k, v in tensors().items()}
    header = {**meta("cint", dtype="int64").__dict__, "labels": list(LABELS)}
    p = tmp_path / "cint.safetensors"
    p.write_bytes(st_save(t, metadata={"lorafed": json.dumps(header)}))
    reason = aggregate_files([p], SPEC).rejected[0][1]
    assert "client 'cint'" in reason and "dtype (transport): expected one of" in reason and "'int64'" in reason
    header["dtype"] = "float32"  # a float32 header over integer tensors
    p.write_bytes(st_save(t, metadata={"lorafed": json.dumps(header)}))
    reason = aggregate_files([p], SPEC).rejected[0][1]
    assert "client 'cint'" in reason and "expected float32 (transport float32), received int64" in reason


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_inf(tmp_path: Path, bad: float) -> None:
    t = tensors()
    name = sorted(t)[2]
    t[name][0, 0] = bad
    t[name][1, 3] = bad
    msg = reject(tmp_path, "cnan", t)
    assert "client 'cnan'" in msg and f"tensor {name} values: expected finite, received 2 NaN/Inf values" in msg


@pytest.mark.parametrize("n", [0, -5])
def test_num_examples_not_positive(tmp_path: Path, n: int) -> None:
    msg = reject(tmp_path, "cn", num_examples=n)
    assert "client 'cn'" in msg and f"num_examples: expected an integer in [1, 10000], received {n}" in msg


def test_num_examples_absurd_bound_is_the_spec_bound(tmp_path: Path) -> None:
    msg = reject(tmp_path, "cbig", num_examples=10_001)
    assert "num_examples: expected an integer in [1, 10000], received 10001" in msg
    validate_update(load_payload(write(tmp_path, "cedge", num_examples=10_000)), SPEC)


def test_wrong_round(tmp_path: Path) -> None:
    msg = reject(tmp_path, "cround", round=2)
    assert "client 'cround'" in msg and "round: expected 3, received 2" in msg


def test_truncated_file(tmp_path: Path) -> None:
    p = write(tmp_path, "ctrunc")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 100])
    with pytest.raises(PayloadError, match=r"ctrunc\.safetensors: corrupted safetensors data"):
        load_payload(p)
    (p2 := tmp_path / "short.safetensors").write_bytes(data[:40])
    with pytest.raises(PayloadError, match=r"short\.safetensors: truncated: header says \d+ bytes but the file has 32"):
        load_payload(p2)
    (p3 := tmp_path / "tiny.safetensors").write_bytes(data[:5])
    with pytest.raises(PayloadError, match="truncated: 5 bytes"):
        load_payload(p3)
    outcome = aggregate_files([p, p2, p3], SPEC)
    assert outcome.state is None and [s for s, _ in outcome.rejected] == [str(p2), str(p3), str(p)]


def test_corrupted_header(tmp_path: Path) -> None:
    p = write(tmp_path, "chead")
    data = bytearray(p.read_bytes())
    data[8:20] = b"{{{{{{{{{{{{"
    p.write_bytes(bytes(data))
    with pytest.raises(PayloadError, match=r"chead\.safetensors: corrupted header: not JSON"):
        read_meta(p)
    assert "corrupted header" in aggregate_files([p], SPEC).rejected[0][1]


def test_header_metadata_of_the_wrong_type(tmp_path: Path) -> None:
    body = json.dumps({"__metadata__": {"lorafed": 5}}).encode()
    p = tmp_path / "cmeta.safetensors"
    p.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(PayloadError, match="lorafed metadata: expected a JSON string, got int"):
        read_meta(p)


def test_header_larger_than_bound(tmp_path: Path) -> None:
    header = {"__metadata__": {"lorafed": json.dumps({"pad": "x" * 3000})}}
    body = json.dumps(header).encode()
    p = tmp_path / "chuge.safetensors"
    p.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(PayloadError, match=rf"header of {len(body)} bytes exceeds the bound of 1024"):
        load_payload(p, max_header_bytes=1024)
    # The default bound (1 MiB) refuses an 8 GB claim from the first 8 bytes alone.
    (p2 := tmp_path / "claim.safetensors").write_bytes(struct.pack("<Q", 8 << 30) + b"{}")
    with pytest.raises(PayloadError, match="header of 8589934592 bytes exceeds the bound of 1048576"):
        read_meta(p2)


class _Marker:
    """Unpickling this creates a file: proof that a payload was (not) executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_pickle_refused_without_executing(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.safetensors"
    p.write_bytes(pickle.dumps(_Marker(str(marker)), protocol=protocol))
    # Sanity check of the weapon itself, on a copy: unpickling it does create the marker.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Marker(str(probe)), protocol=protocol)).close()
    assert probe.exists()
    with pytest.raises(PayloadError, match=r"evil\.safetensors: (this is a Python pickle|header of \d+ bytes exceeds)"):
        load_payload(p)
    outcome = aggregate_files([p], SPEC)
    assert outcome.state is None and outcome.rejected[0][0] == str(p)
    assert not marker.exists()


@pytest.mark.parametrize("zipfile", [True, False])
def test_torch_save_refused_without_executing(tmp_path: Path, zipfile: bool) -> None:
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2), "x": _Marker(str(marker))}, buf, _use_new_zipfile_serialization=zipfile)
    p = tmp_path / "evil.safetensors"
    p.write_bytes(buf.getvalue())
    expected = "zip archive" if zipfile else "Python pickle"
    with pytest.raises(PayloadError, match=rf"evil\.safetensors: this is a (Python pickle|{expected})"):
        load_payload(p)
    with pytest.raises(PayloadError, match="refused without loading it"):
        read_meta(p)
    assert aggregate_files([p], SPEC).state is None
    assert not marker.exists()


def test_duplicate_client_in_one_round(tmp_path: Path) -> None:
    a = save_payload(tmp_path / "a.safetensors", tensors(1), meta("twin"))
    b = save_payload(tmp_path / "b.safetensors", tensors(2), meta("twin"))
    ok = write(tmp_path, "solo")
    outcome = aggregate_files([a, b, ok], SPEC)
    assert [m.client_id for _, m in outcome.accepted] == ["solo"]
    reasons = dict(outcome.rejected)
    for p in (a, b):
        assert (
            "client 'twin'" in reasons[str(p)]
            and "client_id: expected one update per round, received 2" in (reasons[str(p)])
        )


def test_round_continues_with_the_valid_updates(tmp_path: Path) -> None:
    """A round with every kind of bad file: the global state is the FedAvg of the valid ones only."""
    good = {f"g{i}": (tensors(10 + i), 10 * (i + 1)) for i in range(3)}
    paths = [save_payload(tmp_path / f"{c}.safetensors", t, meta(c, num_examples=n)) for c, (t, n) in good.items()]
    nan = tensors(99)
    next(iter(nan.values()))[0, 0] = float("nan")
    paths += [
        write(tmp_path, "b_round", round=4),
        write(tmp_path, "b_nan", nan),
        write(tmp_path, "b_fp", base_fingerprint="sha256:00"),
        write(tmp_path, "b_n", num_examples=0),
    ]
    (pk := tmp_path / "b_pickle.safetensors").write_bytes(pickle.dumps({"a": 1}))
    paths.append(pk)
    dup = [save_payload(tmp_path / f"twin{i}.safetensors", tensors(50 + i), meta("twin")) for i in range(2)]
    paths += dup
    outcome = aggregate_files(paths, SPEC, weighting="samples", min_clients=3)
    assert sorted(m.client_id for _, m in outcome.accepted) == ["g0", "g1", "g2"]
    assert len(outcome.rejected) == 7
    assert outcome.state is not None
    for name in SPEC.tensors:
        oracle = np.average(
            np.stack([t[name].numpy() for t, _ in good.values()]),
            axis=0,
            weights=[n for _, n in good.values()],
        )
        np.testing.assert_allclose(outcome.state[name].numpy(), oracle, rtol=1e-6, atol=1e-7)
    # With one more required update than there are valid ones, the round yields nothing.
    assert aggregate_files(paths, SPEC, min_clients=4).state is None


def test_validation_is_pure_and_names_the_source(tmp_path: Path) -> None:
    p = load_payload(write(tmp_path, "src", round=7))
    with pytest.raises(PayloadValidationError, match=r"client 'src' \(from/here\) rejected: round: expected 3"):
        validate_update(p, SPEC, "from/here")
    validate_update(p, replace(SPEC, round=None))
    assert os.path.exists(tmp_path / "src.safetensors")
    assert payload_to_bytes(tensors(), meta()) == payload_to_bytes(tensors(), meta())
