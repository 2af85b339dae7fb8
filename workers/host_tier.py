"""The host tier: a fixed number of host-memory block slots under the device pool, in LRU order.

A slot holds one block's bytes exactly as the device pool stores them (the KV dtype, no conversion), laid out
like the block wire format's data (``[layers, 2, block_size, kv_heads, head_dim]``, C-contiguous, then for an
fp8 cache its float32 scales ``[layers, 2, block_size, kv_heads]``), so a slot is also a ready payload for a
disk file or a peer:

    slabs     uint8 [num_slots, <one block of a part>] per part of the cache (values; scales for fp8)
    entries   block hash -> HostEntry(slot, token_ids)      OrderedDict: least recently used first
    free      slots holding nothing
    taken     slots whose entry left the index but whose bytes are still being read (a load back, a spill
              down to disk): not reusable until ``release``

    num_slots == len(entries) + len(free) + len(taken)        (check_integrity)

Copies between the device pool and the slabs go through ``DeviceCopies``: on CPU a plain copy; on CUDA the
slabs are pinned and copies are asynchronous. A spill first gathers the block on the current (decode) stream
into a private device buffer, so the pool may overwrite the block in the next forward, then copies that buffer
to the slot on a side stream; a load back copies the slot to the device block on the current stream, so the
forward that reads it is ordered after it. A slot with a copy in flight carries a CUDA event, waited on before
the slot is read on the host or overwritten. The host never blocks on a spill until it needs that slot's bytes.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator

import torch

from cache_service.block_hash import BlockHash
from workers.model.kv_cache import KVCache

BlockBytes = list[torch.Tensor]  # one host tensor per part of the cache (values, then fp8 scales)


@dataclass(slots=True)
class HostEntry:
    slot: int
    token_ids: tuple[int, ...]


class DeviceCopies:
    """Whole blocks between a KV cache (any device, any KV dtype: moved as bytes) and host tensors."""

    def __init__(self, kv_cache: KVCache) -> None:
        # Byte views of the cache's parts: [layers, 2, num_blocks, block_size, ...]. Copying bytes moves any KV
        # dtype unchanged; an fp8 cache's per-slot scales are a second part, in the wire format's order.
        tensors = [kv_cache.tensor] + ([kv_cache.scales] if kv_cache.scales is not None else [])
        self._parts = [t.view(torch.uint8) for t in tensors]
        self.block_shapes = [(p.shape[0], p.shape[1], *p.shape[3:]) for p in self._parts]
        self.device = kv_cache.tensor.device
        self.is_cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self.is_cuda else None

    def empty(self, n: int) -> BlockBytes:
        """``n`` host block buffers per part (pinned on CUDA, so that copies to and from them are asynchronous)."""
        return [torch.empty((n, *shape), dtype=torch.uint8, pin_memory=self.is_cuda) for shape in self.block_shapes]

    def to_host(self, block_id: int, dst: BlockBytes) -> torch.cuda.Event | None:
        """Copy device block ``block_id`` into host buffers ``dst``; on CUDA returns the event that marks the end."""
        if not self.is_cuda:
            for part, d in zip(self._parts, dst):
                d.copy_(part[:, :, block_id])
            return None
        staged = [part[:, :, block_id].contiguous() for part in self._parts]  # on the decode stream: later
        stream = self._stream                                                  # writes come after this read
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for d, src in zip(dst, staged):
                d.copy_(src, non_blocking=True)
                src.record_stream(stream)  # keep the allocator from reusing the buffer before the copy ran
            done = torch.cuda.Event()
            done.record(stream)
        return done

    @torch.inference_mode()  # the cache may have been created in inference mode (in-place writes need it then)
    def to_device(self, src: BlockBytes, block_id: int) -> torch.cuda.Event | None:
        """Copy host buffers ``src`` into device block ``block_id`` (on the current stream, before any forward
        that reads it); on CUDA returns the event after which ``src`` may be overwritten."""
        for part, s in zip(self._parts, src):
            part[:, :, block_id].copy_(s, non_blocking=self.is_cuda)
        if not self.is_cuda:
            return None
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        return done

    def read(self, block_id: int) -> BlockBytes:
        """A host copy of one device block's bytes (synchronous: the spill straight to disk)."""
        return [part[:, :, block_id].to("cpu", copy=True).contiguous() for part in self._parts]

    def split(self, data: bytes | memoryview) -> BlockBytes:
        """A block's wire data (values, then scales) as host tensors shaped like ``empty``'s."""
        out, offset = [], 0
        buf = bytearray(data)  # one copy: torch wants a writable buffer
        for shape in self.block_shapes:
            n = 1
            for d in shape:
                n *= d
            out.append(torch.frombuffer(buf, dtype=torch.uint8, count=n, offset=offset).view(shape))
            offset += n
        assert offset == len(buf), f"block data is {len(buf)} bytes, the cache's blocks {offset}"
        return out


class HostTier:
    def __init__(self, num_slots: int, copies: DeviceCopies) -> None:
        if num_slots < 1:
            raise ValueError(f"the host tier needs at least one slot, got {num_slots}")
        self.num_slots = num_slots
        self.copies = copies
        self._slabs = copies.empty(num_slots)
        self.entries: OrderedDict[BlockHash, HostEntry] = OrderedDict()
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._taken: set[int] = set()
        self._in_flight: dict[int, torch.cuda.Event] = {}  # slot -> its last asynchronous copy (CUDA)

    # ---- queries ---------------------------------------------------------
    def __contains__(self, block_hash: BlockHash) -> bool:
        return block_hash in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, block_hash: BlockHash) -> HostEntry | None:
        return self.entries.get(block_hash)

    @property
    def has_free_slot(self) -> bool:
        return bool(self._free)

    def lru(self) -> BlockHash | None:
        """The least recently used block (the next to move down), None when the index is empty."""
        return next(iter(self.entries), None)

    def hashes(self) -> Iterator[BlockHash]:
        return iter(self.entries)

    # ---- mutations -------------------------------------------------------
    def store(self, block_hash: BlockHash, token_ids: tuple[int, ...], block_id: int) -> None:
        """Copy device block ``block_id`` into a free slot as the most recent entry (the caller made room)."""
        assert block_hash not in self.entries, f"{block_hash.hex()} is already in the host tier"
        slot = self._free.pop()
        self._wait(slot)  # a load back may still be reading the slot's previous bytes
        self._note(slot, self.copies.to_host(block_id, self._slot(slot)))
        self.entries[block_hash] = HostEntry(slot, token_ids)

    def touch(self, block_hash: BlockHash) -> None:
        self.entries.move_to_end(block_hash)

    def take(self, block_hash: BlockHash) -> HostEntry:
        """Take an entry out of the index, keeping its slot (and bytes) until ``release``."""
        entry = self.entries.pop(block_hash)
        self._taken.add(entry.slot)
        return entry

    def release(self, slot: int) -> None:
        self._taken.remove(slot)
        self._free.append(slot)

    def discard(self, block_hash: BlockHash) -> bool:
        entry = self.entries.pop(block_hash, None)
        if entry is None:
            return False
        self._free.append(entry.slot)
        return True

    def clear(self) -> None:
        for entry in self.entries.values():
            self._free.append(entry.slot)
        self.entries.clear()

    # ---- the bytes -------------------------------------------------------
    def _slot(self, slot: int) -> BlockBytes:
        return [slab[slot] for slab in self._slabs]

    def data(self, slot: int) -> BlockBytes:
        """A slot's bytes on the host, per part (waits for its spill to land)."""
        self._wait(slot)
        return self._slot(slot)

    def load(self, slot: int, block_id: int) -> None:
        """Copy a slot back into device block ``block_id``."""
        self._wait(slot)
        self._note(slot, self.copies.to_device(self._slot(slot), block_id))

    def _note(self, slot: int, event: torch.cuda.Event | None) -> None:
        if event is not None:
            self._in_flight[slot] = event

    def _wait(self, slot: int) -> None:
        event = self._in_flight.pop(slot, None)
        if event is not None:
            event.synchronize()

    # ---- invariants ------------------------------------------------------
    def check_integrity(self) -> None:
        held = [e.slot for e in self.entries.values()]
        slots = held + self._free + list(self._taken)
        assert len(slots) == self.num_slots and set(slots) == set(range(self.num_slots)), \
            "host slots: entries + free + taken != all, or a slot is counted twice"
