"""The cluster credential flags of `prefixcache serve` and `prefixcache cache-service`, and what they mean.

    (none)                               a shared secret made for this start (secrets.token_bytes(32))
    --cluster-secret-file FILE           the shared secret in FILE (every member of the cluster reads the same)
    --tls-cert C --tls-key K --tls-ca A  mutual TLS between members; "{id}" in a path is each member's identity
                                         (worker-0, router, cache-service, ...), read where that member runs
    --tls-cert C --tls-key K (no CA)     `serve` only: TLS on the router's client-facing endpoint; members
                                         keep the shared secret

Under mutual TLS the router's client-facing endpoint serves TLS with the router's certificate too.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from common.cluster_auth import (
    ROUTER_IDENTITY,
    ClusterCredential,
    CredentialError,
    SharedSecret,
    TlsFiles,
    read_pem,
)


def add_arguments(parser: argparse.ArgumentParser, *, front_door: bool) -> None:
    """``front_door``: the command runs the router (its client-facing TLS takes --tls-cert/--tls-key alone)."""
    parser.add_argument("--cluster-secret-file", default=None, metavar="FILE",
                        help="the cluster's shared secret (at least 16 bytes; every member reads the same file); "
                             "default: a new secret for this start")
    tls_cert = "certificate (PEM) of this member; '{id}' is replaced by each member's identity"
    if front_door:
        tls_cert += " (without --tls-ca: only the router's client-facing endpoint serves TLS)"
    parser.add_argument("--tls-cert", default=None, metavar="FILE", help=tls_cert)
    parser.add_argument("--tls-key", default=None, metavar="FILE", help="private key (PEM) of --tls-cert")
    parser.add_argument("--tls-ca", default=None, metavar="FILE",
                        help="CA certificate (PEM): mutual TLS between all members, client certificates required")


@dataclass(frozen=True, slots=True)
class CredentialFlags:
    secret_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CredentialFlags:
        return cls(args.cluster_secret_file, args.tls_cert, args.tls_key, args.tls_ca)

    def check(self, *, front_door: bool) -> None:
        """``CredentialError`` naming the flags that do not go together."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise CredentialError("--tls-cert and --tls-key go together")
        if self.tls_ca is not None and self.tls_cert is None:
            raise CredentialError("--tls-ca needs --tls-cert and --tls-key (each member's own certificate)")
        if self.tls_ca is not None and self.secret_file is not None:
            raise CredentialError("--cluster-secret-file and --tls-ca are two kinds of cluster credential: "
                                  "give one")
        if self.tls_cert is not None and self.tls_ca is None and not front_door:
            raise CredentialError("--tls-cert and --tls-key need --tls-ca here (mutual TLS between members)")

    def credential(self, secret: bytes | None = None) -> ClusterCredential:
        """The cluster credential: TLS files, the secret file, ``secret``, or a new secret for this start."""
        if self.tls_ca is not None:
            assert self.tls_cert is not None and self.tls_key is not None
            return TlsFiles(self.tls_cert, self.tls_key, self.tls_ca)
        if self.secret_file is not None:
            return SharedSecret.from_file(self.secret_file)
        return SharedSecret(secret) if secret is not None else SharedSecret.generate()

    def front_door(self) -> tuple[str, str] | None:
        """The router's client-facing certificate and key files (``{id}`` = router), checked to read as PEM;
        None: plaintext."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        cert, key = (p.replace("{id}", ROUTER_IDENTITY) for p in (self.tls_cert, self.tls_key))
        read_pem(cert, "certificate")
        read_pem(key, "private key")
        return cert, key
