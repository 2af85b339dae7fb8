"""Cluster identity: only members reach the control plane (CacheService) and the data plane (BlockTransfer).

A member is a process holding the cluster credential, under one identity: a node id (``worker-0``, ...),
``router``, ``operator`` (tools and people), or ``cache-service`` (the CacheService's own name, which it
presents under TLS). There are two kinds of credential (DESIGN 6b):

    SharedSecret (--cluster-secret-file; `prefixcache serve` makes one per start)
        member key   HMAC-SHA256(secret, "member:" + identity): a key bound to the identity
        each call    x-pc-member: identity | x-pc-time: unix seconds | x-pc-mac: HMAC(member key, method \\n time)
        the server   derives the claimed identity's key, compares the MAC, accepts a time within
                     MAX_CLOCK_SKEW_S of its own clock. A token is bound to one method: it cannot be replayed
                     on another, nor outside the window.
        the peer     proves itself when asked: x-pc-nonce in a request -> x-pc-proof: HMAC(its key, nonce) in
                     its answer, so a requester knows the server is the member the index named.
        It authenticates the ends; it neither encrypts nor protects a message's body (see the README's threat
        model). Every holder of the secret can derive every member key: identities keep honest members and
        bugs apart, not a member that turned hostile (mutual TLS does).
    TlsFiles (--tls-cert, --tls-key, --tls-ca; the paths may hold "{id}", each process reads its own)
        every internal server requires a client certificate signed by the CA; a member's identities are its
        certificate's common name and DNS subject alternative names; a client checks that the server's
        certificate names the identity it meant to reach (the node id the index named, or cache-service).
        Everything is encrypted, the raw block stream included.

``Member`` is what one process uses: its identity and the credential, with the client side (call metadata,
channels, the raw stream's SSL context) and the server side (ports, the raw stream's SSL context) of both
kinds. The server interceptor that checks calls is ``common/member_interceptor.py``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

import grpc

ROUTER_IDENTITY = "router"
OPERATOR_IDENTITY = "operator"
CACHE_SERVICE_IDENTITY = "cache-service"
# Identities that are roles, not nodes: no node may register under one of these.
ROLE_IDENTITIES = frozenset({ROUTER_IDENTITY, OPERATOR_IDENTITY, CACHE_SERVICE_IDENTITY})
MAX_CLOCK_SKEW_S = 120
MIN_SECRET_BYTES = 16
GENERATED_SECRET_BYTES = 32
MEMBER_KEY, TIME_KEY, MAC_KEY, NONCE_KEY, PROOF_KEY = "x-pc-member", "x-pc-time", "x-pc-mac", "x-pc-nonce", "x-pc-proof"
# As cache_service/validation.py's ids (an identity is a node id or a role).
_IDENTITY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/+=-]{0,127}$")
_HEX_RE = re.compile(r"^[0-9a-f]{1,128}$")


class AuthError(Exception):
    """A call is refused: ``code`` is its gRPC status name, ``str()`` says why (never a secret)."""

    code = "UNAUTHENTICATED"


class Unauthenticated(AuthError):
    """No credential, or one that does not verify (expired, replayed, forged, another CA)."""


class PermissionDenied(AuthError):
    """A verified member asked for what its identity may not do."""

    code = "PERMISSION_DENIED"


class CredentialError(ValueError):
    """A credential cannot be loaded (a missing or short secret file, a certificate that does not read)."""


def is_node(identity: str) -> bool:
    return identity not in ROLE_IDENTITIES


def check_identity(identity: str) -> str:
    if not _IDENTITY_RE.match(identity):
        raise CredentialError(f"identity {identity[:80]!r} is not 1-128 characters of [A-Za-z0-9._:@/+=-]")
    return identity


@dataclass(frozen=True, slots=True)
class Caller:
    """A verified caller: every identity its credential names (one for a secret; a certificate's CN and SANs)."""

    names: frozenset[str]

    def acts_as(self, identity: str) -> bool:
        return identity in self.names

    @property
    def is_node(self) -> bool:
        return any(is_node(n) for n in self.names)

    def __str__(self) -> str:
        return ",".join(sorted(self.names))


# ---- the shared secret --------------------------------------------------------------------------------
class Token(NamedTuple):
    """One call's credential: who, when, the MAC over method and time; a nonce when the caller wants proof."""

    identity: str
    issued_s: int
    mac: str
    nonce: str = ""

    def metadata(self) -> tuple[tuple[str, str], ...]:
        md = ((MEMBER_KEY, self.identity), (TIME_KEY, str(self.issued_s)), (MAC_KEY, self.mac))
        return md + ((NONCE_KEY, self.nonce),) if self.nonce else md

    def to_bytes(self) -> bytes:
        """The raw block stream's form (its first request frame)."""
        return "\n".join(map(str, self)).encode("ascii")

    @classmethod
    def from_metadata(cls, metadata: Iterable[tuple[str, Any]] | None) -> Token:
        found = {k: v for k, v in metadata or () if k in (MEMBER_KEY, TIME_KEY, MAC_KEY, NONCE_KEY)}
        if not all(k in found for k in (MEMBER_KEY, TIME_KEY, MAC_KEY)):
            raise Unauthenticated("no cluster credential: only cluster members may call this "
                                  f"(send {MEMBER_KEY}, {TIME_KEY} and {MAC_KEY})")
        return cls._parse(*(_text(found.get(k, "")) for k in (MEMBER_KEY, TIME_KEY, MAC_KEY, NONCE_KEY)))

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> Token:
        fields = bytes(data).decode("ascii", "replace").split("\n")
        if len(fields) not in (3, 4):
            raise Unauthenticated("malformed cluster credential (expected identity, time, mac[, nonce])")
        return cls._parse(*fields)

    @classmethod
    def _parse(cls, identity: str, issued: str, mac: str, nonce: str = "") -> Token:
        if not _IDENTITY_RE.match(identity) or not issued.isdigit() or len(issued) > 12 or not _HEX_RE.match(mac) \
                or (nonce and not _HEX_RE.match(nonce)):
            raise Unauthenticated("malformed cluster credential")
        return cls(identity, int(issued), mac, nonce)


def _text(value: Any) -> str:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)


def _mac(key: bytes, *parts: str) -> str:
    return hmac.new(key, "\n".join(parts).encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class SharedSecret:
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.secret) < MIN_SECRET_BYTES:
            raise CredentialError(f"the cluster secret is {len(self.secret)} bytes; at least {MIN_SECRET_BYTES} "
                                  f"are needed (e.g. python -c 'import secrets; print(secrets.token_hex(32))')")

    @classmethod
    def generate(cls) -> SharedSecret:
        return cls(secrets.token_bytes(GENERATED_SECRET_BYTES))

    @classmethod
    def from_file(cls, path: str | Path) -> SharedSecret:
        """The file's bytes, surrounding whitespace stripped (a hex line written by hand or a tool)."""
        try:
            return cls(Path(path).read_bytes().strip())
        except OSError as exc:
            raise CredentialError(f"cannot read the cluster secret file {path}: {exc.strerror or exc}") from None
        except CredentialError as exc:
            raise CredentialError(f"cluster secret file {path}: {exc}") from None

    def key(self, identity: str) -> bytes:
        return hmac.new(self.secret, b"member:" + identity.encode(), hashlib.sha256).digest()

    def sign(self, identity: str, method: str, *, nonce: str = "", now: float | None = None) -> Token:
        issued = int(time.time() if now is None else now)
        return Token(identity, issued, _mac(self.key(identity), method, str(issued)), nonce)

    def verify(self, token: Token, method: str, *, now: float | None = None) -> Caller:
        """The caller ``token`` proves for ``method``; ``Unauthenticated`` saying why not."""
        skew = int(time.time() if now is None else now) - token.issued_s
        if abs(skew) > MAX_CLOCK_SKEW_S:
            raise Unauthenticated(f"cluster credential of {token.identity!r} is {abs(skew)} s "
                                  f"{'old' if skew > 0 else 'in the future'}; at most {MAX_CLOCK_SKEW_S} s "
                                  f"of clock skew is accepted")
        expected = _mac(self.key(token.identity), method, str(token.issued_s))
        if not hmac.compare_digest(expected, token.mac):
            raise Unauthenticated(f"invalid cluster credential for {token.identity!r} (another secret, "
                                  f"or a token made for another call)")
        return Caller(frozenset({token.identity}))

    def prove(self, identity: str, nonce: str) -> str:
        return _mac(self.key(identity), "proof", nonce)

    def check_proof(self, identity: str, nonce: str, proof: str) -> bool:
        return hmac.compare_digest(self.prove(identity, nonce), proof)


# ---- mutual TLS -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files; ``{id}`` in a path is replaced by the identity of the process that reads it."""

    cert: str
    key: str
    ca: str

    def resolve(self, identity: str) -> TlsFiles:
        return TlsFiles(*(p.replace("{id}", identity) for p in (self.cert, self.key, self.ca)))

    def read(self) -> tuple[bytes, bytes, bytes]:
        return read_pem(self.cert, "certificate"), read_pem(self.key, "private key"), read_pem(self.ca, "CA certificate")


def read_pem(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CredentialError(f"cannot read the TLS {what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN" not in data:
        raise CredentialError(f"the TLS {what} {path} is not PEM")
    return data


ClusterCredential = SharedSecret | TlsFiles


def peer_names(cert: dict[str, Any]) -> frozenset[str]:
    """The identities of a certificate as ``ssl.SSLObject.getpeercert()`` gives it: its CN and DNS SANs."""
    names = {value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"}
    names.update(value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS")
    return frozenset(names)


def auth_context_names(auth_context: dict[str, Sequence[bytes]]) -> frozenset[str]:
    """The identities of a gRPC peer's certificate (``context.auth_context()``): its CN and SANs."""
    return frozenset(v.decode("utf-8", "replace") for key in ("x509_common_name", "x509_subject_alternative_name")
                     for v in auth_context.get(key, ()))


# ---- one process's membership ---------------------------------------------------------------------------
class Member:
    """This process's identity and the cluster credential: both ends of every internal connection."""

    __slots__ = ("identity", "credential", "_tls", "_pem", "_ssl_client", "_ssl_server")

    def __init__(self, identity: str, credential: ClusterCredential) -> None:
        self.identity = check_identity(identity)
        self.credential = credential
        self._tls = credential.resolve(identity) if isinstance(credential, TlsFiles) else None
        self._pem = self._tls.read() if self._tls is not None else None  # read now: a bad file fails at start
        self._ssl_client: ssl.SSLContext | None = None
        self._ssl_server: ssl.SSLContext | None = None

    def __repr__(self) -> str:
        return f"Member({self.identity!r}, {'mutual TLS' if self.tls else 'shared secret'})"

    @property
    def tls(self) -> bool:
        return self._tls is not None

    @property
    def secret(self) -> SharedSecret | None:
        return self.credential if isinstance(self.credential, SharedSecret) else None

    # ---- client side ---------------------------------------------------------------------------------
    def call_metadata(self, method: str, nonce: str = "") -> tuple[tuple[str, str], ...]:
        """What a call to ``method`` carries: a token (secret), nothing (TLS: the handshake authenticates)."""
        secret = self.secret
        return secret.sign(self.identity, method, nonce=nonce).metadata() if secret is not None else ()

    def token(self, method: str, nonce: str = "") -> Token:
        secret = self.secret
        assert secret is not None, "a token is the shared secret's credential"
        return secret.sign(self.identity, method, nonce=nonce)

    def proves(self, peer: str, nonce: str, proof: str) -> bool:
        """Whether ``proof`` (the peer's answer to our ``nonce``) shows the peer holds ``peer``'s key."""
        secret = self.secret
        return secret is not None and bool(proof) and secret.check_proof(peer, nonce, proof)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if self._pem is None:
            return None
        cert, key, ca = self._pem
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    def channel(self, address: str, peer: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        """An aio channel to ``peer`` at ``address``: under TLS the server's certificate must name ``peer``."""
        creds = self.channel_credentials()
        if creds is None:
            return grpc.aio.insecure_channel(address, options=list(options))
        return grpc.aio.secure_channel(address, creds, options=[*options, ("grpc.ssl_target_name_override", peer)])

    def sync_channel(self, address: str, peer: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        """The blocking-API twin of ``channel`` (tools and tests)."""
        creds = self.channel_credentials()
        if creds is None:
            return grpc.insecure_channel(address, options=list(options))
        return grpc.secure_channel(address, creds, options=[*options, ("grpc.ssl_target_name_override", peer)])

    def client_ssl_context(self) -> ssl.SSLContext | None:
        """The raw block stream's requester side under TLS (None with a secret); checks the peer's name."""
        if self._tls is None:
            return None
        if self._ssl_client is None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the host name
            self._load(ctx)
            self._ssl_client = ctx
        return self._ssl_client

    # ---- server side ---------------------------------------------------------------------------------
    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        """Bind ``server``: under TLS every client must present a certificate of the CA."""
        if self._pem is None:
            return server.add_insecure_port(address)
        cert, key, ca = self._pem
        return server.add_secure_port(address, grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=True))

    def server_ssl_context(self) -> ssl.SSLContext | None:
        """The raw block stream's serving side under TLS (None with a secret); requires a client certificate."""
        if self._tls is None:
            return None
        if self._ssl_server is None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.verify_mode = ssl.CERT_REQUIRED
            self._load(ctx)
            self._ssl_server = ctx
        return self._ssl_server

    def _load(self, ctx: ssl.SSLContext) -> None:
        assert self._tls is not None
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3  # both ends are ours
        try:
            ctx.load_cert_chain(self._tls.cert, self._tls.key)
            ctx.load_verify_locations(cafile=self._tls.ca)
        except (OSError, ssl.SSLError) as exc:
            raise CredentialError(f"cannot load the TLS files of {self.identity!r}: {exc}") from None

    def verify(self, method: str, metadata: Iterable[tuple[str, Any]] | None) -> tuple[Caller, str]:
        """(caller, nonce) of a gRPC call under the shared secret; ``Unauthenticated`` saying why not."""
        token = Token.from_metadata(metadata)
        return self.verify_token(token, method), token.nonce

    def verify_token(self, token: Token, method: str) -> Caller:
        secret = self.secret
        assert secret is not None, "under TLS the handshake authenticates: read the peer's certificate"
        return secret.verify(token, method)

    def prove(self, nonce: str) -> str:
        secret = self.secret
        assert secret is not None
        return secret.prove(self.identity, nonce)


def new_nonce() -> str:
    return secrets.token_hex(16)


def server_tls_credentials(cert_pem: bytes, key_pem: bytes) -> grpc.ServerCredentials:
    """Server-only TLS (no client certificate): the router's client-facing gRPC endpoint."""
    return grpc.ssl_server_credentials([(key_pem, cert_pem)])


def server_ssl_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """Server-only TLS for the router's HTTP front door (clients bring bearer tokens, not certificates)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # HTTP clients of every kind
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise CredentialError(f"cannot load the router's TLS certificate {cert_file}: {exc}") from None
    return ctx
