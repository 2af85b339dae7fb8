"""IndexMirror: the router's local hash -> holders map, fed by worker block events."""

from __future__ import annotations

from cache_service.block_hash import hash_prompt_blocks
from cache_service.records import AllBlocksCleared, BlockRemoved, BlockStored, Tier
from cache_service.types import TierCounts
from router.index_mirror import IndexMirror

BS = 4


def chain(tokens: list[int], salt: str = "") -> list[bytes]:
    return hash_prompt_blocks(tokens, BS, "demo", salt)


A = chain(list(range(40)))  # 10 blocks
B = chain(list(range(16)) + [99] * 24)  # shares 4 blocks with A


def stored(hashes):
    return [BlockStored(h) for h in hashes]


def test_lookup_is_longest_prefix_per_worker():
    m = IndexMirror()
    m.apply_events("w0", stored(A[:6]))
    m.apply_events("w1", stored(A[:3]))
    m.apply_events("w2", stored(B))
    assert m.lookup(A) == {"w0": 6, "w1": 3, "w2": 4}
    assert m.lookup(B) == {"w0": 4, "w1": 3, "w2": 10}
    assert m.lookup(chain([7] * 40)) == {}
    assert m.lookup([]) == {}
    m.check_integrity()


def test_a_hole_ends_the_prefix():
    m = IndexMirror()
    m.apply_events("w0", stored(A))
    m.apply_events("w0", [BlockRemoved(A[2])])
    assert m.lookup(A) == {"w0": 2}
    m.apply_events("w0", stored([A[2]]))
    assert m.lookup(A) == {"w0": 10}
    m.check_integrity()


def test_salts_never_match():
    m = IndexMirror()
    m.apply_events("w0", stored(chain(list(range(40)), "tenant-a")))
    assert m.lookup(chain(list(range(40)), "tenant-b")) == {}
    assert m.lookup(chain(list(range(40)), "tenant-a")) == {"w0": 10}


def test_cleared_and_snapshot_replace_a_worker():
    m = IndexMirror()
    m.apply_events("w0", stored(A))
    m.apply_events("w1", stored(A[:5]))
    m.apply_events("w0", [AllBlocksCleared(), *stored(A[:1])])
    assert m.lookup(A) == {"w0": 1, "w1": 5}
    m.replace_worker("w1", B)
    assert m.lookup(A) == {"w0": 1, "w1": 4}
    assert m.num_blocks("w1") == 10
    m.drop_worker("w1")
    assert m.lookup(B) == {"w0": 1}
    assert "w1" not in m.by_worker
    m.check_integrity()


def test_pending_entries_count_until_confirmed_or_expired():
    m = IndexMirror(pending_ttl_s=5.0)
    m.apply_events("w0", stored(A[:2]))
    m.note_routed("w1", A[:6], now=100.0)
    assert m.lookup(A) == {"w0": 2, "w1": 6}
    assert m.lookup(A, include_pending=False) == {"w0": 2}
    m.apply_events("w1", stored(A[:3]))  # confirmed ones leave the pending set
    assert sorted(m.pending) == sorted(A[3:6])
    m.expire(104.9)
    assert m.lookup(A) == {"w0": 2, "w1": 6}
    m.expire(105.0)
    assert m.lookup(A) == {"w0": 2, "w1": 3}
    assert m.pending == {}
    m.check_integrity()


def test_renewed_pending_entry_outlives_the_first_expiry():
    m = IndexMirror(pending_ttl_s=5.0)
    m.note_routed("w0", A[:2], now=0.0)
    m.note_routed("w0", A[:2], now=3.0)
    m.expire(5.0)
    assert m.lookup(A) == {"w0": 2}
    m.expire(8.0)
    assert m.lookup(A) == {}


def test_dropping_a_worker_drops_its_pending_entries():
    m = IndexMirror()
    m.note_routed("w0", A[:4], now=0.0)
    m.note_routed("w1", A[:4], now=0.0)
    m.drop_worker("w0")
    assert m.lookup(A) == {"w1": 4}


def at(tier, hashes):
    return [BlockStored(h, tier=tier) for h in hashes]


def test_tiers_follow_every_move_and_lookup_tiers_counts_them():
    m = IndexMirror()
    m.apply_events("w0", stored(A[:6]))
    m.apply_events("w1", at(Tier.HOST, A[:3]))
    assert m.lookup_tiers(A) == ({"w0": 6, "w1": 3}, {"w1": TierCounts(0, 3, 0)})
    m.apply_events("w0", at(Tier.HOST, A[3:6]))  # evicted to host: still held, still a prefix
    m.apply_events("w0", at(Tier.DISK, A[5:6]))
    assert m.lookup(A) == {"w0": 6, "w1": 3}  # lengths count every tier
    assert m.lookup_tiers(A) == ({"w0": 6, "w1": 3}, {"w0": TierCounts(3, 2, 1), "w1": TierCounts(0, 3, 0)})
    assert m.lookup_tiers(A[:4])[1]["w0"] == TierCounts(3, 1, 0)
    assert [m.tier_of("w0", h) for h in A[:7]] == [Tier.DEVICE] * 3 + [Tier.HOST] * 2 + [Tier.DISK, None]
    m.check_integrity()
    m.apply_events("w0", stored(A[3:4]) + [BlockRemoved(A[5])])  # loaded back; dropped from disk
    m.apply_events("w1", stored(A[:3]))  # w1's whole prefix back on device: it leaves the split
    assert m.lookup_tiers(A) == ({"w0": 5, "w1": 3}, {"w0": TierCounts(4, 1, 0)})
    m.apply_events("w0", stored(A[4:5]))
    assert m.lookup_tiers(A) == ({"w0": 5, "w1": 3}, {}) and m.tiered == {}
    m.check_integrity()


def test_tiers_go_with_removal_clear_drop_and_snapshot():
    m = IndexMirror()
    m.apply_events("w0", at(Tier.DISK, A[:2]))
    m.apply_events("w1", at(Tier.HOST, A[:2]))
    m.apply_events("w0", [AllBlocksCleared()])
    assert m.lookup_tiers(A) == ({"w1": 2}, {"w1": TierCounts(0, 2, 0)})
    m.drop_worker("w1")
    assert m.lookup_tiers(A) == ({}, {}) and m.tiered == {}
    # A snapshot: bare hashes are on device, (hash, tier) pairs and BlockStored events carry theirs.
    m.replace_worker("w0", [A[0], (A[1], Tier.HOST), BlockStored(A[2], tier=Tier.DISK), (A[3], Tier.DEVICE)])
    assert m.lookup_tiers(A) == ({"w0": 4}, {"w0": TierCounts(2, 1, 1)})
    m.replace_worker("w0", A[:2])
    assert m.lookup_tiers(A) == ({"w0": 2}, {}) and m.tiered == {}
    m.check_integrity()


def test_pending_blocks_count_as_device_and_many_holders_are_counted_apart():
    m = IndexMirror()
    workers = [f"w{i}" for i in range(70)]  # more than 64 slots: the bit-sliced counts span several words
    for i, w in enumerate(workers):
        m.apply_events(w, stored(A[:10]))
        m.apply_events(w, at(Tier.HOST, A[10 - i % 4:10]))  # w's last i % 4 blocks on host
        m.apply_events(w, at(Tier.DISK, A[:i % 3]))  # and its first i % 3 on disk
    lengths, tiers = m.lookup_tiers(A)
    assert lengths == dict.fromkeys(workers, 10)
    for i, w in enumerate(workers):
        expect = TierCounts(10 - i % 4 - i % 3, i % 4, i % 3)
        assert tiers.get(w, TierCounts(10)) == expect, w
    m2 = IndexMirror()
    m2.apply_events("w0", at(Tier.HOST, A[:2]))
    m2.note_routed("w0", A[:5], now=0.0)  # blocks 2..4 will be computed there: device
    assert m2.lookup_tiers(A) == ({"w0": 5}, {"w0": TierCounts(3, 2, 0)})
    assert m2.lookup_tiers(A, include_pending=False) == ({"w0": 2}, {"w0": TierCounts(0, 2, 0)})
    m.check_integrity()
