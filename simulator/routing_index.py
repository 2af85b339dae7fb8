"""The simulated router's block index: the router's own ``IndexMirror``, keyed by node index.

The simulator routes with the same index code as the gRPC router (router/index_mirror.py), so what it
reports about routing is what the router would do with the same events:

    node pool --drain_events()--> apply() --> IndexMirror.apply_events   (the feed is instant: no poll lag)
    routing   --note_routed()--> pending entries, confirmed by the node's BlockStored or dropped by its
              BlockRemoved, else gone after the mirror's TTL (simulated seconds; ``expire``)
    lookup    --matches()--> node -> longest held prefix (IndexMirror.lookup, pending entries included)
              --matches_tiers()--> the same, and the tier split of the nodes with some of it on host or
              disk (IndexMirror.lookup_tiers; the nodes' events carry the tiers, see node.py)

What only the simulator needs stays here: ``matches(limit=k)`` (the k deepest holders: with 1000 nodes
routing looks at those plus the least loaded, see cluster.py), ``match_length`` of one node, and read-only
views (``holders``, ``num_entries``, ``is_replicated``) for results and tests. Nodes are the mirror's
worker keys: the mirror only hashes and compares them.
"""

from __future__ import annotations

from operator import itemgetter
from typing import Iterable, Sequence

from cache_service.block_hash import BlockHash
from cache_service.records import BlockEvent, Tier
from cache_service.types import TierCounts
from router.index_mirror import IndexMirror


class SimRoutingIndex:
    def __init__(self, mirror: IndexMirror | None = None) -> None:
        # The router's default pending TTL unless a caller brings its own mirror.
        self.mirror = mirror if mirror is not None else IndexMirror()

    # ---- updates -----------------------------------------------------------------------------------
    def apply(self, node: int, events: Iterable[BlockEvent]) -> None:
        """A node's pool events (``BlockPool.drain_events()``), applied at once."""
        self.mirror.apply_events(node, events)

    def note_routed(self, node: int, block_hashes: Sequence[BlockHash], now: float) -> None:
        """The router sent a request for these blocks to ``node``: they count as held there (pending)."""
        self.mirror.note_routed(node, block_hashes, now)

    def expire(self, now: float) -> None:
        self.mirror.expire(now)

    # ---- queries -----------------------------------------------------------------------------------
    def matches(self, block_hashes: Sequence[BlockHash], limit: int | None = None) -> dict[int, int]:
        """node -> number of leading blocks of ``block_hashes`` it holds or is pending for (0s left out).

        With ``limit``, only the ``limit`` deepest (ties: the mirror's order, i.e. the order in which nodes
        first reported blocks, which is deterministic for a run).
        """
        found = self.mirror.lookup(block_hashes)
        if limit is None or len(found) <= limit:
            return found
        # A stable C-level sort: with hundreds of holders this costs less than heapq.nlargest's Python loop.
        return dict(sorted(found.items(), key=itemgetter(1), reverse=True)[:limit])

    def matches_tiers(self, block_hashes: Sequence[BlockHash], limit: int | None = None
                      ) -> tuple[dict[int, int], dict[int, TierCounts]]:
        """``matches``, and the tier split of the nodes (among those) with some of their prefix below device."""
        found, tiers = self.mirror.lookup_tiers(block_hashes)
        if limit is not None and len(found) > limit:
            found = dict(sorted(found.items(), key=itemgetter(1), reverse=True)[:limit])
            tiers = {n: t for n, t in tiers.items() if n in found}
        return found, tiers

    def tier_counts(self, node: int, block_hashes: Sequence[BlockHash], num_blocks: int) -> TierCounts | None:
        """How ``node``'s first ``num_blocks`` blocks split over its tiers; None when all are on device."""
        if not self.mirror.tiered or not num_blocks:
            return None
        counts = [0, 0, 0]
        tier_of = self.mirror.tier_of
        for h in block_hashes[:num_blocks]:
            counts[tier_of(node, h) or Tier.DEVICE] += 1  # a pending block (None) is computed on device
        return TierCounts(*counts) if counts[1] or counts[2] else None

    def match_length(self, node: int, block_hashes: Sequence[BlockHash]) -> int:
        """Leading blocks of ``block_hashes`` that ``node`` holds or is pending for."""
        held = self.mirror.by_worker.get(node, ())
        pending = self.mirror.pending
        n = 0
        for h in block_hashes:
            if h not in held and node not in pending.get(h, ()):
                break
            n += 1
        return n

    # ---- read-only views ---------------------------------------------------------------------------
    @property
    def holders(self) -> dict[BlockHash, set[int]]:
        """block hash -> nodes really holding it (events applied; pending entries not included)."""
        out: dict[BlockHash, set[int]] = {}
        for node, held in self.mirror.by_worker.items():
            for h in held:
                out.setdefault(h, set()).add(node)
        return out

    @property
    def pending(self) -> dict[BlockHash, dict[int, float]]:
        """block hash -> node -> expiry of the mirror's pending entries."""
        return self.mirror.pending

    @property
    def num_entries(self) -> int:
        """Real (block, node) pairs: the blocks cached in the whole cluster."""
        return sum(len(held) for held in self.mirror.by_worker.values())

    def is_replicated(self, block_hash: BlockHash) -> bool:
        return self.mirror.holders.get(block_hash, 0).bit_count() > 1
