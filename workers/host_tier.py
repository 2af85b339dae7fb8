"""The host tier: a fixed number of host-memory block slots under the device pool, in LRU order.

A slot holds one block's bytes exactly as the device pool stores them (the KV dtype, no conversion), laid out
like the block wire format's data (``[layers, 2, block_size, kv_heads, head_dim]``, C-contiguous), so a slot
is also a ready payload for a disk file or a peer:

    slab      uint8 [num_slots, layers, 2, block_size, kv_heads, head_dim * element_size]   one allocation
    entries   block hash -> HostEntry(slot, token_ids)      OrderedDict: least recently used first
    free      slots holding nothing
    taken     slots whose entry left the index but whose bytes are still being read (a load back, a spill
              down to disk): not reusable until ``release``

    num_slots == len(entries) + len(free) + len(taken)        (check_integrity)

Copies between the device pool and the slab go through ``DeviceCopies``: on CPU a plain copy; on CUDA the slab
is pinned and copies are asynchronous. A spill first gathers the block on the current (decode) stream into a
private device buffer, so the pool may overwrite the block in the next forward, then copies that buffer to the
slot on a side stream; a load back copies the slot to the device block on the current stream, so the forward
that reads it is ordered after it. A slot with a copy in flight carries a CUDA event, waited on before the
slot is read on the host or overwritten. The host never blocks on a spill until it needs that slot's bytes.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator

import torch

from cache_service.block_hash import BlockHash
from workers.model.kv_cache import KVCache


@dataclass(slots=True)
class HostEntry:
    slot: int
    token_ids: tuple[int, ...]


class DeviceCopies:
    """Whole blocks between a KV cache (any device, any dtype: moved as bytes) and host tensors."""

    def __init__(self, kv_cache: KVCache) -> None:
        t = kv_cache.tensor
        # A byte view of the whole cache: [layers, 2, num_blocks, block_size, kv_heads, head_dim * elem]. Copying
        # bytes moves any KV dtype unchanged (float32, bfloat16, fp8 alike).
        self._bytes = t.view(torch.uint8)
        self.block_shape = (t.shape[0], t.shape[1], *self._bytes.shape[3:])
        self.device = t.device
        self.is_cuda = t.device.type == "cuda"
        self._stream = torch.cuda.Stream(t.device) if self.is_cuda else None

    def empty(self, n: int) -> torch.Tensor:
        """``n`` host block buffers (pinned on CUDA, so that copies to and from them are asynchronous)."""
        return torch.empty((n, *self.block_shape), dtype=torch.uint8, pin_memory=self.is_cuda)

    def to_host(self, block_id: int, dst: torch.Tensor) -> torch.cuda.Event | None:
        """Copy device block ``block_id`` into host buffer ``dst``; on CUDA returns the event that marks the end."""
        src = self._bytes[:, :, block_id]
        if not self.is_cuda:
            dst.copy_(src)
            return None
        staged = src.contiguous()  # on the decode stream: later writes to the block come after this read
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            dst.copy_(staged, non_blocking=True)
            staged.record_stream(stream)  # keep the allocator from reusing the buffer before the copy ran
            done = torch.cuda.Event()
            done.record(stream)
        return done

    @torch.inference_mode()  # the cache may have been created in inference mode (in-place writes need it then)
    def to_device(self, src: torch.Tensor, block_id: int) -> torch.cuda.Event | None:
        """Copy host buffer ``src`` into device block ``block_id`` (on the current stream, before any forward
        that reads it); on CUDA returns the event after which ``src`` may be overwritten."""
        self._bytes[:, :, block_id].copy_(src, non_blocking=self.is_cuda)
        if not self.is_cuda:
            return None
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        return done

    def read(self, block_id: int) -> torch.Tensor:
        """A host copy of one device block's bytes (synchronous: the spill straight to disk)."""
        return self._bytes[:, :, block_id].to("cpu", copy=True).contiguous()


class HostTier:
    def __init__(self, num_slots: int, copies: DeviceCopies) -> None:
        if num_slots < 1:
            raise ValueError(f"the host tier needs at least one slot, got {num_slots}")
        self.num_slots = num_slots
        self.copies = copies
        self._slab = copies.empty(num_slots)
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
        self._note(slot, self.copies.to_host(block_id, self._slab[slot]))
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
    def data(self, slot: int) -> torch.Tensor:
        """A slot's bytes on the host (waits for its spill to land)."""
        self._wait(slot)
        return self._slab[slot]

    def load(self, slot: int, block_id: int) -> None:
        """Copy a slot back into device block ``block_id``."""
        self._wait(slot)
        self._note(slot, self.copies.to_device(self._slab[slot], block_id))

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
