"""The simulator's cluster index: block hash -> nodes holding it, fed by the pools' events.

This is what the real cache service keeps in Redis (DESIGN section 4), minus
the network: every ``BlockStored``/``BlockRemoved`` a node's pool emits is
applied at once, and ``matches`` answers Lookup: per node, the length of the
longest prompt prefix it holds.

Optionally (``add_pending``) the router's own bookkeeping joins in: blocks of
requests it routed whose prefill has not finished count as held by their
node until the real events arrive. Without it a burst of requests sharing a
new prefix all arrive before anyone has computed it and get no affinity
(SGLang's router inserts into its tree at routing time for this reason).
"""

from __future__ import annotations

import itertools
from typing import Iterable, Sequence

from cache_service.block_hash import BlockHash
from cache_service.records import AllBlocksCleared, BlockEvent, BlockRemoved, BlockStored


class ClusterIndex:
    def __init__(self) -> None:
        self.holders: dict[BlockHash, set[int]] = {}
        self.num_entries = 0  # real (block, node) pairs: total blocks cached in the cluster
        # (hash, node) -> [routed requests counting on it, whether the node really holds it]
        self.pending: dict[tuple[BlockHash, int], list] = {}

    def apply(self, node: int, events: Iterable[BlockEvent]) -> None:
        holders = self.holders
        pending = self.pending
        for ev in events:
            if type(ev) is BlockStored:
                h = ev.block_hash
                p = pending.get((h, node)) if pending else None
                if p is not None:
                    if not p[1]:
                        p[1] = True
                        self.num_entries += 1
                    continue  # already in holders
                s = holders.get(h)
                if s is None:
                    holders[h] = {node}
                    self.num_entries += 1
                elif node not in s:
                    s.add(node)
                    self.num_entries += 1
            elif type(ev) is BlockRemoved:
                h = ev.block_hash
                p = pending.get((h, node)) if pending else None
                if p is not None:
                    if p[1]:
                        p[1] = False
                        self.num_entries -= 1
                    continue  # still expected there
                s = holders.get(h)
                if s is not None and node in s:
                    s.discard(node)
                    self.num_entries -= 1
                    if not s:
                        del holders[h]
            elif type(ev) is AllBlocksCleared:
                for h in [h for h, s in holders.items() if node in s]:
                    self.apply(node, [BlockRemoved(h)])

    def add_pending(self, node: int, block_hashes: Sequence[BlockHash]) -> None:
        """The router sent a request for these blocks to ``node``: count them as held there."""
        holders, pending = self.holders, self.pending
        for h in block_hashes:
            p = pending.get((h, node))
            if p is not None:
                p[0] += 1
                continue
            s = holders.get(h)
            if s is None:
                holders[h] = {node}
                pending[(h, node)] = [1, False]
            else:
                pending[(h, node)] = [1, node in s]
                s.add(node)

    def release_pending(self, node: int, block_hashes: Sequence[BlockHash]) -> None:
        """That request's prefill finished (its real events are applied) or it was dropped."""
        holders, pending = self.holders, self.pending
        for h in block_hashes:
            key = (h, node)
            p = pending[key]
            p[0] -= 1
            if p[0]:
                continue
            del pending[key]
            if not p[1]:
                s = holders[h]
                s.discard(node)
                if not s:
                    del holders[h]

    def matches(self, block_hashes: Sequence[BlockHash], limit: int | None = None) -> dict[int, int]:
        """node -> number of leading blocks of ``block_hashes`` it holds (nodes with 0 left out).

        With ``limit``, only (at least) the ``limit`` deepest holders are reported
        (ties at the cut broken by set order): the work is then proportional to
        the holders of the deeper blocks, never to the number of nodes, even
        when a system prompt's first block is held by every node.
        """
        holders = self.holders
        if not block_hashes:
            return {}
        current = holders.get(block_hashes[0])
        if not current:
            return {}
        # Each time the holder set shrinks, remember (length, before, after): the nodes in
        # before - after hold exactly ``length`` blocks. Sets are never copied or iterated here.
        levels: list[tuple[int, set[int], set[int]]] = []
        num_blocks = len(block_hashes)
        i = 1
        while i < num_blocks:
            s = holders.get(block_hashes[i])
            if not s:
                break
            if len(current) == 1:
                if not current <= s:
                    break
            else:
                inter = current & s
                if len(inter) < len(current):
                    levels.append((i, current, inter))
                    current = inter
                    if not current:
                        break
            i += 1
        if limit is not None and len(current) > limit:
            # all tie at length i (e.g. a system prompt every node holds): any `limit` of them
            out = dict.fromkeys(itertools.islice(current, limit), i)
        else:
            out = dict.fromkeys(current, i)
        for length, before, after in reversed(levels):
            if limit is not None and len(out) >= limit:
                break
            for node in before:
                if node not in after:
                    out[node] = length
                    if limit is not None and len(out) >= limit:
                        break
        return out

    def match_length(self, node: int, block_hashes: Sequence[BlockHash]) -> int:
        """Leading blocks of ``block_hashes`` that ``node`` holds."""
        holders = self.holders
        n = 0
        for h in block_hashes:
            s = holders.get(h)
            if s is None or node not in s:
                break
            n += 1
        return n

    def is_replicated(self, block_hash: BlockHash) -> bool:
        s = self.holders.get(block_hash)
        return s is not None and len(s) > 1
