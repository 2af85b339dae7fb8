"""The CacheService gRPC edge (servicer + server) on a real embedded Valkey."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from valkey_fixtures import expire_node, redis_dump, valkey, valkey_module  # noqa: F401  (pytest fixtures)

from cache_service.block_hash import hash_prompt_blocks
from cache_service.embedded_redis import connect_sync
from cache_service.server import CacheServiceConfig, CacheServiceThread
from cache_service.validation import MAX_EVENTS_PER_PUBLISH, MAX_LOOKUP_BLOCKS
from common.cluster_auth import Member, SharedSecret
from protos.prefixcache.v1 import cache_pb2 as pb
from protos.prefixcache.v1 import cache_pb2_grpc

MODEL = "m"
HASHES = [bytes(h) for h in hash_prompt_blocks(list(range(16 * 6)), 16, MODEL)]


@pytest.fixture(scope="module")
def service(valkey_module):
    svc = CacheServiceThread(CacheServiceConfig(redis_url=valkey_module.url, port=0, sweep_interval_s=0.2))
    svc.start()
    yield svc
    svc.stop()


@pytest.fixture
def stub(service, valkey_module):
    connect_sync(valkey_module.url).flushall()
    channel = grpc.insecure_channel(service.address)
    yield cache_pb2_grpc.CacheServiceStub(channel)
    channel.close()


def register(stub, node_id, ttl=30, model=MODEL, address="127.0.0.1:7000"):
    node = pb.NodeInfo(node_id=node_id, transfer_address=address, model_id=model, block_size=16,
                       capacity_blocks=100, block_nbytes=4096)
    return stub.RegisterNode(pb.RegisterNodeRequest(node=node, ttl_seconds=ttl), timeout=5).epoch


def stored(hashes):
    return [pb.BlockEvent(stored=pb.BlockStoredEvent(block_hash=h)) for h in hashes]


def test_register_publish_lookup_stats(stub):
    ea, eb = register(stub, "A", address="127.0.0.1:7001"), register(stub, "B", address="127.0.0.1:7002")
    assert (ea, eb) == (1, 1)
    resp = stub.PublishEvents(pb.PublishEventsRequest(node_id="A", epoch=ea, events=stored(HASHES)), timeout=5)
    assert resp.num_applied == 6
    events = stored(HASHES[:3]) + [pb.BlockEvent(removed=pb.BlockRemovedEvent(block_hash=HASHES[2]))]
    assert stub.PublishEvents(pb.PublishEventsRequest(node_id="B", epoch=eb, events=events)).num_applied == 4
    matches = stub.Lookup(pb.LookupRequest(block_hashes=HASHES, model_id=MODEL), timeout=5).matches
    assert [(m.node_id, m.num_blocks, m.transfer_address) for m in matches] == \
        [("A", 6, "127.0.0.1:7001"), ("B", 2, "127.0.0.1:7002")]
    assert stub.Lookup(pb.LookupRequest(block_hashes=[])).matches == []
    hb = stub.Heartbeat(pb.HeartbeatRequest(node_id="A", epoch=ea, load=pb.NodeLoad(num_running=3)), timeout=5)
    assert hb.known and list(hb.pins) == []
    stats = stub.GetStats(pb.GetStatsRequest(), timeout=5)
    assert [(n.node.node_id, n.alive, n.epoch, n.num_indexed_blocks) for n in stats.nodes] == \
        [("A", True, 1, 6), ("B", True, 1, 2)]
    assert stats.nodes[0].load.num_running == 3 and stats.nodes[0].node.block_nbytes == 4096
    assert (stats.num_blocks, stats.num_entries) == (6, 8)
    assert stats.counters["lookups"] == 1 and stats.counters["publishes"] == 2
    assert stats.redis_used_memory_bytes > 0


def _code(fn, *args):
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, timeout=5)
    return info.value.code(), info.value.details()


def test_bad_input_is_rejected_with_a_clear_message_and_changes_nothing(stub, valkey_module):
    epoch = register(stub, "A")
    stub.PublishEvents(pb.PublishEventsRequest(node_id="A", epoch=epoch, events=stored(HASHES[:2])))
    before = redis_dump(valkey_module)
    bad_node = pb.NodeInfo(node_id="A", model_id=MODEL, block_size=16)
    INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    cases = [
        # RegisterNode
        (stub.RegisterNode, pb.RegisterNodeRequest(node=pb.NodeInfo(model_id=MODEL, block_size=16)),
         INVALID, "node.node_id is required"),
        (stub.RegisterNode, pb.RegisterNodeRequest(node=pb.NodeInfo(node_id="bad id", model_id=MODEL, block_size=16)),
         INVALID, "node.node_id 'bad id' has characters"),
        (stub.RegisterNode, pb.RegisterNodeRequest(node=pb.NodeInfo(node_id="x" * 200, model_id=MODEL,
                                                                    block_size=16)),
         INVALID, "the limit is 128"),
        (stub.RegisterNode, pb.RegisterNodeRequest(node=pb.NodeInfo(node_id="B", block_size=16)),
         INVALID, "node.model_id is required"),
        (stub.RegisterNode, pb.RegisterNodeRequest(node=pb.NodeInfo(node_id="B", model_id=MODEL)),
         INVALID, "node.block_size = 0 is out of range"),
        (stub.RegisterNode, pb.RegisterNodeRequest(node=pb.NodeInfo(node_id="B", model_id=MODEL, block_size=16,
                                                                    transfer_address="nohost")),
         INVALID, "node.transfer_address 'nohost' is not host:port"),
        (stub.RegisterNode, pb.RegisterNodeRequest(node=bad_node, ttl_seconds=100_000),
         INVALID, "ttl_seconds = 100000 is out of range"),
        # Heartbeat
        (stub.Heartbeat, pb.HeartbeatRequest(node_id=""), INVALID, "node_id is required"),
        # PublishEvents
        (stub.PublishEvents, pb.PublishEventsRequest(node_id="ghost", epoch=1, events=stored(HASHES[:1])),
         NOT_FOUND, "node 'ghost' is not registered"),
        (stub.PublishEvents, pb.PublishEventsRequest(node_id="", epoch=1), INVALID, "node_id is required"),
        (stub.PublishEvents, pb.PublishEventsRequest(node_id="A", epoch=epoch,
                                                     events=stored(HASHES[:2] + [b"short"])),
         INVALID, "events[2].stored.block_hash[0] is 5 bytes; a block hash is 16 bytes"),
        (stub.PublishEvents, pb.PublishEventsRequest(node_id="A", epoch=epoch, events=[pb.BlockEvent()]),
         INVALID, "events[0] has no kind"),
        (stub.PublishEvents, pb.PublishEventsRequest(
            node_id="A", epoch=epoch, events=[pb.BlockEvent(cleared=pb.AllBlocksClearedEvent())]
            * (MAX_EVENTS_PER_PUBLISH + 1)),
         INVALID, f"the limit is {MAX_EVENTS_PER_PUBLISH} per request"),
        # Lookup
        (stub.Lookup, pb.LookupRequest(block_hashes=[HASHES[0], b"x" * 17]),
         INVALID, "block_hashes[1] is 17 bytes"),
        (stub.Lookup, pb.LookupRequest(block_hashes=[HASHES[0]] * (MAX_LOOKUP_BLOCKS + 1)),
         INVALID, f"the limit is {MAX_LOOKUP_BLOCKS} per request"),
        # Pin / Unpin
        (stub.Pin, pb.PinBlocksRequest(pin_id="", model_id=MODEL, token_ids=[1], block_hashes=HASHES[:1]),
         INVALID, "pin_id is required"),
        (stub.Pin, pb.PinBlocksRequest(pin_id="p", model_id=MODEL, block_hashes=HASHES[:1]),
         INVALID, "token_ids is required"),
        (stub.Pin, pb.PinBlocksRequest(pin_id="p", token_ids=[1], block_hashes=HASHES[:1]),
         INVALID, "model_id is required"),
        (stub.Pin, pb.PinBlocksRequest(pin_id="p", model_id=MODEL, token_ids=list(range(16))),
         INVALID, "block_hashes is required"),
        (stub.Pin, pb.PinBlocksRequest(pin_id="p", model_id=MODEL, token_ids=[1], block_hashes=[b"abc"]),
         INVALID, "block_hashes[0] is 3 bytes"),
        (stub.Pin, pb.PinBlocksRequest(pin_id="p", model_id=MODEL, token_ids=[1], block_hashes=HASHES[:2]),
         INVALID, "2 block_hashes cannot come from 1 token_ids"),
        (stub.Pin, pb.PinBlocksRequest(pin_id="p", model_id=MODEL, token_ids=list(range(16)),
                                       block_hashes=HASHES[:1], replicas=1000),
         INVALID, "replicas = 1000 is out of range [1, 64]"),
        (stub.Pin, pb.PinBlocksRequest(pin_id="p", model_id=MODEL, token_ids=list(range(16)),
                                       block_hashes=HASHES[:1], tenant="t" * 300),
         INVALID, "tenant is 300 characters long; the limit is 256"),
        (stub.Unpin, pb.PinBlocksRequest(pin_id=""), INVALID, "pin_id is required"),
        (stub.Unpin, pb.PinBlocksRequest(pin_id="p", tenant="a\x1fb"), INVALID, "tenant holds a unit separator"),
    ]
    for rpc, request, code, message in cases:
        got_code, details = _code(rpc, request)
        assert (got_code, message in details) == (code, True), (request, got_code, details)
    # A heartbeat from an unknown node is the protocol's "register again", not an error.
    assert stub.Heartbeat(pb.HeartbeatRequest(node_id="ghost", epoch=1)).known is False
    assert stub.Unpin(pb.PinBlocksRequest(pin_id="nope")).found is False
    assert redis_dump(valkey_module) == before


def test_stale_epoch_is_failed_precondition(stub):
    e1 = register(stub, "A")
    register(stub, "A")
    code, details = _code(stub.PublishEvents, pb.PublishEventsRequest(node_id="A", epoch=e1,
                                                                      events=stored(HASHES[:1])))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "epoch 1 is stale (current epoch 2)" in details


def test_pin_rpc_and_reassignment_on_heartbeat(stub, valkey_module):
    ea = register(stub, "A", ttl=30)
    eb = register(stub, "B", ttl=30)
    ec = register(stub, "C", ttl=30)
    tokens = list(range(40))
    hashes = [bytes(h) for h in hash_prompt_blocks(tokens, 16, MODEL)]
    stub.PublishEvents(pb.PublishEventsRequest(node_id="A", epoch=ea, events=stored(hashes)))
    stub.PublishEvents(pb.PublishEventsRequest(node_id="B", epoch=eb, events=stored(hashes[:1])))
    resp = stub.Pin(pb.PinBlocksRequest(pin_id="sys", model_id=MODEL, token_ids=tokens, block_hashes=hashes,
                                        replicas=2))
    assert (resp.found, list(resp.node_ids)) == (True, ["A", "B"])  # the nodes holding most of it
    hb = stub.Heartbeat(pb.HeartbeatRequest(node_id="B", epoch=eb))
    assert [(p.pin_id, list(p.token_ids), p.num_blocks) for p in hb.pins] == [("sys", tokens, 2)]
    assert list(stub.Heartbeat(pb.HeartbeatRequest(node_id="C", epoch=ec)).pins) == []
    assert 0 < expire_node(valkey_module, "A") <= 30_000  # A's heartbeat (PX 30 s) expires
    assert [p.pin_id for p in stub.Heartbeat(pb.HeartbeatRequest(node_id="C", epoch=ec)).pins] == ["sys"]
    stats = stub.GetStats(pb.GetStatsRequest())
    assert [(p.pin_id, list(p.node_ids), p.num_tokens) for p in stats.pins] == [("sys", ["B", "C"], 40)]
    resp = stub.Unpin(pb.PinBlocksRequest(pin_id="sys"))
    assert (resp.found, list(resp.node_ids)) == (True, ["B", "C"])


def test_sweeper_removes_dead_nodes_in_the_background(stub, valkey_module):
    ea = register(stub, "A", ttl=30)
    stub.PublishEvents(pb.PublishEventsRequest(node_id="A", epoch=ea, events=stored(HASHES)))
    assert stub.GetStats(pb.GetStatsRequest()).num_entries == 6
    assert 0 < expire_node(valkey_module, "A") <= 30_000  # A's heartbeat (PX 30 s) expires
    deadline = time.monotonic() + 10
    while stub.GetStats(pb.GetStatsRequest()).num_entries and time.monotonic() < deadline:
        time.sleep(0.1)
    stats = stub.GetStats(pb.GetStatsRequest())
    assert (stats.num_entries, stats.num_blocks, stats.nodes[0].alive) == (0, 0, False)


def test_health_and_reflection(service):
    with grpc.insecure_channel(service.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "prefixcache.v1.CacheService"):
            assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        (resp,) = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 timeout=5))
        names = {s.name for s in resp.list_services_response.service}
        assert {"prefixcache.v1.CacheService", "grpc.health.v1.Health"} <= names


def test_redis_down_is_unavailable_quickly_then_recovers(valkey):
    svc = CacheServiceThread(CacheServiceConfig(redis_url=valkey.url, port=0, sweep_interval_s=0.2))
    svc.start()
    try:
        with grpc.insecure_channel(svc.address) as channel:
            stub = cache_pb2_grpc.CacheServiceStub(channel)
            epoch = register(stub, "A")
            valkey.stop()
            for rpc, request in [
                (stub.Lookup, pb.LookupRequest(block_hashes=HASHES)),
                (stub.Heartbeat, pb.HeartbeatRequest(node_id="A", epoch=epoch)),
                (stub.PublishEvents, pb.PublishEventsRequest(node_id="A", epoch=epoch, events=stored(HASHES))),
                (stub.GetStats, pb.GetStatsRequest()),
            ]:
                code, details = _code(rpc, request)  # a 5 s deadline: UNAVAILABLE comes well before it
                assert code == grpc.StatusCode.UNAVAILABLE and "Redis" in details, (code, details)
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and health.Check(health_pb2.HealthCheckRequest()).status == \
                    health_pb2.HealthCheckResponse.SERVING:
                time.sleep(0.1)
            assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            valkey.start()  # empty
            assert stub.Heartbeat(pb.HeartbeatRequest(node_id="A", epoch=epoch), timeout=5).known is False
            assert register(stub, "A") == 1
    finally:
        svc.stop()


def test_cli_runs_with_embedded_valkey_and_stops_on_sigterm():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "deploy.cli", "cache-service", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        address = secret_file = None
        deadline = time.monotonic() + 60
        while address is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line.startswith("cluster secret for this start: "):  # members only: a secret made for this start
                secret_file = line.split(": ", 1)[1].split()[0]
            if line.startswith("cache service listening on "):
                address = line.split()[-1]
        assert address is not None and secret_file is not None, "the CLI did not report its address and secret"
        operator = Member("operator", SharedSecret.from_file(secret_file))
        with grpc.insecure_channel(address) as channel:
            stub = cache_pb2_grpc.CacheServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.GetStats(pb.GetStatsRequest(), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            metadata = operator.call_metadata("/prefixcache.v1.CacheService/GetStats")
            assert stub.GetStats(pb.GetStatsRequest(), timeout=10, metadata=metadata).num_blocks == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not os.path.exists(secret_file)  # removed with the service
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _varints(values) -> bytes:
    """``values`` as protobuf writes a packed repeated uint32 field's payload."""
    out = bytearray()
    for value in values:
        while value >= 0x80:
            out.append(value & 0x7F | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out)


def test_get_stats_carries_no_salt_and_no_prompt_tokens(stub):
    import struct

    epoch = register(stub, "A")
    salt = "tenant\x1falpha\x1fsecret-salt-7f3a"
    tokens = [0x7EADBEEF - 977 * i for i in range(32)]  # distinctive ids, easy to spot in any encoding
    hashes = [bytes(h) for h in hash_prompt_blocks(tokens, 16, MODEL, salt)]
    stub.Pin(pb.PinBlocksRequest(pin_id="sys", model_id=MODEL, token_ids=tokens, block_hashes=hashes,
                                 cache_salt=salt, tenant="alpha"), timeout=5)
    stats = stub.GetStats(pb.GetStatsRequest(), timeout=5)
    wire = stats.SerializeToString()
    for secret in (salt.encode(), b"secret-salt-7f3a", struct.pack(f"<{len(tokens)}I", *tokens),
                   struct.pack("<I", tokens[0]), _varints(tokens), _varints(tokens[:1])):
        assert secret not in wire, secret
    (pin,) = stats.pins
    assert [(f.name, value) for f, value in pin.ListFields()] == [
        ("pin_id", "sys"), ("replicas", 1), ("num_blocks", 2), ("node_ids", ["A"]), ("num_tokens", 32)]
    # The holder still gets what it needs to warm the pin, with its heartbeat.
    (assignment,) = stub.Heartbeat(pb.HeartbeatRequest(node_id="A", epoch=epoch), timeout=5).pins
    assert (assignment.cache_salt, list(assignment.token_ids)) == (salt, tokens)
