"""Key verbs: ``lorafed keys new`` (an Ed25519 key pair) and ``lorafed keys registry`` (the key registry).

Signed federations (``federation.signing``, see :mod:`lorafed.wire.sign`): each client and the
server make their own key pair and keep the private key; whoever runs the federation collects
the public keys into one registry file that every party gets.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lorafed.cli.common import add_verb
from lorafed.errors import LorafedError


def add_parsers(sub: Any) -> None:
    """Register ``keys`` with its sub-verbs ``new`` and ``registry``."""
    keys = sub.add_parser(
        "keys",
        help="signing keys for a signed federation (keys new, keys registry)",
        description="Make Ed25519 key pairs and the key registry that federation.signing.registry names.",
        epilog="example:\n  lorafed keys new --id shopA --out keys/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = keys.add_subparsers(dest="subverb", required=True, metavar="KEYS_VERB")
    new = add_verb(
        verbs,
        "new",
        help="make an Ed25519 key pair: NAME.key (private, mode 0600) and NAME.pub",
        description=(
            "Make a fresh Ed25519 key pair in --out: NAME.key, the private key (unencrypted PKCS#8 PEM, "
            "created with mode 0600; keep it on this machine and never send it), and NAME.pub, the public "
            "key (PEM) to send to whoever builds the key registry. An existing key is never overwritten."
            "\n\nEach client makes one under its client id; the server makes one named 'server'."
        ),
        example="lorafed keys new --id shopA --out keys/\nlorafed keys new --id server --out server-keys/",
    )
    new.add_argument("--id", required=True, help="the key's name: a client id, or 'server' (letters, digits, _ . -)")
    new.add_argument("--out", required=True, help="folder to write NAME.key and NAME.pub into (created if needed)")
    new.set_defaults(func=cmd_new)
    reg = add_verb(
        verbs,
        "registry",
        help="build the key registry from the clients' and the server's public keys",
        description=(
            "Write the key registry (JSON) that every party names in federation.signing.registry: each "
            "client id's public key, and the server's. The server then accepts an update only when it is "
            "signed by the key of the client id its header claims, and clients accept only a global adapter "
            "signed by the server's key. Send the same file to every party."
        ),
        example=(
            "lorafed keys registry --server server-keys/server.pub --add shopA=keys/shopA.pub "
            "--add shopB=keys/shopB.pub --out registry.json"
        ),
    )
    reg.add_argument(
        "--add", action="append", default=[], metavar="ID=PUB", help="a client id and its public key file (repeat)"
    )
    reg.add_argument("--server", required=True, metavar="PUB", help="the server's public key file")
    reg.add_argument("--out", required=True, help="the registry file to write (refused if it exists)")
    reg.add_argument("--overwrite", action="store_true", help="replace an existing registry file")
    reg.set_defaults(func=cmd_registry)


def cmd_new(args: argparse.Namespace) -> int:
    """``lorafed keys new``."""
    from lorafed.wire.keys import write_key_pair

    priv, pub = write_key_pair(args.out, args.id)
    print(f"{args.id}: private key {priv} (mode 0600, keep it here), public key {pub} (send it for the registry)")
    return 0


def cmd_registry(args: argparse.Namespace) -> int:
    """``lorafed keys registry``."""
    from lorafed.files import atomic_write_text
    from lorafed.wire.keys import load_public_key, parse_registry, registry_to_json

    clients = {}
    for item in args.add:
        cid, sep, path = item.partition("=")
        if not sep or not cid or not path:
            raise LorafedError(f"--add {item!r}: expected CLIENT_ID=PUBLIC_KEY_FILE")
        if cid in clients:
            raise LorafedError(f"--add: client {cid!r} given twice")
        clients[cid] = load_public_key(path)
    if not clients:
        raise LorafedError("--add: give at least one CLIENT_ID=PUBLIC_KEY_FILE")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise LorafedError(f"{out}: exists; pass --overwrite to replace it")
    text = registry_to_json(clients, load_public_key(args.server))
    parse_registry(text, str(out))  # every id and key as a reader will check them
    atomic_write_text(out, text)
    print(f"key registry {out}: server and {len(clients)} client(s): {', '.join(sorted(clients))}")
    return 0
