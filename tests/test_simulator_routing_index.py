"""simulator/routing_index.py: the router's IndexMirror as the simulator drives it (nodes by index)."""

from cache_service.records import BlockRemoved, BlockStored
from router.index_mirror import IndexMirror
from simulator.routing_index import SimRoutingIndex


def _stored(h):
    return BlockStored(h, None, (), 0)


def test_routing_index_matches():
    idx = SimRoutingIndex()
    h = [i.to_bytes(16, "little") for i in range(5)]
    for node, n in ((0, 5), (1, 2), (2, 2), (3, 1)):
        idx.apply(node, [_stored(h[i]) for i in range(n)])
    assert idx.matches(h) == {0: 5, 1: 2, 2: 2, 3: 1}
    assert idx.matches(h[:2]) == {0: 2, 1: 2, 2: 2, 3: 1}
    assert idx.matches(h, limit=1) == {0: 5}
    assert idx.matches(h, limit=2) in ({0: 5, 1: 2}, {0: 5, 2: 2})
    assert idx.match_length(3, h) == 1 and idx.match_length(4, h) == 0
    idx.apply(0, [BlockRemoved(h[1])])
    assert idx.matches(h) == {0: 1, 1: 2, 2: 2, 3: 1}
    assert idx.num_entries == 9 and idx.is_replicated(h[0]) and not idx.is_replicated(h[4])
    assert idx.matches([b"x" * 16]) == {}


def test_pending_entries_yield_to_real_events_or_expire():
    # The mirror's rules (router/index_mirror.py): a routed block counts for its node until that node's
    # BlockStored confirms it, its BlockRemoved drops it, or the TTL ends; blocks already held are not noted.
    idx = SimRoutingIndex(IndexMirror(pending_ttl_s=10.0))
    assert isinstance(idx.mirror, IndexMirror)
    h = [i.to_bytes(16, "little") for i in range(3)]
    idx.note_routed(0, h[:2], now=0.0)
    idx.note_routed(0, h[:1], now=1.0)
    assert idx.matches(h) == {0: 2} and idx.num_entries == 0 and idx.match_length(0, h) == 2
    idx.apply(0, [_stored(h[0])])
    assert idx.matches(h) == {0: 2} and idx.num_entries == 1  # h0 real now, h1 still pending
    assert set(idx.pending) == {h[1]}
    idx.expire(10.0)  # h1 was noted at 0
    assert idx.matches(h) == {0: 1}
    assert idx.holders == {h[0]: {0}} and idx.pending == {} and idx.num_entries == 1
    # real, then routed again (nothing pending: already held), then evicted: gone at once
    idx.apply(1, [_stored(h[2])])
    idx.note_routed(1, h[2:], now=11.0)
    assert idx.pending == {}
    idx.apply(1, [BlockRemoved(h[2])])
    assert h[2] not in idx.holders and idx.num_entries == 1 and idx.matches(h[2:]) == {}
    # pending, then the node reports it does not hold it: dropped before the TTL
    idx.note_routed(2, h[2:], now=12.0)
    assert idx.matches(h[2:]) == {2: 1}
    idx.apply(2, [BlockRemoved(h[2])])
    assert idx.matches(h[2:]) == {} and idx.pending == {}
