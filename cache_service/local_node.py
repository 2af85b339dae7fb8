"""A synchronous worker: Engine + CacheNode behind one engine lock (tests, benchmarks, simple hosts).

The engine is single-threaded, so every touch goes through ``self.lock``:
the caller's ``add_request`` / ``step`` / ``generate`` and the cache node's
``engine_call`` (exports for peers, imports, snapshots, pins), which runs on
a worker thread of the node's private event loop. After every locked call
the engine's block events are drained into the node's bounded queue, so the
index hears about blocks however they were made (steps, imports, pins).

    node = LocalCacheNode(engine, "worker-0", cache_address="127.0.0.1:50052").start()
    outs, fetches = node.generate([prompt], SamplingParams(max_tokens=8))
    node.stop()
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable, Sequence, TypeVar

from cache_service.cache_node import CacheNode, CacheNodeConfig
from cache_service.loop_thread import LoopThread
from cache_service.prefix_fetcher import FetchResult
from cache_service.records import PeerHint
from cache_service.transfer_server import TransferFaults

T = TypeVar("T")


class LocalCacheNode:
    def __init__(
        self,
        engine: Any,
        node_id: str,
        *,
        cache_address: str | None = None,
        config: CacheNodeConfig | None = None,
        faults: TransferFaults | None = None,
    ) -> None:
        self.engine = engine
        self.node_id = node_id
        self.lock = threading.RLock()
        self.loop = LoopThread(f"cache-node-{node_id}")
        self.node = CacheNode.for_engine(engine, node_id, engine_call=self._engine_call,
                                         cache_address=cache_address, config=config, faults=faults)
        engine.set_eviction_advisor(self.node.advisor)
        self._started = False

    @property
    def faults(self) -> TransferFaults:
        return self.node.servicer.faults

    @property
    def transfer_address(self) -> str:
        return self.node.transfer_address

    def start(self, wait_registered_s: float | None = 10.0) -> LocalCacheNode:
        self.loop.start()
        self.loop.run(self.node.start(), 30)
        self._started = True
        if wait_registered_s and self.node.client is not None:
            self.loop.run(self.node.client.wait_registered(wait_registered_s))
        return self

    def stop(self) -> None:
        if self._started:
            self._started = False
            try:
                self.loop.run(self.node.stop(), 30)
            finally:
                self.loop.stop()

    # ---- the engine lock ------------------------------------------------------------
    def call(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(engine)`` under the engine lock, then hand its block events to the node."""
        with self.lock:
            out = fn(self.engine)
            self.node.push_events(self.engine.drain_events())
            return out

    async def _engine_call(self, fn: Callable[[Any], T]) -> T:
        return await asyncio.to_thread(self.call, fn)

    # ---- requests ---------------------------------------------------------------------
    def fetch_prefix(self, prompt_ids: Sequence[int], cache_salt: str = "", peer: PeerHint | None = None, *,
                     peer_known: bool = False, timeout_s: float = 60.0) -> FetchResult:
        return self.loop.run(self.node.fetch_prefix(list(prompt_ids), cache_salt, peer, peer_known=peer_known),
                             timeout_s)

    def add_request(self, request_id: str, prompt_ids: Sequence[int], params: Any, cache_salt: str = "") -> FetchResult:
        """Admission with transfer: fetch what a peer can give cheaper, then queue the request."""
        result = self.fetch_prefix(prompt_ids, cache_salt)
        self.call(lambda e: e.add_request(request_id, prompt_ids, params, cache_salt))
        return result

    def step(self) -> list:
        return self.call(lambda e: e.step())

    def generate(self, prompts: list[list[int]], params: Any, cache_salt: str = ""
                 ) -> tuple[list, list[FetchResult]]:
        """Fetch each prompt's prefix (when worth it), then run them all to completion."""
        fetches = [self.fetch_prefix(p, cache_salt) for p in prompts]
        outputs = self.call(lambda e: e.generate(prompts, params, cache_salt))
        return outputs, fetches

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until the index has every event published so far (tests)."""
        if self.node.client is None:
            return True
        return self.loop.run(self.node.client.flush(timeout_s), timeout_s + 5)

    def __enter__(self) -> LocalCacheNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
