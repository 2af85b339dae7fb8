"""The Ray worker actor: one engine, its cache-service client and BlockTransfer endpoint, in one actor.

Threads inside the actor process::

    asyncio loop (Ray's)   generate() streams, poll(), pin(), the cache node (heartbeats, publishing,
                           BlockTransfer server, prefix fetches)
    engine loop thread     the only code that touches the Engine: runs commands, then engine.step()

The engine is single-threaded by design, so everything else *submits* a function to the engine loop
and awaits its future; the loop delivers each ``RequestOutput`` to the request's asyncio queue with
``call_soon_threadsafe``. Block events drained after every step fan out to the cache node (which
publishes them to the cache service) and to an ``EventFeed`` that the router reads with each poll to
keep its local index mirror fresh.

``generate`` is an async generator called with ``num_returns="streaming"``: the router iterates the
returned ``ObjectRefGenerator`` with ``async for`` (no ``ray.get`` in async code).
"""

from __future__ import annotations

import asyncio
import time
import dataclasses
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Sequence

from cache_service.prefix_fetcher import FetchOutcome, PeerHint
from common.logs import get_logger, request_context
from cache_service.records import BlockEvent, BlockRemoved, BlockStored
from workers.engine_loop import EngineLoop, LoadSnapshot
from workers.event_feed import OP_CLEARED, OP_REMOVED, OP_STORED, EventFeed, FeedEvent, feed_events
from workers.sampling import InvalidRequestError, SamplingParams

log = get_logger("worker")
__all__ = ["OP_CLEARED", "OP_REMOVED", "OP_STORED", "EventFeed", "StreamChunk", "WorkerActor", "WorkerConfig",
           "WorkerInfo", "WorkerPoll", "WorkerStats"]
TRANSFER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


# ---- what crosses the Ray boundary (plain picklable records) ------------------------------------------
@dataclass(slots=True)
class WorkerConfig:
    worker_id: str
    model: str = "demo"
    device: str | None = None  # None: "cuda" when CUDA is present, else "cpu"
    dtype: str | None = None
    block_size: int = 16
    num_blocks: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    cache_service_address: str | None = None  # host:port of the CacheService; None: standalone
    transfer_host: str | None = None  # address peers reach our BlockTransfer on (None: the node's IP)
    enable_transfer_server: bool = True  # serve BlockTransfer even without a cache service
    always_transfer: bool = False  # pull from a peer whenever one holds more (skip the cost test)
    raw_transfer_stream: bool = True  # serve and use the raw block stream beside gRPC (raw_transfer.py)
    heartbeat_interval_s: float = 1.0
    heartbeat_ttl_s: int = 10
    feed_capacity: int = 65536  # block events kept for the router between polls
    torch_threads: int | None = None


@dataclass(slots=True)
class WorkerInfo:
    worker_id: str
    node_id: str
    model_id: str
    device: str
    block_size: int
    num_blocks: int
    transfer_address: str


@dataclass(slots=True)
class StreamChunk:
    """One message of a generate() stream: the tokens since the previous one; the last has usage."""

    token_ids: list[int]
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    transferred_tokens: int = 0
    error: str | None = None
    invalid: bool = False  # the error is the request's fault (INVALID_ARGUMENT), not the worker's


@dataclass(slots=True)
class WorkerStats:
    """Cumulative counters (reset when the worker restarts)."""

    num_blocks_stored: int = 0
    num_blocks_evicted: int = 0
    num_transfers_ok: int = 0
    num_transfers_fallback: int = 0
    num_transfer_bytes: int = 0
    num_transferred_blocks: int = 0
    transfer_bucket_bounds: tuple[float, ...] = TRANSFER_BUCKETS
    transfer_bucket_counts: list[int] = field(default_factory=lambda: [0] * len(TRANSFER_BUCKETS))
    transfer_seconds_sum: float = 0.0
    num_transfer_observations: int = 0
    prefix_query_tokens: int = 0
    prefix_hit_tokens: int = 0

    def observe_transfer(self, ok: bool, num_bytes: int, num_blocks: int, seconds: float) -> None:
        if ok:
            self.num_transfers_ok += 1
        else:
            self.num_transfers_fallback += 1
        self.num_transfer_bytes += num_bytes
        self.num_transferred_blocks += num_blocks
        self.transfer_seconds_sum += seconds
        self.num_transfer_observations += 1
        for i, bound in enumerate(self.transfer_bucket_bounds):
            if seconds <= bound:
                self.transfer_bucket_counts[i] += 1
                break


@dataclass(slots=True)
class WorkerPoll:
    feed_epoch: str
    feed_seq: int
    events: list[FeedEvent]  # since the asked seq (empty when snapshot is given)
    snapshot: list[bytes] | None  # the whole cached set, when the feed could not continue
    # The engine loop's latest load; num_waiting_blocks also counts requests still being admitted.
    load: LoadSnapshot = field(default_factory=LoadSnapshot)
    stats: WorkerStats = field(default_factory=WorkerStats)
    pins: list[str] = field(default_factory=list)
    # Seconds since the engine loop last went round (it does at least every 0.5 s when idle): a hung
    # engine must leave rotation even though this actor still answers polls.
    engine_stalled_s: float = 0.0
    transfer_address: str = ""  # changes when Ray restarts the actor


# ---- the actor ----------------------------------------------------------------------------------------
class WorkerActor:
    """Wrap with ``ray.remote(WorkerActor)`` (see ``deploy/stack.py`` for the options)."""

    def __init__(self, config: WorkerConfig) -> None:
        import torch

        from workers.engine import Engine, EngineConfig

        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.config = config
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.engine = Engine(EngineConfig(
            model=config.model, dtype=config.dtype, device=device, block_size=config.block_size,
            num_blocks=config.num_blocks, max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
        ))
        self.device = device
        self.feed = EventFeed(config.feed_capacity)
        self.stats = WorkerStats()
        self.loop = EngineLoop(self.engine, self._on_events)
        self.loop.start()
        self.cache_node: Any = None  # cache_service's per-worker client + BlockTransfer server
        self._pins: dict[str, tuple[tuple[int, ...], str]] = {}  # pin_id -> (tokens, salt), without a cache node
        self._admitting_blocks = 0  # prompt blocks of requests not yet handed to the engine
        self._snapshot_task: asyncio.Future | None = None
        self._started = False
        self._start_lock = asyncio.Lock()
        self.node_id = _ray_node_id()
        # Ray re-runs only this constructor when it restarts the actor (``max_restarts``): nobody calls
        # start() then, so the first poll does.
        self._restarted = _was_restarted()

    def _on_events(self, events: list[BlockEvent]) -> None:
        # In the engine loop thread.
        for ev in events:
            if isinstance(ev, BlockStored):
                self.stats.num_blocks_stored += 1
            elif isinstance(ev, BlockRemoved):
                self.stats.num_blocks_evicted += 1
        self.feed.push(feed_events(events))
        node = self.cache_node
        if node is not None:
            node.push_events(events)

    async def start(self) -> WorkerInfo:
        """Start the cache node (BlockTransfer server; register + heartbeats + publishing); idempotent."""
        async with self._start_lock:  # concurrent callers wait for the one start (a failed one is retried)
            if not self._started:
                if self.config.cache_service_address is not None or self.config.enable_transfer_server:
                    self.cache_node = await self._start_cache_node()
                self._started = True
        return self.info()

    async def _start_cache_node(self) -> Any:
        from cache_service.cache_node import CacheNode, CacheNodeConfig
        from cache_service.client import CacheClientConfig
        from cache_service.prefix_fetcher import FetcherConfig

        cfg = self.config
        host = cfg.transfer_host or _node_ip()
        node = CacheNode.for_engine(
            self.engine, cfg.worker_id, engine_call=self.loop.call, cache_address=cfg.cache_service_address,
            config=CacheNodeConfig(
                client=CacheClientConfig(ttl_s=cfg.heartbeat_ttl_s, heartbeat_interval_s=cfg.heartbeat_interval_s),
                fetcher=FetcherConfig(always_transfer=cfg.always_transfer),
                transfer_host=host, advertise_host=host, raw_stream=cfg.raw_transfer_stream,
            ),
            ray_node_id=self.node_id,
        )
        await self.loop.call(lambda engine: setattr(engine.pool, "eviction_advisor", node.advisor))
        await node.start()
        return node

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            worker_id=self.config.worker_id,
            node_id=self.node_id,
            model_id=self.engine.model_id,
            device=self.device,
            block_size=self.engine.block_size,
            num_blocks=self.engine.pool.num_blocks,
            transfer_address=getattr(self.cache_node, "transfer_address", "") or "",
        )

    # ---- generation -------------------------------------------------------------------------------------
    async def generate(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        cache_salt: str = "",
        hint: PeerHint | None = None,
    ) -> AsyncIterator[StreamChunk]:
        with request_context(request_id):
            transferred = 0
            # Counted as waiting from now: a poll answered while we fetch must not report an idle worker.
            num_blocks = -(-len(prompt_ids) // self.engine.block_size)
            self._admitting_blocks += num_blocks
            try:
                if self.cache_node is not None:
                    transferred = await self._maybe_fetch(prompt_ids, cache_salt, hint)
                aio = asyncio.get_running_loop()
                outputs: asyncio.Queue = asyncio.Queue()

                def sink(out: Any) -> None:
                    aio.call_soon_threadsafe(outputs.put_nowait, out)

                def add(engine: Any) -> None:
                    self.loop.add_sink(request_id, sink)
                    try:
                        engine.add_request(request_id, prompt_ids, params, cache_salt)
                    except BaseException:
                        self.loop.drop_sink(request_id)
                        raise

                try:
                    await self.loop.call(add)
                except InvalidRequestError as exc:
                    yield StreamChunk([], finished=True, finish_reason="error", error=str(exc), invalid=True)
                    return
                except asyncio.CancelledError:
                    # The add may still run (commands are FIFO): abort right behind it.
                    self.loop.submit(lambda engine: (self.loop.drop_sink(request_id),
                                                     engine.abort_request(request_id)))
                    raise
            finally:
                self._admitting_blocks -= num_blocks
            finished = False
            try:
                while not finished:
                    first = await outputs.get()
                    batch = [first]
                    while not outputs.empty():  # coalesce what is ready: one Ray object per burst
                        batch.append(outputs.get_nowait())
                    chunk = StreamChunk([])
                    for out in batch:
                        if isinstance(out, str):  # the engine loop failed this request
                            chunk.finished, chunk.finish_reason, chunk.error = True, "error", out
                            break
                        chunk.token_ids.extend(out.new_token_ids)
                        chunk.text += out.new_text
                        if out.finished:
                            chunk.finished, chunk.finish_reason = True, out.finish_reason
                            chunk.prompt_tokens, chunk.completion_tokens = out.prompt_tokens, out.completion_tokens
                            chunk.cached_tokens = out.cached_tokens
                            chunk.transferred_tokens = min(transferred, out.cached_tokens)
                            if out.error:
                                chunk.finish_reason, chunk.error = "error", out.error
                            break
                    finished = chunk.finished
                    yield chunk
            finally:
                if not finished:  # the consumer went away (router cancelled): free the engine's slot
                    self.loop.submit(lambda engine: (self.loop.drop_sink(request_id),
                                                     engine.abort_request(request_id)))

    async def abort(self, request_id: str) -> None:
        await self.loop.call(lambda engine: engine.abort_request(request_id))

    async def _maybe_fetch(self, prompt_ids: list[int], cache_salt: str, hint: PeerHint | None) -> int:
        """Pull a longer cached prefix from a peer when that beats recomputing; tokens imported."""
        result = await self.cache_node.fetch_prefix(prompt_ids, cache_salt, hint)
        if not result.attempted:
            return 0
        ok = result.outcome in (FetchOutcome.TRANSFERRED, FetchOutcome.PARTIAL)
        self.stats.observe_transfer(ok, result.num_bytes, result.num_blocks, result.seconds)
        return result.num_tokens if ok else 0

    # ---- the router's poll --------------------------------------------------------------------------------
    async def poll(self, feed_epoch: str, feed_seq: int) -> WorkerPoll:
        if self._restarted and not self._started:
            await self.start()  # re-register with the cache service before answering (entering rotation)
        read = self.feed.read(feed_epoch, feed_seq)
        if read is None:
            # One snapshot at a time: polls that keep coming while the engine is busy share it.
            if self._snapshot_task is None or self._snapshot_task.done():
                self._snapshot_task = asyncio.ensure_future(self.loop.call(self._snapshot))
            seq, snapshot = await asyncio.shield(self._snapshot_task)
            events: list[FeedEvent] = []
        else:
            (seq, events), snapshot = read, None
        load = self.loop.load
        self.stats.prefix_query_tokens, self.stats.prefix_hit_tokens = load.prefix_query_tokens, load.prefix_hit_tokens
        if not self.loop.is_alive():
            raise RuntimeError(f"engine loop died: {self.loop.fatal_error}")
        return WorkerPoll(
            feed_epoch=self.feed.epoch, feed_seq=seq, events=events, snapshot=snapshot,
            load=dataclasses.replace(load, num_waiting_blocks=load.num_waiting_blocks + self._admitting_blocks),
            stats=self.stats, pins=self.pinned(), engine_stalled_s=time.monotonic() - self.loop.last_beat,
            transfer_address=getattr(self.cache_node, "transfer_address", "") or "",
        )

    def _snapshot(self, engine: Any) -> tuple[int, list[bytes]]:
        # In the loop thread: flush pending events first so that the snapshot and the seq agree.
        events = engine.drain_events()
        if events:
            self._on_events(events)
        return self.feed.seq, [bytes(h) for h in engine.pool.cached_hashes()]

    # ---- pins ---------------------------------------------------------------------------------------------
    # The cache service assigns pins and delivers them with heartbeat answers (the node's PinKeeper warms
    # and releases them). The router's Pin also calls ``pin`` directly so that Pin returns only once the
    # prefix is warm; both paths share the keeper's bookkeeping, so neither undoes the other.
    def _held(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return self.cache_node.pins.held if self.cache_node is not None else self._pins

    async def pin(self, pin_id: str, token_ids: Sequence[int], cache_salt: str = "") -> int:
        """Warm and hold a prefix (its blocks are pinned); idempotent per pin_id."""
        tokens = tuple(int(t) for t in token_ids)
        if self.cache_node is not None:
            # Pull it from a peer that holds it, if cheaper. The fetcher leaves a prompt's last token to
            # prefill; one extra token makes every full block of the prefix eligible.
            await self.cache_node.fetch_prefix(list(tokens) + [0], cache_salt)
        num = await self.loop.call(lambda engine: engine.pin(list(tokens), cache_salt))
        self._held()[pin_id] = (tokens, cache_salt)
        if self.cache_node is not None:
            self.cache_node.pins.num_pinned_blocks[pin_id] = num
        return num

    async def unpin(self, pin_id: str) -> int:
        held = self._held()
        entry = held.pop(pin_id, None)
        if self.cache_node is not None:
            self.cache_node.pins.num_pinned_blocks.pop(pin_id, None)
        if entry is None or entry in held.values():  # unknown, or another pin id holds the same prefix
            return 0
        tokens, salt = entry
        return await self.loop.call(lambda engine: engine.unpin(list(tokens), salt))

    def pinned(self) -> list[str]:
        return list(self._held())

    # ---- lifecycle / introspection --------------------------------------------------------------------------
    async def ping(self) -> str:
        return self.config.worker_id

    async def engine_stats(self) -> dict:
        stats = await self.loop.call(lambda engine: engine.stats())
        return {k: getattr(stats, k) for k in stats.__dataclass_fields__}

    async def check_integrity(self) -> None:
        await self.loop.call(lambda engine: engine.check_integrity())

    async def debug_stall(self, seconds: float) -> None:
        """Fault injection (tests): block the engine loop for ``seconds``, as a hung step would."""
        self.loop.submit(lambda engine: time.sleep(seconds))

    async def reset_cache(self) -> bool:
        """Forget every cached block (benchmarks between runs); False while requests or pins hold blocks."""
        return await self.loop.call(lambda engine: engine.pool.reset_cache())

    async def cached_hashes(self) -> list[bytes]:
        return await self.loop.call(lambda engine: [bytes(h) for h in engine.pool.cached_hashes()])

    async def shutdown(self) -> None:
        node, self.cache_node = self.cache_node, None
        if node is not None:
            try:
                await node.stop()
            except Exception:  # noqa: BLE001 - stopping anyway
                pass
        self.loop.stop()


def _ray_node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # noqa: BLE001 - outside Ray (unit tests)
        return ""


def _was_restarted() -> bool:
    """Whether this actor is a restart (Ray re-ran its constructor after the process died)."""
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().was_current_actor_reconstructed
    except Exception:  # noqa: BLE001 - outside Ray (unit tests)
        return False


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray
        return "127.0.0.1"
