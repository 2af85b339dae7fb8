"""The project's one gRPC load driver: bounded concurrency, optional arrival times, per-request measurements.

`prefixcache bench` and the benchmark scripts (benchmarks/bench_serving.py) both drive a stack through
``run_requests``, so TTFT and the usage counters mean the same thing in every figure.

One ``GenerateStream`` call per request (grpc.aio; or, with ``calls=loadgen.http_driver.http_calls``, one
streamed ``/v1/completions`` request to the HTTP front door, measured alike). TTFT is the time from issuing the
call to the first message that carries tokens; latency is the time to the last message (which carries ``usage``
and the worker). Requests with an ``arrival_s`` are issued at that offset from the start (open loop, a trace's
timestamps); the others as soon as one of the ``concurrency`` slots is free (closed loop). Either way at most ``concurrency`` calls are in
flight, so a slow stack cannot make the client pile up unbounded calls.

Multi-turn sessions: a request with ``follows`` is issued only after the request it names finished, and its
prompt is that request's prompt + the answer the stack actually generated + its own ``token_ids`` (the new user
message). That is the reuse pattern of a chat client, and the only way the cached answer blocks can hit.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from protos.prefixcache.v1 import generation_pb2, generation_pb2_grpc

_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(slots=True)
class BenchRequest:
    request_id: str
    token_ids: list[int]
    max_tokens: int
    # Offset (seconds) from the start of the run at which to issue it; None: as soon as a slot is free.
    arrival_s: float | None = None
    # request_id of the previous turn of the same session (its prompt + answer prefix this one's token_ids).
    follows: str | None = None
    session_id: str = ""
    cache_salt: str = ""
    group: str = ""


@dataclass(slots=True)
class RequestResult:
    request_id: str
    group: str
    tenant: str
    start_s: float  # when the call was issued, from the start of the run
    ttft_s: float | None = None
    latency_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    predicted_cached_tokens: int = 0
    transferred_tokens: int = 0
    worker: str = ""
    finish_reason: str = ""
    # Mean gap between streamed token messages after the first one.
    itl_s: float | None = None
    # How long it waited for a concurrency slot after its arrival time (open loop only).
    queue_s: float = 0.0
    error: str | None = None
    output_token_ids: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        out = {k: getattr(self, k) for k in self.__slots__ if k != "output_token_ids"}
        return out


async def _run_one(stub: generation_pb2_grpc.GenerationStub, req: BenchRequest, prompt: list[int],
                   t0: float, timeout_s: float) -> RequestResult:
    start = time.perf_counter()
    res = RequestResult(req.request_id, req.group, req.cache_salt, start_s=start - t0)
    message = generation_pb2.GenerateRequest(
        request_id=req.request_id, token_ids=prompt, cache_salt=req.cache_salt, session_id=req.session_id,
        sampling=generation_pb2.SamplingParams(max_tokens=req.max_tokens, ignore_eos=True))
    last_token_at: float | None = None
    gaps: list[float] = []
    try:
        async for resp in stub.GenerateStream(message, timeout=timeout_s):
            now = time.perf_counter()
            if resp.token_ids:
                if res.ttft_s is None:
                    res.ttft_s = now - start
                elif last_token_at is not None:
                    gaps.append(now - last_token_at)
                last_token_at = now
                res.output_token_ids.extend(resp.token_ids)
            if resp.worker_id:
                res.worker = resp.worker_id
            if resp.finish_reason:
                res.finish_reason = resp.finish_reason
                u = resp.usage
                res.prompt_tokens = u.prompt_tokens
                res.completion_tokens = u.completion_tokens
                res.cached_tokens = u.cached_tokens
                res.predicted_cached_tokens = u.predicted_cached_tokens
                res.transferred_tokens = u.transferred_tokens
        res.latency_s = time.perf_counter() - start
        if not res.finish_reason:
            res.error = "stream ended without a finish_reason"
    except grpc.aio.AioRpcError as exc:
        res.error = f"{exc.code().name}: {exc.details()}"
        res.latency_s = time.perf_counter() - start
    if gaps:
        res.itl_s = sum(gaps) / len(gaps)
    return res


# One request's call: (request, its prompt, the run's start) -> its measurements.
RunOne = Callable[[BenchRequest, list[int], float], Awaitable[RequestResult]]
# What makes those calls for a target and a deadline: gRPC here (``grpc_calls``), HTTP in loadgen/http_driver.py.
Calls = Callable[[str, float], contextlib.AbstractAsyncContextManager[RunOne]]


@contextlib.asynccontextmanager
async def grpc_calls(target: str, timeout_s: float) -> AsyncIterator[RunOne]:
    options = [("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        yield lambda req, prompt, t0: _run_one(stub, req, prompt, t0, timeout_s)


async def run_requests(target: str, requests: list[BenchRequest], concurrency: int, timeout_s: float = 600.0,
                       on_done: Callable[[RequestResult], None] | None = None,
                       calls: Calls = grpc_calls) -> tuple[list[RequestResult], float]:
    """Issue every request against ``target`` (host:port); returns the results in request order and the wall time.
    ``calls``: through the gRPC Generation service (default) or ``loadgen.http_driver.http_calls``."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    by_id = {r.request_id: r for r in requests}
    if len(by_id) != len(requests):
        raise ValueError("request ids must be unique")
    for r in requests:
        if r.follows is not None and r.follows not in by_id:
            raise ValueError(f"request {r.request_id} follows unknown request {r.follows}")
    results: dict[str, RequestResult] = {}
    # Set when a request finished (successfully or not): later turns of its session wait on it.
    finished = {r.request_id: asyncio.Event() for r in requests}
    prompts: dict[str, list[int]] = {}
    slots = asyncio.Semaphore(concurrency)
    async with calls(target, timeout_s) as run_one:
        t0 = time.perf_counter()

        async def drive(req: BenchRequest) -> None:
            try:
                if req.arrival_s is not None:
                    delay = t0 + req.arrival_s - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                prompt = list(req.token_ids)
                if req.follows is not None:
                    await finished[req.follows].wait()
                    prev = results[req.follows]
                    if prev.error is not None:
                        results[req.request_id] = RequestResult(
                            req.request_id, req.group, req.cache_salt, start_s=time.perf_counter() - t0,
                            error=f"skipped: previous turn {req.follows} failed")
                        return
                    prompt = prompts[req.follows] + prev.output_token_ids + prompt
                prompts[req.request_id] = prompt
                ready_at = time.perf_counter()
                async with slots:
                    res = await run_one(req, prompt, t0)
                res.queue_s = res.start_s - (ready_at - t0)
                results[req.request_id] = res
            finally:
                finished[req.request_id].set()
                if on_done is not None and req.request_id in results:
                    on_done(results[req.request_id])

        await asyncio.gather(*(drive(r) for r in requests))
        wall_s = time.perf_counter() - t0
    return [results[r.request_id] for r in requests], wall_s
