"""Routing policies: which worker serves a request, given the index's matches and the workers' load.

Pure code (no Ray, no gRPC): the gRPC router and the cluster simulator
(benchmarks/simulator) call the same ``select``. A policy sees

    query.matches   worker_id -> blocks of the longest prompt prefix that worker holds (the index's Lookup)
    query.tiers     worker_id -> how that prefix splits over the worker's tiers (only workers with some of
                    it on host or disk; absent: all on device)
    workers         the live workers' load (non-empty)

and answers a ``RouteDecision``: the worker, how many blocks it is predicted
not to prefill, and, when transfers are on, the peer to pull a longer prefix
from. ``cache_aware`` (the default) minimises a cost in the spirit of Dynamo's
KV router, in units of "blocks of prefill work":

    cost(w) = prefill_weight     * blocks w must prefill for this request
            + host_hit_cost      * blocks of w's hit it loads back from its host tier
            + disk_hit_cost      * blocks of w's hit it loads back from its disk tier
            + transfer_cost_ratio* blocks w pulls from the best peer       (transfer on)
            + queue_weight       * blocks already waiting to prefill on w  (its backlog: TTFT)
            + decode_load_weight * blocks held by w's running sequences    (decode load)

A device hit costs nothing and a recompute one block of prefill; a host or disk hit costs the time to
load the block back, a fraction of a prefill (like transfer_cost_ratio, in units of one block of prefill
at prefill_weight 1), so among holders of the same prefix the device holder wins, then host, then disk,
before load decides. Pulled blocks cost transfer_cost_ratio whatever tier the peer holds them in: the
network is the slow leg (a host read is several times faster than a NIC, a disk read about as fast).

With transfers on, the best peer's prefix costs ``transfer_cost_ratio`` per
block on any worker, so a hot prefix no longer pins its requests to one
worker: load terms move them elsewhere and the prefix is copied along.

Every other policy also honours ``enable_transfer`` (route by the policy,
then pull the longer prefix from the best peer), so that "transfer on/off"
compares like with like.

Ties are broken by a hash of (request_key, worker_id): deterministic,
independent of the order of ``workers`` and spread evenly over the tied.

Many workers: ``cache_aware`` and ``least_loaded`` pick an argmin, so a caller
may pass only the workers with matches plus the few with the lowest
``load_cost``; the choice is the same up to tie-breaks (``filterable``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

import xxhash

from cache_service.peers import best_peer
from cache_service.records import WorkerLoad
from cache_service.types import TierCounts

_MASK64 = (1 << 64) - 1


class RoutingError(ValueError):
    """A query or worker list the policy cannot route (no workers, bad matches)."""


@dataclass(slots=True)
class RouteQuery:
    num_blocks: int  # full blocks of the prompt
    num_prompt_tokens: int
    matches: Mapping[str, int]  # worker_id -> longest held prefix (blocks), from the index
    session_id: str | None = None
    request_key: int = 0  # stable per-request int (e.g. hash of request_id) for tie-breaks
    # worker_id -> its prefix's split over tiers, for workers with some of it below device (the mirror's
    # lookup_tiers); a worker not in it holds its whole prefix on device.
    tiers: Mapping[str, TierCounts] = field(default_factory=dict)


@dataclass(slots=True)
class RouteDecision:
    worker_id: str
    predicted_cached_blocks: int  # blocks the worker will not prefill (local hit + transferred)
    transfer_from: str | None = None  # peer to pull blocks from
    num_transfer_blocks: int = 0
    cost: float = 0.0


@dataclass(slots=True)
class CostWeights:
    prefill_weight: float = 1.0
    decode_load_weight: float = 0.1
    queue_weight: float = 1.0
    transfer_cost_ratio: float = 0.2  # cost of pulling one block / cost of prefilling it
    enable_transfer: bool = False
    min_transfer_blocks: int = 1  # fewer than this is not worth a round trip
    # Cost of a hit on the worker's host / disk tier, per block, as a fraction of prefilling it: the time
    # to load it back over the time to recompute it. Defaults from the specifications the simulator's time
    # model uses (simulator/time_model.py: a 512-token block of a Llama-3-8B-class model, 64 MiB, loads in
    # 1.3 ms over PCIe 5.0 at ~50 GB/s and in 5.2 ms from an NVMe at ~13 GB/s, against 25.6 ms to prefill at
    # 20k tokens/s), until the worker side's measured TTFT from host and disk replaces them.
    host_hit_cost: float = 0.05
    disk_hit_cost: float = 0.2

    def __post_init__(self) -> None:
        for name in ("prefill_weight", "decode_load_weight", "queue_weight", "transfer_cost_ratio",
                     "host_hit_cost", "disk_hit_cost"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.min_transfer_blocks < 1:
            raise ValueError(f"min_transfer_blocks must be >= 1, got {self.min_transfer_blocks}")


class RoutingPolicy(Protocol):
    name: str
    filterable: bool  # True: the caller may pass only matched + least-loaded workers

    def select(self, query: RouteQuery, workers: Sequence[WorkerLoad]) -> RouteDecision: ...

    def load_cost(self, worker: WorkerLoad) -> float: ...


# ---- helpers shared by every policy ---------------------------------------

_worker_hashes: dict[str, int] = {}


def worker_hash(worker_id: str) -> int:
    """A stable 64-bit hash of a worker id (xxh64, never Python's hash())."""
    h = _worker_hashes.get(worker_id)
    if h is None:
        h = _worker_hashes[worker_id] = xxhash.xxh64_intdigest(worker_id.encode("utf-8"))
    return h


def _mix(a: int, b: int) -> int:
    """splitmix64 finaliser of a ^ b: a cheap, well-spread deterministic score."""
    z = ((a ^ b) + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _check(query: RouteQuery, workers: Sequence[WorkerLoad]) -> None:
    if not workers:
        raise RoutingError("no live workers to route to")
    if query.num_blocks < 0 or query.num_prompt_tokens < 0:
        raise RoutingError("num_blocks and num_prompt_tokens must be >= 0")
    for wid, n in query.matches.items():
        if not 0 <= n <= query.num_blocks:
            raise RoutingError(f"match of {n} blocks on {wid!r} is outside 0..{query.num_blocks}")
    for wid, t in query.tiers.items():
        if min(t) < 0 or t.num_blocks != query.matches.get(wid, 0):
            raise RoutingError(f"tiers {tuple(t)} of {wid!r} do not add up to its match of "
                               f"{query.matches.get(wid, 0)} blocks")


def _best_peer(query: RouteQuery, live: set[str] | None) -> tuple[str | None, int]:
    """The live worker holding the longest prefix (ties: request_key hash), and its length."""
    key = query.request_key
    found = best_peer(query.matches, eligible=live, tie_key=lambda wid: _mix(key, worker_hash(wid)))
    return found if found is not None else (None, 0)


def plan_transfer(
    query: RouteQuery,
    worker_id: str,
    weights: CostWeights,
    peer: tuple[str | None, int],
) -> RouteDecision:
    """The decision for ``worker_id``: its own hit, plus the peer's longer prefix if transfers are on."""
    local = query.matches.get(worker_id, 0)
    peer_id, peer_len = peer
    num_transfer = peer_len - local
    if (
        weights.enable_transfer
        and peer_id is not None
        and peer_id != worker_id
        and num_transfer >= weights.min_transfer_blocks
        and weights.transfer_cost_ratio < weights.prefill_weight  # else recomputing is cheaper
    ):
        return RouteDecision(worker_id, peer_len, peer_id, num_transfer)
    return RouteDecision(worker_id, local)


def _live_ids(workers: Sequence[WorkerLoad]) -> set[str]:
    return {w.worker_id for w in workers}


def _argmin(costs: list[float], workers: Sequence[WorkerLoad], key: int) -> int:
    """Index of the lowest cost; among equal costs, the lowest hash of (request_key, worker_id)."""
    lowest = min(costs)
    tied = [i for i, c in enumerate(costs) if c == lowest]
    if len(tied) == 1:
        return tied[0]
    return min(tied, key=lambda i: _mix(key, worker_hash(workers[i].worker_id)))


# ---- policies --------------------------------------------------------------


class _WeightedPolicy:
    """Shared by the policies that price a worker's load with the cost weights."""

    filterable = True

    def __init__(self, weights: CostWeights | None = None) -> None:
        self.weights = weights or CostWeights()

    def load_cost(self, worker: WorkerLoad) -> float:
        w = self.weights
        return w.queue_weight * worker.num_waiting_blocks + w.decode_load_weight * worker.num_active_blocks


class CacheAwarePolicy(_WeightedPolicy):
    """Minimise prefill work + transfer + backlog + decode load (module doc); ties by request_key."""

    name = "cache_aware"

    def select(self, query: RouteQuery, workers: Sequence[WorkerLoad]) -> RouteDecision:
        _check(query, workers)
        w = self.weights
        peer_id, peer_len = _best_peer(query, _live_ids(workers)) if query.matches else (None, 0)
        use_peer = w.enable_transfer and peer_id is not None and w.transfer_cost_ratio < w.prefill_weight
        n = query.num_blocks
        matches, tiers = query.matches, query.tiers
        pw, qw, dw, ratio = w.prefill_weight, w.queue_weight, w.decode_load_weight, w.transfer_cost_ratio
        hw, kw = w.host_hit_cost, w.disk_hit_cost
        min_pull = w.min_transfer_blocks
        costs = []
        for worker in workers:
            wid = worker.worker_id
            local = matches.get(wid, 0)
            pulled = peer_len - local if use_peer else 0
            if pulled >= min_pull:
                work = pw * (n - peer_len) + ratio * pulled
            else:
                work = pw * (n - local)
            if tiers:
                t = tiers.get(wid)
                if t is not None:
                    work += hw * t.host + kw * t.disk  # loading its own lower-tier hits back
            costs.append(work + qw * worker.num_waiting_blocks + dw * worker.num_active_blocks)
        i = _argmin(costs, workers, query.request_key)
        decision = plan_transfer(query, workers[i].worker_id, w, (peer_id, peer_len))
        decision.cost = costs[i]
        return decision


class LeastLoadedPolicy(_WeightedPolicy):
    """The worker with the least backlog + decode load (the cost's load terms); ignores the cache."""

    name = "least_loaded"

    def select(self, query: RouteQuery, workers: Sequence[WorkerLoad]) -> RouteDecision:
        _check(query, workers)
        costs = [self.load_cost(wl) for wl in workers]
        i = _argmin(costs, workers, query.request_key)
        decision = self._decide(query, workers[i].worker_id, workers)
        decision.cost = costs[i]
        return decision

    def _decide(self, query: RouteQuery, worker_id: str, workers: Sequence[WorkerLoad]) -> RouteDecision:
        peer = _best_peer(query, _live_ids(workers)) if self.weights.enable_transfer else (None, 0)
        return plan_transfer(query, worker_id, self.weights, peer)


class RoundRobinPolicy(LeastLoadedPolicy):
    """Workers in the order given, one after another."""

    name = "round_robin"
    filterable = False

    def __init__(self, weights: CostWeights | None = None) -> None:
        super().__init__(weights)
        self._next = 0

    def select(self, query: RouteQuery, workers: Sequence[WorkerLoad]) -> RouteDecision:
        _check(query, workers)
        chosen = workers[self._next % len(workers)]
        self._next += 1
        return self._decide(query, chosen.worker_id, workers)


class RandomPolicy(LeastLoadedPolicy):
    """A uniformly random worker from a seeded generator (reproducible runs)."""

    name = "random"
    filterable = False

    def __init__(self, weights: CostWeights | None = None, seed: int = 0) -> None:
        super().__init__(weights)
        self._rng = random.Random(seed)

    def select(self, query: RouteQuery, workers: Sequence[WorkerLoad]) -> RouteDecision:
        _check(query, workers)
        chosen = workers[self._rng.randrange(len(workers))]
        return self._decide(query, chosen.worker_id, workers)


class SessionPolicy(LeastLoadedPolicy):
    """Sticky by session_id: rendezvous hashing over the live workers; cache_aware without a session.

    Rendezvous (highest random weight) hashing moves only the sessions of a
    worker that leaves, and a worker that joins takes only the sessions it now
    wins: stickiness survives membership changes with no shared state.
    """

    name = "session"
    filterable = False

    def __init__(self, weights: CostWeights | None = None) -> None:
        super().__init__(weights)
        self._fallback = CacheAwarePolicy(self.weights)

    def select(self, query: RouteQuery, workers: Sequence[WorkerLoad]) -> RouteDecision:
        if query.session_id is None:
            return self._fallback.select(query, workers)
        _check(query, workers)
        skey = xxhash.xxh64_intdigest(query.session_id.encode("utf-8"))
        chosen = max(workers, key=lambda wl: _mix(skey, worker_hash(wl.worker_id)))
        return self._decide(query, chosen.worker_id, workers)


POLICY_NAMES: tuple[str, ...] = ("cache_aware", "round_robin", "random", "least_loaded", "session")
DEFAULT_POLICY = "cache_aware"


def make_policy(name: str = DEFAULT_POLICY, *, seed: int = 0, weights: CostWeights | None = None,
                **fields: float) -> RoutingPolicy:
    """A policy by name that prices load with ``weights`` (None: ``CostWeights()``).

    ``fields`` builds the weights from ``CostWeights`` field names instead (prefill_weight,
    decode_load_weight, queue_weight, transfer_cost_ratio, enable_transfer, min_transfer_blocks,
    host_hit_cost, disk_hit_cost): the
    simulator and the policy tests call it so. Never both."""
    if fields:
        if weights is not None:
            raise TypeError("make_policy takes weights or CostWeights fields, not both")
        unknown = set(fields) - set(CostWeights.__dataclass_fields__)
        if unknown:
            known = sorted(CostWeights.__dataclass_fields__)
            raise ValueError(f"unknown policy weight(s) {sorted(unknown)}; known: {known}")
        weights = CostWeights(**fields)
    cw = weights if weights is not None else CostWeights()
    if name == "cache_aware":
        return CacheAwarePolicy(cw)
    if name == "round_robin":
        return RoundRobinPolicy(cw)
    if name == "random":
        return RandomPolicy(cw, seed=seed)
    if name == "least_loaded":
        return LeastLoadedPolicy(cw)
    if name == "session":
        return SessionPolicy(cw)
    raise ValueError(f"unknown routing policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
