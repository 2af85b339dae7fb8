"""IndexMirror: the router's local hash -> holders map, fed by worker block events."""

from __future__ import annotations

from cache_service.block_hash import hash_prompt_blocks
from cache_service.records import AllBlocksCleared, BlockRemoved, BlockStored
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
