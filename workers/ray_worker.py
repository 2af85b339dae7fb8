"""The Ray worker actor: one engine, its cache node (cache-service client + BlockTransfer), in one actor.

Threads inside the actor process::

    asyncio loop (Ray's)   generate() streams, poll(), pin(), the cache node (heartbeats, publishing,
                           BlockTransfer server, prefix fetches)
    engine loop thread     the only code that touches the Engine (workers/engine_loop.py)

Everything else *submits* a function to the engine loop and awaits its future. Block events drained
after every step fan out to the cache node (which publishes them to the cache service) and to an
``EventFeed`` that the router reads with each poll to keep its local index mirror fresh. What crosses
the Ray boundary is ``cache_service.records``: ``GenerateCall`` in, ``Delta`` and ``WorkerPoll`` out.

``generate`` is an async generator called with ``num_returns="streaming"``: the router iterates the
returned ``ObjectRefGenerator`` with ``async for`` (no ``ray.get`` in async code).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Sequence

from cache_service.block_hash import BlockHash
from cache_service.engine_port import EnginePort
from cache_service.records import (
    BlockEvent, Delta, EngineFailure, FailureKind, GenerateCall, HeldBlock, InvalidRequestError, WorkerCounters,
    WorkerInfo, WorkerPoll,
)
from common.cluster_auth import ClusterCredential
from common.logs import get_logger, request_context
from workers import ray_env
from workers.engine_loop import EngineLoop
from workers.event_feed import EventFeed
from workers.request_stream import RequestStream

log = get_logger("worker")


@dataclass(slots=True)
class WorkerConfig:
    worker_id: str
    model: str = "demo"
    device: str | None = None  # None: "cuda" when CUDA is present, else "cpu"
    dtype: str | None = None
    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_dtype: str = "auto"  # "auto" | "fp8" (workers/model/kv_cache.py)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    cache_service_address: str | None = None  # host:port of the CacheService; None: standalone
    transfer_host: str | None = None  # where BlockTransfer + the raw stream bind: the stack's --host (None: node IP)
    enable_transfer_server: bool = True  # serve BlockTransfer even without a cache service
    always_transfer: bool = False  # pull from a peer whenever one holds more (skip the cost test)
    raw_transfer_stream: bool = True  # serve and use the raw block stream beside gRPC
    # The cluster credential (a shared secret, or TLS files read on the worker's machine, "{id}" = worker_id):
    # the worker acts as the member `worker_id` towards the cache service and its peers. None: open (tests).
    cluster_credential: ClusterCredential | None = None
    heartbeat_interval_s: float = 1.0
    heartbeat_ttl_s: int = 10
    feed_capacity: int = 65536  # block events kept for the router between polls
    torch_threads: int | None = None
    # Tiers under the device pool: host memory (GiB, 0: none) and a disk folder; each worker keeps its blocks
    # in <disk_cache>/<worker_id>, so a worker restarted under its name finds its own.
    host_cache_gb: float = 0.0
    disk_cache: str | None = None
    disk_cache_gb: float = 16.0


class WorkerActor:
    """Wrap with ``ray.remote(WorkerActor)`` (see ``deploy/stack.py`` for the options)."""

    def __init__(self, config: WorkerConfig) -> None:
        import torch

        from workers.engine import Engine, EngineConfig

        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.config = config
        self.device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.engine = Engine(EngineConfig(
            model=config.model, dtype=config.dtype, device=self.device, block_size=config.block_size,
            num_blocks=config.num_blocks, max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens, kv_cache_dtype=config.kv_cache_dtype,
            host_cache_gb=config.host_cache_gb,
            disk_cache_dir=None if config.disk_cache is None else os.path.join(config.disk_cache, config.worker_id),
            disk_cache_gb=config.disk_cache_gb,
        ))
        self.feed = EventFeed(config.feed_capacity)
        self.counters = WorkerCounters()
        self.loop = EngineLoop(self.engine, self._on_events)
        self.loop.start()
        self.cache_node: Any = None  # cache_service.cache_node.CacheNode, once started
        self._admitting_blocks = 0  # prompt blocks of requests not yet handed to the engine
        self._snapshot_task: asyncio.Future | None = None
        self._started = False
        self._start_lock = asyncio.Lock()
        self.node_id = ray_env.ray_node_id()
        # Ray re-runs only this constructor when it restarts the actor (``max_restarts``): nobody calls
        # start() then, so the first poll does.
        self._restarted = ray_env.was_restarted()

    def _on_events(self, events: list[BlockEvent]) -> None:
        # In the engine loop thread.
        self.counters.observe_events(events)
        self.feed.push(events)
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
        from common.cluster_auth import Member

        cfg = self.config
        host = ray_env.bind_host(cfg.transfer_host)  # the stack's --host, made valid on this machine
        member = Member(cfg.worker_id, cfg.cluster_credential) if cfg.cluster_credential is not None else None
        node = CacheNode.for_engine(
            self.engine, cfg.worker_id, engine_call=self.loop.call, cache_address=cfg.cache_service_address,
            config=CacheNodeConfig(
                client=CacheClientConfig(ttl_s=cfg.heartbeat_ttl_s, heartbeat_interval_s=cfg.heartbeat_interval_s),
                fetcher=FetcherConfig(always_transfer=cfg.always_transfer),
                transfer_host=host, advertise_host=ray_env.advertise_host(host), raw_stream=cfg.raw_transfer_stream,
                member=member,
            ),
            ray_node_id=self.node_id,
        )
        await self.loop.call(lambda engine: engine.set_eviction_advisor(node.advisor))
        await node.start()
        return node

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            worker_id=self.config.worker_id,
            node_id=self.node_id,
            model_id=self.engine.model_id,
            device=self.device,
            block_size=self.engine.block_size,
            num_blocks=self.engine.num_blocks,
            transfer_address=self._transfer_address(),
        )

    def _transfer_address(self) -> str:
        return self.cache_node.transfer_address if self.cache_node is not None else ""

    # ---- generation -------------------------------------------------------------------------------------
    async def generate(self, call: GenerateCall) -> AsyncIterator[Delta]:
        # The request id is bound around admission (where the fetch and the engine log), never across a
        # yield: a consumer may resume this generator from another context (an in-process router does).
        with request_context(call.request_id):
            stream = await self._admit(call)
        if isinstance(stream, Delta):  # refused at admission
            yield stream
            return
        try:
            while not stream.finished:
                yield await stream.next_delta()
        finally:
            if not stream.finished:  # the consumer went away (router cancelled): free the engine's slot
                self._abort_soon(call.request_id)

    async def _admit(self, call: GenerateCall) -> RequestStream | Delta:
        """Pull a longer prefix from a peer when worth it, then hand the request to the engine."""
        # Counted as waiting from now: a poll answered while we fetch must not report an idle worker.
        num_blocks = -(-len(call.prompt_ids) // self.engine.block_size)
        self._admitting_blocks += num_blocks
        try:
            transferred = await self._maybe_fetch(call) if self.cache_node is not None else 0
            stream = RequestStream(self.config.worker_id, transferred)

            def add(engine: Any) -> None:
                self.loop.add_sink(call.request_id, stream.sink)
                try:
                    engine.add_request(call.request_id, call.prompt_ids, call.params, call.cache_salt)
                except BaseException:
                    self.loop.drop_sink(call.request_id)
                    raise

            try:
                await self.loop.call(add)
            except InvalidRequestError as exc:
                return Delta(finish_reason="error", failure=EngineFailure(FailureKind.INVALID, str(exc)),
                             worker_id=self.config.worker_id)
            except asyncio.CancelledError:
                self._abort_soon(call.request_id)  # the add may still run (commands are FIFO): abort behind it
                raise
            return stream
        finally:
            self._admitting_blocks -= num_blocks

    def _abort_soon(self, request_id: str) -> None:
        self.loop.submit(lambda engine: (self.loop.drop_sink(request_id), engine.abort_request(request_id)))

    async def abort(self, request_id: str) -> None:
        await self.loop.call(lambda engine: engine.abort_request(request_id))

    async def _maybe_fetch(self, call: GenerateCall) -> int:
        """Tokens imported from a peer for this request (0 when nothing was pulled)."""
        result = await self.cache_node.fetch_prefix(call.prompt_ids, call.cache_salt, call.peer,
                                                    peer_known=call.peer_known)
        check = result.verification
        self.counters.observe_verification(check is not None, check is not None and not check.ok,
                                           result.quarantined_until is not None, bool(result.quarantined_peers))
        if not result.attempted:
            return 0
        self.counters.observe_transfer(result.imported, result.num_bytes, result.num_blocks, result.seconds)
        return result.num_tokens if result.imported else 0

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
            events: list[BlockEvent] = []
        else:
            (seq, events), snapshot = read, None
        if not self.loop.is_alive():
            raise RuntimeError(f"engine loop died: {self.loop.fatal_error}")
        load = self.loop.load
        return WorkerPoll(
            feed_epoch=self.feed.epoch, feed_seq=seq, events=events, snapshot=snapshot,
            load=dataclasses.replace(load, worker_id=self.config.worker_id,
                                     num_waiting_blocks=load.num_waiting_blocks + self._admitting_blocks),
            counters=self.counters, pins=list(self.loop.pins),
            engine_stalled_s=time.monotonic() - self.loop.last_beat, transfer_address=self._transfer_address(),
        )

    def _snapshot(self, engine: EnginePort) -> tuple[int, list[HeldBlock]]:
        # In the loop thread: flush pending events first so that the snapshot and the seq agree.
        events = engine.drain_events()
        if events:
            self._on_events(events)
        return self.feed.seq, engine.cached_blocks()  # (hash, fastest tier) per block held

    # ---- pins ---------------------------------------------------------------------------------------------
    # The engine holds the one pin table. The cache service assigns pins and delivers them with heartbeat
    # answers (the node's PinKeeper converges the engine on them); the router's Pin also calls ``pin``
    # directly so that Pin returns only once the prefix is warm. Both are idempotent per pin id.
    async def pin(self, pin_id: str, token_ids: Sequence[int], cache_salt: str = "") -> int:
        """Warm and hold a prefix (its blocks are pinned); idempotent per pin_id."""
        tokens = [int(t) for t in token_ids]
        if self.cache_node is not None:
            await self.cache_node.fetch_pinned_prefix(tokens, cache_salt)  # from a peer, if cheaper
        return await self.loop.call(lambda engine: engine.pin(pin_id, tokens, cache_salt))

    async def unpin(self, pin_id: str) -> int:
        return await self.loop.call(lambda engine: engine.unpin(pin_id))

    def pinned(self) -> list[str]:
        return list(self.loop.pins)

    # ---- lifecycle / introspection --------------------------------------------------------------------------
    async def ping(self) -> str:
        return self.config.worker_id

    async def load(self) -> Any:
        """The engine's load now (after the commands queued before this one)."""
        return await self.loop.call(lambda engine: engine.load())

    async def check_integrity(self) -> None:
        await self.loop.call(lambda engine: engine.check_integrity())

    async def debug_stall(self, seconds: float) -> None:
        """Fault injection (tests): block the engine loop for ``seconds``, as a hung step would."""
        self.loop.submit(lambda engine: time.sleep(seconds))

    async def reset_cache(self) -> bool:
        """Forget every cached block (benchmarks between runs); False while requests or pins hold blocks."""
        return await self.loop.call(lambda engine: engine.reset_cache())

    async def cached_hashes(self) -> list[BlockHash]:
        return await self.loop.call(lambda engine: engine.cached_hashes())

    async def cached_blocks(self) -> list[HeldBlock]:
        return await self.loop.call(lambda engine: engine.cached_blocks())

    async def shutdown(self) -> None:
        node, self.cache_node = self.cache_node, None
        if node is not None:
            try:
                await node.stop()
            except Exception:  # noqa: BLE001 - stopping anyway
                pass
        self.loop.stop()
