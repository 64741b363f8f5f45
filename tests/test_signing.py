"""Signed updates and global adapters: anyone can no longer be anyone.

Fabricated tiny payloads (no model) for the server's checks, with numpy's weighted average of the
honest tensors as the oracle; the tiny model for the client's check of the global adapter and for
a whole signed simulation.
"""

from __future__ import annotations

import json
import stat
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lorafed.cli import main
from lorafed.client.local import run_client_round, write_update
from lorafed.config import load_config
from lorafed.engine.inprocess import simulate
from lorafed.errors import ConfigError, SignatureError
from lorafed.server.fold import Incoming, fold_updates
from lorafed.wire.keys import load_private_key, load_registry
from lorafed.wire.payload import payload_to_bytes
from lorafed.wire.reader import load_payload
from lorafed.wire.sign import read_signature, sig_path, sign_payload, verify_payload, write_signature
from tests.conftest import ROOT
from tests.test_hostile import REFERENCE, SPEC, good, tensors, with_meta

KEYS = {c: Ed25519PrivateKey.generate() for c in ("A", "B", "C")}
VERIFIER = {c: k.public_key() for c, k in KEYS.items()}
QUIET = {"progress": False}


def signed(client: str, n: int, seed: int, key: str | None = None) -> Incoming:
    """An honest update of ``client``, signed by ``key``'s private key (default: its own)."""
    data = good(client, n, seed)
    return Incoming(f"{client}.safetensors", data, signature=sign_payload(data, KEYS[key or client]))


def assert_average_of(out, honest: list[tuple[int, int]]) -> None:
    """The round's state is numpy's weighted average of the honest (n, seed) tensors."""
    assert out.state is not None
    for name in SPEC.tensors:
        stacked = np.stack([tensors(s)[name].numpy() for _, s in honest])
        want = np.average(stacked, axis=0, weights=[n for n, _ in honest])
        np.testing.assert_allclose(out.state[name].numpy(), want, rtol=1e-6, atol=1e-7)


def test_sign_verify_round_trip_and_tampering() -> None:
    data = good("A", 5, 1)
    sig = sign_payload(data, KEYS["A"])
    verify_payload(data, sig, VERIFIER["A"], "A")
    with pytest.raises(SignatureError, match="does not verify for client 'A'"):
        verify_payload(data[:-1] + bytes([data[-1] ^ 1]), sig, VERIFIER["A"], "A")  # one tensor bit
    with pytest.raises(SignatureError, match="does not verify for client 'B'"):
        verify_payload(data, sig, VERIFIER["B"], "B")
    with pytest.raises(SignatureError, match="missing signature"):
        verify_payload(data, None, VERIFIER["A"], "A")
    with pytest.raises(SignatureError, match="malformed"):
        verify_payload(data, sig[:10], VERIFIER["A"], "A")


def test_relabelled_copy_unsigned_and_unknown_are_refused_and_honest_updates_averaged() -> None:
    a = signed("A", 5, 1)
    relabelled = Incoming("fake-B.safetensors", with_meta(a.data, client_id="B"), signature=a.signature)
    unsigned = Incoming("unsigned-C.safetensors", good("C", 9, 7))
    unknown_data = good("mallory", 9, 8)
    unknown = Incoming("mallory.safetensors", unknown_data, signature=sign_payload(unknown_data, KEYS["A"]))
    copy = Incoming("copy-A.safetensors", a.data, signature=a.signature)
    ups = [a, signed("B", 8, 2), relabelled, unsigned, unknown, copy]
    out = fold_updates(ups, SPEC, reference=REFERENCE, verifier=VERIFIER)
    reasons = dict(out.rejected)
    assert "signature does not verify for client 'B'" in reasons["fake-B.safetensors"]
    assert "missing signature" in reasons["unsigned-C.safetensors"]
    assert "unknown client id: 'mallory'" in reasons["mallory.safetensors"]
    assert "copy of client 'A'" in reasons["copy-A.safetensors"]
    # Honest B is not refused as a duplicate by the forgery; honest A not by the copy.
    assert sorted(m.client_id for _, m in out.accepted) == ["A", "B"] and sorted(out.verified) == ["A", "B"]
    assert_average_of(out, [(5, 1), (8, 2)])
    # Without a registry the forgery succeeds in getting B refused: today's trust in the header.
    plain = fold_updates([a, signed("B", 8, 2), relabelled], SPEC, reference=REFERENCE)
    assert sorted(m.client_id for _, m in plain.accepted) == ["A"]


def test_signature_files_beside_update_files(tmp_path: Path) -> None:
    ok, forged, bad = tmp_path / "A.safetensors", tmp_path / "B.safetensors", tmp_path / "C.safetensors"
    ok.write_bytes(good("A", 5, 1))
    write_signature(ok, sign_payload(ok.read_bytes(), KEYS["A"]))
    forged.write_bytes(good("B", 8, 2))
    write_signature(forged, sign_payload(forged.read_bytes(), KEYS["A"]))
    bad.write_bytes(good("C", 3, 3))
    sig_path(bad).write_text("not base64 !!\n")
    assert read_signature(ok) is not None and sig_path(ok).name == "A.safetensors.sig"
    out = fold_updates([Incoming.from_file(p) for p in (ok, forged, bad)], SPEC, reference=REFERENCE, verifier=VERIFIER)
    reasons = dict(out.rejected)
    assert "does not verify for client 'B'" in reasons[str(forged)] and "malformed" in reasons[str(bad)]
    assert_average_of(out, [(5, 1)])


def test_keys_cli_makes_a_private_key_0600_and_a_registry(tmp_path: Path) -> None:
    for name in ("shopA", "server"):
        assert main(["keys", "new", "--id", name, "--out", str(tmp_path / "k")]) == 0
    priv = tmp_path / "k" / "shopA.key"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600 and b"PRIVATE KEY" in priv.read_bytes()
    assert b"PUBLIC KEY" in (tmp_path / "k" / "shopA.pub").read_bytes()
    assert main(["keys", "new", "--id", "shopA", "--out", str(tmp_path / "k")]) == 2  # never overwritten
    reg = tmp_path / "registry.json"
    argv = ["keys", "registry", "--server", str(tmp_path / "k" / "server.pub"), "--out", str(reg)]
    assert main([*argv, "--add", f"shopA={tmp_path / 'k' / 'shopA.pub'}"]) == 0
    registry = load_registry(reg)
    assert list(registry.clients) == ["shopA"] and registry.server is not None
    key = load_private_key(priv)
    data = good("shopA", 4, 1)
    verify_payload(data, sign_payload(data, key), registry.clients["shopA"], "shopA")
    priv.chmod(0o644)
    with pytest.raises(SignatureError, match="readable by others"):
        load_private_key(priv)


def test_signing_config_checks(tiny_config) -> None:
    with pytest.raises(ConfigError, match="not both"):
        tiny_config("federation.signing.generate=true", "federation.signing.registry=r.json")
    with pytest.raises(ConfigError, match="registry: required"):
        tiny_config("federation.signing.client_key=k.key")


def test_client_refuses_a_tampered_or_unsigned_global_and_signs_its_update(tiny_config, tmp_path: Path) -> None:
    for name in ("shopA", "server"):
        assert main(["-q", "keys", "new", "--id", name, "--out", str(tmp_path / "k")]) == 0
    reg = tmp_path / "registry.json"
    assert main(["-q", "keys", "registry", "--server", str(tmp_path / "k" / "server.pub"), "--out", str(reg),
                 "--add", f"shopA={tmp_path / 'k' / 'shopA.pub'}"]) == 0  # fmt: skip
    key = tmp_path / "k" / "shopA.key"
    signing = [f"federation.signing.registry={reg}", f"federation.signing.client_key={key}"]
    signing.append("data.labels=[bad,good,meh]")
    cfg = tiny_config(*signing)
    u = run_client_round(cfg, "shopA", None, **QUIET)  # round 1: no global to check
    path, sig = write_update(cfg, "shopA", u, tmp_path / "r1" / "shopA.safetensors")
    assert sig == sig_path(path)
    verify_payload(path.read_bytes(), read_signature(path), load_registry(reg).clients["shopA"], "shopA")
    # The server's global adapter, signed by the server's key.
    g = tmp_path / "global_r1.safetensors"
    g.write_bytes(payload_to_bytes(u.tensors, replace(u.meta, kind="global", client_id="server")))
    write_signature(g, sign_payload(g.read_bytes(), load_private_key(tmp_path / "k" / "server.key")))
    assert run_client_round(cfg, "shopA", g, **QUIET).meta.round == 2
    data = bytearray(g.read_bytes())
    data[-1] ^= 1  # one bit of one tensor
    g.write_bytes(bytes(data))
    with pytest.raises(SignatureError, match="does not verify for client 'server'"):
        run_client_round(cfg, "shopA", g, **QUIET)
    sig_path(g).unlink()
    with pytest.raises(SignatureError, match="missing signature"):
        run_client_round(cfg, "shopA", g, **QUIET)
    # A client key that is not the registry's for this id is named before any training.
    with pytest.raises(SignatureError, match="not the registry's key for client 'shopB'"):
        run_client_round(tiny_config(*signing), "shopB", None, **QUIET)


def test_signed_simulation_verifies_every_accepted_update(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config("federation.rounds=2", "partition.num_clients=3", "train.max_steps=2",
                      "federation.signing.generate=true")  # fmt: skip
    out = tmp_path / "run"
    simulate(cfg, out, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    registry = load_registry(out / "keys" / "registry.json")
    assert len(registry.clients) == 3
    assert stat.S_IMODE((out / "keys" / "server.key").stat().st_mode) == 0o600
    for r in rows[1:]:
        assert len(r["clients"]) == 3 and sorted(r["signed"]) == sorted(r["clients"]) and not r["rejected"]
        for cid in r["clients"]:
            upd = out / "rounds" / f"r{r['round']}" / f"{cid}.safetensors"
            verify_payload(upd.read_bytes(), read_signature(upd), registry.clients[cid], cid)
    for r in range(3):
        g = out / "rounds" / f"global_r{r}.safetensors"
        verify_payload(g.read_bytes(), read_signature(g), registry.server_key(), "server")
    assert load_payload(out / "rounds" / "global_r2.safetensors").meta.kind == "global"
    # A simulation cannot hold real clients' private keys.
    with pytest.raises(ConfigError, match="generate=true"):
        simulate(tiny_config(f"federation.signing.registry={out / 'keys' / 'registry.json'}"), tmp_path / "x", **QUIET)


def test_reference_config_parses_signing_section() -> None:
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["federation.signing.generate=true", "data.path=x.csv"])
    assert cfg.federation.signing.generate and cfg.federation.signing.registry is None
    assert load_config(ROOT / "configs" / "tiny.yaml", ["data.path=x.csv"]).federation.signing.registry is None
