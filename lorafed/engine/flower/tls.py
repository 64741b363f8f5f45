"""Test certificates and SuperNode keys for a Flower deployment, made with ``cryptography``.

:func:`make_certificates` writes a private CA and a server certificate signed by it (SANs
``127.0.0.1``, ``localhost`` and any extra hosts) for the SuperLink's ``--ssl-ca-certfile``,
``--ssl-certfile`` and ``--ssl-keyfile``; SuperNodes and the ``flwr`` CLI trust ``ca.crt``
(``--root-certificates`` / ``root-certificates``). :func:`make_node_keys` writes one SuperNode
authentication key pair: an ECDSA SECP384R1 private key in OpenSSH format (the format
``flower-supernode --auth-supernode-private-key`` loads) and its OpenSSH public key (the format
``flwr supernode register`` reads). These are for tests and a first deployment: a real federation
uses its organisation's CA, and each node makes its own key and sends only the public half.

    python -m lorafed.engine.flower.tls certs DIR [--host superlink.example.org ...]
    python -m lorafed.engine.flower.tls node-key DIR NAME
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class Certificates:
    """Paths of the files written by :func:`make_certificates`.

    Attributes:
        ca_cert: The CA certificate (PEM): the clients' root certificate.
        ca_key: The CA's private key (PEM); keep it off the deployment machines.
        server_cert: The server certificate (PEM), signed by the CA.
        server_key: The server's private key (PEM, unencrypted, mode 0600).
    """

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKeys:
    """Paths of one SuperNode's authentication key pair.

    Attributes:
        private_key: OpenSSH private key (ECDSA P-384) for ``--auth-supernode-private-key``.
        public_key: OpenSSH public key for ``flwr supernode register``.
    """

    private_key: Path
    public_key: Path


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if private:  # created 0600, never world-readable even for a moment
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(path, 0o600)
    else:
        path.write_bytes(data)
    return path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _key_usage(ca: bool) -> x509.KeyUsage:
    """A CA signs certificates and CRLs; an ECDSA TLS server signs handshakes (and may agree keys)."""
    flags = dict.fromkeys(
        ("content_commitment", "key_encipherment", "data_encipherment", "encipher_only", "decipher_only"), False
    )
    return x509.KeyUsage(digital_signature=True, key_agreement=not ca, key_cert_sign=ca, crl_sign=ca, **flags)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_certificates(
    out: Path, hosts: tuple[str, ...] | list[str] = DEFAULT_HOSTS, days: int = 30, name: str = "lorafed"
) -> Certificates:
    """Write a CA and a server certificate for ``hosts`` into ``out``.

    Args:
        out: Folder for ``ca.crt``, ``ca.key``, ``server.pem`` and ``server.key``.
        hosts: The server's names: IP addresses become IP SANs, others DNS SANs. The first one is
            also the subject's common name.
        days: Validity of both certificates, from now (less a minute for clock skew).
        name: Organisation name written into both subjects.

    Returns:
        The paths written.

    Raises:
        ValueError: ``hosts`` is empty or ``days`` < 1.
    """
    if not hosts:
        raise ValueError("hosts: at least one name or IP address is needed")
    if days < 1:
        raise ValueError(f"days: must be >= 1, got {days}")
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    until = now + dt.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, name), x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")]
    )
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [x509.NameAttribute(NameOID.ORGANIZATION_NAME, name), x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]
            )
        )
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    return Certificates(
        ca_cert=_write(out / "ca.crt", ca_cert.public_bytes(pem)),
        ca_key=_write(out / "ca.key", _key_pem(ca_key), private=True),
        server_cert=_write(out / "server.pem", server_cert.public_bytes(pem)),
        server_key=_write(out / "server.key", _key_pem(server_key), private=True),
    )


def make_node_keys(out: Path, name: str) -> NodeKeys:
    """Write one SuperNode's ECDSA SECP384R1 key pair as ``out/NAME`` and ``out/NAME.pub`` (OpenSSH).

    Args:
        out: Folder for the two files.
        name: File stem, e.g. ``"node0"``.

    Returns:
        The paths written.
    """
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return NodeKeys(
        private_key=_write(out / name, private, private=True),
        public_key=_write(out / f"{name}.pub", public + f" {name}\n".encode()),
    )


def main(argv: list[str] | None = None) -> None:
    """``python -m lorafed.engine.flower.tls certs|node-key``."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    certs = sub.add_parser("certs", help="a CA and a SuperLink server certificate")
    certs.add_argument("out", type=Path)
    certs.add_argument("--host", action="append", help="server name or IP (repeatable; default 127.0.0.1, localhost)")
    certs.add_argument("--days", type=int, default=30)
    node = sub.add_parser("node-key", help="a SuperNode authentication key pair (ECDSA P-384, OpenSSH)")
    node.add_argument("out", type=Path)
    node.add_argument("name")
    args = ap.parse_args(argv)
    if args.what == "certs":
        c = make_certificates(args.out, tuple(args.host or DEFAULT_HOSTS), days=args.days)
        print(f"CA {c.ca_cert} (key {c.ca_key}); server {c.server_cert} (key {c.server_key})")
    else:
        k = make_node_keys(args.out, args.name)
        print(f"private {k.private_key}; public (register it) {k.public_key}")


if __name__ == "__main__":
    main()
