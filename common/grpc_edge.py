"""The status codes at the edge of every gRPC server: undecodable requests and unexpected failures.

Left to itself, grpc.aio parses a request with the handler's ``request_deserializer`` *before* the
handler runs, and answers bytes that are not a valid message (garbage, a truncated message, invalid
UTF-8 in a proto3 string field) with UNKNOWN "Unexpected <class 'DecodeError'>: ...". An exception a
handler lets escape gets UNKNOWN with the exception's repr. Both are the wrong code, and a repr tells a
caller how the server is built. ``EdgeInterceptor`` moves the parse inside the handler, where it can
answer properly::

    grpc.aio.server(interceptors=[RequestIdInterceptor(), EdgeInterceptor(log)])

    bytes --(request_deserializer: none, raw bytes pass)--> wrapped handler
              parse  -- DecodeError -->  INVALID_ARGUMENT "request is not a valid prefixcache.v1.X message (why)"
              handler(request, bounded context)
                     -- AbortError  -->  as the handler aborted (its own code; its message cut to 2 KiB)
                     -- Exception   -->  logged with its traceback; INTERNAL "internal error (see the server log)"

The message is cut because gRPC carries it in a trailer, and a client drops trailers over 16 KiB: a
message quoting a 100k-character field would reach the caller as RESOURCE_EXHAUSTED "Stream removed"
instead of the code the handler chose.

Unary-unary and unary-stream handlers written as coroutines or async generators are wrapped (every RPC
of the project, and the health service's Check and Watch); any other kind is left as it is. Servicers
map their own errors to codes themselves (one table each) and call ``abort_internal`` for anything else,
so that their log line names their component; the interceptor is the net under all of them.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, AsyncIterator, Callable, NoReturn

import grpc

INTERNAL_MESSAGE = "internal error (see the server log)"
MAX_DETAIL_CHARS = 160  # a relayed error's first line (short_detail)
MAX_DETAILS_BYTES = 2048  # any answer's message, UTF-8 (percent-encoded on the wire: up to 3x)


async def abort_internal(context: grpc.aio.ServicerContext, log: logging.Logger, exc: BaseException,
                         what: str = "") -> NoReturn:
    """Log ``exc`` with its traceback (for the operator) and abort with INTERNAL and a generic message
    (for the caller: nothing of the server's insides). Raises, as ``context.abort`` does."""
    log.error("unexpected error%s", f" in {what}" if what else "", exc_info=(type(exc), exc, exc.__traceback__),
              extra={"error_type": type(exc).__name__})
    await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
    raise AssertionError("unreachable")  # abort raises


def short_detail(exc: BaseException) -> str:
    """The first line of ``str(exc)``, at most MAX_DETAIL_CHARS: a relayed error says what, not where."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= MAX_DETAIL_CHARS else text[: MAX_DETAIL_CHARS - 3] + "..."


def bound_details(details: str) -> str:
    """``details`` cut to MAX_DETAILS_BYTES of UTF-8 (at a character boundary), saying it was cut."""
    encoded = details.encode("utf-8", "replace")
    if len(encoded) <= MAX_DETAILS_BYTES:
        return details
    note = f"... ({len(encoded)} bytes, cut)"
    return encoded[: MAX_DETAILS_BYTES - len(note)].decode("utf-8", "ignore") + note


class _BoundedContext:
    """The handler's context, with the message of its answer bounded (``bound_details``)."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> None:
        await self._context.abort(code, bound_details(details), trailing_metadata)

    def set_details(self, details: str) -> None:
        self._context.set_details(bound_details(details))


def message_name(deserializer: Callable[[bytes], Any], method: str) -> str:
    """``prefixcache.v1.LookupRequest`` for ``LookupRequest.FromString``; the method's path otherwise."""
    cls = getattr(deserializer, "__self__", None)
    descriptor = getattr(cls, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", None) or f"request message of {method}"


def decode_reason(exc: BaseException) -> str:
    # upb says "Error parsing message with type 'X': Wire format was corrupt" (or "String field had bad
    # UTF-8"): the part after the type is the useful one; the type is already in our message.
    text = str(exc)
    head, sep, reason = text.rpartition(": ")
    return reason[:MAX_DETAIL_CHARS] if sep and head.startswith("Error parsing message") else ""


class _Edge:
    """The parse and the safety net for one method; ``unary``/``stream`` are the wrapped behaviours."""

    def __init__(self, method: str, deserializer: Callable[[bytes], Any], log: logging.Logger) -> None:
        self.method = method
        self.deserializer = deserializer
        self.log = log
        self.invalid = f"request is not a valid {message_name(deserializer, method)} message"

    async def parse(self, raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            return self.deserializer(raw)
        except Exception as exc:  # noqa: BLE001 - DecodeError, or whatever a custom deserializer raises
            reason = decode_reason(exc)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{self.invalid} ({reason})" if reason else self.invalid)

    def unary(self, fn: Callable) -> Callable:
        async def behaviour(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            request = await self.parse(raw, context)
            try:
                return await fn(request, _BoundedContext(context))
            except grpc.aio.AbortError:
                raise  # the handler chose its code
            except Exception as exc:  # noqa: BLE001 - the net: INTERNAL, never UNKNOWN with a repr
                await abort_internal(context, self.log, exc, self.method)

        return behaviour

    def stream(self, fn: Callable) -> Callable:
        async def behaviour(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            request = await self.parse(raw, context)
            try:
                async for item in fn(request, _BoundedContext(context)):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - as in unary; GeneratorExit (a cancel) is not caught
                await abort_internal(context, self.log, exc, self.method)

        return behaviour


class EdgeInterceptor(grpc.aio.ServerInterceptor):
    """grpc.aio server interceptor: INVALID_ARGUMENT for undecodable requests, INTERNAL for escapes.

    ``log`` is the server's component logger (unexpected errors are logged there). List it after
    ``RequestIdInterceptor`` so that its log lines carry the caller's request id."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log

    async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler  # unknown method (UNIMPLEMENTED), or a handler that takes raw bytes itself
        edge = _Edge(handler_call_details.method, handler.request_deserializer, self.log)
        if handler.unary_unary is not None and inspect.iscoroutinefunction(handler.unary_unary):
            return grpc.unary_unary_rpc_method_handler(edge.unary(handler.unary_unary), None,
                                                       handler.response_serializer)
        if handler.unary_stream is not None:
            fn = handler.unary_stream
            if inspect.isasyncgenfunction(fn):
                wrapped = edge.stream(fn)
            elif inspect.iscoroutinefunction(fn):  # writes with context.write()
                wrapped = edge.unary(fn)
            else:
                return handler
            return grpc.unary_stream_rpc_method_handler(wrapped, None, handler.response_serializer)
        return handler  # sync, client-streaming and bidirectional handlers (reflection): left as they are
