"""A local mirror of the cluster block index: block hash -> workers that hold it.

Routing must not pay a Redis round trip per request, so the router keeps its own copy of "who holds
what", fed by the block events each worker hands back with its load poll (``registry.py``):

    worker pool --events--> worker feed buffer --poll--> apply_events() --> holders[hash] = {workers}

A worker whose feed the router lost track of (first contact, buffer overflow, worker restart) sends
its whole cached set instead and ``replace_worker`` swaps it in. Between polls the mirror lags; so
that a burst of requests sharing a new prefix does not scatter, ``note_routed`` records the blocks a
request will leave on its worker as *pending* entries that count for routing until confirmed by an
event or until they expire (a request that failed never stores them).

Pure data structure: no Ray, no gRPC, no clock (callers pass ``now``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from cache_service.block_hash import BlockHash
from cache_service.records import AllBlocksCleared, BlockEvent, BlockRemoved, BlockStored

WorkerId = str


@dataclass(slots=True)
class IndexMirror:
    """Holders are bit masks over worker slots: no per-block set objects (memory, and no garbage-collector
    pauses that grow with the index), and a lookup step is one AND of two ints."""

    pending_ttl_s: float = 10.0
    holders: dict[BlockHash, int] = field(default_factory=dict)  # hash -> bit mask of worker slots
    by_worker: dict[WorkerId, set[BlockHash]] = field(default_factory=dict)
    pending: dict[BlockHash, dict[WorkerId, float]] = field(default_factory=dict)  # hash -> worker -> expiry
    pending_mask: dict[BlockHash, int] = field(default_factory=dict)
    _pending_order: deque = field(default_factory=deque)  # (expiry, worker, hash), expiry non-decreasing
    _slot: dict[WorkerId, int] = field(default_factory=dict)
    _slot_worker: list[WorkerId] = field(default_factory=list)

    def _bit(self, worker: WorkerId) -> int:
        slot = self._slot.get(worker)
        if slot is None:
            slot = self._slot[worker] = len(self._slot_worker)
            self._slot_worker.append(worker)
        return 1 << slot

    # ---- updates from worker feeds -----------------------------------------
    def apply_events(self, worker: WorkerId, events: Iterable[BlockEvent]) -> None:
        held = self.by_worker.setdefault(worker, set())
        bit = self._bit(worker)
        holders = self.holders
        for ev in events:
            if isinstance(ev, BlockStored):
                h = ev.block_hash
                if h not in held:
                    held.add(h)
                    holders[h] = holders.get(h, 0) | bit
                if h in self.pending:
                    self._drop_pending(h, worker)
            elif isinstance(ev, BlockRemoved):
                h = ev.block_hash
                if h in held:
                    held.discard(h)
                    self._drop_holder(h, bit)
                if h in self.pending:
                    self._drop_pending(h, worker)
            elif isinstance(ev, AllBlocksCleared):
                self.drop_worker(worker)
                held = self.by_worker.setdefault(worker, set())
            else:
                raise ValueError(f"not a block event: {ev!r}")

    def replace_worker(self, worker: WorkerId, hashes: Iterable[BlockHash]) -> None:
        """A full snapshot of the worker's cached blocks replaces what we knew."""
        self.drop_worker(worker, keep_pending=True)
        held = set(hashes)
        self.by_worker[worker] = held
        bit = self._bit(worker)
        holders = self.holders
        for h in held:
            holders[h] = holders.get(h, 0) | bit

    def drop_worker(self, worker: WorkerId, keep_pending: bool = False) -> None:
        bit = self._bit(worker)
        for h in self.by_worker.pop(worker, ()):
            self._drop_holder(h, bit)
        if not keep_pending:
            for h in [h for h, ws in self.pending.items() if worker in ws]:
                self._drop_pending(h, worker)

    def _drop_holder(self, h: BlockHash, bit: int) -> None:
        mask = self.holders.get(h, 0) & ~bit
        if mask:
            self.holders[h] = mask
        else:
            self.holders.pop(h, None)

    # ---- optimistic entries ---------------------------------------------------
    def note_routed(self, worker: WorkerId, hashes: Sequence[BlockHash], now: float) -> None:
        """The request just sent to ``worker`` will cache these blocks there (soon)."""
        expiry = now + self.pending_ttl_s
        held = self.by_worker.get(worker, ())
        bit = self._bit(worker)
        for h in hashes:
            if h in held:
                continue
            self.pending.setdefault(h, {})[worker] = expiry
            self.pending_mask[h] = self.pending_mask.get(h, 0) | bit
            self._pending_order.append((expiry, worker, h))

    def expire(self, now: float) -> None:
        order = self._pending_order
        while order and order[0][0] <= now:
            expiry, worker, h = order.popleft()
            ws = self.pending.get(h)
            # A later note_routed may have extended this entry: only the newest expiry counts.
            if ws is not None and ws.get(worker) == expiry:
                self._drop_pending(h, worker)

    def _drop_pending(self, h: BlockHash, worker: WorkerId) -> None:
        ws = self.pending.get(h)
        if ws is None or ws.pop(worker, None) is None:
            return
        if ws:
            self.pending_mask[h] &= ~self._bit(worker)
        else:
            del self.pending[h]
            del self.pending_mask[h]

    # ---- queries --------------------------------------------------------------
    def lookup(self, hashes: Sequence[BlockHash], include_pending: bool = True) -> dict[WorkerId, int]:
        """Per worker, the length of the longest prefix of ``hashes`` it holds (workers with >= 1)."""
        matches: dict[WorkerId, int] = {}
        holders = self.holders
        pmask = self.pending_mask if include_pending and self.pending_mask else None
        names = self._slot_worker
        alive = 0  # workers matching every block so far
        num_done = 0
        for i, h in enumerate(hashes):
            here = holders.get(h, 0)
            if pmask is not None:
                here |= pmask.get(h, 0)
            if i == 0:
                alive = here
            else:
                lost = alive & ~here
                if lost:
                    _put(matches, names, lost, i)
                    alive &= here
            if not alive:
                return matches
            num_done = i + 1
        _put(matches, names, alive, num_done)
        return matches

    def num_blocks(self, worker: WorkerId) -> int:
        return len(self.by_worker.get(worker, ()))

    def check_integrity(self) -> None:
        for w, held in self.by_worker.items():
            bit = self._bit(w)
            for h in held:
                assert self.holders.get(h, 0) & bit, f"{w} holds {h.hex()} but holders disagree"
        for h, mask in self.holders.items():
            assert mask, f"empty holder mask for {h.hex()}"
            for slot, w in enumerate(self._slot_worker):
                if mask >> slot & 1:
                    assert h in self.by_worker.get(w, ()), f"holders lists {w} for {h.hex()} but it does not hold it"
        for h, ws in self.pending.items():
            assert ws, f"empty pending set for {h.hex()}"
            assert self.pending_mask[h] == sum(self._bit(w) for w in ws)
        assert set(self.pending_mask) == set(self.pending)


def _put(matches: dict[WorkerId, int], names: list[WorkerId], mask: int, length: int) -> None:
    while mask:
        low = mask & -mask
        matches[names[low.bit_length() - 1]] = length
        mask ^= low
