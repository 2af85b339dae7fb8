"""One simulated node: the project's BlockPool, a FIFO prefill queue and a batched decoder.

    arrive -> prefill queue -> [transfer + prefill: one at a time] -> decode batch -> free blocks

Prefill is serial (one request at a time, its duration from the time model).
Decode is processor sharing: every running sequence gets one token per step,
and a step lasts ``decode_step_s(kv tokens of the batch)``. Between events the
batch is fixed, so one counter ``decode_v`` (tokens each member has emitted
since the node started) moves at 1/step_s, and a sequence finishes when
``decode_v`` reaches the value it was given on joining: O(log n) per event.

A request holds its prompt blocks and its decode blocks (reserved at
admission) from prefill start to its last token; then they are freed, last
block first, so LRU eviction in the pool is the real thing.
"""

from __future__ import annotations

import heapq
from collections import deque

from cache_service.records import WorkerLoad
from workers.block_pool import BlockPool

from .sim_request import SimRequest
from .time_model import TimeModel


class SimNode:
    def __init__(self, index: int, pool: BlockPool, time_model: TimeModel) -> None:
        self.index = index
        self.worker_id = f"node-{index}"
        self.pool = pool
        self.time_model = time_model
        self.load = WorkerLoad(self.worker_id, num_free_blocks=pool.num_free_blocks, capacity_blocks=pool.num_blocks)
        self.prefill_queue: deque[SimRequest] = deque()
        self.prefilling: SimRequest | None = None
        # decode batch (processor sharing, see module doc)
        self.decode_heap: list[tuple[float, int, SimRequest]] = []
        self.decode_v = 0.0
        self.decode_t = 0.0
        self.decode_kv_tokens = 0
        self.decode_version = 0
        # accounting
        self.num_prefill_tokens = 0  # tokens this node computed in prefill
        self.num_prompt_tokens = 0  # tokens of the prompts routed here
        self.num_requests = 0
        self.version = 0  # bumped on every load change (the simulator's load heap)

    # ---- decode batch -------------------------------------------------------
    def decode_advance(self, now: float) -> None:
        if self.decode_heap:
            self.decode_v += (now - self.decode_t) / self.time_model.decode_step_s(self.decode_kv_tokens)
        self.decode_t = now

    def decode_add(self, req: SimRequest, num_tokens: int, now: float) -> None:
        self.decode_advance(now)
        heapq.heappush(self.decode_heap, (self.decode_v + num_tokens, req.index, req))
        self.decode_kv_tokens += req.num_prompt_tokens + req.output_len

    def decode_pop_finished(self, now: float) -> list[SimRequest]:
        self.decode_advance(now)
        done = []
        heap = self.decode_heap
        while heap and heap[0][0] <= self.decode_v + 1e-6:
            _, _, req = heapq.heappop(heap)
            self.decode_kv_tokens -= req.num_prompt_tokens + req.output_len
            done.append(req)
        return done

    def next_decode_finish(self, now: float) -> float | None:
        """When the batch's next member finishes if nothing changes (None: batch empty)."""
        if not self.decode_heap:
            return None
        remaining = max(self.decode_heap[0][0] - self.decode_v, 0.0)
        return now + remaining * self.time_model.decode_step_s(self.decode_kv_tokens)

    @property
    def idle(self) -> bool:
        return self.prefilling is None and not self.prefill_queue and not self.decode_heap
