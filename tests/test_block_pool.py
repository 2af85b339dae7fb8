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


# ---- tiers under the pool: device -> host -> disk -> gone, one event stream -------------------------------
def tiered_pool(tmp_path, num_blocks=2, host_slots=2, disk_files=2):
    """A 2-block pool over a tiny real KV cache (1 layer, 1 KV head, head_dim 2: 64 bytes a block), with a
    host tier of ``host_slots`` and a disk tier that holds exactly ``disk_files`` files, wired as the
    KVManager wires them."""
    import dataclasses

    import torch

    from cache_service.block_wire import encode_payload
    from workers.disk_tier import DiskTier, encode_file
    from workers.host_tier import DeviceCopies, HostTier
    from workers.lower_tiers import LowerTiers
    from workers.model.demo import demo_config
    from workers.model.kv_cache import KVCache

    cfg = dataclasses.replace(demo_config(), num_layers=1, num_kv_heads=1, head_dim=2)
    cache = KVCache(cfg, num_blocks, BS, torch.float32, "cpu")
    copies = DeviceCopies(cache)
    file_nbytes = len(encode_file(tuple(range(BS)), encode_payload("m", bytes(16), "float32", cache.block_shape,
                                                                     bytes(cache.block_nbytes()))))
    disk = DiskTier(tmp_path, disk_files * file_nbytes, model_id="m", dtype="float32", block_shape=cache.block_shape)
    tiers = LowerTiers("m", copies, dtype="float32", block_shape=cache.block_shape,
                       host=HostTier(host_slots, copies) if host_slots else None, disk=disk)
    pool = BlockPool(num_blocks, BS, lower=tiers)
    tiers.attach(pool.emit, lambda h: h in pool.cached)
    return pool, tiers, cache


def fill_with_data(pool, cache, tokens, value):
    """``fill``, with every K/V element of the chain's block i set to ``value + i`` (to follow the bytes)."""
    import torch

    blocks, hashes = fill(pool, tokens)
    for i, b in enumerate(blocks):
        cache.write_block(b.block_id, torch.full(cache.block_shape, float(value + i)))
    return blocks, hashes


def toks(start):
    return tuple(range(start, start + BS))


def test_evicted_blocks_go_device_host_disk_then_gone_with_exact_events(tmp_path):
    from cache_service.records import HeldBlock, Tier

    pool, tiers, cache = tiered_pool(tmp_path, disk_files=4)
    assert pool.drain_events() == []  # an empty disk folder announces nothing
    a, ha = fill_with_data(pool, cache, list(range(0, 8)), 10)
    pool.free(a)  # queue = [1, 0]: chain tails first
    assert pool.drain_events() == [BlockStored(ha[0], None, toks(0), 0), BlockStored(ha[1], ha[0], toks(4), 1)]

    # B takes both blocks: A's go to host memory (tail first), not away (and through to disk: files).
    b, hb = fill_with_data(pool, cache, list(range(100, 108)), 20)
    assert [blk.block_id for blk in b] == [1, 0]
    assert pool.drain_events() == [
        BlockStored(ha[1], None, toks(4), None, Tier.HOST), BlockStored(ha[0], None, toks(0), None, Tier.HOST),
        BlockStored(hb[0], None, toks(100), 1), BlockStored(hb[1], hb[0], toks(104), 0)]
    assert pool.num_evicted == 2 and list(tiers.host.hashes()) == [ha[1], ha[0]]

    # C: B's blocks need the host slots, so A's (least recently used first) move on to disk.
    pool.free(b)
    c, hc = fill_with_data(pool, cache, list(range(200, 208)), 30)
    assert pool.drain_events() == [
        BlockStored(ha[1], None, toks(4), None, Tier.DISK), BlockStored(hb[1], None, toks(104), None, Tier.HOST),
        BlockStored(ha[0], None, toks(0), None, Tier.DISK), BlockStored(hb[0], None, toks(100), None, Tier.HOST),
        BlockStored(hc[0], None, toks(200), 0), BlockStored(hc[1], hc[0], toks(204), 1)]

    # D: C to host, B to disk, and C's files take the places of A's (4 files, least recently used first):
    # A is gone from every tier.
    pool.free(c)
    d, hd = fill_with_data(pool, cache, list(range(300, 308)), 40)
    assert pool.drain_events() == [
        BlockStored(hb[1], None, toks(104), None, Tier.DISK), BlockRemoved(ha[1]),
        BlockStored(hc[1], None, toks(204), None, Tier.HOST),
        BlockStored(hb[0], None, toks(100), None, Tier.DISK), BlockRemoved(ha[0]),
        BlockStored(hc[0], None, toks(200), None, Tier.HOST),
        BlockStored(hd[0], None, toks(300), 1), BlockStored(hd[1], hd[0], toks(304), 0)]
    assert sorted(pool.cached.values(), key=lambda blk: blk.block_id) == sorted(d, key=lambda blk: blk.block_id)
    assert tiers.blocks() == [HeldBlock(hc[1], Tier.HOST), HeldBlock(hc[0], Tier.HOST),
                              HeldBlock(hb[1], Tier.DISK), HeldBlock(hb[0], Tier.DISK)]
    assert sorted(p.name for p in tiers.disk.directory.iterdir()) == sorted(f"{h.hex()}.kvb" for h in hb + hc)

    # The bytes travelled unchanged: C's in host slots, B's in checked disk payloads.
    import torch

    from cache_service.block_wire import check_payload
    for i, h in enumerate(hc):
        (host_bytes,) = tiers.host.data(tiers.host.get(h).slot)  # one part: values (no fp8 scales)
        assert torch.equal(host_bytes.view(torch.float32).reshape(cache.block_shape),
                           torch.full(cache.block_shape, 30.0 + i))
    for i, h in enumerate(hb):
        raw = check_payload(tiers.disk.read(h), model_id="m", dtype="float32", shape=cache.block_shape, block_hash=h)
        assert torch.equal(torch.frombuffer(bytearray(raw), dtype=torch.float32).reshape(cache.block_shape),
                           torch.full(cache.block_shape, 20.0 + i))
    pool.free(d)
    pool.check_integrity()
    tiers.check_integrity()


def test_without_a_host_tier_evicted_blocks_go_straight_to_disk(tmp_path):
    from cache_service.records import Tier

    pool, tiers, cache = tiered_pool(tmp_path, host_slots=0, disk_files=3)
    a, ha = fill_with_data(pool, cache, list(range(0, 8)), 10)
    pool.free(a)
    pool.drain_events()
    b, hb = fill_with_data(pool, cache, list(range(100, 108)), 20)
    assert pool.drain_events()[:2] == [BlockStored(ha[1], None, toks(4), None, Tier.DISK),
                                       BlockStored(ha[0], None, toks(0), None, Tier.DISK)]
    pool.free(b)
    fill_with_data(pool, cache, list(range(200, 208)), 30)  # 4 files for 3 places: A's oldest goes
    assert pool.drain_events()[:3] == [BlockStored(hb[1], None, toks(104), None, Tier.DISK),
                                       BlockRemoved(ha[1]), BlockStored(hb[0], None, toks(100), None, Tier.DISK)]
    pool.check_integrity()
    tiers.check_integrity()


class RecordingTier:
    """A LowerTier that records what the pool hands it, and what the pool's hash map says meanwhile."""

    def __init__(self, pool):
        self.pool = pool
        self.calls = []

    def spill(self, evicted):
        self.calls.append([(e.block_hash, e.token_ids, e.block_id, e.block_hash in self.pool.cached)
                           for e in evicted])


def test_the_pool_hands_every_victim_of_one_allocation_to_the_tier_below_at_once():
    pool = BlockPool(4, BS)
    tier = RecordingTier(pool)
    pool.lower = tier
    a, ha = fill(pool, list(range(0, 8)))  # blocks 0, 1; 2 and 3 never used
    pool.free(a)  # queue = [2, 3, 1, 0]
    pool.drain_events()
    got = pool.allocate(3)  # two unhashed blocks first, then a's tail
    assert [b.block_id for b in got] == [2, 3, 1]
    # One call per allocation, in eviction order, each victim already out of the hash map; the pool
    # itself emits nothing for it (the tier below says where it went).
    assert tier.calls == [[(ha[1], toks(4), 1, False)]]
    assert pool.drain_events() == [] and pool.num_evicted == 1
    assert pool.allocate(0) == [] and tier.calls == [[(ha[1], toks(4), 1, False)]]
    pool.free(got)
    pool.check_integrity()
