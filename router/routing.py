"""Choosing a worker: index lookup (local mirror, or the cache service) + the policy + the decision record.

    hashes  = encoder.block_hashes(prompt, salt)            (done by the caller, once per request)
    matches = mirror.lookup_tiers(hashes) | CacheService.Lookup
                                   worker -> longest held prefix (blocks, any tier), and its split over
                                   tiers for the workers holding some of it on host or disk
    choice  = policy.select(RouteQuery(...), live loads)     or the request's target_worker
    peer    = the peer holding a longer prefix, for the chosen worker to pull from (BlockTransfer), or None

The mirror answers in microseconds from memory; the service costs a network + Redis round trip, so
it is used only when asked for (``index_source="service"``, benchmarks) or while the mirror is not
in sync with a live worker (its first poll has not answered yet).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Sequence

import xxhash

from cache_service.block_hash import BlockHash
from cache_service.peers import best_peer
from cache_service.records import PeerHint
from cache_service.types import TierCounts
from router.index_mirror import IndexMirror
from router.metrics import RouterMetrics
from router.policies import RouteDecision, RouteQuery, RoutingPolicy
from router.registry import WorkerRegistry, WorkerState
from router.tokenize import PromptEncoder

# worker -> prefix length, or (that, worker -> TierCounts for the workers with some of it below device).
ServiceLookup = Callable[[Sequence[BlockHash]],
                         Awaitable[dict[str, int] | tuple[dict[str, int], dict[str, TierCounts]]]]
INDEX_SOURCES = ("mirror", "service")


class NoWorkerError(Exception):
    """No live worker can take the request (UNAVAILABLE at the edge)."""


class UnknownWorkerError(ValueError):
    """target_worker names no worker of this stack (INVALID_ARGUMENT)."""


@dataclass(slots=True)
class Decision:
    worker_id: str
    predicted_cached_tokens: int
    num_prompt_blocks: int
    num_cached_blocks: int  # the policy's predicted_cached_blocks (local hit + transfer)
    # The peer the worker should pull a longer prefix from; None: no peer holds more. The router always
    # decides this, so the worker never pays a Lookup round trip of its own.
    peer: PeerHint | None = None
    lookup_source: str = "mirror"
    matches: dict[str, int] = field(default_factory=dict)
    # The live workers whose prefix is partly on host or disk, and how it splits (the rest: all device).
    tiers: dict[str, TierCounts] = field(default_factory=dict)
    targeted: bool = False


class RoutingCore:
    def __init__(
        self,
        encoder: PromptEncoder,
        registry: WorkerRegistry,
        mirror: IndexMirror,
        policy: RoutingPolicy,
        metrics: RouterMetrics,
        *,
        service_lookup: ServiceLookup | None = None,
        index_source: str = "mirror",
        transfer_hints: bool = True,
    ) -> None:
        if index_source not in INDEX_SOURCES:
            raise ValueError(f"index_source must be one of {INDEX_SOURCES}, got {index_source!r}")
        if index_source == "service" and service_lookup is None:
            raise ValueError("index_source='service' needs a cache service")
        self.encoder = encoder
        self.registry = registry
        self.mirror = mirror
        self.policy = policy
        self.metrics = metrics
        self.service_lookup = service_lookup
        self.index_source = index_source
        # False: tell every worker that no peer holds more (no transfers at all; benchmarks compare
        # routing alone this way).
        self.transfer_hints = transfer_hints

    async def lookup(self, hashes: Sequence[BlockHash]) -> tuple[dict[str, int], dict[str, TierCounts], str]:
        """(worker -> prefix length, worker -> tier split where some is below device, the source asked)."""
        source = self.index_source
        if source == "mirror" and self.service_lookup is not None and not self._mirror_in_sync():
            source = "service"
        started = time.perf_counter()
        if source == "service":
            assert self.service_lookup is not None
            try:
                answer = await self.service_lookup(hashes)
                matches, tiers = answer if isinstance(answer, tuple) else (answer, {})
            except Exception:  # noqa: BLE001 - the index is a hint: a down service must not fail requests
                source = "mirror"
                matches, tiers = self.mirror.lookup_tiers(hashes)
        else:
            matches, tiers = self.mirror.lookup_tiers(hashes)
        elapsed = time.perf_counter() - started
        self.metrics.index_lookups.labels(source).inc()
        self.metrics.index_lookup_seconds.labels(source).observe(elapsed)
        return matches, tiers, source

    def _mirror_in_sync(self) -> bool:
        return all(w.feed_epoch for w in self.registry.live_workers())

    async def decide(
        self,
        prompt_ids: Sequence[int],
        hashes: Sequence[BlockHash],
        *,
        request_id: str,
        session_id: str = "",
        target_worker: str = "",
        exclude: frozenset[str] = frozenset(),
    ) -> Decision:
        matches, tiers, source = await self.lookup(hashes)
        return self.choose(prompt_ids, hashes, matches, source, request_id=request_id, session_id=session_id,
                           target_worker=target_worker, exclude=exclude, tiers=tiers)

    def choose(
        self,
        prompt_ids: Sequence[int],
        hashes: Sequence[BlockHash],
        matches: dict[str, int],
        source: str,
        *,
        request_id: str,
        session_id: str = "",
        target_worker: str = "",
        exclude: frozenset[str] = frozenset(),
        tiers: dict[str, TierCounts] | None = None,
    ) -> Decision:
        registry = self.registry
        live = {w.worker_id: w for w in registry.live_workers() if w.worker_id not in exclude}
        # Matches of workers out of rotation must not count (a stale service answer, a worker just lost).
        matches = {wid: n for wid, n in matches.items() if wid in live}
        # Only splits that describe a live worker's match (a service answer may disagree with the mirror's).
        tiers = {wid: t for wid, t in tiers.items() if matches.get(wid) == t.num_blocks} if tiers else {}
        num_blocks = len(hashes)
        if target_worker:
            state = registry.get(target_worker)
            if state is None:
                known = ", ".join(sorted(registry.workers)) or "none"
                raise UnknownWorkerError(f"unknown target_worker {target_worker!r} (known workers: {known})")
            if target_worker not in live:
                raise NoWorkerError(f"target_worker {target_worker!r} is not available "
                                    f"({state.last_error or 'out of rotation'})")
            decision = RouteDecision(target_worker, matches.get(target_worker, 0))
            targeted = True
        else:
            if not live:
                raise NoWorkerError("no live worker can take the request" +
                                    (f" (excluded after failures: {', '.join(sorted(exclude))})" if exclude else ""))
            loads = [w.effective_load() for w in live.values()]
            query = RouteQuery(
                num_blocks=num_blocks,
                num_prompt_tokens=len(prompt_ids),
                matches=matches,
                session_id=session_id or None,
                request_key=xxhash.xxh64_intdigest(request_id.encode("utf-8")),
                tiers=tiers,
            )
            decision = self.policy.select(query, loads)
            targeted = False
        peer, cached_blocks = self._peer_hint(decision, matches, live)
        return Decision(
            worker_id=decision.worker_id,
            predicted_cached_tokens=self.encoder.cacheable_tokens(len(prompt_ids), cached_blocks),
            num_prompt_blocks=num_blocks,
            num_cached_blocks=cached_blocks,
            peer=peer,
            lookup_source=source,
            matches=matches,
            tiers=tiers,
            targeted=targeted,
        )

    def _peer_hint(self, decision: RouteDecision, matches: dict[str, int],
                   live: dict[str, WorkerState]) -> tuple[PeerHint | None, int]:
        """The peer the chosen worker should pull from (None: none holds more), and the blocks it is predicted
        to reuse: the policy's transfer source, else the peer holding the longest prefix, when that is more
        than the worker's own (the worker then decides transfer vs recompute on measured rates).
        """
        wid = decision.worker_id
        local = matches.get(wid, 0)
        if not self.transfer_hints:
            return None, local
        if decision.transfer_from is not None:
            found: tuple[str, int] | None = (decision.transfer_from, decision.predicted_cached_blocks)
        else:
            found = best_peer(matches, exclude=wid)
        if found is None:
            return None, local
        peer, peer_len = found
        state = live.get(peer)
        if state is None or not state.transfer_address or peer_len <= local:
            return None, local
        return PeerHint(peer, state.transfer_address, peer_len), peer_len
