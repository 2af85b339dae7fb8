"""Choosing a worker: index lookup (local mirror, or the cache service) + the policy + the decision record.

    hashes  = encoder.block_hashes(prompt, salt)            (done by the caller, once per request)
    matches = mirror.lookup(hashes)   | CacheService.Lookup  worker -> longest held prefix (blocks)
    choice  = policy.select(RouteQuery(...), live loads)     or the request's target_worker
    hint    = the peer holding a longer prefix, for the chosen worker to pull from (BlockTransfer)

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
from router.index_mirror import IndexMirror
from router.metrics import RouterMetrics
from router.policies import RouteDecision, RouteQuery, RoutingPolicy
from router.registry import WorkerRegistry, WorkerState
from router.tokenize import PromptEncoder
from cache_service.prefix_fetcher import PeerHint

ServiceLookup = Callable[[Sequence[BlockHash]], Awaitable[dict[str, int]]]
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
    hint: PeerHint | None = None  # what the worker should know about peers (saves its own Lookup)
    lookup_source: str = "mirror"
    matches: dict[str, int] = field(default_factory=dict)
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

    async def lookup(self, hashes: Sequence[BlockHash]) -> tuple[dict[str, int], str]:
        source = self.index_source
        if source == "mirror" and self.service_lookup is not None and not self._mirror_in_sync():
            source = "service"
        started = time.perf_counter()
        if source == "service":
            assert self.service_lookup is not None
            try:
                matches = await self.service_lookup(hashes)
            except Exception:  # noqa: BLE001 - the index is a hint: a down service must not fail requests
                source, matches = "mirror", self.mirror.lookup(hashes)
        else:
            matches = self.mirror.lookup(hashes)
        elapsed = time.perf_counter() - started
        self.metrics.index_lookups.labels(source).inc()
        self.metrics.index_lookup_seconds.labels(source).observe(elapsed)
        return matches, source

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
        matches, source = await self.lookup(hashes)
        return self.choose(prompt_ids, hashes, matches, source, request_id=request_id, session_id=session_id,
                           target_worker=target_worker, exclude=exclude)

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
    ) -> Decision:
        registry = self.registry
        live = {w.worker_id: w for w in registry.live_workers() if w.worker_id not in exclude}
        # Matches of workers out of rotation must not count (a stale service answer, a worker just lost).
        matches = {wid: n for wid, n in matches.items() if wid in live}
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
            )
            decision = self.policy.select(query, loads)
            targeted = False
        hint, cached_blocks = self._peer_hint(decision, matches, live)
        return Decision(
            worker_id=decision.worker_id,
            predicted_cached_tokens=self.encoder.cacheable_tokens(len(prompt_ids), cached_blocks),
            num_prompt_blocks=num_blocks,
            num_cached_blocks=cached_blocks,
            hint=hint,
            lookup_source=source,
            matches=matches,
            targeted=targeted,
        )

    def _peer_hint(self, decision: RouteDecision, matches: dict[str, int],
                   live: dict[str, WorkerState]) -> tuple[PeerHint, int]:
        """What the chosen worker should know about its peers, and the blocks it is predicted to reuse.

        The router always passes its knowledge on, so the worker never pays a Lookup round trip of its
        own: the peer holding the longest prefix when that is more than the worker's own (the worker
        then decides transfer vs recompute on measured rates), else a hint naming no peer.
        """
        wid = decision.worker_id
        local = matches.get(wid, 0)
        if not self.transfer_hints:
            return PeerHint(NO_PEER, "", 0), local
        peer, peer_len = decision.transfer_from, decision.predicted_cached_blocks if decision.transfer_from else 0
        if peer is None:
            peer, peer_len = _best_peer(matches, exclude={wid})
        state = live.get(peer) if peer is not None else None
        if state is None or not state.transfer_address or peer_len <= local:
            return PeerHint(NO_PEER, "", 0), local
        return PeerHint(peer, state.transfer_address, peer_len), peer_len


NO_PEER = "-"  # a hint naming no node: "no peer holds more than you" (the worker skips its Lookup)


def _best_peer(matches: dict[str, int], exclude: set[str]) -> tuple[str | None, int]:
    best, best_len = None, 0
    for wid in sorted(matches):
        n = matches[wid]
        if wid not in exclude and n > best_len:
            best, best_len = wid, n
    return best, best_len
