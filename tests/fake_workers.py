"""In-process fake workers for the router's cores (dispatch, registry, pins): scripted, no engine, no Ray.

    FakeWorker --InProcessWorkerClient--> WorkerRegistry / RoutingCore / Dispatcher / PinManager

A ``FakeWorker`` has the worker actor's methods (``generate`` an async generator; ``poll``, ``pin``,
``unpin``, ``abort`` coroutines), so it goes through the same ``InProcessWorkerClient`` a real in-process
worker would, and the router sees exactly the errors a Ray call would give it. Each generate call plays
the next ``Plan`` (stream N tokens, optionally wait for a gate, then finish / die / fail); polls serve a
sequence-numbered block feed like ``workers/event_feed.py`` (events after the asked seq, or a full
snapshot when the epoch or seq cannot continue) and can be scripted to fail, hang, or report a stalled
engine. Everything a test asserts on is recorded (calls, polls, aborts, pin calls).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, Sequence

from cache_service.block_hash import BlockHash
from cache_service.records import (BlockEvent, BlockRemoved, BlockStored, Delta, EngineFailure, FailureKind, HeldBlock,
                                   GenerateCall, SamplingParams, Usage, WorkerLoad, WorkerPoll)
from router.dispatch import Dispatcher
from router.index_mirror import IndexMirror
from router.metrics import RouterMetrics
from router.policies import make_policy
from router.registry import WorkerRegistry, WorkerState
from router.routing import RoutingCore
from router.tokenize import PromptEncoder
from router.validation import ValidRequest
from router.worker_client import InProcessWorkerClient, WorkerCallError

BS = 16
ENDS = ("finish", "die", "restarting", "crash", "invalid", "engine", "silent", "request")
TEST_TIMEOUT_S = 5.0  # a safety net against a deadlocked test, never a timing assertion


@dataclass(slots=True)
class Plan:
    """One generate call: ``tokens`` deltas of one token each, then (after ``gate``, if any) ``end``.

    ``finish``: a final delta with usage; ``die`` / ``restarting``: ``WorkerCallError(dead / restarting)``;
    ``crash``: a plain exception (the client reports it as an unreachable worker); ``invalid`` / ``engine`` /
    ``request``: a final delta with that ``EngineFailure`` kind; ``silent``: the stream ends without a final
    delta.
    """

    tokens: int = 3
    end: str = "finish"
    gate: asyncio.Event | None = None  # wait for it after the tokens: a worker that hangs until released

    def __post_init__(self) -> None:
        if self.end not in ENDS:
            raise ValueError(f"end must be one of {ENDS}, got {self.end!r}")


class FakeWorker:
    def __init__(self, worker_id: str, *, token_base: int = 0, plans: Sequence[Plan] = ()) -> None:
        self.worker_id = worker_id
        self.token_base = token_base  # token ids it emits: token_base, token_base + 1, ...
        self.plans = list(plans)  # one per generate call, in order; then Plan()
        self.cached_tokens = 0  # reported in usage.cached_tokens
        self.calls: list[GenerateCall] = []
        self.started = asyncio.Event()  # a generate call began
        self.aborted: list[str] = []
        self.abort_seen = asyncio.Event()
        # ---- the block feed: event k has seq k; a reader at seq s gets events s+1..
        self.epoch = f"{worker_id}-epoch-1"
        self.seq = 0
        self._oldest = 0  # seq of the event just before the buffer's first
        self._buf: list[BlockEvent] = []
        self.cached: set[BlockHash] = set()
        # ---- what polls answer, and how they misbehave
        self.load = WorkerLoad(capacity_blocks=100, num_free_blocks=100)
        self.engine_stalled_s = 0.0
        self.transfer_address = ""
        self.poll_errors: list[BaseException] = []  # raised by the next polls, one each
        self.poll_gate: asyncio.Event | None = None  # polls wait for it: a slow or hung worker
        self.poll_entered = asyncio.Event()
        self.polls: list[tuple[str, int]] = []  # (feed_epoch, feed_seq) asked
        # ---- pins
        self.pins: set[str] = set()
        self.pin_calls: list[tuple[str, list[int], str]] = []
        self.unpin_calls: list[str] = []
        self.pin_error: BaseException | None = None

    # ---- what the engine did (test side) ---------------------------------------------------------------
    def _push(self, events: list[BlockEvent]) -> None:
        self._buf.extend(events)
        self.seq += len(events)

    def store(self, hashes: Sequence[BlockHash]) -> None:
        self.cached.update(hashes)
        self._push([BlockStored(h) for h in hashes])

    def evict(self, hashes: Sequence[BlockHash]) -> None:
        self.cached.difference_update(hashes)
        self._push([BlockRemoved(h) for h in hashes])

    def drop_feed(self) -> None:
        """The feed buffer overflowed: a reader behind it must take a snapshot."""
        self._oldest, self._buf = self.seq, []

    def restart(self) -> None:
        """A new incarnation: new feed epoch, empty cache, no pins."""
        n = int(self.epoch.rsplit("-", 1)[1]) + 1
        self.epoch, self.seq, self._oldest, self._buf = f"{self.worker_id}-epoch-{n}", 0, 0, []
        self.cached.clear()
        self.pins.clear()

    # ---- the worker actor's methods ----------------------------------------------------------------------
    async def generate(self, call: GenerateCall) -> AsyncIterator[Delta]:
        self.calls.append(call)
        plan = self.plans.pop(0) if self.plans else Plan()
        self.started.set()
        for i in range(plan.tokens):
            t = self.token_base + i
            yield Delta([t], f"<{t}>")
        if plan.gate is not None:
            await plan.gate.wait()
        end = plan.end
        if end == "finish":
            yield Delta(finish_reason="length",
                        usage=Usage(len(call.prompt_ids), plan.tokens, cached_tokens=self.cached_tokens))
        elif end == "die":
            raise WorkerCallError(f"{self.worker_id} died", dead=True)
        elif end == "restarting":
            raise WorkerCallError(f"{self.worker_id} is restarting", restarting=True)
        elif end == "crash":
            raise RuntimeError(f"{self.worker_id} crashed")
        elif end in ("invalid", "engine", "request"):
            kind = {"invalid": FailureKind.INVALID, "engine": FailureKind.ENGINE, "request": FailureKind.REQUEST}[end]
            yield Delta(finish_reason="error", failure=EngineFailure(kind, f"{self.worker_id}: {end} failure"))

    async def poll(self, feed_epoch: str, feed_seq: int) -> WorkerPoll:
        self.polls.append((feed_epoch, feed_seq))
        self.poll_entered.set()
        if self.poll_gate is not None:
            await self.poll_gate.wait()
        if self.poll_errors:
            raise self.poll_errors.pop(0)
        if feed_epoch == self.epoch and self._oldest <= feed_seq <= self.seq:
            events, snapshot = self._buf[feed_seq - self._oldest:], None
        else:
            events, snapshot = [], [HeldBlock(h) for h in sorted(self.cached)]  # every block on the device
        return WorkerPoll(self.epoch, self.seq, events, snapshot, load=dataclasses.replace(self.load),
                          pins=sorted(self.pins), engine_stalled_s=self.engine_stalled_s,
                          transfer_address=self.transfer_address)

    async def pin(self, pin_id: str, token_ids: list[int], cache_salt: str) -> int:
        self.pin_calls.append((pin_id, list(token_ids), cache_salt))
        if self.pin_error is not None:
            raise self.pin_error
        self.pins.add(pin_id)
        return len(token_ids) // BS

    async def unpin(self, pin_id: str) -> int:
        self.unpin_calls.append(pin_id)
        found = pin_id in self.pins
        self.pins.discard(pin_id)
        return int(found)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.abort_seen.set()


class RecordingClient(InProcessWorkerClient):
    """The in-process client, recording ``abort`` calls as they are made (the worker sees them a loop turn
    later: abort is fire and forget), so that a test can assert that none was made."""

    def __init__(self, worker_id: str, worker: FakeWorker) -> None:
        super().__init__(worker_id, worker)
        self.abort_calls: list[str] = []

    def abort(self, request_id: str) -> None:
        self.abort_calls.append(request_id)
        super().abort(request_id)


# ---- a router core over fake workers --------------------------------------------------------------------
@dataclass(slots=True)
class FakeClock:
    """Monotonic seconds that move only when a test says so."""

    now: float = 0.0

    def __call__(self) -> float:
        return self.now


@functools.cache
def encoder() -> PromptEncoder:
    return PromptEncoder("demo", BS)


@dataclass(slots=True)
class Stack:
    workers: dict[str, FakeWorker]
    registry: WorkerRegistry
    routing: RoutingCore
    dispatcher: Dispatcher
    metrics: RouterMetrics
    clock: FakeClock = field(default_factory=FakeClock)

    def state(self, worker_id: str) -> WorkerState:
        w = self.registry.get(worker_id)
        assert w is not None
        return w

    def abort_calls(self, worker_id: str) -> list[str]:
        client = self.state(worker_id).client
        assert isinstance(client, RecordingClient)
        return client.abort_calls

    def sample(self, name: str, **labels: str) -> float:
        """A metric sample's value (0 when the series was never touched)."""
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def stream(self, req: ValidRequest, *, restartable: bool = True) -> AsyncIterator[Delta]:
        return self.dispatcher.stream(req, "", time.perf_counter(), restartable=restartable)

    def requests(self, worker: str, status: str) -> float:
        """prefixcache_requests_total{worker, tenant="default", status}."""
        return self.sample("prefixcache_requests_total", worker=worker, tenant="default", status=status)


def make_stack(num_workers: int = 2, *, policy: str = "cache_aware", registry_kw: dict | None = None,
               **dispatcher_kw) -> Stack:
    """Workers worker-0.. (token ids 100.., 200.., ...) registered but not polled yet (out of rotation)."""
    clock = FakeClock()
    mirror = IndexMirror()
    registry = WorkerRegistry(mirror, clock=clock, **(registry_kw or {}))
    workers = {}
    for i in range(num_workers):
        fake = FakeWorker(f"worker-{i}", token_base=100 * (i + 1))
        registry.add(RecordingClient(fake.worker_id, fake))
        workers[fake.worker_id] = fake
    metrics = RouterMetrics()
    routing = RoutingCore(encoder(), registry, mirror, make_policy(policy), metrics)
    return Stack(workers, registry, routing, Dispatcher(routing, registry, metrics, **dispatcher_kw), metrics, clock)


def prompt(n: int, base: int = 0) -> list[int]:
    return [(base + i) % 256 for i in range(n)]


def request(ids: list[int], request_id: str = "req-1", target_worker: str = "", max_tokens: int = 3) -> ValidRequest:
    return ValidRequest(request_id, ids, SamplingParams(max_tokens=max_tokens), "", "", target_worker)


async def drain(stream: AsyncIterator[Delta]) -> tuple[list[Delta], BaseException | None]:
    """Every delta of a stream, and the exception it ended with (None when it finished)."""
    out: list[Delta] = []
    try:
        async for delta in stream:
            out.append(delta)
    except Exception as exc:  # noqa: BLE001 - handed to the test to assert on
        return out, exc
    return out, None


def tokens(deltas: Sequence[Delta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def async_test(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an ``async def`` test in its own event loop (pytest-asyncio is not used here)."""

    @functools.wraps(fn)
    def run(*args, **kwargs) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), TEST_TIMEOUT_S))

    return run
