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

Lower tiers (``LowerTiers``, when the node has host or disk capacity): what
the pool evicts goes to host memory, what host evicts goes to disk, what disk
evicts is gone; each tier is an LRU of its own. A block lives in one tier at a
time (the fastest that holds it): a hit on host or disk loads it back into
the pool (a fresh block, cached at once) and leaves the lower tier, and a
block the pool caches again leaves it too. The node's events say so in the
records' terms: the pool's ``BlockRemoved`` of an evicted block becomes
``BlockStored(tier=HOST)`` (or DISK), and only a block that leaves the last
tier is ``BlockRemoved``.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from typing import Sequence

from cache_service.block_hash import BlockHash
from cache_service.records import AllBlocksCleared, BlockEvent, BlockRemoved, BlockStored, Tier, WorkerLoad
from workers.block_pool import BlockPool

from .sim_request import SimRequest
from .time_model import TimeModel


class LruTier:
    """One lower tier: block hashes in LRU order (oldest first), at most ``num_blocks`` of them."""

    def __init__(self, tier: Tier, num_blocks: int) -> None:
        assert tier != Tier.DEVICE and num_blocks > 0
        self.tier = tier
        self.num_blocks = num_blocks
        self.blocks: OrderedDict[BlockHash, None] = OrderedDict()

    def __contains__(self, h: object) -> bool:
        return h in self.blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def put(self, h: BlockHash) -> BlockHash | None:
        """Hold ``h`` as the most recent; returns the least recent one pushed out, if the tier was full."""
        self.blocks[h] = None
        if len(self.blocks) > self.num_blocks:
            return self.blocks.popitem(last=False)[0]
        return None

    def take(self, h: BlockHash) -> bool:
        """Let go of ``h``; False when this tier did not hold it."""
        if h not in self.blocks:
            return False
        del self.blocks[h]
        return True

    def touch(self, h: BlockHash) -> None:
        self.blocks.move_to_end(h)


class LowerTiers:
    """A node's host and disk tiers under its pool (module doc): where its evicted blocks go."""

    def __init__(self, host_blocks: int, disk_blocks: int) -> None:
        self.host = LruTier(Tier.HOST, host_blocks) if host_blocks > 0 else None
        self.disk = LruTier(Tier.DISK, disk_blocks) if disk_blocks > 0 else None

    def tier_of(self, h: BlockHash) -> Tier | None:
        if self.host is not None and h in self.host:
            return Tier.HOST
        if self.disk is not None and h in self.disk:
            return Tier.DISK
        return None

    def take(self, h: BlockHash) -> None:
        """``h`` goes back to the pool (a hit loads it): no lower tier holds it any more."""
        if not (self.host is not None and self.host.take(h)) and self.disk is not None:
            self.disk.take(h)

    def touch(self, h: BlockHash) -> None:
        """A peer read ``h`` from here: a use, as in the pool."""
        tier = self.tier_of(h)
        if tier is not None:
            (self.host if tier == Tier.HOST else self.disk).touch(h)  # type: ignore[union-attr]

    def translate(self, events: Sequence[BlockEvent]) -> list[BlockEvent]:
        """The pool's events as the node's: evictions demote (module doc), stores leave the lower tiers."""
        out: list[BlockEvent] = []
        for ev in events:
            if isinstance(ev, BlockRemoved):
                self._demote(ev.block_hash, out)
            elif isinstance(ev, BlockStored):
                self.take(ev.block_hash)
                out.append(ev)
            elif isinstance(ev, AllBlocksCleared):
                for tier in (self.host, self.disk):
                    if tier is not None:
                        tier.blocks.clear()
                out.append(ev)
        return out

    def _demote(self, h: BlockHash, out: list[BlockEvent]) -> None:
        for tier in (self.host, self.disk):
            if tier is None:
                continue
            out.append(BlockStored(h, tier=tier.tier))
            pushed = tier.put(h)
            if pushed is None:
                return
            h = pushed  # the tier's oldest block goes one tier further down
        out.append(BlockRemoved(h))

    def check_integrity(self, pool: BlockPool) -> None:
        host = self.host.blocks if self.host is not None else {}
        disk = self.disk.blocks if self.disk is not None else {}
        assert not (host.keys() & disk.keys()), "a block is on host and on disk"
        assert not (pool.cached.keys() & (host.keys() | disk.keys())), "a block is on device and below it"
        for tier in (self.host, self.disk):
            if tier is not None:
                assert len(tier) <= tier.num_blocks


class SimNode:
    def __init__(self, index: int, pool: BlockPool, time_model: TimeModel, tiers: LowerTiers | None = None) -> None:
        self.index = index
        self.worker_id = f"node-{index}"
        self.pool = pool
        self.tiers = tiers  # host and disk under the pool (None: the pool is the node's whole cache)
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

    # ---- cache --------------------------------------------------------------
    def drain_events(self) -> list[BlockEvent]:
        """The node's block events since the last call, in the records' tier terms (module doc)."""
        events = self.pool.drain_events()
        if self.tiers is None or not events:
            return events
        return self.tiers.translate(events)

    def count_cached_prefix(self, block_hashes: Sequence[BlockHash]) -> int:
        """Leading blocks held in any tier (no token check: for routing hints)."""
        if self.tiers is None:
            return self.pool.count_cached_prefix(block_hashes)
        cached, tier_of = self.pool.cached, self.tiers.tier_of
        n = 0
        for h in block_hashes:
            if h not in cached and tier_of(h) is None:
                break
            n += 1
        return n

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
