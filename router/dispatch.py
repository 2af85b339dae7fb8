"""Sending a request to its worker, streaming the tokens back, and failing over.

    admit (in-flight cap) -> route -> worker.generate (Ray streaming generator) -> deltas
                                  ^                                                  |
                                  +-- worker lost before any token reached the client+

A worker that dies (``ActorDiedError``), becomes unreachable, or leaves rotation (the registry's
``down`` event: it stopped answering polls) while serving a request fails the *attempt*: the worker
is taken out of rotation and, if the client has seen no token yet, the request is routed again
among the remaining workers. Once tokens reached a streaming client the request cannot be replayed
invisibly, so it ends with ``StreamBrokenError`` (UNAVAILABLE). A unary ``Generate`` client sees
nothing before the end, so it is always restartable.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import ray

from common.logs import get_logger
from router.metrics import RouterMetrics, tenant_label
from router.registry import WorkerRegistry
from router.routing import Decision, NoWorkerError, RoutingCore
from router.validation import ValidRequest
from workers.ray_worker import StreamChunk
from workers.sampling import InvalidRequestError

log = get_logger("router.dispatch")


class OverloadedError(Exception):
    """Too many requests in flight (RESOURCE_EXHAUSTED)."""


class StreamBrokenError(Exception):
    """The worker was lost after tokens were streamed to the client (UNAVAILABLE)."""


class WorkerLostError(Exception):
    """One attempt failed because its worker died, hung or left rotation."""


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    transferred_tokens: int = 0
    predicted_cached_tokens: int = 0


@dataclass(slots=True)
class Delta:
    """What the servicer turns into one GenerateResponse (``restart``: drop what came before)."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""
    usage: Usage | None = None
    worker_id: str = ""
    restart: bool = False


class Dispatcher:
    def __init__(
        self,
        routing: RoutingCore,
        registry: WorkerRegistry,
        metrics: RouterMetrics,
        *,
        max_in_flight: int = 256,
        max_attempts: int = 3,
    ) -> None:
        self.routing = routing
        self.registry = registry
        self.metrics = metrics
        self.max_in_flight = max_in_flight
        self.max_attempts = max_attempts
        self.num_in_flight = 0

    async def stream(self, req: ValidRequest, tenant: str, started: float, *, restartable: bool) -> AsyncIterator[Delta]:
        """Deltas of one request; the last has ``finish_reason`` and ``usage``.

        ``started`` is when the request arrived (perf_counter), before tokenization: the routing
        decision's time and TTFT are measured from it.
        """
        if self.num_in_flight >= self.max_in_flight:
            self.metrics.record_failed("", tenant, "error")
            raise OverloadedError(f"the router is at its limit of {self.max_in_flight} requests in flight; retry later")
        self.num_in_flight += 1
        try:
            async for delta in self._attempts(req, tenant, started, restartable):
                yield delta
        finally:
            self.num_in_flight -= 1

    async def _attempts(self, req: ValidRequest, tenant: str, started: float, restartable: bool) -> AsyncIterator[Delta]:
        encoder = self.routing.encoder
        hashes = encoder.block_hashes(req.prompt_ids, req.cache_salt)
        excluded: set[str] = set()
        last_error = ""
        for attempt in range(self.max_attempts):
            try:
                decision = await self.routing.decide(
                    req.prompt_ids, hashes, request_id=req.request_id, session_id=req.session_id,
                    target_worker=req.target_worker, exclude=frozenset(excluded),
                )
            except NoWorkerError as exc:
                self.metrics.record_failed("", tenant, "error")
                raise NoWorkerError(f"{exc}; last failure: {last_error}" if last_error else str(exc)) from None
            if attempt == 0:
                self.metrics.decision_seconds.observe(time.perf_counter() - started)
            num_streamed = 0
            try:
                async for delta in self._run_on_worker(req, tenant, decision, hashes, started):
                    num_streamed += len(delta.token_ids)
                    yield delta
                return
            except WorkerLostError as exc:
                last_error = f"{decision.worker_id}: {exc}"
                log.warning("attempt failed", extra={"request_id": req.request_id, "worker": decision.worker_id,
                                                     "error": str(exc), "streamed_tokens": num_streamed})
                self.metrics.record_failed(decision.worker_id, tenant, "error")
                if num_streamed and not restartable:
                    raise StreamBrokenError(
                        f"worker {decision.worker_id} was lost after streaming {num_streamed} tokens ({exc}); "
                        "the stream cannot be resumed: retry the request"
                    ) from None
                if decision.targeted:
                    raise NoWorkerError(f"target_worker {decision.worker_id!r} failed: {exc}") from None
                excluded.add(decision.worker_id)
                if num_streamed:
                    yield Delta(restart=True)
        raise NoWorkerError(f"the request failed on {self.max_attempts} workers; last failure: {last_error}")

    async def _run_on_worker(
        self, req: ValidRequest, tenant: str, decision: Decision, hashes: list, started: float
    ) -> AsyncIterator[Delta]:
        w = self.registry.get(decision.worker_id)
        assert w is not None
        # Unique per attempt: a client may reuse request ids, and a retried attempt must not collide.
        engine_id = f"{req.request_id}#{uuid.uuid4().hex[:8]}"
        now = time.monotonic()
        self.routing.mirror.note_routed(w.worker_id, hashes, now)
        self.registry.note_routed(w.worker_id, decision.num_prompt_blocks - decision.num_cached_blocks)
        down = w.down
        w.num_in_flight += 1
        finished = False
        first_token_at: float | None = None
        last_token_at = 0.0
        down_wait = asyncio.ensure_future(down.wait())
        try:
            gen = w.handle.generate.options(num_returns="streaming").remote(
                engine_id, req.prompt_ids, req.params, req.cache_salt, decision.hint)
            it = gen.__aiter__()
            while True:
                chunk = await self._next_chunk(it, down_wait, w.worker_id)
                if chunk is None:
                    raise WorkerLostError("the worker ended the stream without a final message")
                if chunk.error is not None:
                    if chunk.invalid:
                        finished = True
                        self.metrics.record_failed(w.worker_id, tenant, "error")
                        raise InvalidRequestError(chunk.error)
                    raise WorkerLostError(f"the worker failed the request: {chunk.error}")
                now_p = time.perf_counter()
                if chunk.token_ids:
                    if first_token_at is None:
                        first_token_at = now_p
                        self.metrics.ttft.labels(w.worker_id, tenant_label(tenant)).observe(now_p - started)
                    else:
                        per_token = (now_p - last_token_at) / len(chunk.token_ids)
                        itl = self.metrics.itl.labels(w.worker_id)
                        for _ in chunk.token_ids:
                            itl.observe(per_token)
                    last_token_at = now_p
                delta = Delta(token_ids=chunk.token_ids, text=chunk.text, worker_id=w.worker_id)
                if chunk.finished:
                    finished = True
                    delta.finish_reason = chunk.finish_reason or "stop"
                    delta.usage = Usage(chunk.prompt_tokens, chunk.completion_tokens, chunk.cached_tokens,
                                        chunk.transferred_tokens, decision.predicted_cached_tokens)
                    self._record(req, tenant, decision, chunk)
                    yield delta
                    return
                yield delta
        except BaseException as exc:
            if not finished:
                self._abort(w.handle, engine_id)
                if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
                    self.metrics.record_failed(w.worker_id, tenant, "aborted")
            raise
        finally:
            down_wait.cancel()
            w.num_in_flight -= 1

    async def _next_chunk(self, it: Any, down_wait: asyncio.Future, worker_id: str) -> StreamChunk | None:
        nxt = asyncio.ensure_future(self._await_next(it))
        try:
            await asyncio.wait({nxt, down_wait}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            nxt.cancel()
            raise
        if not nxt.done():
            nxt.cancel()
            raise WorkerLostError(f"{worker_id} left rotation ({self._why_down(worker_id)})")
        try:
            return nxt.result()
        except StopAsyncIteration:
            return None
        except ray.exceptions.ActorDiedError as exc:
            self.registry.take_out(worker_id, f"actor died: {type(exc).__name__}", dead=True)
            raise WorkerLostError(f"the worker process died ({type(exc).__name__})") from None
        except ray.exceptions.RayError as exc:
            self.registry.take_out(worker_id, f"call failed: {type(exc).__name__}")
            raise WorkerLostError(f"the worker is unreachable ({type(exc).__name__})") from None

    @staticmethod
    async def _await_next(it: Any) -> StreamChunk:
        ref = await it.__anext__()
        return await ref

    def _why_down(self, worker_id: str) -> str:
        w = self.registry.get(worker_id)
        return (w.last_error if w is not None else "") or "out of rotation"

    @staticmethod
    def _abort(handle: Any, engine_id: str) -> None:
        try:
            handle.abort.remote(engine_id)  # fire and forget: the worker frees the request's blocks
        except Exception:  # noqa: BLE001 - the worker may be gone; nothing to free then
            pass

    def _record(self, req: ValidRequest, tenant: str, decision: Decision, chunk: StreamChunk) -> None:
        self.metrics.record_finished(decision.worker_id, tenant, chunk.prompt_tokens, chunk.cached_tokens,
                                     decision.predicted_cached_tokens)
        log.debug("finished", extra={
            "request_id": req.request_id, "worker": decision.worker_id, "prompt_tokens": chunk.prompt_tokens,
            "cached_tokens": chunk.cached_tokens, "transferred_tokens": chunk.transferred_tokens,
            "predicted_cached_tokens": decision.predicted_cached_tokens, "lookup": decision.lookup_source,
            "finish_reason": chunk.finish_reason,
        })
