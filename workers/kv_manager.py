"""The one door to the block pool: a sequence's blocks, and the cached set as the engine port sees it.

No other code touches the ``BlockPool`` (the engine builds it and hands it here; ``block_io`` and the pin
table go through the methods below). The life of a sequence's blocks (the scheduler's side):

    admit    lookup_prefix -> allocate(seq, n, hits)    hits are touched (ref +1), the rest allocated lazily
    step     allocate(seq, n)                           only the blocks the next n tokens need
    after    cache_full_blocks(seq)                     every block that became full is hashed and published
    end      free(seq)                                  cached blocks go to the LRU queue, others to its head

The prefix hit never covers the whole sequence: at least its last token is computed so that the model
produces the logits the next token is sampled from. Hence the cap ``num_reusable_blocks(num_tokens)`` (cache_service/block_hash.py).

The cache-wide side (lookups for routing hints, held runs for pins and export, one block at a time for
import, events, reset) works on whole cached blocks and never on a sequence.

With tiers under the pool (``workers/lower_tiers.py``: host memory, disk) the pool spills what it evicts into
them, and ``lookup_prefix`` extends the device hit with the blocks that continue it there: it copies them into
fresh device blocks and caches them, exactly like an import, so the scheduler sees ordinary cached blocks.
Counts, the held set and exports then cover every tier.
"""

from __future__ import annotations

from typing import Sequence as Seq

from cache_service.block_hash import BlockHash, hash_prompt_blocks, num_reusable_blocks
from cache_service.block_wire import ExportedBlock
from cache_service.records import BlockEvent, HeldBlock, Tier
from cache_service.engine_port import EvictionAdvisor
from workers.block_pool import Block, BlockPool
from workers.lower_tiers import LowerTiers
from workers.sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVManager:
    def __init__(self, pool: BlockPool, model_id: str, tiers: LowerTiers | None = None) -> None:
        self._pool = pool
        self.block_size = pool.block_size
        self.model_id = model_id
        self.tiers = tiers
        if tiers is not None:
            pool.lower = tiers
            tiers.attach(pool.emit, lambda h: h in pool.cached)

    # ---- hashing ---------------------------------------------------------
    def update_block_hashes(self, seq: Sequence, num_tokens: int | None = None) -> list[BlockHash]:
        """Extend ``seq.block_hashes`` to cover every full block of its first ``num_tokens`` tokens."""
        bs = self.block_size
        n = seq.num_tokens if num_tokens is None else num_tokens
        num_full = n // bs
        have = len(seq.block_hashes)
        if num_full > have:
            start = have * bs
            chunk = seq.token_ids[start : num_full * bs]
            if have:
                seq.block_hashes.extend(hash_prompt_blocks(chunk, bs, self.model_id, parent=seq.block_hashes[-1]))
            else:
                seq.block_hashes.extend(hash_prompt_blocks(chunk, bs, self.model_id, seq.cache_salt))
        return seq.block_hashes

    # ---- admission -------------------------------------------------------
    def lookup_prefix(self, seq: Sequence) -> list[Block]:
        """The cached blocks a (not yet admitted) sequence can reuse; nothing is touched yet."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self._pool.enable_caching:
            return []  # no hit is possible: skip hashing the prompt now
        hashes = self.reusable_hashes(seq)
        hits = self.cached_prefix(hashes, seq.token_ids)
        if self.tiers is None or len(hits) == len(hashes):
            return hits
        loaded = self._load_back(hashes, seq.token_ids, hits)
        if seq.num_cached_tokens is None:  # counted for the first admission only (as the hit itself is)
            seq.num_host_hit_tokens += sum(t is Tier.HOST for t in loaded) * self.block_size
            seq.num_disk_hit_tokens += sum(t is Tier.DISK for t in loaded) * self.block_size
        return self.cached_prefix(hashes, seq.token_ids) if loaded else hits

    def _load_back(self, hashes: list[BlockHash], token_ids: list[int], hits: list[Block]) -> list[Tier]:
        """Copy the blocks that continue ``hits`` in the lower tiers into fresh device blocks and cache them
        (unreferenced, like an import); returns their tiers. Only as many as leave the pool a free block
        beyond the whole hit, so that the load never takes the room the prefill needs next."""
        pool, start = self._pool, len(hits)
        run = self.tiers.find_run(hashes, token_ids, start)
        room = pool.num_free_blocks - sum(1 for b in hits if b.ref_count == 0) - 1
        run = run[: max(0, room)]
        if not run:
            return []
        pool.touch(hits)  # held: the allocations below must not evict the hit they extend
        # Taken out first (host slots reserved, disk payloads read and checked), so that what the allocations
        # push down cannot push them out; one block at a time, so that the slot a load frees takes the next
        # block the pool evicts.
        rising = self.tiers.take(hashes[start : start + len(run)])
        blocks: list[Block] = []
        for i, up in enumerate(rising, start=start):
            new = pool.allocate(1)
            assert new is not None, "room was counted with the hits held"
            self.tiers.load(up, new[0].block_id)
            pool.cache_block(new[0], up.block_hash, up.token_ids, hashes[i - 1] if i else None)
            blocks.extend(new)
        pool.free(hits + blocks)  # last first: the loaded chain's tail is evicted before its head
        return [up.tier for up in rising]

    def reusable_hashes(self, seq: Sequence) -> list[BlockHash]:
        """The hashes of the blocks a hit may cover: all full blocks but one that holds the last token."""
        return self.update_block_hashes(seq)[: num_reusable_blocks(seq.num_tokens, self.block_size)]

    def num_new_blocks(self, seq: Sequence, num_new_tokens: int, num_hits: int = 0) -> int:
        num_computed = seq.num_computed_tokens + num_hits * self.block_size
        return max(0, cdiv(num_computed + num_new_tokens, self.block_size) - len(seq.block_table) - num_hits)

    def max_new_tokens(self, seq: Sequence, hits: list[Block] | None = None) -> int:
        """How many of the sequence's uncomputed tokens fit in its blocks plus the pool's free blocks."""
        hits = hits or []
        num_evictable_hits = sum(1 for b in hits if b.ref_count == 0)
        num_free = self._pool.num_free_blocks - num_evictable_hits
        num_computed = seq.num_computed_tokens + len(hits) * self.block_size
        capacity = (len(seq.block_table) + len(hits) + max(0, num_free)) * self.block_size
        return max(0, min(seq.num_tokens - num_computed, capacity - num_computed))

    def allocate(self, seq: Sequence, num_new_tokens: int, hits: list[Block] | None = None) -> bool:
        """Make room for ``num_new_tokens`` more tokens (taking ``hits`` first). False, and nothing changed, if not."""
        hits = hits or []
        needed = self.num_new_blocks(seq, num_new_tokens, len(hits))
        # A hit nobody references sits in the free queue: touching it takes it out of what allocate can get.
        num_evictable_hits = sum(1 for b in hits if b.ref_count == 0)
        if not self._pool.can_allocate(needed + num_evictable_hits):
            return False
        if hits:
            assert not seq.block_table
            self._pool.touch(hits)
            seq.block_table.extend(hits)
            seq.num_registered_blocks = len(hits)
            seq.num_computed_tokens = len(hits) * self.block_size
        if needed:
            blocks = self._pool.allocate(needed)
            assert blocks is not None
            seq.block_table.extend(blocks)
        return True

    # ---- after a step ------------------------------------------------------
    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register every block whose tokens are now all computed (prompt and generated blocks alike)."""
        bs = self.block_size
        num_full = seq.num_computed_tokens // bs
        start = seq.num_registered_blocks
        if num_full <= start:
            return
        hashes = self.update_block_hashes(seq, num_full * bs)
        for i in range(start, num_full):
            parent = hashes[i - 1] if i else None
            # False when an equal block is already cached (computed concurrently by another sequence):
            # ours then stays a private copy and is recycled as worthless when freed.
            if self._pool.cache_block(seq.block_table[i], hashes[i], seq.token_ids[i * bs : (i + 1) * bs], parent):
                self._on_device_cached(hashes[i])
        seq.num_registered_blocks = num_full

    def _on_device_cached(self, block_hash: BlockHash) -> None:
        if self.tiers is not None:
            self.tiers.on_device_cached(block_hash)  # the host copy is redundant now

    def free(self, seq: Sequence) -> None:
        """Give back the sequence's blocks (its computed full blocks stay cached for later hits)."""
        self._pool.free(seq.block_table)
        seq.block_table = []
        seq.num_registered_blocks = 0
        seq.num_computed_tokens = 0

    # ---- the cached set as a whole: counts ----------------------------------
    @property
    def num_blocks(self) -> int:
        return self._pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can get (free + cached-unreferenced)."""
        return self._pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self._pool.num_used_blocks

    @property
    def num_cached_blocks(self) -> int:
        return self._pool.num_cached_blocks

    def num_cached_prefix_blocks(self, block_hashes: Seq[BlockHash]) -> int:
        """Leading hashes held in any tier, without a token check (a routing hint, not a hit)."""
        n = self._pool.count_cached_prefix(block_hashes)
        if self.tiers is not None and n < len(block_hashes):
            n += self.tiers.count_run(block_hashes[n:])
        return n

    def cached_hashes(self) -> list[BlockHash]:
        """Every block held, in any tier."""
        return [h for h, _ in self.cached_blocks()]

    def cached_blocks(self) -> list[HeldBlock]:
        """Every block held, at its fastest tier: the device pool's, then those only the lower tiers hold."""
        out = [HeldBlock(h, Tier.DEVICE) for h in self._pool.cached_hashes()]
        if self.tiers is not None:
            out.extend(self.tiers.blocks())
        return out

    @property
    def num_host_blocks(self) -> int:
        return self.tiers.num_host_blocks if self.tiers is not None else 0

    @property
    def num_disk_blocks(self) -> int:
        return self.tiers.num_disk_blocks if self.tiers is not None else 0

    # ---- the cached set as a whole: holding and adding blocks ----------------
    def held_run(self, block_hashes: Seq[BlockHash]) -> list[Block]:
        """The leading run of ``block_hashes`` cached now, untouched (export reads it at once)."""
        run: list[Block] = []
        for h in block_hashes:
            block = self._pool.cached.get(h)
            if block is None:
                break
            run.append(block)
        return run

    def cached_prefix(self, block_hashes: Seq[BlockHash], token_ids: Seq[int]) -> list[Block]:
        """The longest token-checked cached run from block 0, untouched."""
        return self._pool.find_cached_prefix(block_hashes, token_ids)

    def hold_prefix(self, block_hashes: Seq[BlockHash], token_ids: Seq[int]) -> list[Block]:
        """Take a reference on ``cached_prefix``'s run (a pin, an import in progress); ``release`` gives it back."""
        blocks = self.cached_prefix(block_hashes, token_ids)
        self._pool.touch(blocks)
        return blocks

    def is_cached(self, block_hash: BlockHash) -> bool:
        return block_hash in self._pool.cached

    def new_block(self) -> Block | None:
        """One held block to write (evicting a cached one if need be); None when every block is in use."""
        blocks = self._pool.allocate(1)
        return blocks[0] if blocks else None

    def publish(self, block: Block, block_hash: BlockHash, token_ids: Seq[int], parent: BlockHash | None) -> None:
        """Register a held block whose K/V was just written under its hash (a ``BlockStored`` event)."""
        if self._pool.cache_block(block, block_hash, token_ids, parent):
            self._on_device_cached(block_hash)

    def export_below(self, block_hashes: Seq[BlockHash]) -> list[ExportedBlock]:
        """The leading run of ``block_hashes`` the lower tiers hold, as payloads (continues ``held_run``)."""
        return self.tiers.export(block_hashes) if self.tiers is not None and block_hashes else []

    def release(self, blocks: Seq[Block]) -> None:
        """Drop the references ``hold_prefix`` / ``new_block`` took (cached blocks stay cached)."""
        self._pool.free(blocks)

    # ---- events, eviction, reset --------------------------------------------
    def drain_events(self) -> list[BlockEvent]:
        return self._pool.drain_events()

    def set_eviction_advisor(self, advisor: EvictionAdvisor | None) -> None:
        self._pool.eviction_advisor = advisor

    def reset_cache(self) -> bool:
        """Forget every cached block, in every tier (disk files deleted); False (nothing done) while any block
        is in use."""
        if not self._pool.reset_cache():
            return False
        if self.tiers is not None:
            self.tiers.clear()  # AllBlocksCleared (the pool's event) covers every tier
        return True

    def evict(self, block_hashes: list[BlockHash]) -> int:
        """Forget these blocks now in every tier (unreferenced ones only on the device; each a BlockRemoved
        event); how many went."""
        n = 0
        for h in block_hashes:
            # The copies below first: the pool's BlockRemoved is then the truth.
            dropped = self.tiers.drop(h) if self.tiers is not None else False
            n += self._pool.evict(h) or (dropped and h not in self._pool.cached)
        return n

    def check_integrity(self) -> None:
        self._pool.check_integrity()
        if self.tiers is not None:
            self.tiers.check_integrity()
