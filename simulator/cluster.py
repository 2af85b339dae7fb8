"""The discrete-event cluster simulation: the project's routing policies over the project's block pools.

    arrival --route--> node.prefill_queue --start--> [transfer + prefill] --done--> decode batch --> finish
      |                                     |                                 |                     |
      index.matches + policy.select        touch hits, pull blocks from the   cache computed blocks  free blocks
                                            peer, allocate (LRU eviction)      (BlockStored events)   (LRU order)

Every pool change becomes BlockStored/BlockRemoved events, applied at once to
the router's own index mirror (SimRoutingIndex wraps router/index_mirror.py),
which answers the policy's ``matches``. Events at one instant run completions
first, then arrivals (blocks freed at t are visible to a request arriving at t).
With ``pending`` the router also notes the blocks of each request it routes
(IndexMirror.note_routed): they count for routing until the node's events
confirm or drop them, or until the mirror's TTL (in simulated seconds) ends.

``global`` is the upper bound: one pool of num_nodes x capacity shared by
all nodes (every block visible to every node for free); requests go to the
least loaded node. With lower tiers it shares them too (num_nodes x each).

Lower tiers (``host_capacity_tokens`` / ``disk_capacity_tokens`` per node,
node.py): hits there are loaded back at prefill start, charged
``TimeModel.load_s`` before the prefill, and priced by the policy at
``host_hit_cost`` / ``disk_hit_cost`` (the time model's load over prefill
ratios unless given). With both at 0 (the default) nothing changes.
"""

from __future__ import annotations

import heapq
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

from cache_service.block_hash import BlockHash
from cache_service.records import Tier, WorkerLoad
from cache_service.types import TierCounts
from router.policies import POLICY_NAMES, CostWeights, RouteQuery, RoutingPolicy, make_policy
from workers.block_pool import Block, BlockPool

from .node import LowerTiers, SimNode
from .results import NodeStats, RunRecorder, SimResult
from .routing_index import SimRoutingIndex
from .sim_request import SimRequest, hit_tokens
from .time_model import TimeModel

GLOBAL = "global"
SIM_POLICY_NAMES: tuple[str, ...] = POLICY_NAMES + (GLOBAL,)

# Above this many nodes, filterable policies see only the deepest matches plus the least loaded.
EXACT_ROUTING_MAX_NODES = 128
DEFAULT_NUM_CANDIDATES = 16
MAX_INF_BLOCKS = 20_000_000  # Block objects we are willing to create for an unbounded run

_PREFILL_DONE, _DECODE = 0, 1


@dataclass(slots=True)
class SimConfig:
    num_nodes: int = 10
    capacity_tokens: int | None = 3_000_000  # per node; None = unbounded (no eviction)
    block_size: int = 512
    policy: str = "cache_aware"
    transfer: bool = False
    time_model: TimeModel = field(default_factory=TimeModel)
    weights: dict[str, float] = field(default_factory=dict)  # CostWeights overrides
    seed: int = 0
    num_candidates: int | None = None  # None: exact up to EXACT_ROUTING_MAX_NODES nodes, else 16
    pending: bool = False  # the router also counts blocks of routed, not yet prefilled requests
    host_capacity_tokens: int = 0  # per node, under the pool (0: no host tier)
    disk_capacity_tokens: int = 0  # per node, under the host tier (0: no disk tier)

    def __post_init__(self) -> None:
        if self.num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {self.num_nodes}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.capacity_tokens is not None and self.capacity_tokens < self.block_size:
            raise ValueError(f"capacity_tokens must hold at least one block ({self.block_size} tokens)")
        if self.policy not in SIM_POLICY_NAMES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {', '.join(SIM_POLICY_NAMES)}")
        for name in ("host_capacity_tokens", "disk_capacity_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["capacity_tokens"] = "inf" if self.capacity_tokens is None else self.capacity_tokens
        return d


def decode_blocks(req: SimRequest, block_size: int) -> int:
    """Blocks reserved for the output beyond the prompt's blocks."""
    total = -(-(req.num_prompt_tokens + req.output_len) // block_size)
    return max(total - req.num_blocks, 0)


class Simulator:
    def __init__(self, config: SimConfig, capacity_blocks: int) -> None:
        self.config = config
        self.tm = config.time_model
        self.bs = config.block_size
        self.is_global = config.policy == GLOBAL
        weights = dict(config.weights)
        weights.setdefault("transfer_cost_ratio", round(self.tm.transfer_cost_ratio(self.bs), 4))
        weights.setdefault("host_hit_cost", round(self.tm.load_cost_ratio(self.tm.host_load_gbs, self.bs), 4))
        weights.setdefault("disk_hit_cost", round(self.tm.load_cost_ratio(self.tm.disk_load_gbs, self.bs), 4))
        weights["enable_transfer"] = config.transfer and not self.is_global
        self.weights = CostWeights(**weights)
        name = "least_loaded" if self.is_global else config.policy
        self.policy: RoutingPolicy = make_policy(name, seed=config.seed, **asdict(self.weights))
        n = config.num_nodes
        host_blocks = config.host_capacity_tokens // self.bs
        disk_blocks = config.disk_capacity_tokens // self.bs
        tiered = host_blocks > 0 or disk_blocks > 0
        if self.is_global:
            shared = BlockPool(capacity_blocks * n if config.capacity_tokens is not None else capacity_blocks, self.bs)
            shared_tiers = LowerTiers(host_blocks * n, disk_blocks * n) if tiered else None
            self.nodes = [SimNode(i, shared, self.tm, shared_tiers) for i in range(n)]
        else:
            self.nodes = [SimNode(i, BlockPool(capacity_blocks, self.bs), self.tm,
                                  LowerTiers(host_blocks, disk_blocks) if tiered else None) for i in range(n)]
        self.loads: list[WorkerLoad] = [node.load for node in self.nodes]
        self.by_id = {node.worker_id: node for node in self.nodes}
        self.index = SimRoutingIndex()
        # The pool checks a hit's tokens against the request's; block identity here is the hash
        # itself, so every block carries the same token tuple and the check passes cheaply.
        self.tokens = (0,) * self.bs
        self.events: list[tuple] = []
        self._seq = 0
        self.rec = RunRecorder()
        k = config.num_candidates
        if k is None:
            k = 0 if n <= EXACT_ROUTING_MAX_NODES else DEFAULT_NUM_CANDIDATES
        self.num_candidates = k if (k and self.policy.filterable and k < n) else 0
        self._rng = random.Random(config.seed)
        self._load_heap: list[tuple[float, float, int, int]] = []
        self._blocked: set[int] = set()  # nodes whose queue head waits for free blocks
        if self.num_candidates:
            for node in self.nodes:
                self._push_load(node)

    # ---- event queue -------------------------------------------------------------
    def _schedule(self, t: float, kind: int, node: SimNode, arg) -> None:
        self._seq += 1
        heapq.heappush(self.events, (t, kind, self._seq, node, arg))

    def run(self, requests: Iterable[SimRequest]) -> SimResult:
        t0, c0 = time.perf_counter(), time.process_time()
        events = self.events
        for req in requests:
            now = req.arrival_s
            while events and events[0][0] <= now:
                self._handle(heapq.heappop(events))
            self._arrive(req, now)
        while events:
            self._handle(heapq.heappop(events))
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        for node in self.nodes:
            assert node.idle, f"{node.worker_id} did not drain"
        if self.rec.num_requests <= 20_000 and self.config.num_nodes <= 16:
            self.nodes[0].pool.check_integrity()
            if self.nodes[0].tiers is not None:
                self.nodes[0].tiers.check_integrity(self.nodes[0].pool)
        return SimResult(self.config.to_dict(), self.rec, self._node_stats(), elapsed, cpu)

    def _handle(self, ev: tuple) -> None:
        t, kind, _, node, arg = ev
        if kind == _PREFILL_DONE:
            self._prefill_done(node, arg, t)
        elif arg == node.decode_version:
            for req in node.decode_pop_finished(t):
                self._finish(node, req, t)
            self._reschedule_decode(node, t)
            self._start_prefills(node, t)

    # ---- routing ---------------------------------------------------------------------
    def _arrive(self, req: SimRequest, now: float) -> None:
        rec = self.rec
        rec.num_requests += 1
        rec.first_arrival_s = min(rec.first_arrival_s, now)
        hashes = req.hashes()
        if self.config.pending and not self.is_global:
            self.index.expire(now)  # the router's registry does this every poll; routing is what sees it
        # (global: the index stays empty, every node sees every block; only load matters)
        workers, by_node, tiers_by_node = self._candidates(hashes)
        nodes = self.nodes
        matches = {nodes[i].worker_id: n for i, n in by_node.items()}
        tiers = {nodes[i].worker_id: t for i, t in tiers_by_node.items()} if tiers_by_node else {}
        query = RouteQuery(len(hashes), req.num_prompt_tokens, matches, req.session_id, req.index, tiers)
        decision = self.policy.select(query, workers)
        node = self.by_id[decision.worker_id]
        req.node = node.index
        req.predicted_cached_blocks = (
            node.count_cached_prefix(hashes) if self.is_global else decision.predicted_cached_blocks
        )
        if decision.transfer_from is not None:
            req.transfer_from = self.by_id[decision.transfer_from].index
            req.num_planned_transfer = decision.num_transfer_blocks
        if self.config.pending and not self.is_global:
            self.index.note_routed(node.index, hashes, now)
        node.num_requests += 1
        node.num_prompt_tokens += req.num_prompt_tokens
        node.prefill_queue.append(req)
        load = node.load
        load.num_waiting += 1
        load.num_waiting_blocks += len(hashes) - req.predicted_cached_blocks
        self._load_changed(node)
        self._start_prefills(node, now)

    def _candidates(self, hashes: list) -> tuple[Sequence[WorkerLoad], dict[int, int], dict[int, TierCounts]]:
        """(workers the policy sees, their matches, the tier split of those partly below device): every
        node, or with many nodes the ``num_candidates`` deepest matches plus as many least-loaded nodes
        (policies doc)."""
        k = self.num_candidates
        if not k:
            return (self.loads, *self.index.matches_tiers(hashes))
        nodes = self.nodes
        by_node, tiers = self.index.matches_tiers(hashes, limit=k)
        heap = self._load_heap
        popped = []
        while heap and len(popped) < k:
            entry = heapq.heappop(heap)
            if entry[3] == nodes[entry[2]].version:
                popped.append(entry)
        for entry in popped:
            heapq.heappush(heap, entry)
            i = entry[2]
            if i not in by_node:
                length = self.index.match_length(i, hashes)
                by_node[i] = length
                split = self.index.tier_counts(i, hashes, length)
                if split is not None:
                    tiers[i] = split
        if len(heap) > 8 * len(nodes) + 1024:
            self._load_heap = []
            for node in nodes:
                self._push_load(node)
        return [nodes[i].load for i in by_node], {i: n for i, n in by_node.items() if n}, tiers

    def _push_load(self, node: SimNode) -> None:
        # A random second key spreads ties among equally loaded nodes.
        entry = (self.policy.load_cost(node.load), self._rng.random(), node.index, node.version)
        heapq.heappush(self._load_heap, entry)

    def _load_changed(self, node: SimNode) -> None:
        node.load.num_free_blocks = node.pool.num_free_blocks
        node.version += 1
        if self.num_candidates:
            self._push_load(node)

    # ---- prefill -------------------------------------------------------------------------
    def _start_prefills(self, node: SimNode, now: float) -> None:
        self._start_prefill(node, now)
        if self.is_global and self._blocked:
            # One shared pool: memory freed anywhere may unblock any node.
            for i in sorted(self._blocked):
                self._start_prefill(self.nodes[i], now)

    def _start_prefill(self, node: SimNode, now: float) -> None:
        pool = node.pool
        lower = node.tiers
        tokens = self.tokens
        bs = self.bs
        while node.prefilling is None and node.prefill_queue:
            req = node.prefill_queue[0]
            hashes = req.hashes()
            n = len(hashes)
            # The node's own prefix: per position a device Block, or the lower Tier it is loaded back from.
            hits: list[Block] = []
            local: list[Block | Tier] = []
            for h in hashes:
                block = pool.get_cached_block(h, tokens)
                if block is not None:
                    hits.append(block)
                    local.append(block)
                    continue
                tier = lower.tier_of(h) if lower is not None else None
                if tier is None:
                    break
                local.append(tier)
            num_local = len(local)
            src: list[Block] = []  # the peer's device blocks among those pulled
            src_lower: list[BlockHash] = []  # ... and those it serves from its lower tiers (at network speed)
            num_pulled = 0
            peer = peer_lower = None
            if req.transfer_from is not None:
                # Pull what the peer still holds of the planned prefix (it may have evicted some).
                peer, peer_lower = self.nodes[req.transfer_from].pool, self.nodes[req.transfer_from].tiers
                for pos in range(num_local, min(req.predicted_cached_blocks, n)):
                    block = peer.get_cached_block(hashes[pos], tokens)
                    if block is not None:
                        src.append(block)
                    elif peer_lower is not None and peer_lower.tier_of(hashes[pos]) is not None:
                        src_lower.append(hashes[pos])
                    else:
                        break
                    num_pulled += 1
            num_alloc = n - len(hits) + decode_blocks(req, bs)
            if len(hits) + num_alloc > pool.num_blocks:
                node.prefill_queue.popleft()  # can never fit on this node
                self._reject(node, req)
                continue
            num_needed = num_alloc + sum(1 for b in hits if b.ref_count == 0)
            if num_needed > pool.num_free_blocks:
                self._blocked.add(node.index)
                return  # wait until running requests free blocks (head of line)
            self._blocked.discard(node.index)
            node.prefill_queue.popleft()
            pool.touch(hits)
            fresh = pool.allocate(num_alloc)
            assert fresh is not None
            # req.blocks in prompt order: the local prefix (hits, and fresh blocks the lower-tier ones are
            # loaded into, cached at once), the pulled blocks (cached at once), then the blocks to compute.
            blocks: list[Block] = []
            j = 0
            num_host = num_disk = 0
            for pos, entry in enumerate(local):
                if isinstance(entry, Block):
                    blocks.append(entry)
                    continue
                assert lower is not None
                if entry == Tier.HOST:
                    num_host += 1
                else:
                    num_disk += 1
                lower.take(hashes[pos])
                pool.cache_block(fresh[j], hashes[pos], tokens, hashes[pos - 1] if pos else None)
                blocks.append(fresh[j])
                j += 1
            k = num_pulled
            if k:
                assert peer is not None
                if src:
                    peer.touch(src)  # serving the blocks is a use: refresh the peer's LRU
                    peer.free(src)
                for h in src_lower:
                    peer_lower.touch(h)  # type: ignore[union-attr]
                for pos in range(num_local, num_local + k):
                    pool.cache_block(fresh[j], hashes[pos], tokens, hashes[pos - 1] if pos else None)
                    blocks.append(fresh[j])
                    j += 1
            blocks.extend(fresh[j:])
            req.blocks = blocks
            req.num_local_hit_blocks = num_local
            req.num_host_hit_blocks = num_host
            req.num_disk_hit_blocks = num_disk
            req.num_transferred_blocks = k
            num_hit_tokens = hit_tokens(num_local + k, bs, req.num_prompt_tokens)
            # A fully cached prompt still computes its last token (to produce the first output).
            req.num_computed_tokens = max(req.num_prompt_tokens - num_hit_tokens, 1)
            req.prefill_start_s = now
            node.prefilling = req
            duration = self.tm.transfer_s(k, bs) + self.tm.prefill_s(req.num_computed_tokens)
            if num_host or num_disk:
                duration += self.tm.load_s(num_host, num_disk, bs)
            self._schedule(now + duration, _PREFILL_DONE, node, req)
            load = node.load
            load.num_waiting -= 1
            load.num_running += 1
            load.num_active_blocks += len(req.blocks)
            self._publish(node)
            if k:
                self._publish(self.nodes[req.transfer_from])
            self._load_changed(node)

    def _prefill_done(self, node: SimNode, req: SimRequest, now: float) -> None:
        pool = node.pool
        hashes = req.hashes()
        blocks = req.blocks
        tokens = self.tokens
        for i in range(req.num_hit_blocks, len(hashes)):
            pool.cache_block(blocks[i], hashes[i], tokens, hashes[i - 1] if i else None)
        req.first_token_s = now
        node.prefilling = None
        node.num_prefill_tokens += req.num_computed_tokens
        node.load.num_waiting_blocks -= len(hashes) - req.predicted_cached_blocks
        self.rec.record_prefill(req, self.bs)
        if req.output_len > 1:
            node.decode_add(req, req.output_len - 1, now)
            self._reschedule_decode(node, now)
        else:
            self._finish(node, req, now)
        self._publish(node)  # its BlockStored events confirm the pending entries its routing noted
        self._load_changed(node)
        self._start_prefills(node, now)

    # ---- decode / finish -----------------------------------------------------------------
    def _reschedule_decode(self, node: SimNode, now: float) -> None:
        node.decode_version += 1
        t = node.next_decode_finish(now)
        if t is not None:
            self._schedule(t, _DECODE, node, node.decode_version)

    def _finish(self, node: SimNode, req: SimRequest, now: float) -> None:
        node.pool.free(req.blocks)
        load = node.load
        load.num_running -= 1
        load.num_active_blocks -= len(req.blocks)
        self._load_changed(node)
        req.finish_s = now
        rec = self.rec
        rec.last_finish_s = max(rec.last_finish_s, now)
        rec.e2e_s.append(now - req.arrival_s)
        req.blocks = []
        req.block_hashes = None if req.block_ids is not None else req.block_hashes

    def _reject(self, node: SimNode, req: SimRequest) -> None:
        req.rejected = True
        self.rec.num_rejected += 1
        # Its pending entries stay until they expire: the router is not told either.
        node.load.num_waiting -= 1
        node.load.num_waiting_blocks -= req.num_blocks - req.predicted_cached_blocks
        self._load_changed(node)

    def _publish(self, node: SimNode) -> None:
        events = node.drain_events()  # also moves what the pool evicted into the lower tiers
        if events and not self.is_global:
            self.index.apply(node.index, events)

    # ---- accounting ------------------------------------------------------------------------
    def _node_stats(self) -> list[NodeStats]:
        def lower(n: SimNode, tier: str) -> int:
            t = getattr(n.tiers, tier) if n.tiers is not None else None
            return len(t) if t is not None else 0

        return [
            NodeStats(n.worker_id, n.num_requests, n.num_prompt_tokens, n.num_prefill_tokens, n.pool.num_cached_blocks,
                      lower(n, "host"), lower(n, "disk"))
            for n in self.nodes
        ]


def unbounded_capacity_blocks(requests: Sequence[SimRequest], block_size: int) -> int:
    """Blocks that can hold every block the trace ever allocates: no eviction can happen."""
    return max(sum(r.num_blocks + decode_blocks(r, block_size) for r in requests), 1)


def simulate(config: SimConfig, requests: Iterable[SimRequest]) -> SimResult:
    """Run ``requests`` (sorted by arrival) through a cluster built from ``config``."""
    if config.capacity_tokens is None:
        requests = list(requests)
        capacity_blocks = unbounded_capacity_blocks(requests, config.block_size)
        num_pools = 1 if config.policy == GLOBAL else config.num_nodes
        if capacity_blocks * num_pools > MAX_INF_BLOCKS:
            raise ValueError(
                f"unbounded capacity on {config.num_nodes} nodes needs {capacity_blocks * num_pools:,} blocks"
                f" (limit {MAX_INF_BLOCKS:,}); give a finite --capacity-tokens"
            )
    else:
        capacity_blocks = config.capacity_tokens // config.block_size
    return Simulator(config, capacity_blocks).run(requests)
