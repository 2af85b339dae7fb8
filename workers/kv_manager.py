"""The narrow manager between sequences and the block pool: prefix lookup, allocation, caching, freeing.

The scheduler speaks only to this class; it never touches blocks itself. The life of a sequence's blocks:

    admit    lookup_prefix -> allocate(seq, n, hits)    hits are touched (ref +1), the rest allocated lazily
    step     allocate(seq, n)                           only the blocks the next n tokens need
    after    cache_full_blocks(seq)                     every block that became full is hashed and published
    end      free(seq)                                  cached blocks go to the LRU queue, others to its head

The prefix hit never covers the whole sequence: at least its last token is computed so that the model
produces the logits the next token is sampled from. Hence the cap ``num_reusable_blocks(num_tokens)`` (cache_service/block_hash.py).
"""

from __future__ import annotations

from cache_service.block_hash import BlockHash, hash_prompt_blocks, num_reusable_blocks
from workers.block_pool import Block, BlockPool
from workers.sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVManager:
    def __init__(self, pool: BlockPool, model_id: str) -> None:
        self.pool = pool
        self.block_size = pool.block_size
        self.model_id = model_id

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
        if not self.pool.enable_caching:
            return []
        max_blocks = num_reusable_blocks(seq.num_tokens, self.block_size)
        hashes = self.update_block_hashes(seq)[:max_blocks]
        return self.pool.find_cached_prefix(hashes, seq.token_ids)

    def num_new_blocks(self, seq: Sequence, num_new_tokens: int, num_hits: int = 0) -> int:
        num_computed = seq.num_computed_tokens + num_hits * self.block_size
        return max(0, cdiv(num_computed + num_new_tokens, self.block_size) - len(seq.block_table) - num_hits)

    def max_new_tokens(self, seq: Sequence, hits: list[Block] | None = None) -> int:
        """How many of the sequence's uncomputed tokens fit in its blocks plus the pool's free blocks."""
        hits = hits or []
        num_evictable_hits = sum(1 for b in hits if b.ref_count == 0)
        num_free = self.pool.num_free_blocks - num_evictable_hits
        num_computed = seq.num_computed_tokens + len(hits) * self.block_size
        capacity = (len(seq.block_table) + len(hits) + max(0, num_free)) * self.block_size
        return max(0, min(seq.num_tokens - num_computed, capacity - num_computed))

    def allocate(self, seq: Sequence, num_new_tokens: int, hits: list[Block] | None = None) -> bool:
        """Make room for ``num_new_tokens`` more tokens (taking ``hits`` first). False, and nothing changed, if not."""
        hits = hits or []
        needed = self.num_new_blocks(seq, num_new_tokens, len(hits))
        # A hit nobody references sits in the free queue: touching it takes it out of what allocate can get.
        num_evictable_hits = sum(1 for b in hits if b.ref_count == 0)
        if not self.pool.can_allocate(needed + num_evictable_hits):
            return False
        if hits:
            assert not seq.block_table
            self.pool.touch(hits)
            seq.block_table.extend(hits)
            seq.num_registered_blocks = len(hits)
            seq.num_computed_tokens = len(hits) * self.block_size
        if needed:
            blocks = self.pool.allocate(needed)
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
            self.pool.cache_block(seq.block_table[i], hashes[i], seq.token_ids[i * bs : (i + 1) * bs], parent)
        seq.num_registered_blocks = num_full

    def free(self, seq: Sequence) -> None:
        """Give back the sequence's blocks (its computed full blocks stay cached for later hits)."""
        self.pool.free(seq.block_table)
        seq.block_table = []
        seq.num_registered_blocks = 0
        seq.num_computed_tokens = 0
