"""The gRPC ``Generation`` servicer: converts protos at the edge and delegates.

Errors map to status codes here and nowhere else:

    InvalidRequestError / UnknownWorkerError   INVALID_ARGUMENT   (what is wrong with the request)
    AuthError                                  UNAUTHENTICATED
    OverloadedError                            RESOURCE_EXHAUSTED (in-flight cap reached)
    NoWorkerError / StreamBrokenError          UNAVAILABLE        (no live worker, worker lost mid-stream)
    WorkerCallError / TimeoutError             UNAVAILABLE        (Pin: a worker failed or did not warm in time)
    PinNotFoundError                           NOT_FOUND
    PinUnsupportedError                        FAILED_PRECONDITION (the workers' engine cannot hold pins: vLLM)
    CacheServiceError                          the cache service's code (router/cache_link.py says which)
    anything else                              INTERNAL, a generic message; the traceback goes to the log
"""

from __future__ import annotations

import time
from typing import AsyncIterator, Callable

import grpc

from common.grpc_edge import abort_internal, short_detail
from common.logs import get_logger, request_context
from protos.prefixcache.v1 import generation_pb2 as pb
from protos.prefixcache.v1 import generation_pb2_grpc
from router.auth import AuthError, TokenAuth
from router.cache_link import CacheServiceError
from router.dispatch import Dispatcher, OverloadedError, RequestFailedError, StreamBrokenError
from router.front_door import FrontDoor
from router.pins import PinManager, PinNotFoundError, PinNotYoursError, PinUnsupportedError
from router.routing import NoWorkerError, UnknownWorkerError
from router.tokenize import PromptEncoder
from router.validation import GenerateArgs, ValidRequest
from router.worker_client import WorkerCallError
from cache_service.records import InvalidRequestError, Usage

log = get_logger("router")

_STATUS: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (UnknownWorkerError, grpc.StatusCode.INVALID_ARGUMENT),
    (AuthError, grpc.StatusCode.UNAUTHENTICATED),
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NoWorkerError, grpc.StatusCode.UNAVAILABLE),
    (StreamBrokenError, grpc.StatusCode.UNAVAILABLE),
    (PinNotFoundError, grpc.StatusCode.NOT_FOUND),
    (PinNotYoursError, grpc.StatusCode.PERMISSION_DENIED),
    (PinUnsupportedError, grpc.StatusCode.FAILED_PRECONDITION),
]


def _status_of(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The code and message ``exc`` is answered with; None for an unexpected error (INTERNAL)."""
    if isinstance(exc, CacheServiceError):
        return exc.code, exc.details
    if isinstance(exc, WorkerCallError):
        # The worker's own words may be a Ray traceback: its first line says enough.
        return grpc.StatusCode.UNAVAILABLE, short_detail(exc)
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.UNAVAILABLE, "the workers did not answer in time"
    if isinstance(exc, RequestFailedError):
        # The request's own failure on its worker (not retried): the worker's words stay in the router's log.
        log.warning("request failed on its worker", extra={"error": str(exc)})
        return grpc.StatusCode.INTERNAL, "the request failed on its worker and was not retried (see the router log)"
    for cls, code in _STATUS:
        if isinstance(exc, cls):
            return code, str(exc)
    return None


def args_from_proto(req: pb.GenerateRequest) -> GenerateArgs:
    s = req.sampling
    return GenerateArgs(
        request_id=req.request_id,
        text=req.text,
        token_ids=list(req.token_ids),
        max_tokens=s.max_tokens if s.HasField("max_tokens") else None,
        temperature=s.temperature,
        top_p=s.top_p if s.HasField("top_p") else None,
        top_k=s.top_k,
        seed=s.seed if s.HasField("seed") else None,
        stop=list(s.stop),
        ignore_eos=s.ignore_eos,
        cache_salt=req.cache_salt,
        session_id=req.session_id,
        target_worker=req.target_worker,
    )


def _usage_proto(u: Usage | None) -> pb.Usage | None:
    if u is None:
        return None
    return pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                    cached_tokens=u.cached_tokens, transferred_tokens=u.transferred_tokens,
                    predicted_cached_tokens=u.predicted_cached_tokens)


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, encoder: PromptEncoder, dispatcher: Dispatcher, pins: PinManager,
                 auth: TokenAuth | None = None) -> None:
        self.encoder = encoder
        self.dispatcher = dispatcher
        self.pins = pins
        self.auth = auth
        self.door = FrontDoor(encoder, dispatcher, auth)  # auth -> tenant salt, validation: shared with HTTP

    # ---- shared edge logic ------------------------------------------------------------------------------
    def _tenant_and_salt(self, context: grpc.aio.ServicerContext, client_salt: str) -> tuple[str, str]:
        return self.door.tenant_and_salt(context.invocation_metadata(), client_salt)

    def _pin_owner(self, tenant: str) -> str | None:
        """The tenant a pin belongs to: the authenticated one; with auth off every client is the default
        tenant (None: ``PinManager`` reads it from the salt)."""
        return tenant if self.auth is not None else None

    def _prepare(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> tuple[ValidRequest, str]:
        tenant = self.door.authenticate(context.invocation_metadata())
        return self.door.admit(tenant, lambda: args_from_proto(request))

    @staticmethod
    async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
        status = _status_of(exc)
        if status is None:
            await abort_internal(context, log, exc, "Generation")
        if isinstance(exc, CacheServiceError) and exc.cause:  # what the caller is not told
            log.warning("cache service call failed", extra={"error": exc.cause})
        await context.abort(*status)

    async def _guard(self, context: grpc.aio.ServicerContext, fn: Callable):
        try:
            return await fn()
        except grpc.aio.AbortError:
            raise  # already answered
        except Exception as exc:  # noqa: BLE001 - mapped to a status, or INTERNAL
            await self._abort(context, exc)

    # ---- RPCs -------------------------------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        started = time.perf_counter()

        async def go() -> pb.GenerateResponse:
            req, tenant = self._prepare(request, context)
            with request_context(req.request_id):
                out = await self.door.complete(req, tenant, started)
                return pb.GenerateResponse(request_id=req.request_id, token_ids=out.token_ids, text=out.text,
                                           finish_reason=out.finish_reason, usage=_usage_proto(out.usage),
                                           worker_id=out.worker_id)

        return await self._guard(context, go)

    async def GenerateStream(self, request: pb.GenerateRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        started = time.perf_counter()
        try:
            req, tenant = self._prepare(request, context)
            with request_context(req.request_id):
                async for delta in self.dispatcher.stream(req, tenant, started, restartable=False):
                    yield pb.GenerateResponse(request_id=req.request_id, token_ids=delta.token_ids, text=delta.text,
                                              finish_reason=delta.finish_reason or "", usage=_usage_proto(delta.usage),
                                              worker_id=delta.worker_id)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status, or INTERNAL
            await self._abort(context, exc)

    async def Pin(self, request: pb.PinRequest, context: grpc.aio.ServicerContext) -> pb.PinResponse:
        async def go() -> pb.PinResponse:
            tenant, salt = self._tenant_and_salt(context, request.cache_salt)
            r = await self.pins.pin(request.text, list(request.token_ids), request.replicas, request.ttl_seconds, salt,
                                    tenant=self._pin_owner(tenant))
            return pb.PinResponse(pin_id=r.pin_id, workers=r.workers, pinned_tokens=r.pinned_tokens,
                                  num_blocks=r.num_blocks)

        return await self._guard(context, go)

    async def Unpin(self, request: pb.PinRequest, context: grpc.aio.ServicerContext) -> pb.PinResponse:
        async def go() -> pb.PinResponse:
            tenant, salt = self._tenant_and_salt(context, request.cache_salt)
            r = await self.pins.unpin(request.text, list(request.token_ids), salt, tenant=self._pin_owner(tenant))
            return pb.PinResponse(pin_id=r.pin_id, workers=r.workers, pinned_tokens=r.pinned_tokens,
                                  num_blocks=r.num_blocks)

        return await self._guard(context, go)
