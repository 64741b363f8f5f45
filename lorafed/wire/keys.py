"""Ed25519 keys and the key registry: client id -> public key, and the server's public key.

Private keys are PKCS#8 PEM files created 0600 and never overwritten; like ssh, loading refuses a
key that group or others can read. Every file read here is size-bounded. Signing and verifying
payloads live in :mod:`lorafed.wire.sign`.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from lorafed.errors import LorafedError, SignatureError
from lorafed.files import atomic_write_text
from lorafed.wire.payload import CLIENT_ID

REGISTRY_FORMAT = "lorafed-keys-v1"
MAX_KEY_FILE = 16 * 1024
MAX_REGISTRY_BYTES = 16 * 1024 * 1024


def read_bounded(path: Path, limit: int, error: type[LorafedError]) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(limit)
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror}") from exc


# ---- keys ---------------------------------------------------------------------------------


def public_key_text(key: Ed25519PublicKey) -> str:
    """A public key as the registry writes it: base64 of its 32 raw bytes."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def parse_public_key(text: str, source: str = "") -> Ed25519PublicKey:
    """An Ed25519 public key from base64 of its 32 raw bytes, or a PEM ``PUBLIC KEY`` block.

    Raises:
        SignatureError: Neither, or not an Ed25519 key.
    """
    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.encode("ascii"))
            if not isinstance(key, Ed25519PublicKey):
                raise SignatureError(f"not an Ed25519 public key ({type(key).__name__})", source)
            return key
        raw = base64.b64decode(text, validate=True)
        if len(raw) != 32:
            raise SignatureError(f"an Ed25519 public key is 32 bytes, got {len(raw)}", source)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, TypeError, UnicodeError, binascii.Error) as exc:
        raise SignatureError(f"unreadable public key: {exc}", source) from None


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """An Ed25519 public key file (PEM or base64).

    Raises:
        SignatureError: Missing, unreadable or not an Ed25519 public key.
    """
    p = Path(path)
    if not p.is_file():
        raise SignatureError("public key file not found", str(p))
    return parse_public_key(read_bounded(p, MAX_KEY_FILE, SignatureError).decode("ascii", "replace"), str(p))


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """An Ed25519 private key (PKCS#8 PEM, unencrypted) that only its owner may read.

    Raises:
        SignatureError: Missing, readable by group or others (like ssh, it is refused: chmod 600),
            unreadable, or not an Ed25519 private key.
    """
    p = Path(path)
    if not p.is_file():
        raise SignatureError("private key file not found", str(p))
    mode = stat.S_IMODE(p.stat().st_mode)
    if os.name == "posix" and mode & 0o077:
        raise SignatureError(f"private key is readable by others (mode {mode:04o}); run: chmod 600 {p}", str(p))
    try:
        key = serialization.load_pem_private_key(read_bounded(p, MAX_KEY_FILE, SignatureError), password=None)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"unreadable private key (expected unencrypted PKCS#8 PEM): {exc}", str(p)) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"not an Ed25519 private key ({type(key).__name__})", str(p))
    return key


def write_key_pair(out_dir: str | Path, name: str, key: Ed25519PrivateKey | None = None) -> tuple[Path, Path]:
    """Write a new key pair: ``<name>.key`` (private, PKCS#8 PEM, mode 0600) and ``<name>.pub`` (PEM).

    The private key is created with mode 0600 from the start (never briefly readable by others)
    and an existing key is never overwritten.

    Returns:
        The private and public key paths.

    Raises:
        SignatureError: A bad name, or either file exists already.
    """
    if not CLIENT_ID.match(name):
        raise SignatureError(f"key name {name!r}: use 1-128 letters, digits, '_', '.' or '-'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out / f"{name}.key", out / f"{name}.pub"
    for p in (priv_path, pub_path):
        if p.exists() or p.is_symlink():
            raise SignatureError("exists already; a key is never overwritten (choose another --out or --id)", str(p))
    key = key or Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), 0o600)  # whatever the umask
        fh.write(pem)
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    atomic_write_text(pub_path, pub.decode("ascii"))
    return priv_path, pub_path


# ---- the registry -------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyRegistry:
    """Who may sign what: each client id's public key, and the server's.

    Attributes:
        clients: Client id -> public key; an update is accepted only with a signature by its
            claimed client's key.
        server: The server's public key (global adapters), or ``None`` when not listed.
        source: Where the registry came from, for messages.
    """

    clients: Mapping[str, Ed25519PublicKey]
    server: Ed25519PublicKey | None = None
    source: str = "registry"

    def server_key(self) -> Ed25519PublicKey:
        """The server's public key.

        Raises:
            SignatureError: The registry lists none.
        """
        if self.server is None:
            raise SignatureError("the key registry lists no server key, so no global adapter can be verified",
                                 self.source)  # fmt: skip
        return self.server


def registry_to_json(clients: Mapping[str, Ed25519PublicKey], server: Ed25519PublicKey | None) -> str:
    """A registry file's text (keys as base64 of their raw bytes, clients sorted)."""
    doc: dict[str, Any] = {"format": REGISTRY_FORMAT}
    if server is not None:
        doc["server"] = public_key_text(server)
    doc["clients"] = {cid: public_key_text(clients[cid]) for cid in sorted(clients)}
    return json.dumps(doc, indent=2) + "\n"


def parse_registry(text: str, source: str = "registry") -> KeyRegistry:
    """A key registry from its JSON text; every problem is named.

    Raises:
        SignatureError: Not a lorafed key registry, a bad client id, or an unreadable key.
    """
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise SignatureError(f"key registry is not JSON: {exc}", source) from None
    if not isinstance(doc, dict) or doc.get("format") != REGISTRY_FORMAT:
        raise SignatureError(f'not a key registry (expected an object with "format": {REGISTRY_FORMAT!r})', source)
    clients = doc.get("clients", {})
    if not isinstance(clients, dict):
        raise SignatureError('"clients" must map client ids to public keys', source)
    keys: dict[str, Ed25519PublicKey] = {}
    for cid, text_key in clients.items():
        if not CLIENT_ID.match(cid) or not isinstance(text_key, str):
            raise SignatureError(f"client {cid!r}: expected a client id (letters, digits, _ . -) and a key string",
                                 source)  # fmt: skip
        keys[cid] = parse_public_key(text_key, f"{source}: client {cid!r}")
    server = doc.get("server")
    if server is not None and not isinstance(server, str):
        raise SignatureError('"server" must be a public key string', source)
    return KeyRegistry(keys, parse_public_key(server, f"{source}: server") if server else None, source)


def load_registry(path: str | Path) -> KeyRegistry:
    """The key registry file at ``path`` (at most 16 MiB).

    Raises:
        SignatureError: Missing, too large, or not a valid registry.
    """
    p = Path(path)
    if not p.is_file():
        raise SignatureError("key registry not found", str(p))
    data = read_bounded(p, MAX_REGISTRY_BYTES + 1, SignatureError)
    if len(data) > MAX_REGISTRY_BYTES:
        raise SignatureError(f"key registry larger than {MAX_REGISTRY_BYTES} bytes", str(p))
    return parse_registry(data.decode("utf-8", "replace"), str(p))


# ---- one party's signing set-up -----------------------------------------------------------
