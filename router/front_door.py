"""What every front door (the gRPC servicer, the HTTP app) does around the dispatcher, in one place.

    headers/metadata --authenticate--> tenant --build args--> GenerateArgs --validate--> ValidRequest
                                                                               (cache salt = the tenant's)
    ValidRequest --Dispatcher.stream--> deltas --collect (unary callers)--> Completion

The edges differ only in how they read a request (a proto, a JSON body) and how they write the answer; the
tenant, its salt, the validation and the accounting of refused requests must be the same on both, or one
door would be a way around the other's rules. So both call ``FrontDoor.admit`` and ``FrontDoor.complete``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

from cache_service.records import Delta, InvalidRequestError, Usage
from router.auth import AuthError, TokenAuth, tenant_salt
from router.dispatch import Dispatcher
from router.metrics import anonymous_tenant
from router.tokenize import PromptEncoder
from router.validation import GenerateArgs, ValidRequest, validate_generate

Metadata = Iterable[tuple[str, str | bytes]]

# The tenant label of a request whose token was refused: it has no tenant, and a client-chosen name must
# not become a metric label.
UNAUTHENTICATED = "unauthenticated"


@dataclass(slots=True)
class Completion:
    """A whole answer, for the unary calls (gRPC ``Generate``, HTTP without ``stream``)."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""
    usage: Usage = field(default_factory=Usage)
    worker_id: str = ""


class FrontDoor:
    def __init__(self, encoder: PromptEncoder, dispatcher: Dispatcher, auth: TokenAuth | None = None) -> None:
        self.encoder = encoder
        self.dispatcher = dispatcher
        self.auth = auth

    def authenticate(self, metadata: Metadata | None) -> str | None:
        """The caller's tenant, None when auth is off; raises ``AuthError``, counted as a refused request.

        A front door calls this before it reads anything else of the request, so an outsider learns
        nothing about a request's validity (nor gets its body parsed)."""
        try:
            return self._tenant(metadata)
        except AuthError:
            self._refused(UNAUTHENTICATED)
            raise

    def tenant_and_salt(self, metadata: Metadata | None, client_salt: str) -> tuple[str, str]:
        """(tenant, cache salt), for calls that are not generations (pins). With auth on, the salt is derived
        server-side from the authenticated tenant (``tenant_salt``): a client's own salt only sub-partitions
        its tenant's space. With auth off the client's salt is the salt, and its digest the tenant (the salt
        is that client's only isolation: metrics never see it)."""
        tenant = self._tenant(metadata)
        if tenant is None:
            return anonymous_tenant(client_salt), client_salt
        return tenant, tenant_salt(tenant, client_salt)

    def admit(self, tenant: str | None, build_args: Callable[[], GenerateArgs]) -> tuple[ValidRequest, str]:
        """Build (``build_args`` may raise ``InvalidRequestError``) and validate the request of an
        authenticated ``tenant`` (``authenticate``; None: auth is off, and the client's salt's digest names
        the tenant). Returns it with the tenant's salt applied, and the tenant. A refusal is counted."""
        label = UNAUTHENTICATED if tenant is None else tenant
        try:
            args = build_args()
            if tenant is None:
                label, salt = anonymous_tenant(args.cache_salt), args.cache_salt
            else:
                salt = tenant_salt(tenant, args.cache_salt)
            req = validate_generate(args, self.encoder)
        except InvalidRequestError:
            self._refused(label)
            raise
        req.cache_salt = salt
        return req, label

    def _tenant(self, metadata: Metadata | None) -> str | None:
        return None if self.auth is None else self.auth.authenticate(metadata)

    def _refused(self, tenant: str) -> None:
        # Refused at the edge: counted (no worker) so that error rates include bad requests.
        self.dispatcher.metrics.record_failed(None, tenant, "error")

    async def complete(self, req: ValidRequest, tenant: str, started: float) -> Completion:
        """The whole answer of a unary call. Unary callers see nothing before the end, so a failed worker's
        partial output is dropped and the request replayed elsewhere (``restartable``)."""
        out = Completion()
        text: list[str] = []
        last = Delta()
        async for delta in self.dispatcher.stream(req, tenant, started, restartable=True):
            if delta.restart:
                out.token_ids.clear()
                text.clear()
                continue
            out.token_ids.extend(delta.token_ids)
            text.append(delta.text)
            last = delta
        out.text = "".join(text)
        out.finish_reason = last.finish_reason or ""
        out.usage = last.usage or Usage()
        out.worker_id = last.worker_id
        return out
