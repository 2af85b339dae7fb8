"""The block pool's view of the cluster: which of our blocks another node also holds.

``BlockPool`` asks ``is_replicated(h)`` while picking an eviction victim,
inside ``allocate`` on the engine's thread, so the answer must be a local
dictionary read, never a Redis round trip. The mirror is fed, off the hot
path, by what the node learns anyway:

- a Lookup answer (node X holds the prompt's first n blocks),
- a fetch from a peer (the peer holds what it sent us),
- an export to a peer (the requester holds what we sent it).

Entries age out after ``ttl_s`` (a peer may evict its copy without telling
us) and the mirror is bounded (oldest entries go first). A stale "yes" only
makes us evict a block that turns out to be the last copy: a later request
recomputes it; it can never produce a wrong answer.

Tiers: a copy in another node's host or disk tier is a copy. A Lookup answer
counts a node's prefix in every tier, and that is what is marked: losing our
copy then costs the cluster a load from that tier plus a transfer, never a
recompute, which is what "prefer the blocks with copies elsewhere" is for.
Pins are the exception that needs no entry here: a pinned block is held
(referenced) on its holders, so it stays on device there and is never a
victim.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Iterable

from cache_service.block_hash import BlockHash


class ReplicaMirror:
    def __init__(self, ttl_s: float = 60.0, capacity: int = 1 << 20) -> None:
        self.ttl_s = ttl_s
        self.capacity = capacity
        self._lock = threading.Lock()  # fed from the asyncio thread, read from the engine thread
        self._expiry: OrderedDict[BlockHash, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._expiry)

    def mark_replicated(self, hashes: Iterable[BlockHash], now: float | None = None) -> None:
        expiry = (time.monotonic() if now is None else now) + self.ttl_s
        with self._lock:
            for h in hashes:
                self._expiry[h] = expiry
                self._expiry.move_to_end(h)
            while len(self._expiry) > self.capacity:
                self._expiry.popitem(last=False)

    def forget(self, hashes: Iterable[BlockHash]) -> None:
        with self._lock:
            for h in hashes:
                self._expiry.pop(h, None)

    def is_replicated(self, block_hash: BlockHash) -> bool:
        """``EvictionAdvisor``: True when another node is known to hold ``block_hash``."""
        expiry = self._expiry.get(block_hash)  # a dict read: no lock on the allocation path
        return expiry is not None and expiry > time.monotonic()

    def prune(self, now: float | None = None) -> int:
        """Drop expired entries; returns how many."""
        now = time.monotonic() if now is None else now
        num = 0
        with self._lock:
            while self._expiry:
                h, expiry = next(iter(self._expiry.items()))
                if expiry > now:
                    break  # insertion order == expiry order (same ttl, moved to end on refresh)
                self._expiry.popitem(last=False)
                num += 1
        return num
