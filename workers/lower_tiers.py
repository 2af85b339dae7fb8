"""The tiers under the device pool, host memory then disk: where an evicted block goes, where a hit below the
pool comes from, and the events that say so.

    device pool --evicted by allocate--> host tier --its LRU--> disk tier --its LRU (bytes)--> gone
        ^                                    |                      |
        +------- loaded back at admission ---+----------------------+      (kv_manager.lookup_prefix)

Host memory and the device pool are exclusive: a block loaded back leaves the host tier, and a block the
device caches otherwise (computed, imported) drops its host copy, so the two add up. The disk is inclusive and
written through: a block leaving the device pool is also written to disk the first time (later trips only
touch its file), so when the host tier lets it go it is already there, and a crash or a restart keeps every
block that ever left the device pool, the heads of chains included (those leave the pool last and would reach
the disk last of all). A block loaded back keeps its file. Without a host tier, blocks evicted from the pool
go straight to disk.

Events (one stream, the pool's ``emit``): whenever the fastest tier holding a block changes because of
something here, ``BlockStored(h, tier=HOST | DISK)`` or ``BlockRemoved(h)``; nothing while the device pool
holds the block (its own ``BlockStored(tier=DEVICE)`` stands). At start-up every block found on disk is
announced as ``BlockStored(h, tier=DISK)``.

Every method runs on the engine's thread. The K/V of a block moves as bytes in the KV dtype (host slots and
disk payloads alike: ``workers/host_tier.py``), so a block that went down and came back is bit-identical.
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple, Sequence

import torch

from cache_service.block_hash import BlockHash
from cache_service.block_wire import ExportedBlock, encode_payload, read_header
from cache_service.records import BlockEvent, BlockRemoved, BlockStored, HeldBlock, Tier
from workers.block_pool import Evicted
from workers.disk_tier import DiskTier
from workers.host_tier import BlockBytes, DeviceCopies, HostTier
from workers.model.kv_cache import KVCache

GIB = 1 << 30


class Rising(NamedTuple):
    """A block on its way back into the device pool: a host slot taken out of the index, or a checked payload
    read from disk (so that nothing the loading evicts meanwhile can take it away)."""

    block_hash: BlockHash
    token_ids: tuple[int, ...]
    tier: Tier
    slot: int | None = None  # HOST
    payload: bytes | None = None  # DISK


def _as_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.reshape(-1).numpy())


def _payload(model_id: str, h: BlockHash, dtype: str, shape: tuple[int, ...], data: BlockBytes) -> bytes:
    """One block as a block-wire payload: its values, and an fp8 cache's scales section."""
    if len(data) == 1:
        return encode_payload(model_id, h, dtype, shape, _as_bytes(data[0]))
    return encode_payload(model_id, h, dtype, shape, bytes(_as_bytes(data[0])), bytes(_as_bytes(data[1])))


class LowerTiers:
    def __init__(self, model_id: str, copies: DeviceCopies, *, dtype: str, block_shape: tuple[int, ...],
                 host: HostTier | None = None, disk: DiskTier | None = None) -> None:
        self.model_id = model_id
        self.copies = copies
        self.dtype = dtype  # the KV dtype's name, as block payloads carry it
        self.block_shape = tuple(block_shape)  # [layers, 2, block_size, kv_heads, head_dim]
        self.host = host
        self.disk = disk
        self._emit: Callable[[BlockEvent], None] = lambda event: None
        self._on_device: Callable[[BlockHash], bool] = lambda h: False

    @classmethod
    def for_cache(cls, kv_cache: KVCache, model_id: str, *, host_cache_gb: float = 0.0,
                  disk_cache_dir: str | os.PathLike | None = None, disk_cache_gb: float = 16.0,
                  disk_fsync: bool = False) -> LowerTiers | None:
        """The tiers an engine was configured with (None: neither)."""
        copies = DeviceCopies(kv_cache)
        num_slots = int(host_cache_gb * GIB) // kv_cache.block_nbytes()
        host = HostTier(num_slots, copies) if num_slots > 0 else None
        dtype = kv_cache.dtype_name  # the storage dtype, as payloads name it (float8_e4m3fn for fp8)
        disk = None
        if disk_cache_dir is not None:
            disk = DiskTier(disk_cache_dir, int(disk_cache_gb * GIB), model_id=model_id, dtype=dtype,
                            block_shape=kv_cache.block_shape, fsync=disk_fsync)
        if host is None and disk is None:
            return None
        return cls(model_id, copies, dtype=dtype, block_shape=kv_cache.block_shape, host=host, disk=disk)

    def attach(self, emit: Callable[[BlockEvent], None], on_device: Callable[[BlockHash], bool]) -> None:
        """Join the pool's event stream; announce what the disk already holds (a restart with the same folder)."""
        self._emit, self._on_device = emit, on_device
        if self.disk is not None:
            for h in self.disk.hashes():
                self._announce(h)

    # ---- down: the pool's hook -----------------------------------------------------------------------
    def spill(self, evicted: Sequence[Evicted]) -> None:
        """Blocks the device pool is reusing: into host memory (making room by moving its LRU down) and
        through to disk; gone when neither takes it; one event each (the fastest tier that took it)."""
        for e in evicted:
            h = e.block_hash
            if self.host is not None and self._host_room():
                self.host.store(h, e.token_ids, e.block_id)
                data = lambda: self.host.data(self.host.get(h).slot)  # noqa: E731 - read now, below
            else:
                data = lambda: self.copies.read(e.block_id)  # noqa: E731
            if self.disk is not None:
                self._to_disk(h, e.token_ids, data, touch=True)
            self._announce(h)

    def _host_room(self) -> bool:
        """A free host slot, moving least recently used blocks down to disk (or dropping them) for it."""
        host = self.host
        while not host.has_free_slot:
            victim = host.lru()
            if victim is None:
                return False  # every slot is being read back right now
            entry = host.take(victim)
            if self.disk is not None:  # usually written through already; not if the disk let it go since
                self._to_disk(victim, entry.token_ids, lambda: host.data(entry.slot), touch=False)
            host.release(entry.slot)
            self._announce(victim)
        return True

    def _to_disk(self, h: BlockHash, token_ids: tuple[int, ...], data: Callable[[], BlockBytes], *,
                 touch: bool) -> None:
        if h in self.disk:
            if touch:  # it was just used on the device: the most recent file now; nothing to write
                self.disk.touch(h)
            return
        payload = _payload(self.model_id, h, self.dtype, self.block_shape, data())
        for gone in self.disk.put(h, token_ids, payload):
            self._announce(gone)

    def _announce(self, h: BlockHash) -> None:
        """Emit where ``h`` is now, unless the device pool holds it (its own event stands)."""
        if self._on_device(h):
            return
        entry = self.host.get(h) if self.host is not None else None
        if entry is not None:
            self._emit(BlockStored(h, None, entry.token_ids, None, Tier.HOST))
            return
        on_disk = self.disk.get(h) if self.disk is not None else None
        if on_disk is not None:
            self._emit(BlockStored(h, None, on_disk.token_ids, None, Tier.DISK))
        else:
            self._emit(BlockRemoved(h))

    # ---- up: hits below the pool ------------------------------------------------------------------------
    def tier_of(self, h: BlockHash) -> Tier | None:
        if self.host is not None and h in self.host:
            return Tier.HOST
        if self.disk is not None and h in self.disk:
            return Tier.DISK
        return None

    def find_run(self, block_hashes: Sequence[BlockHash], token_ids: Sequence[int], start: int) -> list[Tier]:
        """The tiers of the token-checked run of ``block_hashes[start:]`` held here (stops at the first miss)."""
        bs = self.block_shape[2]
        run: list[Tier] = []
        for i in range(start, len(block_hashes)):
            h = block_hashes[i]
            want = tuple(token_ids[i * bs : (i + 1) * bs])
            entry = self.host.get(h) if self.host is not None else None
            if entry is None and self.disk is not None:
                entry = self.disk.get(h)
            if entry is None or entry.token_ids != want or self._on_device(h):
                break
            run.append(self.tier_of(h))
        return run

    def count_run(self, block_hashes: Sequence[BlockHash]) -> int:
        """Leading hashes held here (no token check: a routing hint)."""
        n = 0
        for h in block_hashes:
            if self.tier_of(h) is None:
                break
            n += 1
        return n

    def take(self, block_hashes: Sequence[BlockHash]) -> list[Rising]:
        """Take these blocks (a run ``find_run`` found) out for loading back, in order; stops before a disk
        file that fails its checks (deleted, announced): the block is recomputed."""
        out: list[Rising] = []
        for h in block_hashes:
            if self.host is not None and h in self.host:
                entry = self.host.take(h)
                out.append(Rising(h, entry.token_ids, Tier.HOST, slot=entry.slot))
                continue
            entry = self.disk.get(h)
            payload = self.disk.read(h)
            if payload is None:
                self._announce(h)
                break
            out.append(Rising(h, entry.token_ids, Tier.DISK, payload=payload))
        return out

    def load(self, block: Rising, block_id: int) -> None:
        """Copy a taken block into device block ``block_id`` (the caller caches it there: BlockStored DEVICE)."""
        if block.tier is Tier.HOST:
            self.host.load(block.slot, block_id)
            self.host.release(block.slot)  # its copy in flight (CUDA) is waited for before the slot is reused
            return
        offset = read_header(block.payload).data_offset
        self.copies.to_device(self.copies.split(memoryview(block.payload)[offset:]), block_id)

    # ---- peers ------------------------------------------------------------------------------------------
    def export(self, block_hashes: Sequence[BlockHash]) -> list[ExportedBlock]:
        """The leading run of ``block_hashes`` held here, as payloads (host first, then disk; a disk file that
        fails its checks ends the run: never served)."""
        out: list[ExportedBlock] = []
        for h in block_hashes:
            entry = self.host.get(h) if self.host is not None else None
            if entry is not None:
                self.host.touch(h)
                payload = _payload(self.model_id, h, self.dtype, self.block_shape, self.host.data(entry.slot))
                out.append(ExportedBlock(h, entry.token_ids, payload))
                continue
            on_disk = self.disk.get(h) if self.disk is not None else None
            payload = self.disk.read(h) if on_disk is not None else None
            if payload is None:
                if on_disk is not None:
                    self._announce(h)
                break
            out.append(ExportedBlock(h, on_disk.token_ids, payload))
        return out

    # ---- the held set -----------------------------------------------------------------------------------
    def blocks(self) -> list[HeldBlock]:
        """Blocks held here and not on the device, at their fastest tier."""
        out = []
        if self.host is not None:
            out.extend(HeldBlock(h, Tier.HOST) for h in self.host.hashes() if not self._on_device(h))
        if self.disk is not None:
            out.extend(HeldBlock(h, Tier.DISK) for h in self.disk.hashes()
                       if not self._on_device(h) and (self.host is None or h not in self.host))
        return out

    @property
    def num_host_blocks(self) -> int:
        return len(self.host) if self.host is not None else 0

    @property
    def num_disk_blocks(self) -> int:
        return len(self.disk) if self.disk is not None else 0

    def on_device_cached(self, h: BlockHash) -> None:
        """The device pool cached ``h`` (computed or imported): its host copy is redundant (silently: the
        pool's BlockStored DEVICE says where it is); a disk file stays."""
        if self.host is not None:
            self.host.discard(h)

    def drop(self, h: BlockHash) -> bool:
        """Forget ``h`` in every tier here (announced: removed, unless the device holds it)."""
        dropped = self.host is not None and self.host.discard(h)
        dropped = (self.disk is not None and self.disk.discard(h)) or dropped
        if dropped:
            self._announce(h)
        return dropped

    def clear(self) -> None:
        """Forget everything, deleting the disk files (the caller emits AllBlocksCleared)."""
        if self.host is not None:
            self.host.clear()
        if self.disk is not None:
            self.disk.clear()

    def check_integrity(self) -> None:
        if self.host is not None:
            self.host.check_integrity()
            for h in self.host.hashes():
                assert not self._on_device(h), f"{h.hex()} is both in the device pool and in the host tier"
        if self.disk is not None:
            self.disk.check_integrity()
