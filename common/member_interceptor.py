"""The server side of cluster identity: each call to an internal gRPC server is checked before it is parsed.

    grpc.aio.server(interceptors=[RequestIdInterceptor(), MemberInterceptor(member), EdgeInterceptor(log)])

    shared secret   the call's token (x-pc-member, x-pc-time, x-pc-mac) is verified for *this* method
                    -- none, expired, forged, made for another method -->  UNAUTHENTICATED "why", not parsed
                    a request that sent x-pc-nonce gets x-pc-proof (HMAC of this server's key) in its
                    answer's initial metadata: the caller learns it reached the member it meant to
    mutual TLS      the handshake already refused anyone without a certificate of the CA; the caller's
                    identities are read from its certificate (``context.auth_context()``)

The handler then runs with ``current_caller()`` bound (a ContextVar, one per call's task); servicers decide
what that caller may do (``cache_service/access.py``) and answer PERMISSION_DENIED otherwise. The health
service's Check and Watch stay open: liveness probes hold no credential, and they learn nothing but
SERVING. Listed before ``EdgeInterceptor``, so that nothing a stranger sends is even decoded.
"""

from __future__ import annotations

import contextvars
import inspect
from typing import Any, Callable

import grpc

from common.cluster_auth import PROOF_KEY, AuthError, Caller, Member, Unauthenticated, auth_context_names

caller_var: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("prefixcache_caller", default=None)
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})


def current_caller() -> Caller | None:
    """The verified caller of the call being handled; None on a server that runs without a credential."""
    return caller_var.get()


def _status(exc: AuthError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, exc.code)


def _deny(handler: grpc.RpcMethodHandler, exc: AuthError) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that answers ``exc``'s code and message and nothing else."""

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(_status(exc), str(exc))

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(_status(exc), str(exc))
        yield  # an async generator, as the streaming kinds expect (abort raises first)

    de, ser = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary, de, ser)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream, de, ser)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary, de, ser)
    return grpc.stream_stream_rpc_method_handler(stream, de, ser)


CallerOf = Callable[[grpc.aio.ServicerContext], Caller]


def _tls_caller(context: grpc.aio.ServicerContext) -> Caller:
    names = auth_context_names(context.auth_context())
    if not names:  # cannot happen with require_client_auth; refuse rather than run without a caller
        raise Unauthenticated("the client certificate names no identity (no CN, no DNS SAN)")
    return Caller(names)


def _bind(handler: grpc.RpcMethodHandler, caller_of: CallerOf, proof: str) -> grpc.RpcMethodHandler:
    """``handler`` with the caller bound while it runs (and the proof sent first, when one was asked for)."""

    async def enter(context: grpc.aio.ServicerContext) -> contextvars.Token:
        try:
            caller = caller_of(context)
        except AuthError as exc:
            await context.abort(_status(exc), str(exc))
        if proof:
            await context.send_initial_metadata(((PROOF_KEY, proof),))
        return caller_var.set(caller)

    def unary(fn: Any) -> Any:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            token = await enter(context)
            try:
                return await fn(request, context)
            finally:
                caller_var.reset(token)

        return wrapper

    def stream(fn: Any) -> Any:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            token = await enter(context)
            caller = caller_var.get()
            try:
                async for item in fn(request, context):
                    yield item
                    caller_var.set(caller)  # an async generator resumes in its consumer's context
            finally:
                try:
                    caller_var.reset(token)
                except ValueError:  # closed from another context: nothing of ours is bound there
                    pass

        return wrapper

    de, ser = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary is not None and inspect.iscoroutinefunction(handler.unary_unary):
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), de, ser)
    if handler.unary_stream is not None:
        fn = handler.unary_stream
        if inspect.isasyncgenfunction(fn):
            return grpc.unary_stream_rpc_method_handler(stream(fn), de, ser)
        if inspect.iscoroutinefunction(fn):
            return grpc.unary_stream_rpc_method_handler(unary(fn), de, ser)
    # Client-streaming and bidirectional handlers (reflection): authenticated already, no caller needed.
    return handler


class MemberInterceptor(grpc.aio.ServerInterceptor):
    """grpc.aio server interceptor: only members of ``member``'s cluster get past it (see the module doc)."""

    def __init__(self, member: Member) -> None:
        self.member = member

    async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method in OPEN_METHODS:
            return handler  # unknown method (UNIMPLEMENTED), or a health check
        if self.member.tls:
            return _bind(handler, _tls_caller, "")
        try:
            caller, nonce = self.member.verify(handler_call_details.method, handler_call_details.invocation_metadata)
        except AuthError as exc:
            return _deny(handler, exc)
        return _bind(handler, lambda _context: caller, self.member.prove(nonce) if nonce else "")
