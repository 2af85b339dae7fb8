"""The cluster knows the tiers: block events with tiers through the real CacheService (embedded Valkey) and
through the router's IndexMirror give the same exact answers after every move; routing prefers the faster
tier through either source; the router's metrics and `prefixcache stats` count hits per tier."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc
import pytest
from prometheus_client import generate_latest
from cache_fixtures import cache_service  # noqa: F401  (pytest fixture)
from valkey_fixtures import valkey_module  # noqa: F401  (pytest fixture)

from cache_service.block_hash import hash_prompt_blocks
from cache_service.client import event_to_proto, match_from_proto
from cache_service.embedded_redis import connect_sync
from cache_service.records import (AllBlocksCleared, BlockRemoved, BlockStored, Tier, Usage, WorkerCounters,
                                   WorkerLoad)
from cache_service.servicer import match_to_proto
from cache_service.types import PrefixMatch, TierCounts
from deploy.stats import format_table, parse_metrics, to_json
from protos.prefixcache.v1 import cache_pb2 as pb
from protos.prefixcache.v1 import cache_pb2_grpc
from router.cache_link import CacheLink
from router.index_mirror import IndexMirror
from router.metrics import RouterMetrics, usage_tier_tokens
from router.policies import make_policy
from router.registry import WorkerRegistry
from router.routing import RoutingCore
from router.tokenize import PromptEncoder
from router.worker_client import InProcessWorkerClient

MODEL = "m"
HASHES = hash_prompt_blocks(list(range(16 * 6)), 16, MODEL)  # 6 blocks
ADDRESS = {"A": "127.0.0.1:7001", "B": "127.0.0.1:7002"}
D, H, K = Tier.DEVICE, Tier.HOST, Tier.DISK


def at(tier, idx):
    return [BlockStored(HASHES[i], HASHES[i - 1] if i else None, tier=tier) for i in idx]


def gone(idx):
    return [BlockRemoved(HASHES[i]) for i in idx]


# (events per node, then the exact Lookup answer for all 6 blocks: node -> (length, device, host, disk))
STEPS = [
    ({"A": at(D, range(6)), "B": at(D, range(3))}, {"A": (6, 6, 0, 0), "B": (3, 3, 0, 0)}),
    ({"A": at(H, range(3, 6))}, {"A": (6, 3, 3, 0), "B": (3, 3, 0, 0)}),  # A's tail evicted to host
    ({"A": at(K, [5]), "B": at(H, range(3))}, {"A": (6, 3, 2, 1), "B": (3, 0, 3, 0)}),  # ... and on to disk
    ({"A": at(K, [4])}, {"A": (6, 3, 1, 2), "B": (3, 0, 3, 0)}),
    ({"A": gone([5])}, {"A": (5, 3, 1, 1), "B": (3, 0, 3, 0)}),  # dropped from disk: no tier holds it
    ({"A": at(D, [3]), "B": gone([1])}, {"A": (5, 4, 0, 1), "B": (1, 0, 1, 0)}),  # A loads block 3 back
    ({"A": [AllBlocksCleared()], "B": at(K, [0])}, {"B": (1, 0, 0, 1)}),
]


@pytest.fixture
def stub(cache_service, valkey_module):  # noqa: F811
    connect_sync(valkey_module.url).flushall()
    channel = grpc.insecure_channel(cache_service.address)
    yield cache_pb2_grpc.CacheServiceStub(channel)
    channel.close()


def register(stub, node_id: str) -> int:
    node = pb.NodeInfo(node_id=node_id, transfer_address=ADDRESS[node_id], model_id=MODEL, block_size=16,
                       capacity_blocks=100, block_nbytes=4096)
    return stub.RegisterNode(pb.RegisterNodeRequest(node=node, ttl_seconds=30), timeout=5).epoch


def service_answer(stub, hashes=HASHES) -> dict[str, tuple[int, int, int, int]]:
    resp = stub.Lookup(pb.LookupRequest(block_hashes=[bytes(h) for h in hashes], model_id=MODEL), timeout=5)
    out = {}
    for m in map(match_from_proto, resp.matches):  # the worker's conversion (cache_service/client.py)
        assert m.transfer_address == ADDRESS[m.node_id]
        out[m.node_id] = (m.num_blocks, *m.tiers)
    return out


def mirror_answer(mirror: IndexMirror, hashes=HASHES) -> dict[str, tuple[int, int, int, int]]:
    lengths, tiers = mirror.lookup_tiers(hashes)
    return {w: (n, *tiers.get(w, TierCounts(n))) for w, n in lengths.items()}


def test_every_move_gives_the_same_exact_answer_from_the_service_and_the_mirror(stub):
    epochs = {n: register(stub, n) for n in ("A", "B")}
    mirror = IndexMirror()
    for i, (events, expected) in enumerate(STEPS):
        for node, evs in events.items():
            resp = stub.PublishEvents(pb.PublishEventsRequest(
                node_id=node, epoch=epochs[node], events=[event_to_proto(e) for e in evs]), timeout=5)
            assert resp.num_applied == len(evs)
            mirror.apply_events(node, evs)
        assert service_answer(stub) == expected, f"step {i}: service"
        assert mirror_answer(mirror) == expected, f"step {i}: mirror"
        mirror.check_integrity()
    # A shorter prompt counts tiers along its own prefix only.
    stub.PublishEvents(pb.PublishEventsRequest(node_id="A", epoch=epochs["A"],
                                               events=[event_to_proto(e) for e in at(D, [0]) + at(H, [1])]))
    mirror.apply_events("A", at(D, [0]) + at(H, [1]))
    assert service_answer(stub, HASHES[:1]) == mirror_answer(mirror, HASHES[:1]) == \
        {"A": (1, 1, 0, 0), "B": (1, 0, 0, 1)}
    assert service_answer(stub, HASHES[:3]) == mirror_answer(mirror, HASHES[:3]) == \
        {"A": (2, 1, 1, 0), "B": (1, 0, 0, 1)}


def test_an_unknown_tier_is_invalid_and_changes_nothing(stub):
    epoch = register(stub, "A")
    bad = pb.BlockEvent(stored=pb.BlockStoredEvent(block_hash=bytes(HASHES[0]), tier=3))
    with pytest.raises(grpc.RpcError) as info:
        stub.PublishEvents(pb.PublishEventsRequest(node_id="A", epoch=epoch, events=[event_to_proto(at(D, [0])[0]),
                                                                                      bad]), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "events[1].stored.tier is 3; it must be 0 (device), 1 (host) or 2 (disk)"
    assert service_answer(stub) == {}


def test_match_conversions_keep_tiers_and_read_an_old_answer_as_device():
    m = PrefixMatch("A", 5, "x:1", TierCounts(2, 2, 1))
    assert match_from_proto(match_to_proto(m)) == m
    assert match_to_proto(PrefixMatch("A", 5, "x:1")).num_device_blocks == 5  # no split known: device
    old = pb.NodeMatch(node_id="A", num_blocks=5, transfer_address="x:1")  # a service before tiers
    assert match_from_proto(old) == PrefixMatch("A", 5, "x:1", None)
    assert event_to_proto(BlockStored(HASHES[0], tier=Tier.DISK)).stored.tier == pb.TIER_DISK


def make_core(**kw) -> RoutingCore:
    mirror = IndexMirror()
    registry = WorkerRegistry(mirror)
    for i in range(4):
        w = registry.add(InProcessWorkerClient(f"worker-{i}", None), transfer_address=f"10.0.0.{i}:7000")
        w.live, w.feed_epoch = True, "e"
        w.load = WorkerLoad(f"worker-{i}", capacity_blocks=100, num_free_blocks=100)
    return RoutingCore(PromptEncoder("demo", 16), registry, mirror, make_policy("cache_aware"), RouterMetrics(), **kw)


def test_routing_prefers_device_then_host_then_disk_then_recompute_from_either_source(stub, cache_service):  # noqa: F811
    """The same holders through the mirror and through CacheService.Lookup (CacheLink.lookup_tiers)."""
    core = make_core()
    ids = [(7 * i) % 250 + 3 for i in range(100)]  # 6 full blocks
    hashes = core.encoder.block_hashes(ids)
    holders = {"worker-0": D, "worker-1": H, "worker-2": K}  # worker-3 holds nothing
    epochs = {}
    for wid, tier in holders.items():
        events = [BlockStored(h, tier=tier) for h in hashes[:5]]
        core.mirror.apply_events(wid, events)
        node = pb.NodeInfo(node_id=wid, transfer_address="127.0.0.1:7000", model_id=core.encoder.model_id,
                           block_size=16)
        epochs[wid] = stub.RegisterNode(pb.RegisterNodeRequest(node=node, ttl_seconds=30), timeout=5).epoch
        stub.PublishEvents(pb.PublishEventsRequest(node_id=wid, epoch=epochs[wid],
                                                   events=[event_to_proto(e) for e in events]), timeout=5)

    async def choices(source: str) -> list[tuple[str, int, dict]]:
        link = CacheLink(cache_service.address, core.encoder.model_id)
        try:
            c = RoutingCore(core.encoder, core.registry, core.mirror, core.policy, core.metrics,
                            service_lookup=link.lookup_tiers, index_source=source)
            out = []
            for out_of_rotation in ([], ["worker-0"], ["worker-0", "worker-1"], ["worker-0", "worker-1", "worker-2"]):
                d = await c.decide(ids, hashes, request_id="r", exclude=frozenset(out_of_rotation))
                assert d.lookup_source == source
                out.append((d.worker_id, d.num_cached_blocks, d.tiers))
            return out
        finally:
            await link.close()

    expected = [("worker-0", 5, {"worker-1": TierCounts(0, 5, 0), "worker-2": TierCounts(0, 0, 5)}),
                ("worker-1", 5, {"worker-1": TierCounts(0, 5, 0), "worker-2": TierCounts(0, 0, 5)}),
                ("worker-2", 5, {"worker-2": TierCounts(0, 0, 5)}),
                ("worker-3", 0, {})]
    assert asyncio.run(choices("mirror")) == expected
    assert asyncio.run(choices("service")) == expected


@dataclass(slots=True)
class TieredUsage(Usage):
    """Usage with the per-tier fields the worker side reports (router/metrics.py USAGE_TIER_FIELDS)."""

    host_cached_tokens: int = 0
    disk_cached_tokens: int = 0


@dataclass(slots=True)
class TieredLoad(WorkerLoad):
    prefix_host_hit_tokens: int = 0
    prefix_disk_hit_tokens: int = 0


def test_metrics_and_stats_count_hits_per_tier_and_tenant():
    metrics = RouterMetrics()
    assert usage_tier_tokens(Usage(100, 4, 64, 16)) == (48, 0, 0, 16)  # a worker without tier fields: device
    metrics.record_finished("worker-0", "alpha", 100, 64, 64, usage=TieredUsage(100, 4, 64, 16, 64, 16, 8))
    metrics.record_finished("worker-1", "beta", 50, 32, 32, usage=Usage(50, 4, 32))
    metrics.record_finished("worker-1", "beta", 50, 32, 32)  # no usage given: only the totals

    @dataclass
    class State:  # what the collector reads of a registry's WorkerState
        worker_id: str
        load: WorkerLoad
        live: bool = True
        counters: WorkerCounters = field(default_factory=WorkerCounters)

    workers = [State("worker-0", TieredLoad("worker-0", prefix_hit_tokens=96, prefix_host_hit_tokens=16,
                                            prefix_disk_hit_tokens=8)),
               State("worker-1", WorkerLoad("worker-1", prefix_hit_tokens=64))]

    class Registry:
        def snapshot(self):
            return workers

    metrics.attach_registry(Registry())
    stats = parse_metrics(generate_latest(metrics.registry).decode())
    assert stats.workers["worker-0"].tier_tokens == {"device": 24, "host": 16, "disk": 8, "peer": 16}
    assert stats.workers["worker-1"].tier_tokens == {"device": 32, "host": 0, "disk": 0, "peer": 0}
    assert stats.tenants["alpha"].tier_tokens == stats.workers["worker-0"].tier_tokens
    assert stats.total.tier_tokens == {"device": 56, "host": 16, "disk": 8, "peer": 16}
    assert stats.total.cached_tokens == 128  # the contract's total counts the request without usage too
    assert stats.workers["worker-0"].engine_tier_tokens == {"device": 72, "host": 16, "disk": 8}
    assert stats.total.engine_tier_tokens == {"device": 136, "host": 16, "disk": 8}
    table = format_table(stats).splitlines()
    tier_rows = table[table.index(next(line for line in table if line.startswith("hits by tier"))):]
    assert tier_rows[0].split() == ["hits", "by", "tier", "device", "host", "disk", "peer"]
    assert [row.split() for row in tier_rows[1:]] == [
        ["worker-0", "24", "16", "8", "16"], ["worker-1", "32", "0", "0", "0"], ["total", "56", "16", "8", "16"],
        ["tenant", "alpha", "24", "16", "8", "16"], ["tenant", "beta", "32", "0", "0", "0"]]
    assert to_json(stats)["workers"]["worker-0"]["tier_tokens"]["host"] == 16
