"""Sending a request to its worker, streaming the tokens back, and failing over.

    admit (in-flight cap) -> route -> client.generate(GenerateCall) -> deltas
                                  ^                                           |
                                  +-- worker lost before any token reached the client

A worker whose call fails (``WorkerCallError``: dead, restarting, unreachable) or that leaves rotation
(the registry's ``down`` event: it stopped answering polls) while serving a request fails the *attempt*: the worker
is taken out of rotation and, if the client has seen no token yet, the request is routed again
among the remaining workers. Once tokens reached a streaming client the request cannot be replayed
invisibly, so it ends with ``StreamBrokenError`` (UNAVAILABLE). A unary ``Generate`` client sees
nothing before the end, so it is always restartable.

A failure the worker reports (``Delta.failure``) is retried elsewhere only when it is the worker's
(``FailureKind.ENGINE``: a failed step, shutdown, no room in its KV cache). The request's own failures are
never retried, since every worker would fail them the same way and a retry would carry one request's failure
to the next worker's batch: INVALID (the worker's validation refused it) is ``InvalidRequestError``
(INVALID_ARGUMENT, the worker's message); REQUEST (its own part of a step failed although it passed
validation) is ``RequestFailedError``, which the servicer answers INTERNAL with a generic message (the
detail goes to the log): the parameters were valid by our own rules, so the fault is the server's, not
the client's, and INVALID_ARGUMENT would tell the client to change a request that is not wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import AsyncIterator

from cache_service.records import Delta, FailureKind, GenerateCall, InvalidRequestError, Usage
from common.logs import get_logger
from router.metrics import RouterMetrics
from router.registry import WorkerRegistry, WorkerState
from router.routing import Decision, NoWorkerError, RoutingCore
from router.validation import ValidRequest
from router.worker_client import WorkerCallError

log = get_logger("router")


class OverloadedError(Exception):
    """Too many requests in flight (RESOURCE_EXHAUSTED)."""


class StreamBrokenError(Exception):
    """The worker was lost after tokens were streamed to the client (UNAVAILABLE)."""


class WorkerLostError(Exception):
    """One attempt failed because its worker died, hung or left rotation."""


class RequestFailedError(Exception):
    """The worker failed this request alone (``FailureKind.REQUEST``): not retried (INTERNAL)."""


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
            self.metrics.record_failed(None, tenant, "error")
            raise OverloadedError(f"the router is at its limit of {self.max_in_flight} requests in flight; retry later")
        self.num_in_flight += 1
        try:
            # aclosing: a client that closes this stream closes the attempt now (its worker is told to abort),
            # not whenever the garbage collector finalizes the inner generators.
            async with contextlib.aclosing(self._attempts(req, tenant, started, restartable)) as attempts:
                async for delta in attempts:
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
                self.metrics.record_failed(None, tenant, "error")
                raise NoWorkerError(f"{exc}; last failure: {last_error}" if last_error else str(exc)) from None
            if attempt == 0:
                self.metrics.decision_seconds.observe(time.perf_counter() - started)
            num_streamed = 0
            try:
                async with contextlib.aclosing(self._run_on_worker(req, tenant, decision, hashes, started)) as run:
                    async for delta in run:
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
        call = GenerateCall(f"{req.request_id}#{uuid.uuid4().hex[:8]}", req.prompt_ids, req.params, req.cache_salt,
                            peer=decision.peer, peer_known=True)
        self.routing.mirror.note_routed(w.worker_id, hashes, self.registry.clock())
        self.registry.note_routed(w.worker_id, decision.num_prompt_blocks - decision.num_cached_blocks)
        w.num_in_flight += 1
        finished = False
        first_token_at: float | None = None
        last_token_at = 0.0
        down_wait = asyncio.ensure_future(w.down.wait())
        deltas = w.client.generate(call)
        try:
            while True:
                delta = await self._next_delta(deltas, down_wait, w)
                if delta is None:
                    raise WorkerLostError("the worker ended the stream without a final message")
                if delta.failure is not None:
                    kind = delta.failure.kind
                    if kind in (FailureKind.INVALID, FailureKind.REQUEST):  # the request's own: not retried
                        finished = True  # the worker ended it itself: no abort
                        self.metrics.record_failed(w.worker_id, tenant, "error")
                        if kind is FailureKind.INVALID:
                            raise InvalidRequestError(delta.failure.message)
                        raise RequestFailedError(f"{w.worker_id} failed the request: {delta.failure.message}")
                    raise WorkerLostError(f"the worker failed the request: {delta.failure.message}")
                now_p = time.perf_counter()
                if delta.token_ids:
                    if first_token_at is None:
                        first_token_at = now_p
                        self.metrics.record_first_token(w.worker_id, tenant, now_p - started)
                    else:
                        per_token = (now_p - last_token_at) / len(delta.token_ids)
                        itl = self.metrics.itl.labels(w.worker_id)
                        for _ in delta.token_ids:
                            itl.observe(per_token)
                    last_token_at = now_p
                delta.worker_id = w.worker_id
                if delta.finished:
                    finished = True
                    usage = delta.usage or Usage()
                    usage.predicted_cached_tokens = decision.predicted_cached_tokens
                    delta.usage = usage
                    self._record(req, tenant, decision, usage, delta.finish_reason)
                    yield delta
                    return
                yield delta
        except BaseException as exc:
            if not finished:
                w.client.abort(call.request_id)
                if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
                    self.metrics.record_failed(w.worker_id, tenant, "aborted")
            raise
        finally:
            down_wait.cancel()
            w.num_in_flight -= 1
            with contextlib.suppress(RuntimeError):  # still running: a cancelled __anext__ is unwinding it
                await deltas.aclose()

    async def _next_delta(self, deltas: AsyncIterator[Delta], down_wait: asyncio.Future,
                          w: WorkerState) -> Delta | None:
        """The next delta, or None at the end; ``WorkerLostError`` when the worker fails or leaves rotation."""
        nxt = asyncio.ensure_future(deltas.__anext__())
        try:
            await asyncio.wait({nxt, down_wait}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            nxt.cancel()
            raise
        if not nxt.done():
            nxt.cancel()
            await asyncio.wait({nxt})  # let the generator unwind before it is closed
            raise WorkerLostError(f"{w.worker_id} left rotation ({w.last_error or 'out of rotation'})")
        try:
            return nxt.result()
        except StopAsyncIteration:
            return None
        except WorkerCallError as exc:
            self.registry.take_out(w.worker_id, f"call failed: {exc}", dead=exc.dead)
            raise WorkerLostError(str(exc)) from None

    def _record(self, req: ValidRequest, tenant: str, decision: Decision, usage: Usage, finish_reason: str) -> None:
        self.metrics.record_finished(decision.worker_id, tenant, usage.prompt_tokens, usage.cached_tokens,
                                     decision.predicted_cached_tokens, usage=usage)
        log.debug("finished", extra={
            "request_id": req.request_id, "worker": decision.worker_id, "prompt_tokens": usage.prompt_tokens,
            "cached_tokens": usage.cached_tokens, "transferred_tokens": usage.transferred_tokens,
            "predicted_cached_tokens": decision.predicted_cached_tokens, "lookup": decision.lookup_source,
            "finish_reason": finish_reason,
        })
