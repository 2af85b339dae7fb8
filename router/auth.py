"""Optional bearer-token authentication: each token names a tenant, and the tenant owns a cache salt.

Tokens come from a JSON file ``{"token": "tenant", ...}`` (``--auth-tokens FILE``) or from the
environment, ``PREFIXCACHE_AUTH_TOKENS="tok1=tenantA,tok2=tenantB"``. With auth on, the router
*derives* the cache salt from the tenant (``tenant_salt``): whatever ``cache_salt`` a client sends
only sub-partitions its own tenant's space, so one tenant can never name another tenant's blocks.
"""

from __future__ import annotations

import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

ENV_VAR = "PREFIXCACHE_AUTH_TOKENS"
DEFAULT_TENANT = "default"


class AuthError(Exception):
    """Missing or unknown bearer token (UNAUTHENTICATED at the gRPC edge)."""


class AuthConfigError(ValueError):
    """A malformed token file or environment value."""


def tenant_salt(tenant: str, client_salt: str) -> str:
    # The unit separator cannot appear in a tenant name (rejected at load), so the tenant part of the
    # salt is unambiguous whatever the client appends.
    return f"tenant\x1f{tenant}\x1f{client_salt}"


@dataclass(slots=True)
class TokenAuth:
    tokens: dict[str, str]  # bearer token -> tenant

    def __post_init__(self) -> None:
        if not self.tokens:
            raise AuthConfigError("auth is enabled but no tokens were given")
        for token, tenant in self.tokens.items():
            if not token or not tenant:
                raise AuthConfigError("auth tokens and tenant names must be non-empty")
            if "\x1f" in tenant or any(c.isspace() for c in token):
                raise AuthConfigError(f"invalid tenant name or token for tenant {tenant!r}")

    @classmethod
    def from_file(cls, path: str | Path) -> TokenAuth:
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise AuthConfigError(f"auth token file not found: {path}") from None
        except json.JSONDecodeError as exc:
            raise AuthConfigError(f"auth token file {path} is not valid JSON: {exc}") from None
        if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
            raise AuthConfigError(f"auth token file {path} must hold a JSON object {{token: tenant}}")
        return cls(dict(raw))

    @classmethod
    def from_env_value(cls, value: str) -> TokenAuth:
        tokens: dict[str, str] = {}
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            token, sep, tenant = item.partition("=")
            if not sep:
                raise AuthConfigError(f"{ENV_VAR} entries must look like token=tenant, got {item!r}")
            tokens[token.strip()] = tenant.strip()
        return cls(tokens)

    @classmethod
    def load(cls, path: str | Path | None = None, env: dict[str, str] | None = None) -> TokenAuth | None:
        """The file if given, else the environment variable if set, else None (auth off)."""
        if path:
            return cls.from_file(path)
        value = (os.environ if env is None else env).get(ENV_VAR, "")
        return cls.from_env_value(value) if value.strip() else None

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
        """The tenant of the request's ``authorization: Bearer <token>`` header."""
        header = None
        for key, value in metadata or ():
            if key.lower() == "authorization":
                header = value.decode() if isinstance(value, bytes) else value
                break
        if header is None:
            raise AuthError("missing bearer token: send the 'authorization: Bearer <token>' header")
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("malformed authorization header: expected 'Bearer <token>'")
        token = token.strip()
        for known, tenant in self.tokens.items():
            # Constant-time compare: do not leak how much of a guessed token was right.
            if hmac.compare_digest(known.encode(), token.encode()):
                return tenant
        raise AuthError("invalid bearer token")
