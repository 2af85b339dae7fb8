"""A local mirror of the cluster block index: block hash -> workers that hold it.

Routing must not pay a Redis round trip per request, so the router keeps its own copy of "who holds
what", fed by the block events each worker hands back with its load poll (``registry.py``):

    worker pool --events--> worker feed buffer --poll--> apply_events() --> holders[hash] = {workers}

A worker whose feed the router lost track of (first contact, buffer overflow, worker restart) sends
its whole cached set instead and ``replace_worker`` swaps it in. Between polls the mirror lags; so
that a burst of requests sharing a new prefix does not scatter, ``note_routed`` records the blocks a
request will leave on its worker as *pending* entries that count for routing until confirmed by an
event or until they expire (a request that failed never stores them).

Tiers: a worker holds a block at one tier, its fastest (``records.Tier``: device, host, disk); a
``BlockStored`` with another tier moves it there, ``BlockRemoved`` means no tier holds it. ``holders``
counts every tier (a host copy is still a prefix hit, only a dearer one), and ``tiered`` keeps, for the
blocks that some worker holds below device, which workers hold them on host and on disk. Both queries
are one walk (``_walk``): ``lookup`` (lengths only) skips the tiers, and ``lookup_tiers`` (the router's)
pays one extra dict probe per block only while some block is below device anywhere (16 workers, prompts
of 256-512 blocks: ~27 us either way without lower tiers; ~55-70 us when a third to all of the prompt's
blocks are on host somewhere). Pending entries count as device: the routed request computes them into
the worker's pool.

Pure data structure: no Ray, no gRPC, no clock (callers pass ``now``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from cache_service.block_hash import BlockHash
from cache_service.records import AllBlocksCleared, BlockEvent, BlockRemoved, BlockStored, Tier
from cache_service.types import TierCounts

WorkerId = str
# A snapshot entry: a hash (held on device, what a worker without tiers sends), a (hash, tier) pair, or
# the BlockStored event that would store it.
SnapshotEntry = BlockHash | tuple[BlockHash, Tier] | BlockStored
_HOST, _DISK = 0, 1  # positions in a ``tiered`` entry


@dataclass(slots=True)
class IndexMirror:
    """Holders are bit masks over worker slots: no per-block set objects (memory, and no garbage-collector
    pauses that grow with the index), and a lookup step is one AND of two ints."""

    pending_ttl_s: float = 10.0
    holders: dict[BlockHash, int] = field(default_factory=dict)  # hash -> bit mask of worker slots (any tier)
    # hash -> [host mask, disk mask]: only blocks some worker holds below device (module doc)
    tiered: dict[BlockHash, list[int]] = field(default_factory=dict)
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
                if ev.tier or h in self.tiered:  # a device block nobody holds lower: nothing to do
                    self._set_tier(h, bit, ev.tier)
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

    def replace_worker(self, worker: WorkerId, entries: Iterable[SnapshotEntry]) -> None:
        """A full snapshot of the worker's cached blocks replaces what we knew (a bare hash: on device)."""
        self.drop_worker(worker, keep_pending=True)
        held: set[BlockHash] = set()
        self.by_worker[worker] = held
        bit = self._bit(worker)
        holders = self.holders
        for entry in entries:
            if isinstance(entry, bytes):
                h, tier = entry, Tier.DEVICE
            elif isinstance(entry, BlockStored):
                h, tier = entry.block_hash, entry.tier
            else:
                h, tier = entry
            if h not in held:
                held.add(h)
                holders[h] = holders.get(h, 0) | bit
            if tier or h in self.tiered:
                self._set_tier(h, bit, tier)

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
        if h in self.tiered:
            self._set_tier(h, bit, Tier.DEVICE)

    def _set_tier(self, h: BlockHash, bit: int, tier: Tier) -> None:
        """The worker of ``bit`` holds ``h`` at ``tier`` now (DEVICE also clears it from ``tiered``)."""
        entry = self.tiered.get(h)
        if entry is None:
            if tier == Tier.DEVICE:
                return
            entry = self.tiered[h] = [0, 0]
        entry[_HOST] &= ~bit
        entry[_DISK] &= ~bit
        if tier == Tier.HOST:
            entry[_HOST] |= bit
        elif tier == Tier.DISK:
            entry[_DISK] |= bit
        elif tier != Tier.DEVICE:
            raise ValueError(f"unknown tier {tier!r}")
        if not (entry[_HOST] | entry[_DISK]):
            del self.tiered[h]

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
        return self._walk(hashes, include_pending, None)[0]

    def lookup_tiers(self, hashes: Sequence[BlockHash], include_pending: bool = True
                     ) -> tuple[dict[WorkerId, int], dict[WorkerId, TierCounts]]:
        """``lookup``'s lengths, and how each worker's prefix splits over its tiers: only the workers with
        some of it below device are in the second dict (the others hold all of it on device)."""
        return self._walk(hashes, include_pending, self.tiered or None)

    def _walk(self, hashes: Sequence[BlockHash], include_pending: bool, tiered: dict[BlockHash, list[int]] | None
              ) -> tuple[dict[WorkerId, int], dict[WorkerId, TierCounts]]:
        """The one walk of a prompt's chain: ``alive`` is the mask of the workers holding every block so far,
        one AND per block; a worker leaves it at the length of its prefix. With ``tiered`` it also counts each
        worker's host and disk blocks along its prefix."""
        matches: dict[WorkerId, int] = {}
        holders = self.holders
        pmask = self.pending_mask if include_pending and self.pending_mask else None
        names = self._slot_worker
        # Per-worker counts of host and disk blocks, bit-sliced: bit w of host[j] is bit j of worker w's count,
        # so adding to every worker of a mask costs the same for one worker as for all. And they are added a
        # run at a time: a chain's blocks sit in runs on one tier (its tail is evicted first), so a block
        # costs one probe and a compare; a run ends where its (tier masks & alive) change, so a worker that
        # drops out is counted up to its own length only.
        host: list[int] = []
        disk: list[int] = []
        run_host = run_disk = 0  # the current run's masks (within alive), and where it started
        run_start = 0
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
                break
            if tiered is not None:
                entry = tiered.get(h)
                if entry is None:
                    if run_host | run_disk:
                        _add(host, run_host, i - run_start)
                        _add(disk, run_disk, i - run_start)
                        run_host = run_disk = 0
                else:
                    eh = entry[0] & alive  # [_HOST], [_DISK]: literal indices, this is the hot loop
                    ed = entry[1] & alive
                    if eh != run_host or ed != run_disk:
                        if run_host | run_disk:
                            _add(host, run_host, i - run_start)
                            _add(disk, run_disk, i - run_start)
                        run_host, run_disk, run_start = eh, ed, i
            num_done = i + 1
        _put(matches, names, alive, num_done)  # alive is 0 after a break
        if tiered is None:
            return matches, {}
        if run_host | run_disk:
            _add(host, run_host, num_done - run_start)
            _add(disk, run_disk, num_done - run_start)
        tiers: dict[WorkerId, TierCounts] = {}
        below = 0
        for s in host:
            below |= s
        for s in disk:
            below |= s
        while below:
            low = below & -below
            slot = low.bit_length() - 1
            w = names[slot]
            num_host, num_disk = _count(host, slot), _count(disk, slot)
            tiers[w] = TierCounts(matches[w] - num_host - num_disk, num_host, num_disk)
            below ^= low
        return matches, tiers

    def tier_of(self, worker: WorkerId, h: BlockHash) -> Tier | None:
        """The tier ``worker`` holds ``h`` at (events applied), or None when it does not hold it."""
        if h not in self.by_worker.get(worker, ()):
            return None
        entry = self.tiered.get(h)
        bit = self._bit(worker)
        if entry is not None and entry[_HOST] & bit:
            return Tier.HOST
        if entry is not None and entry[_DISK] & bit:
            return Tier.DISK
        return Tier.DEVICE

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
        for h, entry in self.tiered.items():
            assert entry[_HOST] | entry[_DISK], f"empty tier entry for {h.hex()}"
            assert not entry[_HOST] & entry[_DISK], f"a worker holds {h.hex()} on host and on disk"
            assert (entry[_HOST] | entry[_DISK]) & ~self.holders.get(h, 0) == 0, \
                f"a tier entry of {h.hex()} names a worker that does not hold it"
        for h, ws in self.pending.items():
            assert ws, f"empty pending set for {h.hex()}"
            assert self.pending_mask[h] == sum(self._bit(w) for w in ws)
        assert set(self.pending_mask) == set(self.pending)


def _put(matches: dict[WorkerId, int], names: list[WorkerId], mask: int, length: int) -> None:
    while mask:
        low = mask & -mask
        matches[names[low.bit_length() - 1]] = length
        mask ^= low


def _add(slices: list[int], mask: int, k: int) -> None:
    """Add ``k`` to the bit-sliced count of every worker in ``mask`` (slice j holds bit j of each count): a
    ripple-carry add, one step per bit of ``k`` plus the carries."""
    if not mask:
        return
    j = 0
    carry = 0
    while k or carry:
        if j == len(slices):
            slices.append(0)
        s = slices[j]
        b = mask if k & 1 else 0
        slices[j] = s ^ b ^ carry
        carry = (s & b) | (carry & (s ^ b))
        k >>= 1
        j += 1


def _count(slices: list[int], slot: int) -> int:
    return sum(((s >> slot) & 1) << j for j, s in enumerate(slices))
