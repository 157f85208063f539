"""Enrolment: the cluster's own CA and a certificate for the server and for every inventory node.

    potluck certs --inventory deploy/inventory.yaml --out certs/

writes
    certs/ca.pem, certs/ca.key       the CA (keep ca.key off the devices: it enrols new ones)
    certs/server/{ca,cert,key}.pem   for the machine running `potluck serve`
    certs/nodes/<node>/{ca,cert,key}.pem   for each node: copy the folder to that device

Each certificate names its identity as a DNS subject alternative name (protos/security.py), so
the addresses of the inventory can change without new certificates. A later run with an existing
CA (`--out` holding ca.pem and ca.key) keeps the CA and only issues what is missing, so enrolling a
new node does not re-key the others. Keys are ECDSA P-256; private keys are written mode 0600.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protos.security import SERVER_IDENTITY, Credentials, agent_identity

SERVER_FOLDER = "server"
NODES_FOLDER = "nodes"  # apart from the server's: a node may be named "server"


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "potluck"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common)])


class ClusterCA:
    """A CA that signs the cluster's certificates."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self.key = key

    @classmethod
    def create(cls, days: int, now: datetime.datetime | None = None) -> ClusterCA:
        now = now or datetime.datetime.now(datetime.timezone.utc)
        key = ec.generate_private_key(ec.SECP256R1())
        name = _name("potluck cluster CA")
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        return cls(cert, key)

    @classmethod
    def load(cls, folder: Path) -> ClusterCA:
        cert = x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{folder / 'ca.key'} is not the ECDSA key `potluck certs` writes")
        return cls(cert, key)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, identity: str, days: int, now: datetime.datetime | None = None) -> Credentials:
        """A certificate and key naming `identity`, for both ends of a connection (an agent serves
        and calls its peers; the server only calls)."""
        now = now or datetime.datetime.now(datetime.timezone.utc)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(_name(identity)).issuer_name(self.cert.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(identity)]), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .sign(self.key, hashes.SHA256()))
        return Credentials(self.pem, cert.public_bytes(serialization.Encoding.PEM), _pem_key(key), identity)

    def save(self, folder: Path) -> None:
        _write(folder / "ca.pem", self.pem)
        _write(folder / "ca.key", _pem_key(self.key), private=True)


def save_credentials(creds: Credentials, folder: Path) -> None:
    _write(folder / "ca.pem", creds.ca)
    _write(folder / "cert.pem", creds.cert)
    _write(folder / "key.pem", creds.key, private=True)


def enrol(out: Path, nodes: Iterable[str], days: int = 3650) -> tuple[list[str], list[str]]:
    """Certificates for the server and `nodes` under `out` (a CA there is reused, else created);
    returns the folders written and those kept because they already held a certificate."""
    if (out / "ca.pem").is_file() and (out / "ca.key").is_file():
        ca = ClusterCA.load(out)
    elif (out / "ca.pem").exists() or (out / "ca.key").exists():
        raise ValueError(f"{out} holds only half a CA (ca.pem and ca.key go together): move it away or restore "
                         f"the other file")
    else:
        ca = ClusterCA.create(days)
        ca.save(out)
    written, kept = [], []
    for folder, identity in [(SERVER_FOLDER, SERVER_IDENTITY), *((f"{NODES_FOLDER}/{n}", agent_identity(n)) for n in nodes)]:
        if (out / folder / "cert.pem").is_file():
            kept.append(folder)
            continue
        save_credentials(ca.issue(identity, days), out / folder)
        written.append(folder)
    return written, kept


def folders(root: Path, nodes: Iterable[str]) -> dict[str, Path]:
    """Where `enrol` put the server's (key SERVER_FOLDER) and each node's certificate."""
    return {SERVER_FOLDER: root / SERVER_FOLDER, **{n: root / NODES_FOLDER / n for n in nodes}}


def throwaway(folder: Path, nodes: Iterable[str]) -> dict[str, Path]:
    """A fresh CA and certificates under `folder` (for `potluck up` and tests, whose processes all
    run here): the folder of each node, and of the server under SERVER_FOLDER."""
    nodes = list(nodes)
    enrol(folder, nodes, days=7)
    return folders(folder, nodes)


def own_folder(folder: Path, node: str | None) -> Path:
    """The folder holding the certificate of `node` (None: the server): `folder` itself, or, given
    the whole output of `potluck certs`, its server/ or nodes/<node>/ part."""
    if (folder / "cert.pem").exists():
        return folder
    inner = folder / SERVER_FOLDER if node is None else folder / NODES_FOLDER / node
    return inner if (inner / "cert.pem").exists() else folder
