"""vLLM's KV cache events -> canonical block events: the index holds exactly what vLLM holds, under our hashes.

    vLLM BlockStored(block_hashes, parent_block_hash, token_ids, block_size, extra_keys, ...)
        -> per block: canonical = hash_block(canonical(parent), tokens)   (a chain's first block: the root of
           its salt, resolved by workers/vllm_roots.py) -> BlockStored(canonical, parent, tokens)
    vLLM BlockRemoved(block_hashes)  -> BlockRemoved(canonical) once vLLM holds no copy any more
    vLLM AllBlocksCleared            -> AllBlocksCleared

The translator keeps the map ``vllm hash -> (canonical hash, copies)`` of the blocks vLLM holds. Why copies:
vLLM does not de-duplicate its cache (two requests that fill the same block at once each get a physical block
with the same hash, NOTE #1 of vLLM's ``BlockHashToBlockMap``), and it publishes one BlockStored and, later, one
BlockRemoved per physical block. Our index names a block by its hash alone, so it leaves the index when the
last copy is removed, not the first.

What is not translated is dropped, never guessed (the index may miss a block vLLM holds; it must never claim
one vLLM does not hold): a block of another size (vLLM's partial-prefix entries of hybrid models), another
medium than the device pool (an offloading tier), a LoRA adapter, extra keys other than a salt, a chain whose
parent we do not know (dropped, or stored before we subscribed), a root whose salt is ambiguous.

Bounded: the map holds at most ``capacity`` vLLM hashes (the pool's size is the natural bound; the cap only
guards against a publisher that never removes). Past it the oldest entry is forgotten *and removed from the
index*, keeping the rule above. Pure: no vLLM, no threads (the subscriber calls it under its lock).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Hashable, NamedTuple, Sequence

from cache_service.block_hash import BlockHash, hash_block, root_hash
from cache_service.records import AllBlocksCleared, BlockEvent, BlockRemoved, BlockStored
from workers.vllm_roots import UNKNOWN_SALT, RootSalts, salt_of_extra_keys

__all__ = ["VllmBlockStored", "VllmBlockRemoved", "VllmAllBlocksCleared", "VllmEvent", "VllmEventTranslator"]

# vLLM's medium names for its device pool (None: a publisher that does not say).
DEVICE_MEDIA = (None, "GPU")


class VllmBlockStored(NamedTuple):
    """vLLM's ``BlockStored``, the fields we read (``workers/vllm_kv_subscriber.py`` converts)."""

    block_hashes: list[Hashable]
    parent_block_hash: Hashable | None
    token_ids: list[int]
    block_size: int
    extra_keys: list[Any] | None = None
    medium: str | None = None
    lora_name: str | None = None


class VllmBlockRemoved(NamedTuple):
    block_hashes: list[Hashable]
    medium: str | None = None


class VllmAllBlocksCleared(NamedTuple):
    pass


VllmEvent = VllmBlockStored | VllmBlockRemoved | VllmAllBlocksCleared


@dataclass(slots=True)
class _Held:
    canonical: BlockHash
    copies: int


class VllmEventTranslator:
    def __init__(self, model_id: str, block_size: int, roots: RootSalts, capacity: int = 1 << 20) -> None:
        self.model_id = model_id
        self.block_size = block_size
        self.roots = roots
        self.capacity = capacity
        self._held: OrderedDict[Hashable, _Held] = OrderedDict()  # vllm hash -> what it maps to
        self._canonical: dict[BlockHash, int] = {}  # canonical hash -> vllm hashes mapped to it
        self.num_dropped_blocks = 0  # stored blocks we could not translate
        # Canonical hashes stored lately (held or not any more), newest last: a finishing request waits for
        # its blocks' store events (workers/vllm_store_watch.py), and one stored and already evicted again
        # must not keep it waiting.
        self._recent: OrderedDict[BlockHash, None] = OrderedDict()
        self.recent_capacity = 1 << 16

    # ---- queries --------------------------------------------------------------------------------------
    def cached_hashes(self) -> list[BlockHash]:
        """The canonical hashes of every block vLLM holds that we could translate (a feed snapshot)."""
        return list(self._canonical)

    def holds(self, canonical: BlockHash) -> bool:
        return canonical in self._canonical

    def holds_vllm(self, vllm_hash: Hashable) -> bool:
        return vllm_hash in self._held

    def was_stored(self, canonical: BlockHash) -> bool:
        """Held now, or stored lately (see ``_recent``)."""
        return canonical in self._canonical or canonical in self._recent

    @property
    def num_vllm_blocks(self) -> int:
        """Distinct vLLM hashes held (translated ones only)."""
        return len(self._held)

    # ---- translation ------------------------------------------------------------------------------------
    def translate(self, events: Sequence[VllmEvent]) -> list[BlockEvent]:
        out: list[BlockEvent] = []
        for ev in events:
            if isinstance(ev, VllmBlockStored):
                self._stored(ev, out)
            elif isinstance(ev, VllmBlockRemoved):
                if ev.medium in DEVICE_MEDIA:
                    for vh in ev.block_hashes:
                        self._release(vh, out)
            elif isinstance(ev, VllmAllBlocksCleared):
                self._held.clear()
                self._canonical.clear()
                out.append(AllBlocksCleared())
        return out

    def _stored(self, ev: VllmBlockStored, out: list[BlockEvent]) -> None:
        bs = self.block_size
        n = len(ev.block_hashes)
        if (ev.block_size != bs or ev.medium not in DEVICE_MEDIA or ev.lora_name is not None
                or len(ev.token_ids) != n * bs):
            self.num_dropped_blocks += n
            return
        parent: BlockHash | None = None
        if ev.parent_block_hash is not None:
            entry = self._held.get(ev.parent_block_hash)
            if entry is None:  # a parent we dropped or never saw: its chain cannot be rooted
                self.num_dropped_blocks += n
                return
            parent = entry.canonical
        for i, vh in enumerate(ev.block_hashes):
            tokens = ev.token_ids[i * bs:(i + 1) * bs]
            salt = salt_of_extra_keys(ev.extra_keys, i)
            if parent is None:
                resolved = self.roots.resolve(tokens, salt, vh)
                if resolved is None:
                    self.num_dropped_blocks += n - i
                    return
                canonical = hash_block(root_hash(self.model_id, resolved), tokens)
            elif salt is not UNKNOWN_SALT and salt != "":
                # Below the root vLLM mixes no salt in: any extra key here (LoRA, multimodal) is not ours.
                self.num_dropped_blocks += n - i
                return
            else:
                canonical = hash_block(parent, tokens)
            self._store(vh, canonical, parent, tuple(tokens), out)
            parent = canonical

    def _store(self, vh: Hashable, canonical: BlockHash, parent: BlockHash | None, tokens: tuple[int, ...],
               out: list[BlockEvent]) -> None:
        self._recent[canonical] = None
        self._recent.move_to_end(canonical)
        if len(self._recent) > self.recent_capacity:
            self._recent.popitem(last=False)
        entry = self._held.get(vh)
        if entry is not None:  # another physical copy of a block vLLM holds already
            entry.copies += 1
            return
        if len(self._held) >= self.capacity:
            old_vh, old = next(iter(self._held.items()))
            old.copies = 1
            self._release(old_vh, out)
        self._held[vh] = _Held(canonical, 1)
        refs = self._canonical.get(canonical, 0)
        self._canonical[canonical] = refs + 1
        if refs == 0:
            out.append(BlockStored(canonical, parent, tokens))

    def _release(self, vh: Hashable, out: list[BlockEvent]) -> None:
        entry = self._held.get(vh)
        if entry is None:  # a block we dropped (or forgot): the index never had it
            return
        entry.copies -= 1
        if entry.copies > 0:
            return
        del self._held[vh]
        refs = self._canonical[entry.canonical] - 1
        if refs:
            self._canonical[entry.canonical] = refs
        else:
            del self._canonical[entry.canonical]
            out.append(BlockRemoved(entry.canonical))
