"""simulator: host and disk tiers under each node's pool (node.py LowerTiers), on hand-made traces."""

import json

import pytest

from cache_service.records import BlockRemoved, BlockStored, Tier
from cache_service.types import TierCounts
from deploy.cli import main as cli_main
from simulator import SimConfig, SimRequest, Simulator, TimeModel
from simulator.node import LowerTiers

# prefill 1 ms/token, decode 0.1 s/step; a 4-token block (4000 bytes) loads in 0.1 s from host, 0.2 s from disk
TM = TimeModel(prefill_tps=1000, prefill_overhead_ms=0, decode_tps=10, kv_bytes_per_token=1000, hbm_gbs=1e9,
               transfer_gbps=3.2e-4, transfer_latency_ms=10, host_load_gbs=4e-5, disk_load_gbs=2e-5)


def h(i: int) -> bytes:
    return i.to_bytes(16, "little")


def reqs(*specs):
    """(arrival_s, ids) ... -> 7-token prompts of 2 blocks, 1 output token (no decode block)."""
    return [SimRequest(i, t, 7, 1, block_ids=ids) for i, (t, ids) in enumerate(specs)]


def simulator(nodes=1, device=12, host=8, disk=8, policy="cache_aware", **weights) -> Simulator:
    cfg = SimConfig(num_nodes=nodes, capacity_tokens=device, block_size=4, policy=policy, time_model=TM,
                    weights=weights, host_capacity_tokens=host, disk_capacity_tokens=disk)
    return Simulator(cfg, device // 4)


def tiers_of(s: Simulator, node: int = 0) -> dict[str, set[int]]:
    pool, lower = s.nodes[node].pool, s.nodes[node].tiers
    ids = lambda hs: {int.from_bytes(x, "little") for x in hs}  # noqa: E731
    return {"device": ids(pool.cached), "host": ids(lower.host.blocks), "disk": ids(lower.disk.blocks)}


def test_evictions_go_down_the_tiers_and_hits_load_back():
    # 3 device blocks, 2 on host, 2 on disk. The pool evicts LRU (a chain's tail first, node.py):
    #   r0 (1,2) computes; r1 (3,4) evicts 2 -> host; r2 (5,6) evicts 1, 4 -> host, pushing 2 to disk;
    #   r3 (1,2) finds 1 on host and 2 on disk: both load back (0.1 s + 0.2 s) and evict 3, 6 -> host,
    #   which pushes 4 to disk.
    s = simulator()
    r = reqs((0.0, (1, 2)), (1.0, (3, 4)), (2.0, (5, 6)), (3.0, (1, 2)))
    out = s.run(r).summary()
    assert [(q.num_local_hit_blocks, q.num_host_hit_blocks, q.num_disk_hit_blocks) for q in r] == \
        [(0, 0, 0), (0, 0, 0), (0, 0, 0), (2, 1, 1)]
    assert r[3].num_computed_tokens == 1  # fully cached: only the last token
    assert r[3].ttft_s == pytest.approx(0.1 + 0.2 + 0.001)
    assert tiers_of(s) == {"device": {1, 2, 5}, "host": {3, 6}, "disk": {4}}
    assert (out["device_hit_blocks"], out["host_hit_blocks"], out["disk_hit_blocks"], out["hit_blocks"]) == \
        (0, 1, 1, 2)
    assert out["block_hit_rate"] == round(2 / 8, 6) and out["local_block_hit_rate"] == round(2 / 8, 6)
    # The router's mirror saw every move (the node's events carry the tiers).
    mirror = s.index.mirror
    assert {i: mirror.tier_of(0, h(i)) for i in range(1, 7)} == {
        1: Tier.DEVICE, 2: Tier.DEVICE, 5: Tier.DEVICE, 3: Tier.HOST, 6: Tier.HOST, 4: Tier.DISK}
    mirror.check_integrity()
    s.nodes[0].tiers.check_integrity(s.nodes[0].pool)
    assert [(n.num_cached_blocks, n.num_host_blocks, n.num_disk_blocks) for n in s._node_stats()] == [(3, 2, 1)]


def test_a_block_pushed_out_of_the_last_tier_is_removed():
    s = simulator(disk=0)  # host only: what host evicts is gone
    r = reqs((0.0, (1, 2)), (1.0, (3, 4)), (2.0, (5, 6)), (3.0, (1, 2)))
    out = s.run(r).summary()
    # r2 pushed 2 out of host for good: r3 loads 1 from host, and the chain stops at 2
    assert (r[3].num_local_hit_blocks, r[3].num_host_hit_blocks, r[3].num_computed_tokens) == (1, 1, 3)
    assert r[3].ttft_s == pytest.approx(0.1 + 0.003)
    assert (out["host_hit_blocks"], out["disk_hit_blocks"]) == (1, 0)
    assert s.index.mirror.tier_of(0, h(2)) is Tier.DEVICE  # recomputed into the pool
    events = LowerTiers(1, 0).translate([BlockRemoved(h(7)), BlockRemoved(h(8)), BlockStored(h(7))])
    assert events == [BlockStored(h(7), tier=Tier.HOST), BlockStored(h(8), tier=Tier.HOST), BlockRemoved(h(7)),
                      BlockStored(h(7))]


def test_the_router_prefers_the_faster_tier_and_predicts_the_hit():
    # Node 0 holds the prefix on host, node 1 on disk (seeded as their evictions would leave it), node 2 not at
    # all: cache_aware pays 3 - 2 + 0.05 * 2 = 1.1 on node 0, 1 + 0.2 * 2 = 1.4 on node 1, 3 on node 2.
    s = simulator(nodes=3, host_hit_cost=0.05, disk_hit_cost=0.2)
    for node, tier in ((0, s.nodes[0].tiers.host), (1, s.nodes[1].tiers.disk)):
        for i in (1, 2):
            tier.put(h(i))
        s.index.apply(node, [BlockStored(h(i), tier=tier.tier) for i in (1, 2)])
    assert s.index.matches_tiers([h(1), h(2), h(3)]) == (
        {0: 2, 1: 2}, {0: TierCounts(0, 2, 0), 1: TierCounts(0, 0, 2)})
    r = [SimRequest(0, 0.0, 11, 1, block_ids=(1, 2, 3))]
    out = s.run(r).summary()
    assert (r[0].node, r[0].predicted_cached_blocks, r[0].num_host_hit_blocks) == (0, 2, 2)
    assert r[0].ttft_s == pytest.approx(2 * 0.1 + 0.003)
    assert out["prediction_exact_rate"] == 1.0
    # With no host copy, the disk holder beats recomputing ...
    def disk_only(**weights):
        s = simulator(nodes=3, **weights)
        for i in (1, 2):
            s.nodes[1].tiers.disk.put(h(i))
        s.index.apply(1, [BlockStored(h(i), tier=Tier.DISK) for i in (1, 2)])
        r = [SimRequest(0, 0.0, 11, 1, block_ids=(1, 2, 3))]
        s.run(r)
        return s, r[0]

    s, q = disk_only(disk_hit_cost=0.2)
    assert (q.node, q.num_disk_hit_blocks, q.ttft_s) == (1, 2, pytest.approx(2 * 0.2 + 0.003))
    # ... unless loading is dearer than computing: this time model's own ratio (0.2 s to load a block, 4 ms to
    # prefill it: 50), the default in the simulator, sends it to an idle node that recomputes in 11 ms.
    s, q = disk_only()
    assert s.weights.disk_hit_cost == 50.0
    assert (q.node, q.num_local_hit_blocks, q.ttft_s) == (0, 0, pytest.approx(0.011))


def test_tiers_off_changes_nothing_and_global_shares_the_tiers():
    r = reqs((0.0, (1, 2)), (1.0, (3, 4)), (2.0, (5, 6)), (3.0, (1, 2)))
    s = simulator(host=0, disk=0)
    out = s.run(r).summary()
    assert s.nodes[0].tiers is None and (out["hit_blocks"], out["host_hit_blocks"]) == (0, 0)
    g = simulator(nodes=2, device=8, host=4, disk=0, policy="global")  # one pool of 4, one host tier of 2
    assert g.nodes[0].tiers is g.nodes[1].tiers and g.nodes[0].tiers.host.num_blocks == 2
    r = reqs((0.0, (1, 2)), (1.0, (3, 4)), (2.0, (5, 6)), (3.0, (1, 2)))
    out = g.run(r).summary()
    assert (out["hit_blocks"], out["host_hit_blocks"]) == (2, 2) and r[3].predicted_cached_blocks == 2


def test_cli_tier_flags(tmp_path):
    trace = tmp_path / "t.jsonl"
    lines = [{"timestamp": 1000 * i, "input_length": 1024, "output_length": 1, "hash_ids": ids}
             for i, ids in enumerate([[0, 1], [2, 3], [0, 1]])]
    trace.write_text("\n".join(json.dumps(x) for x in lines))
    out = tmp_path / "out.json"
    rc = cli_main(["simulate", "--trace", str(trace), "--nodes", "1", "--capacity-tokens", "1536",
                   "--host-capacity-tokens", "2k", "--host-load-gbs", "100", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert (res["host_hit_blocks"], res["disk_hit_blocks"], res["device_hit_blocks"]) == (2, 0, 0)
    assert res["config"]["host_capacity_tokens"] == 2000 and res["config"]["time_model"]["host_load_gbs"] == 100
    with pytest.raises(SystemExit):
        cli_main(["simulate", "--trace", str(trace), "--host-capacity-tokens", "inf"])
