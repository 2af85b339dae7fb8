"""Block pool: ref counts, token-checked hits, exact LRU eviction order, events."""

import random

import pytest

from cache_service.block_hash import hash_prompt_blocks
from cache_service.records import AllBlocksCleared, BlockRemoved, BlockStored
from workers.block_pool import BlockPool

BS = 4


def fill(pool, tokens, model="m"):
    """Allocate, 'write' and cache blocks for tokens like a finished prefill would."""
    hashes = hash_prompt_blocks(tokens, BS, model)
    blocks = pool.allocate(len(hashes))
    assert blocks is not None
    parent = None
    for i, (b, h) in enumerate(zip(blocks, hashes)):
        pool.cache_block(b, h, tokens[i * BS:(i + 1) * BS], parent)
        parent = h
    return blocks, hashes


def test_allocate_free_and_integrity():
    pool = BlockPool(8, BS)
    blocks = pool.allocate(3)
    assert [b.block_id for b in blocks] == [0, 1, 2]
    assert pool.num_free_blocks == 5 and pool.num_used_blocks == 3
    assert pool.allocate(6) is None  # check, then mutate: nothing taken
    assert pool.num_free_blocks == 5
    pool.check_integrity()
    pool.free(blocks)
    assert pool.num_free_blocks == 8
    pool.check_integrity()
    with pytest.raises(AssertionError, match="double free"):
        pool.free(blocks[:1])


def test_hits_are_token_checked():
    pool = BlockPool(8, BS)
    tokens = list(range(12))
    blocks, hashes = fill(pool, tokens)
    pool.free(blocks)
    hits = pool.find_cached_prefix(hashes, tokens)
    assert [b.block_id for b in hits] == [0, 1, 2]
    # A forged collision: same hashes, different tokens in block 1 -> only block 0 hits.
    forged = tokens[:4] + [99, 99, 99, 99] + tokens[8:]
    assert [b.block_id for b in pool.find_cached_prefix(hashes, forged)] == [0]
    assert pool.count_cached_prefix(hashes) == 3


def test_touch_takes_hits_out_of_the_free_queue():
    pool = BlockPool(4, BS)
    blocks, hashes = fill(pool, list(range(8)))
    pool.free(blocks)
    assert pool.num_free_blocks == 4 and pool.num_cached_blocks == 2
    hits = pool.find_cached_prefix(hashes, list(range(8)))
    pool.touch(hits)
    assert pool.num_free_blocks == 2
    # Allocating everything left must not evict the referenced hits.
    rest = pool.allocate(2)
    assert pool.num_cached_blocks == 2 and pool.allocate(1) is None
    pool.free(rest)
    pool.free(hits)
    pool.check_integrity()


def test_exact_eviction_order():
    pool = BlockPool(6, BS)
    a, ha = fill(pool, list(range(0, 12)))      # blocks 0,1,2: chain A
    b, hb = fill(pool, list(range(100, 112)))   # blocks 3,4,5: chain B
    pool.free(a)  # freed tail-first: queue = [2, 1, 0]
    pool.free(b)  # queue = [2, 1, 0, 5, 4, 3]
    pool.drain_events()
    got = pool.allocate(4)
    # Uncached blocks would go first; all are cached, so LRU order, chain tails first.
    assert [blk.block_id for blk in got] == [2, 1, 0, 5]
    assert pool.drain_events() == [BlockRemoved(ha[2]), BlockRemoved(ha[1]), BlockRemoved(ha[0]),
                                   BlockRemoved(hb[2])]
    assert pool.count_cached_prefix(hb) == 2  # B's head survives its tail
    pool.free(got)  # uncached now: each goes to the head, walked last-first -> [2, 1, 0, 5, 4, 3]
    assert [blk.block_id for blk in pool.allocate(2)] == [2, 1]
    pool.check_integrity()


def test_hit_moves_block_to_most_recent():
    pool = BlockPool(4, BS)
    a, ha = fill(pool, list(range(4)))
    b, hb = fill(pool, list(range(50, 54)))
    pool.free(a)
    pool.free(b)  # queue = [2, 3 (never used), a0, b0]
    hit = pool.find_cached_prefix(ha, list(range(4)))
    pool.touch(hit)
    pool.free(hit)  # a is now most recent
    order = [blk.block_id for blk in pool.allocate(4)]
    assert order == [2, 3, b[0].block_id, a[0].block_id]


def test_events_and_duplicates():
    pool = BlockPool(8, BS)
    blocks, hashes = fill(pool, list(range(8)))
    ev = pool.drain_events()
    assert ev == [BlockStored(hashes[0], None, tuple(range(4)), 0),
                  BlockStored(hashes[1], hashes[0], tuple(range(4, 8)), 1)]
    # A second sequence computing the same block: not cached twice, freed as worthless.
    dup = pool.allocate(1)[0]
    assert not pool.cache_block(dup, hashes[0], list(range(4)), None)
    pool.free([dup])
    assert pool.drain_events() == []
    pool.free(blocks)
    assert pool.evict(hashes[1])
    assert pool.drain_events() == [BlockRemoved(hashes[1])]
    assert pool.reset_cache()
    assert pool.drain_events() == [AllBlocksCleared()]
    pool.check_integrity()


class Replicated:
    def __init__(self, hashes):
        self.hashes = set(hashes)

    def is_replicated(self, h):
        return h in self.hashes


def test_cluster_advisor_prefers_replicated_victims():
    a_tokens, b_tokens = list(range(4)), list(range(10, 14))
    advisor = Replicated(hash_prompt_blocks(b_tokens, BS, "m"))
    pool = BlockPool(2, BS, eviction_advisor=advisor)
    a, ha = fill(pool, a_tokens)
    b, hb = fill(pool, b_tokens)
    pool.free(a)
    pool.free(b)  # LRU would evict a first, but a is the cluster's last copy
    got = pool.allocate(1)
    assert got[0].block_id == b[0].block_id
    assert pool.count_cached_prefix(ha) == 1 and pool.count_cached_prefix(hb) == 0


def test_random_operations_keep_integrity():
    rng = random.Random(0)
    pool = BlockPool(32, BS)
    live = []
    for step in range(2000):
        if live and rng.random() < 0.45:
            pool.free(live.pop(rng.randrange(len(live))))
        else:
            prefix = rng.randrange(5)
            tokens = [prefix] * 4 + [rng.randrange(3) for _ in range(rng.randrange(0, 12))]
            hashes = hash_prompt_blocks(tokens, BS, "m")
            hits = pool.find_cached_prefix(hashes, tokens)
            pool.touch(hits)
            new = pool.allocate(len(hashes) - len(hits))
            if new is None:
                pool.free(hits)
                continue
            parent = hits[-1].block_hash if hits else None
            for i, blk in enumerate(new, start=len(hits)):
                pool.cache_block(blk, hashes[i], tokens[i * BS:(i + 1) * BS], parent)
                parent = hashes[i]
            live.append(hits + new)
        if step % 97 == 0:
            pool.check_integrity()
    pool.check_integrity()
