"""A throwaway certificate authority for tests and benchmarks of mutual TLS (``cryptography``, the dev extra).

    pki = ThrowawayPki(folder)                       # a CA (its key never leaves this object)
    files = pki.issue_all(["worker-0", "router", ...])   # folder/<id>.crt, <id>.key, and folder/ca.crt
    TlsFiles(cert=f"{folder}/{{id}}.crt", key=f"{folder}/{{id}}.key", ca=f"{folder}/ca.crt")

Each certificate names its identity as the common name and as its only DNS subject alternative name, as a
deployment's CA would (``common/cluster_auth.py`` reads both). EC P-256 keys: quick to make, and the TLS
handshake's cost is not what the benchmarks measure. The product itself makes no certificates: operators
bring theirs (``--tls-cert``, ``--tls-key``, ``--tls-ca``).
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_FOR = datetime.timedelta(days=2)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class ThrowawayPki:
    def __init__(self, folder: str | Path, name: str = "prefixcache test CA") -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALID_FOR)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(self._key, hashes.SHA256()))
        self.ca_path = self.folder / "ca.crt"
        self.ca_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, identity: str, *, names: Iterable[str] | None = None, prefix: str = "") -> tuple[Path, Path]:
        """``<prefix><identity>.crt`` and ``.key`` in the folder: a certificate for client and server use."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder().subject_name(_name(identity)).issuer_name(self.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALID_FOR)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in (names or [identity])]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(self._key, hashes.SHA256()))
        cert_path, key_path = self.folder / f"{prefix}{identity}.crt", self.folder / f"{prefix}{identity}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(_pem_key(key))
        key_path.chmod(0o600)
        return cert_path, key_path

    def issue_all(self, identities: Iterable[str]) -> Path:
        for identity in identities:
            self.issue(identity)
        return self.folder

    def template(self, prefix: str = "") -> tuple[str, str, str]:
        """(cert, key, ca) paths with ``{id}`` in place of the identity: what ``TlsFiles`` and the flags take."""
        return (str(self.folder / f"{prefix}{{id}}.crt"), str(self.folder / f"{prefix}{{id}}.key"),
                str(self.ca_path))
