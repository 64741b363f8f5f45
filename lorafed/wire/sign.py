"""Ed25519 signatures over payload bytes: who sent an update, and that the global adapter is the server's.

Wire format: a **detached** signature. The signed message is ``DOMAIN + sha256(payload bytes)``,
so the signature covers every byte of the payload, header included (the client id, round,
``num_examples`` and ``kind`` are all in the header), and nothing is parsed before the bytes are
authenticated except the bounded header read that names the claimed client id. The domain string
keeps these signatures from being valid for anything else signed with the same key. The signature
(64 bytes) travels beside the payload, never inside it, so the payload format is unchanged:

* files: ``<name>.safetensors.sig``, one line of base64 (:func:`sig_path`, :func:`write_signature`);
* in memory (in-process, Flower): the 64 raw bytes next to the payload
  (:attr:`lorafed.server.fold.Incoming.signature`, a Flower ``ConfigRecord`` entry).

Keys: each client and the server hold an Ed25519 private key (PKCS#8 PEM, unencrypted, mode
0600, refused when others may read it); everyone holds the same **key registry**, a JSON file
naming each client's public key and the server's (:func:`load_registry`)::

    {"format": "lorafed-keys-v1",
     "server": "<base64 of the 32-byte public key, or a PEM block>",
     "clients": {"shopA": "<base64 or PEM>", "shopB": "..."}}
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from lorafed.errors import ConfigError, SignatureError
from lorafed.files import atomic_write_text
from lorafed.wire.keys import (
    KeyRegistry,
    load_private_key,
    load_registry,
    read_bounded,
    registry_to_json,
    write_key_pair,
)

#: Prefix of every signed message (domain separation; the version names this scheme).
DOMAIN = b"lorafed payload signature v1\n"
#: Suffix of a detached signature file.
SIG_SUFFIX = ".sig"
SIGNATURE_BYTES = 64
#: Largest signature file, key file and registry read (bounded reads of untrusted files).
MAX_SIG_FILE = 1024


def signed_message(data: bytes | bytearray) -> bytes:
    """What is signed for payload ``data``: :data:`DOMAIN` + its sha256 (32 raw bytes)."""
    return DOMAIN + hashlib.sha256(data).digest()


def sign_payload(data: bytes | bytearray, key: Ed25519PrivateKey) -> bytes:
    """The 64-byte Ed25519 signature of payload ``data`` (deterministic: same bytes, same signature)."""
    return key.sign(signed_message(data))


def verify_payload(
    data: bytes | bytearray, signature: bytes | None, key: Ed25519PublicKey, signer: str, source: str = ""
) -> None:
    """Check that ``signature`` is ``signer``'s signature of ``data``.

    Args:
        data: The payload bytes as received.
        signature: The detached signature (``None``: none came with the payload).
        key: ``signer``'s public key from the registry.
        signer: Who the payload claims to be from (a client id, or ``server``), for the message.
        source: Where the payload came from, for the message.

    Raises:
        SignatureError: No signature, a malformed one, or one that does not verify.
    """
    if signature is None:
        raise SignatureError(f"missing signature: an update claiming client {signer!r} came unsigned", source)
    if len(signature) != SIGNATURE_BYTES:
        raise SignatureError(
            f"malformed signature for client {signer!r}: expected {SIGNATURE_BYTES} bytes, received {len(signature)}",
            source,
        )
    try:
        key.verify(bytes(signature), signed_message(data))
    except InvalidSignature:
        raise SignatureError(f"signature does not verify for client {signer!r}", source) from None


def sig_path(payload_path: str | Path) -> Path:
    """The detached signature file of ``payload_path`` (``X.safetensors`` -> ``X.safetensors.sig``)."""
    p = Path(payload_path)
    return p.with_name(p.name + SIG_SUFFIX)


def encode_signature(signature: bytes) -> bytes:
    """A signature file's contents: one line of base64."""
    return base64.b64encode(signature) + b"\n"


def decode_signature(text: bytes, source: str = "") -> bytes:
    """The 64 signature bytes of a signature file's contents.

    Raises:
        SignatureError: Not one line of base64 of 64 bytes.
    """
    if len(text) > MAX_SIG_FILE:
        raise SignatureError(f"malformed signature file: {len(text)} bytes, expected about 90", source)
    try:
        sig = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("malformed signature file: not base64", source) from None
    if len(sig) != SIGNATURE_BYTES:
        raise SignatureError(f"malformed signature file: {len(sig)} bytes, expected {SIGNATURE_BYTES}", source)
    return sig


def write_signature(payload_path: str | Path, signature: bytes) -> Path:
    """Write ``signature`` beside ``payload_path`` (atomically); return the ``.sig`` path."""
    return atomic_write_text(sig_path(payload_path), encode_signature(signature).decode("ascii"))


def read_signature(payload_path: str | Path) -> bytes | None:
    """The detached signature beside ``payload_path``, or ``None`` when there is none.

    Raises:
        SignatureError: The signature file is malformed or unreadable.
    """
    path = sig_path(payload_path)
    if not path.is_file():
        return None
    return decode_signature(read_bounded(path, MAX_SIG_FILE + 1, SignatureError), str(path))


@dataclass(frozen=True)
class Signing:
    """One party's view of a signed federation: the registry and the private keys it holds.

    Attributes:
        registry: Everyone's public keys.
        server_key: The server's private key (signs global adapters), on the server only.
        client_keys: Client id -> private key (signs its updates): one on a client, every
            client's in a simulation.
    """

    registry: KeyRegistry
    server_key: Ed25519PrivateKey | None = None
    client_keys: Mapping[str, Ed25519PrivateKey] = field(default_factory=dict)

    def sign_global(self, data: bytes) -> bytes:
        """The server's signature of a global adapter.

        Raises:
            SignatureError: This party holds no server key.
        """
        if self.server_key is None:
            raise SignatureError("signing is on but no server key is configured (federation.signing.server_key)")
        return sign_payload(data, self.server_key)

    def sign_update(self, client_id: str, data: bytes) -> bytes:
        """``client_id``'s signature of its update.

        Raises:
            SignatureError: This party holds no key for ``client_id``.
        """
        key = self.client_keys.get(client_id)
        if key is None:
            raise SignatureError(
                f"signing is on but no private key for client {client_id!r} is configured "
                "(federation.signing.client_key)"
            )
        return sign_payload(data, key)

    def check_global(self, data: bytes, signature: bytes | None, source: str) -> None:
        """Refuse a global adapter that the registry's server key did not sign.

        Raises:
            SignatureError: Unsigned, or not signed by the server.
        """
        key = self.registry.server_key()
        if signature is None:
            raise SignatureError("missing signature: the global adapter came unsigned; refused", source)
        verify_payload(data, signature, key, "server", source)


def _same_key(private: Ed25519PrivateKey, public: Ed25519PublicKey | None) -> bool:
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    return public is not None and private.public_key().public_bytes(*raw) == public.public_bytes(*raw)


def signing_from_config(scfg: Any, client_id: str | None = None) -> Signing | None:
    """The signing set-up ``federation.signing`` describes, or ``None`` when no registry is set.

    Each private key given must belong to the registry's entry it signs for (the server's, or
    ``client_id``'s), so a mixed-up key is named here and not by every peer later.

    Args:
        scfg: The ``federation.signing`` section.
        client_id: This client's id (for ``client_key``).

    Raises:
        SignatureError: A key or the registry is unreadable, a key is not the registry's, or
            ``generate`` (simulations only) is set.
    """
    if scfg.generate and not scfg.registry:
        raise SignatureError(
            "federation.signing.generate is for simulate only (one process holding every key); elsewhere make keys "
            "with 'lorafed keys new' and set federation.signing.registry"
        )
    if not scfg.registry:
        return None
    registry = load_registry(scfg.registry)
    server_key = load_private_key(scfg.server_key) if scfg.server_key else None
    if server_key is not None and not _same_key(server_key, registry.server):
        raise SignatureError(f"federation.signing.server_key {scfg.server_key} is not the registry's server key",
                             registry.source)  # fmt: skip
    client_keys: dict[str, Ed25519PrivateKey] = {}
    if scfg.client_key:
        if client_id is None:
            raise SignatureError("federation.signing.client_key is set but no client id is known")
        ck = load_private_key(scfg.client_key)
        if not _same_key(ck, registry.clients.get(client_id)):
            raise SignatureError(
                f"federation.signing.client_key {scfg.client_key} is not the registry's key for client {client_id!r}",
                registry.source,
            )
        client_keys[client_id] = ck
    return Signing(registry, server_key, client_keys)


def server_signing(scfg: Any) -> Signing | None:
    """The server's signing set-up from ``federation.signing`` (``None`` without a registry).

    Raises:
        ConfigError: A registry without ``server_key`` (the clients could not verify the global adapter).
        SignatureError: A key or the registry is unreadable, or the key is not the registry's server key.
    """
    signing = signing_from_config(scfg)
    if signing is not None and signing.server_key is None:
        raise ConfigError(
            ["federation.signing.server_key: required on the server with a registry (it signs every global adapter)"]
        )
    return signing


def generate_signing(client_ids: Iterable[str], out_dir: str | Path) -> Signing:
    """Fresh keys for a simulation: one pair per client and for the server, and the registry, in ``out_dir``.

    Files: ``<client>.key``/``.pub``, ``server.key``/``.pub`` and ``registry.json``; a previous
    set in ``out_dir`` (a resumed run) is loaded instead of replaced.

    Raises:
        SignatureError: A key or registry in ``out_dir`` is unreadable.
    """
    out = Path(out_dir)
    ids = list(client_ids)
    reg_path = out / "registry.json"
    if reg_path.is_file():
        registry = load_registry(reg_path)
        keys = {cid: load_private_key(out / f"{cid}.key") for cid in ids}
        return Signing(registry, load_private_key(out / "server.key"), keys)
    keys = {}
    for cid in [*ids, "server"]:
        key = Ed25519PrivateKey.generate()
        write_key_pair(out, cid, key)
        keys[cid] = key
    server = keys.pop("server")
    atomic_write_text(reg_path, registry_to_json({c: k.public_key() for c, k in keys.items()}, server.public_key()))
    return Signing(load_registry(reg_path), server, keys)
