"""Structured logs: one JSON object per line, carrying the request id across router, worker and cache service.

Every component logs through ``get_logger(component)``; the record gets ``ts``, ``level``, ``component``,
``msg``, the current ``request_id`` (when one is bound) and any ``extra={...}`` fields::

    log = get_logger("router")
    with request_context(request.request_id):
        log.info("routed", extra={"worker": "worker-1", "predicted_cached_tokens": 48})
    # {"ts": "2025-...Z", "level": "info", "component": "router", "msg": "routed",
    #  "request_id": "r-17", "worker": "worker-1", "predicted_cached_tokens": 48}

The request id lives in a ``ContextVar``: each asyncio task (one per gRPC call under grpc.aio) sees its own,
so concurrent requests never mix ids. A contextvar does not cross a process boundary: a Ray actor or a gRPC
servicer that receives the id in its request binds it again (``request_context(id)``) before it logs, which is
what makes one grep of a request id find its lines in every process.

Across gRPC hops (router -> cache service Lookup, worker -> peer FetchBlocks) the id rides in the call's
metadata: the client passes ``metadata=request_id_metadata()`` and the server is built with
``interceptors=[RequestIdInterceptor()]``, which binds the id for the handler (unary and streaming alike).

``configure_logging()`` installs the handler once per process (idempotent, safe in Ray actors that are reused).
Format and level come from the arguments or from ``PREFIXCACHE_LOG_FORMAT`` (json | text) and
``PREFIXCACHE_LOG_LEVEL``; ``get_logger`` configures with those defaults on first use.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import inspect
import json
import logging
import os
import sys
from collections.abc import Iterator
from typing import IO, Any

ROOT_LOGGER = "prefixcache"
COMPONENTS = ("router", "worker", "cache_service", "serve", "bench", "transfer")

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("prefixcache_request_id", default=None)

# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is emitted as a field.
_RECORD_ATTRS = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", (), None)).keys()
    | {"message", "asctime", "component", "request_id", "taskName"}
)
_HANDLER_MARK = "_prefixcache_handler"


def current_request_id() -> str | None:
    return request_id_var.get()


def bind_request_id(request_id: str | None) -> contextvars.Token:
    """Bind ``request_id`` for the current context; pass the token to ``request_id_var.reset``."""
    return request_id_var.set(request_id or None)


@contextlib.contextmanager
def request_context(request_id: str | None) -> Iterator[None]:
    """Bind ``request_id`` for the duration of the block (a servicer call, an engine step for one request)."""
    token = request_id_var.set(request_id or None)
    try:
        yield
    finally:
        request_id_var.reset(token)


class _ContextFilter(logging.Filter):
    """Stamps component and request id on the record, so any formatter (JSON or text) can use them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            record.request_id = request_id_var.get()
        if not getattr(record, "component", None):
            name = record.name
            prefix = ROOT_LOGGER + "."
            record.component = name[len(prefix):] if name.startswith(prefix) else name
        return True


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line; stable keys first, then the ``extra`` fields in the order given."""

    def format(self, record: logging.LogRecord) -> str:
        ts = _dt.datetime.fromtimestamp(record.created, tz=_dt.timezone.utc)
        out: dict[str, Any] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "component": getattr(record, "component", record.name),
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            out["request_id"] = request_id
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=_json_default, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Human-readable variant for a terminal; same fields, ``key=value`` after the message."""

    def format(self, record: logging.LogRecord) -> str:
        ts = _dt.datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        parts = [ts, record.levelname[0], getattr(record, "component", record.name)]
        request_id = getattr(record, "request_id", None)
        if request_id:
            parts.append(f"[{request_id}]")
        parts.append(record.getMessage())
        parts += [f"{k}={v}" for k, v in record.__dict__.items() if k not in _RECORD_ATTRS and not k.startswith("_")]
        line = " ".join(str(p) for p in parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(level: str | int | None = None, fmt: str | None = None, stream: IO[str] | None = None) -> None:
    """Install the prefixcache handler on the ``prefixcache`` logger (replacing an earlier one)."""
    fmt = (fmt or os.environ.get("PREFIXCACHE_LOG_FORMAT") or "json").lower()
    if fmt not in ("json", "text"):
        raise ValueError(f"log format must be 'json' or 'text', got {fmt!r}")
    level = level if level is not None else os.environ.get("PREFIXCACHE_LOG_LEVEL", "INFO")
    if isinstance(level, str):
        level_name = level.upper()
        if not isinstance(logging.getLevelName(level_name), int):
            raise ValueError(f"unknown log level {level!r}")
        level = logging.getLevelName(level_name)
    root = logging.getLogger(ROOT_LOGGER)
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    setattr(handler, _HANDLER_MARK, True)
    handler.addFilter(_ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    # Our lines are complete on their own; do not duplicate them through the root logger's handlers.
    root.propagate = False


def _is_configured() -> bool:
    return any(getattr(h, _HANDLER_MARK, False) for h in logging.getLogger(ROOT_LOGGER).handlers)


def get_logger(component: str) -> logging.Logger:
    """The logger of one component (``router``, ``worker``, ``cache_service``, ...): ``prefixcache.<component>``."""
    if not component or not isinstance(component, str):
        raise ValueError("component must be a non-empty string, e.g. 'router'")
    if not _is_configured():
        configure_logging()
    return logging.getLogger(f"{ROOT_LOGGER}.{component}")


# ---- propagation over gRPC ----------------------------------------------------------------------------
REQUEST_ID_METADATA_KEY = "x-request-id"


def request_id_metadata(request_id: str | None = None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``request_id`` (default: the bound one); empty when there is none."""
    rid = request_id if request_id is not None else request_id_var.get()
    return ((REQUEST_ID_METADATA_KEY, rid),) if rid else ()


def _metadata_request_id(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == REQUEST_ID_METADATA_KEY:
            return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return None


def _bind_unary(fn: Any, rid: str) -> Any:
    async def wrapper(request: Any, context: Any) -> Any:
        with request_context(rid):
            return await fn(request, context)

    return wrapper


def _bind_stream(fn: Any, rid: str) -> Any:
    async def wrapper(request: Any, context: Any) -> Any:
        token = request_id_var.set(rid)
        try:
            async for item in fn(request, context):
                # An async generator runs in its consumer's context: restore what the handler had bound when
                # it yielded (the metadata's id, or the handler's own request_context) before it resumes.
                bound = request_id_var.get()
                yield item
                request_id_var.set(bound)
        finally:
            try:
                request_id_var.reset(token)
            except ValueError:  # closed from another context: nothing of ours is bound there
                pass

    return wrapper


def _make_interceptor_class() -> type:
    import grpc

    class RequestIdInterceptor(grpc.aio.ServerInterceptor):
        """grpc.aio server interceptor: binds the caller's ``x-request-id`` metadata for the handler."""

        async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
            handler = await continuation(handler_call_details)
            rid = _metadata_request_id(handler_call_details.invocation_metadata)
            if handler is None or not rid:
                return handler
            if handler.unary_unary is not None and inspect.iscoroutinefunction(handler.unary_unary):
                return grpc.unary_unary_rpc_method_handler(
                    _bind_unary(handler.unary_unary, rid), handler.request_deserializer,
                    handler.response_serializer)
            if handler.unary_stream is not None:
                fn = handler.unary_stream
                if inspect.isasyncgenfunction(fn):
                    wrapped = _bind_stream(fn, rid)
                elif inspect.iscoroutinefunction(fn):  # writes with context.write()
                    wrapped = _bind_unary(fn, rid)
                else:
                    return handler
                return grpc.unary_stream_rpc_method_handler(wrapped, handler.request_deserializer,
                                                            handler.response_serializer)
            return handler  # sync or client-streaming handlers: left as they are

    return RequestIdInterceptor


def __getattr__(name: str) -> Any:
    # Built lazily so that importing this module (every process logs) never imports grpc.
    if name == "RequestIdInterceptor":
        cls = _make_interceptor_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
