"""A throwaway CA, one admin certificate for a loopback-only dev control plane, and the
certificates of its kubelets (node client certificates and serving certificates)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Names the API server is reached by, from the host and (by convention) from pods.
SERVER_DNS_NAMES = (
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)


@dataclass(frozen=True)
class CertPaths:
    ca_cert: Path
    admin_cert: Path
    admin_key: Path
    ca_key: Path  # kept for the life of the cluster: it signs the nodes' certificates


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,  # "EC PRIVATE KEY": what kube reads
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def write_dev_certs(directory: Path, days: int = 30, extra_ips: tuple[str, ...] = ()) -> CertPaths:
    """One CA and one cert that is both the API server's serving cert (for 127.0.0.1 and
    extra_ips) and a system:masters client cert; its key also signs service-account tokens."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    not_before, not_after = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubetune-dev-ca")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )

    admin_key = ec.generate_private_key(ec.SECP256R1())
    admin_cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "kubetune-admin"),
                ]
            )
        )
        .issuer_name(ca_name)
        .public_key(admin_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(n) for n in SERVER_DNS_NAMES]
                + [
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
                ]
                + [
                    x509.IPAddress(ipaddress.ip_address(ip))
                    for ip in dict.fromkeys(extra_ips)
                    if ip != "127.0.0.1"
                ]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    paths = CertPaths(
        directory / "ca.crt", directory / "admin.crt", directory / "admin.key", directory / "ca.key"
    )
    paths.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths.admin_cert.write_bytes(admin_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(admin_key, paths.admin_key)
    _write_key(ca_key, paths.ca_key)
    return paths


def issue(
    ca: CertPaths,
    directory: Path,
    name: str,
    subject: x509.Name,
    usage: ExtendedKeyUsageOID,
    ips: tuple[str, ...] = (),
    dns: tuple[str, ...] = (),
    days: int = 30,
) -> KeyPair:
    """A certificate signed by the dev cluster's CA: <name>.crt and <name>.key."""
    ca_cert = x509.load_pem_x509_certificate(ca.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(ca.ca_key.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if ips or dns:
        names = [x509.DNSName(n) for n in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    directory.mkdir(parents=True, exist_ok=True)
    pair = KeyPair(directory / f"{name}.crt", directory / f"{name}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, pair.key)
    return pair


def node_client_cert(ca: CertPaths, directory: Path, node: str) -> KeyPair:
    """The kubelet's identity to the API server, as the Node authorizer and the
    NodeRestriction admission plugin expect it: CN system:node:<name>, O system:nodes."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:nodes"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"system:node:{node}"),
        ]
    )
    return issue(ca, directory, "kubelet-client", subject, ExtendedKeyUsageOID.CLIENT_AUTH)


def node_serving_cert(ca: CertPaths, directory: Path, node: str, ip: str) -> KeyPair:
    """The kubelet's serving certificate, for the address the API server dials (logs, exec)."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)])
    return issue(
        ca, directory, "kubelet-serving", subject, ExtendedKeyUsageOID.SERVER_AUTH, ips=(ip,), dns=(node,)
    )
