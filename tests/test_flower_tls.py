"""Flower across companies: TLS with a verified server certificate, and only registered SuperNodes join.

Unit tests of :mod:`lorafed.engine.flower.tls` (the server certificate verifies against the CA, names
127.0.0.1 and localhost, expires when asked; node keys are what Flower loads), then one secure
:class:`LocalDeployment` on 127.0.0.1 (no app, no run) against which a registered SuperNode comes
online while one with an unknown key, one with no key and one trusting another CA are refused.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import socket
import ssl
import stat
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from lorafed.engine.flower.tls import main, make_certificates, make_node_keys

pytest.importorskip("flwr")

REFUSE_S = 30.0  # a refused SuperNode must have exited within this (it takes ~3 s)


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_server_certificate_verifies_against_the_ca(tmp_path) -> None:
    certs = make_certificates(tmp_path, days=7)
    ca, server = _load(certs.ca_cert), _load(certs.server_cert)
    server.verify_directly_issued_by(ca)  # raises on a bad signature or issuer
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    # A certificate from another CA does not verify against this one.
    other = make_certificates(tmp_path / "other")
    with pytest.raises(InvalidSignature):  # same issuer name, another key
        _load(other.server_cert).verify_directly_issued_by(ca)
    # The key files are the server's and the CA's, private, and P-384.
    key = serialization.load_pem_private_key(certs.server_key.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    for private in (certs.server_key, certs.ca_key):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_server_certificate_names_127_0_0_1_and_expires(tmp_path) -> None:
    certs = make_certificates(tmp_path, hosts=("127.0.0.1", "localhost", "superlink.example.org"), days=7)
    server = _load(certs.server_cert)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "superlink.example.org"]
    now = dt.datetime.now(dt.UTC)
    assert server.not_valid_before_utc <= now < server.not_valid_after_utc
    assert dt.timedelta(days=6, hours=23) < server.not_valid_after_utc - now <= dt.timedelta(days=7)
    assert _load(certs.ca_cert).not_valid_after_utc == server.not_valid_after_utc
    with pytest.raises(ValueError, match="hosts"):
        make_certificates(tmp_path / "none", hosts=())
    with pytest.raises(ValueError, match="days"):
        make_certificates(tmp_path / "zero", days=0)


def test_python_tls_accepts_the_certificate_for_127_0_0_1(tmp_path) -> None:
    """A stock TLS client (hostname check on) trusting only the CA completes a handshake."""
    certs = make_certificates(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs.server_cert, certs.server_key)
    client_ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        lsock.settimeout(10)

        def serve() -> None:
            conn, _ = lsock.accept()
            with contextlib.suppress(ssl.SSLError), server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")  # the second client aborts the handshake: SSLError

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        with (
            socket.create_connection(lsock.getsockname(), timeout=10) as raw,
            client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            assert tls.recv(2) == b"ok"
            assert ("IP Address", "127.0.0.1") in tls.getpeercert()["subjectAltName"]
        server.join(10)
        # The same client refuses a name the certificate does not carry.
        server = threading.Thread(target=serve, daemon=True)
        server.start()
        with (
            socket.create_connection(lsock.getsockname(), timeout=10) as raw,
            pytest.raises(ssl.SSLCertVerificationError),
        ):
            client_ctx.wrap_socket(raw, server_hostname="10.9.8.7")
        server.join(10)


def test_node_keys_are_p384_openssh(tmp_path) -> None:
    keys = make_node_keys(tmp_path, "node0")
    private = serialization.load_ssh_private_key(keys.private_key.read_bytes(), None)
    public = serialization.load_ssh_public_key(keys.public_key.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert private.public_key().public_numbers() == public.public_numbers()
    assert stat.S_IMODE(keys.private_key.stat().st_mode) == 0o600
    assert keys.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")


def test_tls_module_cli(tmp_path, capsys) -> None:
    main(["certs", str(tmp_path), "--host", "10.0.0.5", "--host", "link.example.org"])
    san = _load(tmp_path / "server.pem").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    main(["node-key", str(tmp_path), "bank-a"])
    assert (tmp_path / "bank-a").exists() and (tmp_path / "bank-a.pub").exists()
    assert "register it" in capsys.readouterr().out


def _exited(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def _online(dep) -> list[str]:
    import json

    nodes = json.loads(dep.flwr("supernode", "list", "lorafed-local", "--format", "json"))["nodes"]
    return sorted(n["node-id"] for n in nodes if n["status"] == "online")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_only_registered_supernodes_join(tmp_path) -> None:
    from lorafed.engine.flower.deploy import LocalDeployment

    work = tmp_path / "dep"
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with LocalDeployment(work, ["partition-id=0"]) as dep:
        assert dep.certs is not None and all(a.startswith("127.0.0.1:") for a in dep.listeners())
        # The SuperLink serves TLS with our certificate, verified for 127.0.0.1 (plaintext is not spoken).
        ctx = ssl.create_default_context(cafile=str(dep.certs.ca_cert))
        with (
            socket.create_connection(("127.0.0.1", dep.link_port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
        # The registered node comes online (bounded wait).
        end, online = time.monotonic() + 60, []
        while time.monotonic() < end and len(online) < 1:
            online = _online(dep)
            if not online:
                time.sleep(1)
        assert len(online) == 1, (work / "logs" / "supernode0.log").read_text()[-2000:]

        # An unknown key: the SuperLink refuses to activate it and the node gives up.
        rogue = dep.add_node("rogue", "partition-id=1", register=False, max_wait_time=10)
        assert _exited(rogue, REFUSE_S) not in (None, 0)
        log = (work / "logs" / "rogue.log").read_text()
        assert "Failed to initialize the connection to the SuperLink" in log and "Failed to activate" in log
        link_log = (work / "logs" / "superlink.log").read_text()
        assert "No SuperNode found with the given public key" in link_log

        # No key at all: self-registration over the Fleet API is disabled under --enable-supernode-auth.
        bin_dir = dep._bin("flower-supernode")
        base = [str(bin_dir), "--superlink", f"127.0.0.1:{dep.link_port}", "--host", "127.0.0.1",
                "--max-wait-time", "10", "--node-config", "partition-id=2"]  # fmt: skip
        keyless = dep._start("keyless", [*base, "--port", str(_free()), "--root-certificates", str(dep.certs.ca_cert)])
        assert _exited(keyless[0], REFUSE_S) not in (None, 0)
        assert "All SuperNodes must be registered via the CLI" in keyless[1].read_text()

        # A registered-looking node that trusts another CA does not even complete TLS.
        other = make_certificates(tmp_path / "other-ca")
        spoofed = dep._start(
            "other_ca",
            [*base, "--port", str(_free()), "--root-certificates", str(other.ca_cert),
             "--auth-supernode-private-key", str(work / "tls" / "supernode0")],
        )  # fmt: skip
        assert _exited(spoofed[0], REFUSE_S) not in (None, 0)
        assert "CERTIFICATE_VERIFY_FAILED" in spoofed[1].read_text()

        # Still exactly the one registered node online.
        assert _online(dep) == online
    assert {p.pid for p in psutil.Process().children(recursive=True)} - before == set()


def _free() -> int:
    from lorafed.engine.flower.deploy import free_port

    return free_port()


def test_insecure_is_explicit(capsys) -> None:
    from lorafed.cli import main as cli_main
    from lorafed.engine.flower.deploy import LocalDeployment

    assert LocalDeployment(Path("unused"), []).secure  # secure unless asked
    with pytest.raises(SystemExit):
        cli_main(["flower", "run", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--insecure" in help_text and "debugging only" in help_text
    assert "--enable-supernode-auth" in help_text


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_insecure_deployment_is_plaintext_and_open(tmp_path) -> None:
    """``secure=False`` is the old deployment: every process ``--insecure``, no certificates, no keys."""
    from lorafed.engine.flower.deploy import DeploymentError, LocalDeployment

    with LocalDeployment(tmp_path, ["partition-id=0"], secure=False) as dep:
        assert dep.certs is None and not (tmp_path / "tls").exists()
        assert "insecure = true" in (tmp_path / "flwr_home" / "config.toml").read_text()
        assert all("--insecure" in p.args for p in dep.procs)
        with pytest.raises(DeploymentError, match="only a secure deployment"):
            dep.register(["x"])
    assert "SuperNode authentication is disabled" in (tmp_path / "logs" / "superlink.log").read_text()
