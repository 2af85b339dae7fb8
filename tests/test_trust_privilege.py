"""Least privilege in the cache service (trust model, DESIGN 6b), on a real Valkey, a real CacheService and
real engines: a pin belongs to its tenant, a tenant's pins stay within its quota, pins never take a worker's
last free blocks, and a heartbeat's absurd transfer counts break nothing after it."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from cache_fixtures import PARAMS, cold_output, demo_model, make_node, prompt_of, wait_until  # noqa: F401
from valkey_fixtures import redis_dump, valkey_module  # noqa: F401  (pytest fixtures)

from cache_service.block_hash import hash_prompt_blocks
from cache_service.embedded_redis import connect_sync
from cache_service.pin_keeper import pin_reserve_blocks
from cache_service.records import InvalidRequestError, SamplingParams
from cache_service.server import CacheServiceConfig, CacheServiceThread
from cache_service.validation import MAX_COUNTER_DELTA
from protos.prefixcache.v1 import cache_pb2 as pb
from protos.prefixcache.v1 import cache_pb2_grpc
from router.auth import tenant_salt
from router.index_mirror import IndexMirror
from router.pins import PinManager, PinNotFoundError, PinNotYoursError, PinQuotaError
from router.registry import WorkerRegistry
from router.tokenize import PromptEncoder
from router.worker_client import InProcessWorkerClient
from workers.engine import Engine, EngineConfig

BS = 16
INT64_MAX = 2**63 - 1
PERMISSION_DENIED, RESOURCE_EXHAUSTED = grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(scope="module")
def cache_service(valkey_module):
    """This module's one CacheService (make_node uses it too): "ops" is an operator tenant besides "operator"."""
    svc = CacheServiceThread(CacheServiceConfig(redis_url=valkey_module.url, port=0, sweep_interval_s=0.2,
                                                operator_tenants=frozenset({"ops"})))
    svc.start()
    yield svc
    svc.stop()


@pytest.fixture
def stub(cache_service, valkey_module):
    connect_sync(valkey_module.url).flushall()
    with grpc.insecure_channel(cache_service.address) as channel:
        yield cache_pb2_grpc.CacheServiceStub(channel)


def register(stub, node_id: str, capacity_blocks: int = 64, model: str = "demo") -> int:
    node = pb.NodeInfo(node_id=node_id, transfer_address="127.0.0.1:7000", model_id=model, block_size=BS,
                       capacity_blocks=capacity_blocks)
    return stub.RegisterNode(pb.RegisterNodeRequest(node=node, ttl_seconds=30), timeout=5).epoch


def pin_request(pin_id: str, tenant: str, num_blocks: int, seed: int = 0, **kw) -> pb.PinBlocksRequest:
    """What the router sends: the prefix's tokens and hashes under the tenant's own salt."""
    salt = tenant_salt(tenant, "")
    tokens = prompt_of(num_blocks * BS, seed=seed)
    hashes = [bytes(h) for h in hash_prompt_blocks(tokens, BS, "demo", salt)]
    return pb.PinBlocksRequest(pin_id=pin_id, model_id="demo", token_ids=tokens, block_hashes=hashes,
                               cache_salt=salt, tenant=tenant, **kw)


def rpc_error(fn, request) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn(request, timeout=5)
    return info.value.code(), info.value.details()


def test_only_the_owner_or_an_operator_unpins_a_pin(stub, valkey_module):
    register(stub, "A")
    assert list(stub.Pin(pin_request("p", "alpha", 4), timeout=5).node_ids) == ["A"]
    before = redis_dump(valkey_module)
    # Another tenant, or a caller naming no tenant, can neither release nor take over alpha's pin.
    for tenant in ("beta", ""):
        assert rpc_error(stub.Unpin, pb.PinBlocksRequest(pin_id="p", tenant=tenant)) == (
            PERMISSION_DENIED, "pin 'p' belongs to another tenant")
        assert rpc_error(stub.Pin, pin_request("p", tenant or "default", 4)) == (
            PERMISSION_DENIED, "pin 'p' belongs to another tenant")
    assert redis_dump(valkey_module) == before  # refused: nothing written
    assert stub.Unpin(pb.PinBlocksRequest(pin_id="p", tenant="alpha"), timeout=5).found is True
    # Operators: the literal "operator" tenant and those configured (--operator-tenants: here "ops").
    for operator in ("operator", "ops"):
        stub.Pin(pin_request("p", "alpha", 4), timeout=5)
        resp = stub.Unpin(pb.PinBlocksRequest(pin_id="p", tenant=operator), timeout=5)
        assert (resp.found, list(resp.node_ids)) == (True, ["A"])


def test_a_tenants_pins_stay_within_its_quota(stub):
    register(stub, "A", capacity_blocks=64)
    register(stub, "B", capacity_blocks=80)
    quota = 64 // 4  # the default: a quarter of the smallest live node's pool
    stub.Pin(pin_request("a1", "alpha", quota, seed=1), timeout=5)
    assert rpc_error(stub.Pin, pin_request("a2", "alpha", 1, seed=2)) == (
        RESOURCE_EXHAUSTED, f"tenant 'alpha' has {quota} pinned blocks; 1 more would exceed its quota of "
                            f"{quota} blocks (unpin some first)")
    stub.Pin(pin_request("a1", "alpha", quota, seed=1), timeout=5)  # pinning again is not counted twice
    stub.Pin(pin_request("b1", "beta", quota, seed=3), timeout=5)  # each tenant has its own quota
    stub.Unpin(pb.PinBlocksRequest(pin_id="a1", tenant="alpha"), timeout=5)
    stub.Pin(pin_request("a2", "alpha", 1, seed=2), timeout=5)
    stats = stub.GetStats(pb.GetStatsRequest(), timeout=5)
    assert sorted((p.pin_id, p.num_blocks) for p in stats.pins) == [("a2", 1), ("b1", quota)]


def test_requests_keep_being_served_on_a_worker_after_a_pin_flood(make_node, cache_service, demo_model):
    a = make_node("A", num_blocks=64)
    reserve = pin_reserve_blocks(64, BS)
    assert reserve == 16  # a request's worth (2048 tokens) capped at a quarter of this small pool
    with grpc.insecure_channel(cache_service.address) as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        # Six tenants pin 16 blocks each, every one within its own quota: 96 blocks for a 64-block pool.
        for k in range(6):
            assert list(stub.Pin(pin_request(f"flood-{k}", f"t{k}", 16, seed=10 + k), timeout=5).node_ids) == ["A"]
        assert rpc_error(stub.Pin, pin_request("flood-0b", "t0", 1, seed=20))[0] == RESOURCE_EXHAUSTED
    # The node holds the pins until the next one would leave it fewer than the reserve free, and no more.
    refused = "pin refused: 16 blocks would leave 0 of 64 KV blocks free, fewer than the 16 kept for requests"
    wait_until(lambda: all(f"flood-{k}: {refused}" in (a.node.client.stats.last_error or "") for k in (3, 4, 5)),
               what="the pins beyond the reserve to be refused")
    assert a.call(lambda e: e.pinned()) == {"flood-0": 16, "flood-1": 16, "flood-2": 16}
    assert a.call(lambda e: e.load().num_free_blocks) == reserve
    prompt = prompt_of(BS * 10 + 1, seed=30)  # 11 blocks with its output: within the reserve
    (out,), _ = a.generate([prompt], PARAMS)
    assert (out.finish_reason, out.new_token_ids) == ("length", cold_output(demo_model, prompt))
    assert a.call(lambda e: e.pinned()) == {"flood-0": 16, "flood-1": 16, "flood-2": 16}
    a.call(lambda e: e.check_integrity())


def test_an_int64_max_heartbeat_breaks_no_later_heartbeat(make_node, cache_service, demo_model):
    a, b = make_node("A"), make_node("B")
    prompt = prompt_of(BS * 3 + 1, seed=40)
    a.generate([prompt], PARAMS)
    assert a.flush()
    with grpc.insecure_channel(cache_service.address) as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        # A node of another model reports counts at and beyond INT64_MAX, twice: the totals used to be left
        # at INT64_MAX, and every later heartbeat carrying a transfer count failed (HINCRBY overflow).
        epoch = register(stub, "X", model="other")
        huge = pb.TransferCounters(num_transfers=INT64_MAX, num_failed=INT64_MAX, num_blocks=2**64 - 1,
                                   num_bytes=INT64_MAX)
        for _ in range(2):
            assert stub.Heartbeat(pb.HeartbeatRequest(node_id="X", epoch=epoch, transfers=huge), timeout=5).known
        (out,), (fetch,) = b.generate([prompt], PARAMS)  # a real transfer: B's next heartbeat counts it
        assert fetch.num_blocks == 3 and out.new_token_ids == cold_output(demo_model, prompt)

        def counters():
            return stub.GetStats(pb.GetStatsRequest(), timeout=5).counters

        wait_until(lambda: counters()["transfers"] == 2 * MAX_COUNTER_DELTA + 1, what="B's transfer to be counted")
        c = counters()
        assert (c["transfers_failed"], c["transferred_blocks"]) == (2 * MAX_COUNTER_DELTA, 2 * MAX_COUNTER_DELTA + 3)
        # Pins are still delivered with the heartbeats (to A and B; X is of another model).
        tokens = prompt_of(BS * 2, seed=41)
        hashes = [bytes(h) for h in hash_prompt_blocks(tokens, BS, "demo")]
        resp = stub.Pin(pb.PinBlocksRequest(pin_id="sys", model_id="demo", token_ids=tokens, block_hashes=hashes,
                                            replicas=2), timeout=5)
        assert sorted(resp.node_ids) == ["A", "B"]
    for node in (a, b):
        wait_until(lambda n=node: n.call(lambda e: e.pinned()) == {"sys": 2}, what=f"{node.node_id} to pin")


# ---- the router's side, without a cache service (router/pins.py keeps the same rules itself) ---------------
class EngineWorker:
    """The worker side of an InProcessWorkerClient: a real engine's pin and unpin."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def pin(self, pin_id, token_ids, cache_salt):
        return self.engine.pin(pin_id, token_ids, cache_salt)

    async def unpin(self, pin_id):
        return self.engine.unpin(pin_id)


def test_router_pins_without_a_cache_service_keep_owner_quota_and_reserve(demo_model):
    engine = Engine(EngineConfig(model="demo", num_blocks=64), loaded=demo_model)
    registry = WorkerRegistry(IndexMirror())
    w = registry.add(InProcessWorkerClient("worker-0", EngineWorker(engine)))
    w.live = True
    pins = PinManager(PromptEncoder("demo", BS), registry, None)

    def polled():  # what the registry's next poll would bring
        w.load, w.pins = engine.load(), frozenset(engine.pinned())

    def pin(tenant: str, seed: int, num_blocks: int = 16, **kw):
        polled()
        return asyncio.run(pins.pin("", prompt_of(num_blocks * BS, seed=seed), 1, 0, tenant_salt(tenant, ""), **kw))

    alpha = prompt_of(16 * BS, seed=50)
    assert pin("alpha", 50).workers == ["worker-0"]
    with pytest.raises(PinQuotaError, match=r"^tenant 'alpha' has 16 pinned blocks; 1 more would exceed its quota "
                                            r"of 16 blocks \(unpin some first\)$"):
        pin("alpha", 51, num_blocks=1)
    # Another tenant's salt names another pin: beta cannot even address alpha's; naming alpha's salt with
    # beta's identity is refused; an operator may.
    with pytest.raises(PinNotFoundError):
        asyncio.run(pins.unpin("", alpha, tenant_salt("beta", "")))
    with pytest.raises(PinNotYoursError, match="belongs to another tenant"):
        asyncio.run(pins.unpin("", alpha, tenant_salt("alpha", ""), tenant="beta"))
    assert engine.pinned() != {}
    assert pin("beta", 52).workers == ["worker-0"]
    assert pin("gamma", 53).workers == ["worker-0"]
    # 48 of 64 blocks pinned: one more pin would take the worker's reserve.
    with pytest.raises(PinQuotaError, match="^no worker has room to pin 16 blocks and keep its reserve"):
        pin("delta", 54)
    # The engine refuses it too, whoever asks (a poll that came too late, a cache service's assignment).
    with pytest.raises(InvalidRequestError, match=r"^pin refused: 16 blocks would leave 0 of 64 KV blocks free, "
                                                  r"fewer than the 16 kept for requests \(pin 'x'\)$"):
        engine.pin("x", prompt_of(16 * BS, seed=54))
    assert len(engine.pinned()) == 3
    [out] = engine.generate([prompt_of(BS * 10 + 1, seed=55)], SamplingParams(max_tokens=6))
    assert out.finish_reason == "length"
    polled()
    assert asyncio.run(pins.unpin("", alpha, tenant_salt("alpha", ""), tenant="operator")).workers == ["worker-0"]
    assert len(engine.pinned()) == 2
    engine.check_integrity()
