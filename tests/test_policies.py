"""router/policies.py: exact choices on hand-made queries."""

import itertools

import pytest

from cache_service.types import TierCounts
from router.policies import (
    POLICY_NAMES,
    CacheAwarePolicy,
    CostWeights,
    RouteDecision,
    RouteQuery,
    RoutingError,
    WorkerLoad,
    make_policy,
)


def loads(*specs):
    """('a', active, waiting_blocks) ... -> WorkerLoads."""
    return [WorkerLoad(wid, num_active_blocks=act, num_waiting_blocks=wait) for wid, act, wait in specs]


IDLE3 = loads(("a", 0, 0), ("b", 0, 0), ("c", 0, 0))


def q(num_blocks, matches=None, key=0, session=None):
    return RouteQuery(num_blocks, num_blocks * 16, matches or {}, session, key)


# ---- cache_aware ----------------------------------------------------------------


def test_longest_prefix_wins_when_idle():
    d = make_policy("cache_aware").select(q(10, {"a": 3, "b": 7}), IDLE3)
    assert d == RouteDecision("b", 7, None, 0, 3.0)


def test_decode_load_outweighs_a_short_prefix():
    policy = make_policy("cache_aware", decode_load_weight=0.1)
    workers = loads(("a", 100, 0), ("b", 0, 0))
    # a: (10 - 2) + 0.1 * 100 = 18; b: 10
    d = policy.select(q(10, {"a": 2}), workers)
    assert (d.worker_id, d.predicted_cached_blocks, d.cost) == ("b", 0, 10.0)
    # a long prefix still wins: a: (10 - 9) + 0.1 * 20 = 3 < b: 10
    workers = loads(("a", 20, 0), ("b", 0, 0))
    d = policy.select(q(10, {"a": 9}), workers)
    assert (d.worker_id, d.predicted_cached_blocks, d.cost) == ("a", 9, 3.0)


def test_queue_term_counts_blocks_waiting_to_prefill():
    policy = make_policy("cache_aware", queue_weight=1.0, decode_load_weight=0.0)
    workers = loads(("a", 0, 6), ("b", 0, 0))
    # a: (10 - 5) + 6 = 11; b: 10
    assert policy.select(q(10, {"a": 5}), workers).worker_id == "b"
    workers = loads(("a", 0, 4), ("b", 0, 0))
    assert policy.select(q(10, {"a": 5}), workers).worker_id == "a"  # 9 < 10


def test_transfer_moves_a_hot_prefix_to_an_idle_worker():
    workers = loads(("a", 60, 0), ("b", 0, 0))
    query = q(10, {"a": 8})
    # no transfer: a = 2 + 0.1*60 = 8, b = 10 -> a
    off = make_policy("cache_aware", decode_load_weight=0.1).select(query, workers)
    assert off == RouteDecision("a", 8, None, 0, 8.0)
    # transfer: b = 2 + 0.2*8 = 3.6 -> b pulls 8 blocks from a
    on = make_policy("cache_aware", decode_load_weight=0.1, enable_transfer=True, transfer_cost_ratio=0.2)
    d = on.select(query, workers)
    assert (d.worker_id, d.predicted_cached_blocks, d.transfer_from, d.num_transfer_blocks) == ("b", 8, "a", 8)
    assert d.cost == pytest.approx(3.6)


def test_transfer_pulls_only_what_the_worker_lacks():
    on = make_policy("cache_aware", enable_transfer=True, transfer_cost_ratio=0.25, decode_load_weight=0.1)
    workers = loads(("a", 100, 0), ("b", 0, 0))
    d = on.select(q(12, {"a": 10, "b": 6}), workers)
    # b: (12 - 10) + 0.25 * 4 = 3; a: 2 + 10 = 12
    assert (d.worker_id, d.predicted_cached_blocks, d.transfer_from, d.num_transfer_blocks, d.cost) == (
        "b", 10, "a", 4, 3.0)


def test_no_transfer_when_it_is_not_cheaper_or_too_small():
    workers = loads(("a", 100, 0), ("b", 0, 0))
    expensive = make_policy("cache_aware", enable_transfer=True, transfer_cost_ratio=1.0)
    d = expensive.select(q(10, {"a": 8}), workers)
    assert (d.transfer_from, d.num_transfer_blocks) == (None, 0)
    small = make_policy("cache_aware", enable_transfer=True, min_transfer_blocks=3, transfer_cost_ratio=0.2)
    d = small.select(q(10, {"a": 2}), workers)
    assert (d.worker_id, d.transfer_from, d.predicted_cached_blocks) == ("b", None, 0)


def test_transfer_source_is_a_live_worker():
    on = make_policy("cache_aware", enable_transfer=True, transfer_cost_ratio=0.2)
    # "dead" holds the longest prefix but is not in the live list: "a" is the source
    d = on.select(q(10, {"dead": 9, "a": 6}), loads(("a", 100, 0), ("b", 0, 0)))
    assert (d.worker_id, d.transfer_from, d.num_transfer_blocks, d.predicted_cached_blocks) == ("b", "a", 6, 6)


def test_ties_are_deterministic_order_free_and_spread():
    policy = make_policy("cache_aware")
    chosen = []
    for key in range(60):
        picks = {policy.select(q(4, key=key), list(perm)).worker_id for perm in itertools.permutations(IDLE3)}
        assert len(picks) == 1, "the choice must not depend on the order of workers"
        chosen.append(picks.pop())
    counts = {w: chosen.count(w) for w in "abc"}
    assert all(c >= 10 for c in counts.values()), counts
    # the same key always gives the same worker
    assert [policy.select(q(4, key=k), IDLE3).worker_id for k in range(60)] == chosen


def test_tied_transfer_peers_are_chosen_by_request_key():
    on = make_policy("cache_aware", enable_transfer=True, transfer_cost_ratio=0.2)
    workers = loads(("a", 100, 0), ("b", 100, 0), ("c", 0, 0))
    sources = set()
    for key in range(20):
        d = on.select(q(10, {"a": 5, "b": 5}, key=key), workers)
        assert d.worker_id == "c" and d.num_transfer_blocks == 5
        assert d == on.select(q(10, {"a": 5, "b": 5}, key=key), list(reversed(workers)))
        sources.add(d.transfer_from)
    assert sources == {"a", "b"}


# ---- the other policies ----------------------------------------------------------


def test_round_robin_cycles_in_the_given_order():
    policy = make_policy("round_robin")
    assert [policy.select(q(4), IDLE3).worker_id for _ in range(5)] == ["a", "b", "c", "a", "b"]


def test_random_is_reproducible_with_its_seed():
    def picks(seed):
        policy = make_policy("random", seed=seed)
        return [policy.select(q(4), IDLE3).worker_id for _ in range(30)]

    assert picks(1) == picks(1)
    assert picks(1) != picks(2)
    assert set(picks(1)) == {"a", "b", "c"}


def test_least_loaded_ignores_the_cache_unless_transfer_is_on():
    workers = loads(("a", 50, 0), ("b", 10, 2), ("c", 10, 3))
    d = make_policy("least_loaded").select(q(10, {"a": 9}), workers)
    assert (d.worker_id, d.predicted_cached_blocks, d.transfer_from) == ("b", 0, None)  # 0.1*10 + 2 = 3
    d = make_policy("least_loaded", enable_transfer=True, transfer_cost_ratio=0.2).select(q(10, {"a": 9}), workers)
    assert (d.worker_id, d.predicted_cached_blocks, d.transfer_from, d.num_transfer_blocks) == ("b", 9, "a", 9)


def test_non_cache_policies_report_the_local_hit():
    d = make_policy("round_robin").select(q(10, {"a": 4}), IDLE3)
    assert (d.worker_id, d.predicted_cached_blocks) == ("a", 4)


def test_session_is_sticky_and_survives_a_worker_leaving():
    policy = make_policy("session")
    workers = [WorkerLoad(f"w{i}") for i in range(5)]
    before = {s: policy.select(q(4, session=f"s{s}"), workers).worker_id for s in range(100)}
    assert len(set(before.values())) == 5
    # sticky: ignores matches and load
    busy = [WorkerLoad(w.worker_id, num_active_blocks=1000) for w in workers]
    assert all(policy.select(q(4, {"w0": 4}, session=f"s{s}"), busy).worker_id == before[s] for s in range(100))
    # w2 leaves: only its sessions move
    remaining = [w for w in workers if w.worker_id != "w2"]
    after = {s: policy.select(q(4, session=f"s{s}"), remaining).worker_id for s in range(100)}
    for s in range(100):
        if before[s] != "w2":
            assert after[s] == before[s]
        else:
            assert after[s] != "w2"
    # and comes back: its sessions return to it
    assert {s: policy.select(q(4, session=f"s{s}"), workers).worker_id for s in range(100)} == before


def test_session_without_id_falls_back_to_cache_aware():
    session, cache = make_policy("session"), make_policy("cache_aware")
    workers = loads(("a", 30, 0), ("b", 0, 0), ("c", 5, 0))
    for key in range(10):
        query = q(10, {"a": 6, "c": 2}, key=key)
        assert session.select(query, workers) == cache.select(query, workers)


# ---- construction and errors ---------------------------------------------------------


def test_every_policy_name_builds():
    for name in POLICY_NAMES:
        policy = make_policy(name)
        assert policy.name == name
        assert policy.select(q(2), IDLE3).worker_id in {"a", "b", "c"}
    assert isinstance(make_policy(), CacheAwarePolicy)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_policy("fastest")
    with pytest.raises(ValueError, match="unknown policy weight"):
        make_policy("cache_aware", decode_weight=1.0)
    with pytest.raises(ValueError, match="decode_load_weight"):
        CostWeights(decode_load_weight=-1)
    with pytest.raises(RoutingError, match="no live workers"):
        make_policy("cache_aware").select(q(2), [])
    with pytest.raises(RoutingError, match="outside 0..2"):
        make_policy("cache_aware").select(q(2, {"a": 3}), IDLE3)


def test_load_cost_is_the_load_terms():
    policy = make_policy("cache_aware", queue_weight=2.0, decode_load_weight=0.5)
    assert policy.load_cost(WorkerLoad("a", num_active_blocks=10, num_waiting_blocks=3)) == 11.0
    assert policy.filterable and make_policy("least_loaded").filterable
    assert not make_policy("round_robin").filterable


# ---- tiers ------------------------------------------------------------------------------


def tq(num_blocks, matches, tiers, key=0):
    return RouteQuery(num_blocks, num_blocks * 16, matches, None, key, tiers)


IDLE4 = loads(("dev", 0, 0), ("host", 0, 0), ("disk", 0, 0), ("none", 0, 0))
SAME_PREFIX = {"dev": 8, "host": 8, "disk": 8}
ON = {"host": TierCounts(0, 8, 0), "disk": TierCounts(0, 0, 8)}  # "dev" is not listed: all on device


def test_device_holder_beats_host_beats_disk_beats_recompute():
    policy = make_policy("cache_aware")  # host_hit_cost 0.05, disk_hit_cost 0.2
    # dev: 2; host: 2 + 0.05 * 8 = 2.4; disk: 2 + 0.2 * 8 = 3.6; none: 10
    d = policy.select(tq(10, SAME_PREFIX, ON), IDLE4)
    assert d == RouteDecision("dev", 8, None, 0, 2.0)
    without_dev = [w for w in IDLE4 if w.worker_id != "dev"]
    matches = {k: v for k, v in SAME_PREFIX.items() if k != "dev"}
    d = policy.select(tq(10, matches, ON), without_dev)
    assert (d.worker_id, d.predicted_cached_blocks, d.cost) == ("host", 8, pytest.approx(2.4))
    d = policy.select(tq(10, {"disk": 8}, {"disk": ON["disk"]}), without_dev)
    assert (d.worker_id, d.predicted_cached_blocks, d.cost) == ("disk", 8, pytest.approx(3.6))
    # Tiers unknown (no split given): the three holders tie at 2, as before tiers existed.
    tied = {policy.select(tq(10, SAME_PREFIX, {}, key=k), IDLE4).worker_id for k in range(30)}
    assert tied == {"dev", "host", "disk"}


def test_a_split_prefix_pays_only_for_its_lower_blocks_and_load_still_counts():
    policy = make_policy("cache_aware", decode_load_weight=0.1)
    workers = loads(("a", 5, 0), ("b", 0, 0))
    # a: (10 - 8) + 0.05 * 2 + 0.2 * 1 + 0.1 * 5 = 2.8; b: (10 - 8) + 0.05 * 8 = 2.4
    d = policy.select(tq(10, {"a": 8, "b": 8}, {"a": TierCounts(5, 2, 1), "b": TierCounts(0, 8, 0)}), workers)
    assert (d.worker_id, d.cost) == ("b", pytest.approx(2.4))
    # a longer prefix on disk still beats a short one on device: c: (10 - 9) + 0.2 * 9 = 2.8 < d: 10 - 2 = 8
    d = policy.select(tq(10, {"c": 9, "d": 2}, {"c": TierCounts(0, 0, 9)}), loads(("c", 0, 0), ("d", 0, 0)))
    assert (d.worker_id, d.predicted_cached_blocks, d.cost) == ("c", 9, pytest.approx(2.8))
    # a disk hit that costs more than recomputing loses to an idle worker that recomputes
    dear = make_policy("cache_aware", disk_hit_cost=1.5)
    d = dear.select(tq(4, {"c": 4}, {"c": TierCounts(0, 0, 4)}), loads(("c", 0, 0), ("d", 0, 0)))
    assert (d.worker_id, d.predicted_cached_blocks, d.cost) == ("d", 0, 4.0)


def test_tiers_with_transfer_and_other_policies():
    on = make_policy("cache_aware", enable_transfer=True, transfer_cost_ratio=0.2, decode_load_weight=0.1)
    workers = loads(("a", 100, 0), ("b", 0, 0))
    # b holds 4 of a's 10 on host and pulls 6: (12 - 10) + 0.2 * 6 + 0.05 * 4 = 3.4; a: 2 + 10 = 12
    d = on.select(tq(12, {"a": 10, "b": 4}, {"b": TierCounts(0, 4, 0)}), workers)
    assert (d.worker_id, d.predicted_cached_blocks, d.transfer_from, d.num_transfer_blocks, d.cost) == (
        "b", 10, "a", 6, pytest.approx(3.4))
    # predicted cached blocks count every tier, for every policy
    d = make_policy("round_robin").select(tq(10, {"a": 6}, {"a": TierCounts(1, 2, 3)}), IDLE3)
    assert (d.worker_id, d.predicted_cached_blocks) == ("a", 6)


def test_tier_weights_and_splits_are_checked():
    with pytest.raises(ValueError, match="host_hit_cost"):
        CostWeights(host_hit_cost=-0.1)
    with pytest.raises(ValueError, match="disk_hit_cost"):
        CostWeights(disk_hit_cost=float("nan"))
    with pytest.raises(RoutingError, match=r"tiers \(1, 1, 0\) of 'a' do not add up to its match of 3 blocks"):
        make_policy("cache_aware").select(tq(4, {"a": 3}, {"a": TierCounts(1, 1, 0)}), IDLE3)
    assert (CostWeights().host_hit_cost, CostWeights().disk_hit_cost) == (0.05, 0.2)
