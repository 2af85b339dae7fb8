"""The OpenAI-compatible HTTP front door: routes, who may call each, and errors in OpenAI's shape.

    POST /v1/chat/completions   tenants (a bearer token of --auth-tokens when auth is on; anyone when off)
    POST /v1/completions        tenants
    GET  /v1/models[/{id}]      tenants
    GET  /health                anyone (load balancers): 200 while a worker is live, 503 otherwise
    GET  /metrics               anyone when auth is off. With auth on: 403, because the registry carries
                                every tenant's labels; operators scrape --metrics-port, which outsiders
                                must not reach (DESIGN 6b)

Like the gRPC servicer, this layer only converts and delegates: body -> ``OpenAIRequest``
(router/openai_request.py) -> ``GenerateArgs`` -> ``FrontDoor.admit`` (auth, tenant salt, the shared
validation) -> ``Dispatcher.stream`` -> OpenAI JSON / SSE (router/openai_response.py). Errors map to a
status here and nowhere else:

    ModelNotFoundError, unknown route           404  not_found_error
    InvalidRequestError, UnknownWorkerError     400  invalid_request_error (param: the field)
    BodyTooLargeError                           413  (bodies are bounded: 8 MiB by default)
    AuthError                                   401  authentication_error
    OverloadedError                             429  rate_limit_error (the router's in-flight cap)
    NoWorkerError, StreamBrokenError            503  service_unavailable_error
    RequestFailedError                          500  server_error: the request failed on its worker, not
                                                     retried; the worker's words go to the log only
    anything else                               500  server_error, logged; no traceback reaches the client

A stream fails with its HTTP status while nothing was sent yet (the first delta is awaited before the
response starts); later, an error event in the same shape, then ``data: [DONE]``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cache_service.records import Delta, InvalidRequestError
from common.grpc_edge import bound_details
from common.logs import get_logger, request_context
from router.auth import AuthError
from router.chat_template import ChatTemplate, probe_template
from router.dispatch import OverloadedError, RequestFailedError, StreamBrokenError
from router.front_door import FrontDoor
from router.http_stream import DisconnectGuard, EventStream
from router.openai_request import (ModelNotFoundError, OpenAIRequest, OpenAIRequestError, decode_body, generate_args,
                                   param_of, parse_chat, parse_completion)
from router.openai_response import (DONE, ResponseHead, chunk, completion_body, error_body, sse, usage_chunk)
from router.routing import NoWorkerError, UnknownWorkerError
from router.validation import ValidRequest

log = get_logger("router.http")

MAX_BODY_BYTES = 8 * 1024 * 1024
DEMO = "demo"


class BodyTooLargeError(Exception):
    """The request body is over the limit (413)."""


class ForbiddenError(Exception):
    """Not for this caller (403)."""


# (exception, status, OpenAI error type, code); subclasses before their bases.
_ERRORS: list[tuple[type[BaseException], int, str, str | None]] = [
    (ModelNotFoundError, 404, "not_found_error", "model_not_found"),
    (InvalidRequestError, 400, "invalid_request_error", None),
    (UnknownWorkerError, 400, "invalid_request_error", None),
    (BodyTooLargeError, 413, "invalid_request_error", "request_too_large"),
    (AuthError, 401, "authentication_error", "invalid_api_key"),
    (ForbiddenError, 403, "permission_error", None),
    (OverloadedError, 429, "rate_limit_error", "too_many_requests"),
    (NoWorkerError, 503, "service_unavailable_error", "no_live_worker"),
    (StreamBrokenError, 503, "service_unavailable_error", "stream_broken"),
    (RequestFailedError, 500, "server_error", "request_failed"),
]
REQUEST_FAILED = "the request failed on its worker and was not retried (see the router log)"


def default_served_model_name(model: str) -> str:
    """``demo`` for the demo model, else the checkpoint folder's name (what clients put in ``model``)."""
    return DEMO if model == DEMO else Path(model).expanduser().resolve().name


@dataclass(slots=True)
class _Mapped:
    status: int
    body: dict[str, Any]


def map_error(exc: BaseException, chat: bool = False) -> _Mapped | None:
    """The status and OpenAI error body of an exception; None when it is not a request's fault (a bug)."""
    for cls, status, type_, code in _ERRORS:
        if isinstance(exc, cls):
            message = bound_details(str(exc))  # 2 KiB: a message may quote a field of any size
            if isinstance(exc, RequestFailedError):  # the worker's words are for the operator, as over gRPC
                log.warning("request failed on its worker", extra={"error": message})
                message = REQUEST_FAILED
            if isinstance(exc, OpenAIRequestError):
                param = exc.param
            elif isinstance(exc, UnknownWorkerError):
                param = "target_worker"
            elif isinstance(exc, InvalidRequestError):
                param = param_of(message, chat)
            else:
                param = None
            return _Mapped(status, error_body(message, type_, param, code))
    return None


def _error_response(exc: BaseException, chat: bool = False) -> Response:
    mapped = map_error(exc, chat)
    if mapped is None:
        raise exc  # the app's handler: a logged 500, no traceback to the client
    headers = {"www-authenticate": "Bearer"} if mapped.status == 401 else None
    return JSONResponse(mapped.body, mapped.status, headers=headers)


class OpenAIApp:
    """The routes over one router's front door; ``build()`` gives the ASGI app."""

    def __init__(self, door: FrontDoor, template: ChatTemplate | None, served_model: str, *,
                 is_live: Callable[[], bool], metrics_registry: CollectorRegistry,
                 max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.door = door
        self.encoder = door.encoder
        self.template = template
        self.served_model = served_model
        self.is_live = is_live
        self.metrics_registry = metrics_registry
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())
        if template is not None:
            check = probe_template(template, self.encoder.tokenizer.encode)
            if not check.stable:
                log.warning("the chat template rewrites earlier turns: multi-turn chats reuse the cache only up "
                            "to the change", extra={"template": template.origin, "detail": check.detail})

    def build(self) -> Starlette:
        # Starlette, not FastAPI on top of it: bodies are parsed by router/openai_request.py (FastAPI's
        # pydantic layer would answer 422 with its own shape), and FastAPI's per-request machinery costs
        # ~60 us more (91 vs 30 us per request measured on this machine) for nothing used here. Nothing but
        # the API is exposed on a client-facing port (no docs, no OpenAPI schema).
        routes = [
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.model, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ]
        return Starlette(routes=routes, exception_handlers={StarletteHTTPException: _http_exception,
                                                            Exception: _unexpected})

    # ---- generation ----------------------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def _generate(self, request: Request, chat: bool) -> Response:
        started = time.perf_counter()
        parsed: list[OpenAIRequest] = []

        def build_args():
            body = decode_body(raw)
            oreq = parse_chat(body, self.served_model) if chat else parse_completion(body, self.served_model)
            parsed.append(oreq)
            return generate_args(oreq, self.encoder, self.template, request.headers.get("x-request-id", ""))

        try:
            tenant = self.door.authenticate(request.headers.items())
            raw = await self._read_body(request)
            req, tenant = self.door.admit(tenant, build_args)
        except Exception as exc:  # noqa: BLE001 - mapped to a status, or re-raised (500)
            return _error_response(exc, chat)
        oreq = parsed[0]
        head = ResponseHead(("chatcmpl-" if chat else "cmpl-") + req.request_id, int(time.time()),
                            self.served_model, chat)
        with request_context(req.request_id):
            if oreq.stream:
                return await self._stream(request, req, tenant, started, oreq, head)
            async with DisconnectGuard(request.receive) as guard:
                try:
                    out = await self.door.complete(req, tenant, started)
                except Exception as exc:  # noqa: BLE001
                    return _error_response(exc, chat)
            if guard.fired:
                return Response(status_code=499)  # nobody reads it: the client left, the request was aborted
        ids = oreq.return_token_ids
        return JSONResponse(completion_body(head, out.text, out.finish_reason, out.usage,
                                            req.prompt_ids if ids else None, out.token_ids if ids else None),
                            headers={"x-request-id": req.request_id})

    async def _stream(self, request: Request, req: ValidRequest, tenant: str, started: float, oreq: OpenAIRequest,
                      head: ResponseHead) -> Response:
        deltas = self.door.dispatcher.stream(req, tenant, started, restartable=False)
        # The first delta before the response starts: a request refused by the dispatcher (in-flight cap, no
        # worker) gets its own HTTP status, not a 200 with an error inside.
        async with DisconnectGuard(request.receive) as guard:
            try:
                first = await deltas.__anext__()
            except StopAsyncIteration:
                first = Delta(finish_reason="error")
            except Exception as exc:  # noqa: BLE001
                await deltas.aclose()
                return _error_response(exc, head.chat)
        if guard.fired:
            await deltas.aclose()
            return Response(status_code=499)
        return EventStream(self._events(deltas, first, oreq, head, req.prompt_ids), {"x-request-id": req.request_id})

    async def _events(self, deltas: AsyncIterator[Delta], first: Delta, oreq: OpenAIRequest, head: ResponseHead,
                      prompt_ids: list[int]) -> AsyncIterator[bytes]:
        usage_on, ids = oreq.include_usage, oreq.return_token_ids
        prompt = prompt_ids if ids else None  # in the first chunk only
        try:
            if head.chat:  # OpenAI's first chat chunk: the role, empty content
                yield chunk(head, "", None, include_usage=usage_on, role=True, token_ids=[] if ids else None,
                            prompt_ids=prompt)
                prompt = None
            delta = first
            while True:
                if delta.text or (ids and delta.token_ids):
                    yield chunk(head, delta.text, None, include_usage=usage_on,
                                token_ids=delta.token_ids if ids else None, prompt_ids=prompt)
                    prompt = None
                if delta.finished:
                    yield chunk(head, None, delta.finish_reason, include_usage=usage_on,
                                token_ids=[] if ids else None, prompt_ids=prompt)
                    if usage_on and delta.usage is not None:
                        yield usage_chunk(head, delta.usage)
                    break
                delta = await deltas.__anext__()
        except StopAsyncIteration:
            pass
        except Exception as exc:  # noqa: BLE001 - after the 200: an error event in OpenAI's shape
            mapped = map_error(exc, head.chat)
            if mapped is None:
                log.exception("stream failed")
                mapped = _Mapped(500, error_body("internal error", "server_error"))
            yield sse(mapped.body)
        finally:
            await deltas.aclose()
        yield DONE

    async def _read_body(self, request: Request) -> bytes:
        limit = self.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise BodyTooLargeError(f"the request body is {int(declared)} bytes; at most {limit} are accepted")
        chunks: list[bytes] = []
        size = 0
        async for part in request.stream():  # chunked bodies have no declared length: count as they come
            size += len(part)
            if size > limit:
                raise BodyTooLargeError(f"the request body is over the limit of {limit} bytes")
            chunks.append(part)
        return b"".join(chunks)

    # ---- models, health, metrics -------------------------------------------------------------------------------
    def _model_card(self) -> dict[str, Any]:
        return {"id": self.served_model, "object": "model", "created": self.created, "owned_by": "prefixcache",
                "max_model_len": self.encoder.info.max_context}

    async def models(self, request: Request) -> Response:
        try:
            self.door.authenticate(request.headers.items())
        except AuthError as exc:
            return _error_response(exc)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        model_id = request.path_params["model_id"]
        try:
            self.door.authenticate(request.headers.items())
            if model_id != self.served_model:
                raise ModelNotFoundError(f"the model {model_id!r} does not exist: this server serves "
                                         f"{self.served_model!r}", "model")
        except (AuthError, ModelNotFoundError) as exc:
            return _error_response(exc)
        return JSONResponse(self._model_card())

    async def health(self, request: Request) -> Response:
        if self.is_live():
            return JSONResponse({"status": "ok"})
        return JSONResponse(error_body("no live worker", "service_unavailable_error", None, "no_live_worker"), 503)

    async def metrics(self, request: Request) -> Response:
        if self.door.auth is not None:
            return _error_response(ForbiddenError(
                "with auth on, metrics are served on the metrics port only (they carry every tenant's labels)"))
        return Response(generate_latest(self.metrics_registry), media_type=CONTENT_TYPE_LATEST)


async def _http_exception(request: Request, exc: StarletteHTTPException) -> Response:
    # Routing's own errors (no such route, wrong method) in OpenAI's shape too.
    if exc.status_code == 404:
        body = error_body(f"no route {request.method} {request.url.path}", "not_found_error", None, "not_found")
    elif exc.status_code == 405:
        body = error_body(f"method {request.method} is not allowed on {request.url.path}", "invalid_request_error",
                          None, "method_not_allowed")
    else:
        body = error_body(str(exc.detail), "invalid_request_error")
    return JSONResponse(body, exc.status_code, headers=getattr(exc, "headers", None))


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("unexpected error", extra={"path": request.url.path, "error": f"{type(exc).__name__}: {exc}"})
    return JSONResponse(error_body("internal error", "server_error"), 500)
