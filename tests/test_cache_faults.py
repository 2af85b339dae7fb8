"""Faults around the cache: every one ends in degradation or recomputation, never a failed request
or a wrong answer. Real engines (shared demo model), real Valkey, real gRPC on loopback."""

from __future__ import annotations

import grpc
import pytest
from cache_fixtures import (  # noqa: F401  (pytest fixtures)
    PARAMS,
    cache_service,
    cold_output,
    demo_model,
    make_node,
    node_config,
    prompt_of,
    wait_until,
)
from valkey_fixtures import valkey, valkey_module  # noqa: F401  (pytest fixtures)

from cache_service.local_node import LocalCacheNode
from cache_service.prefix_fetcher import FetchOutcome
from cache_service.server import CacheServiceConfig, CacheServiceThread
from cache_service.transfer_source import flip_one_byte
from protos.prefixcache.v1 import cache_pb2 as pb
from protos.prefixcache.v1 import cache_pb2_grpc
from workers.engine import Engine, EngineConfig


def indexed(node, prompt, holder, salt=""):
    """How many leading blocks of ``prompt`` the index says ``holder`` has (0 if none)."""
    matches = node.loop.run(node.node.lookup(node.engine.block_hashes(prompt, salt)), 10)
    return next((m.num_blocks for m in matches if m.node_id == holder), 0)


def held(node, prompt):
    return node.call(lambda e: e.num_cached_prefix_blocks(e.block_hashes(prompt)))


def forget_behind_the_index(node, hashes=None):
    """Evict from the engine without telling the cache service (a stale index entry)."""
    with node.lock:
        if hashes is None:
            assert node.engine.reset_cache()
        else:
            assert node.engine.evict(hashes) == len(hashes)
        node.engine.drain_events()  # swallowed: never published


def test_redis_stopped_mid_run_then_back_empty(valkey, demo_model):
    svc = CacheServiceThread(CacheServiceConfig(redis_url=valkey.url, port=0, sweep_interval_s=0.2))
    svc.start()
    nodes = []
    try:
        for name in ("A", "B"):
            engine = Engine(EngineConfig(model="demo", num_blocks=64), loaded=demo_model)
            nodes.append(LocalCacheNode(engine, name, cache_address=svc.address, config=node_config()).start())
        a, b = nodes
        p1, p2, p3 = prompt_of(16 * 3 + 1, seed=10), prompt_of(16 * 4 + 1, seed=11), prompt_of(16 * 2 + 5, seed=12)
        a.generate([p1], PARAMS)
        assert a.flush()
        assert indexed(b, p1, "A") == 3
        valkey.stop()
        # Both nodes keep serving: local hits, new prompts, prompts the other node holds (no lookup possible).
        for node, prompt in [(a, p1), (a, p2), (b, p1), (b, p3)]:
            (out,), (fetch,) = node.generate([prompt], PARAMS)
            assert out.error is None and out.finish_reason == "length"
            assert out.new_token_ids == cold_output(demo_model, prompt)
            assert fetch.outcome in (FetchOutcome.LOCAL, FetchOutcome.NO_PEER)
        assert a.generate([p1], PARAMS)[0][0].cached_tokens == 48
        wait_until(lambda: a.node.client.stats.num_heartbeat_failures > 0, what="a failed heartbeat")
        valkey.start()  # same port, empty: every node is unknown now
        # Heartbeats say known=false -> register again -> full snapshot of what each engine holds.
        for node, prompts in [(a, (p1, p2)), (b, (p1, p3))]:
            for prompt in prompts:
                wait_until(lambda n=node, p=prompt: indexed(n, p, n.node_id) == held(n, p) > 0,
                           what=f"{node.node_id} to republish")
        assert a.node.client.stats.num_registrations >= 2
        # And transfers work again.
        (out,), (fetch,) = b.generate([p2], PARAMS)
        assert (fetch.outcome, fetch.num_blocks, out.cached_tokens) == (FetchOutcome.TRANSFERRED, 4, 64), fetch
    finally:
        for node in nodes:
            node.stop()
        svc.stop()


def test_stale_index_entry_falls_back_to_recompute(make_node, demo_model):
    a, b = make_node("A"), make_node("B")
    prompt = prompt_of(16 * 6 + 1, seed=13)
    expected = cold_output(demo_model, prompt)
    a.generate([prompt], PARAMS)
    assert a.flush()
    forget_behind_the_index(a)
    assert indexed(b, prompt, "A") == 6  # the index still believes A holds it
    (out,), (fetch,) = b.generate([prompt], PARAMS)
    assert fetch.outcome == FetchOutcome.FAILED and "stale index entry" in fetch.error
    assert (out.cached_tokens, out.new_token_ids) == (0, expected)


def test_partly_stale_entry_keeps_what_arrived(make_node, demo_model):
    a, b = make_node("A"), make_node("B")
    prompt = prompt_of(16 * 6 + 1, seed=14)
    a.generate([prompt], PARAMS)
    assert a.flush()
    forget_behind_the_index(a, a.engine.block_hashes(prompt)[3:])  # the tail blocks went away
    (out,), (fetch,) = b.generate([prompt], PARAMS)
    assert (fetch.outcome, fetch.num_blocks) == (FetchOutcome.PARTIAL, 3) and "3 of 6 blocks" in fetch.error
    assert (out.cached_tokens, out.new_token_ids) == (48, cold_output(demo_model, prompt))


@pytest.mark.parametrize("raw_stream", [True, False], ids=["raw_stream", "grpc_stream"])
def test_dead_peer_falls_back_to_recompute(make_node, demo_model, raw_stream):
    a, b = make_node("A", raw_stream=raw_stream), make_node("B", raw_stream=raw_stream)
    warm = prompt_of(16 * 2 + 1, seed=25)  # a first transfer: B learns A's streams and keeps a connection
    a.generate([warm], PARAMS)
    assert a.flush()
    assert b.generate([warm], PARAMS)[1][0].outcome == FetchOutcome.TRANSFERRED
    assert a.node.servicer.stats.num_raw_requests == (1 if raw_stream else 0)
    prompt = prompt_of(16 * 4 + 1, seed=15)
    a.generate([prompt], PARAMS)
    assert a.flush()
    a.loop.run(a.node.transfer_server.stop(0), 10)  # the peer's data plane dies; it still heartbeats
    (out,), (fetch,) = b.generate([prompt], PARAMS)
    assert fetch.outcome == FetchOutcome.FAILED and "UNAVAILABLE" in fetch.error
    assert (out.cached_tokens, out.new_token_ids) == (0, cold_output(demo_model, prompt))


@pytest.mark.parametrize("raw_stream", [True, False], ids=["raw_stream", "grpc_stream"])
def test_corrupted_chunk_is_detected_and_recomputed(make_node, demo_model, raw_stream):
    a, b = make_node("A", raw_stream=raw_stream), make_node("B", raw_stream=raw_stream)
    prompt = prompt_of(16 * 5 + 1, seed=16)
    expected = cold_output(demo_model, prompt)
    a.generate([prompt], PARAMS)
    assert a.flush()
    a.faults.corrupt = flip_one_byte(block_index=0, offset=-1)  # one byte of block 0's data, in transit
    (out,), (fetch,) = b.generate([prompt], PARAMS)
    assert fetch.outcome == FetchOutcome.FAILED and "checksum" in fetch.error
    assert (out.cached_tokens, out.new_token_ids) == (0, expected)
    b.engine.check_integrity()
    # A flipped byte in a later block: the good leading blocks are kept.
    c = make_node("C", raw_stream=raw_stream)
    a.faults.corrupt = flip_one_byte(block_index=2, offset=-100)
    (out,), (fetch,) = c.generate([prompt], PARAMS)
    assert (fetch.outcome, fetch.num_blocks) == (FetchOutcome.PARTIAL, 2) and "checksum" in fetch.error
    assert (out.cached_tokens, out.new_token_ids) == (32, expected)
    assert a.node.servicer.stats.num_raw_requests == (2 if raw_stream else 0)


@pytest.mark.parametrize("raw_stream", [True, False], ids=["raw_stream", "grpc_stream"])
def test_slow_peer_hits_the_deadline_and_the_request_completes(make_node, demo_model, raw_stream):
    a = make_node("A", raw_stream=raw_stream)
    b = make_node("B", raw_stream=raw_stream, min_deadline_s=0.3, max_deadline_s=0.3)
    prompt = prompt_of(16 * 4 + 1, seed=17)
    a.generate([prompt], PARAMS)
    assert a.flush()
    a.faults.delay_s = 1.0  # per chunk
    (out,), (fetch,) = b.generate([prompt], PARAMS)
    assert fetch.outcome == FetchOutcome.FAILED and "deadline" in fetch.error
    assert fetch.seconds < 1.0
    assert out.finish_reason == "length" and out.new_token_ids == cold_output(demo_model, prompt)


def test_event_queue_overflow_resyncs_with_a_snapshot(make_node, demo_model, cache_service):
    a = make_node("A")
    a.node.client.queue.capacity = 2  # every step's events overflow it
    prompt = prompt_of(16 * 5 + 1, seed=18)
    (out,), _ = a.generate([prompt], PARAMS)
    assert a.node.client.queue.num_overflows > 0
    assert a.flush()
    assert indexed(a, prompt, "A") == 5
    assert a.node.client.stats.num_snapshots >= 2


def test_pins_are_held_on_n_nodes_and_rewarmed_when_a_holder_dies(make_node, cache_service):
    a, b, c = make_node("A"), make_node("B"), make_node("C")
    tokens = prompt_of(16 * 3, seed=19)
    hashes = [bytes(h) for h in a.engine.block_hashes(tokens)]
    a.generate([tokens + [5]], PARAMS)  # A already holds the prefix: it is preferred
    assert a.flush()
    stub = cache_pb2_grpc.CacheServiceStub(grpc.insecure_channel(cache_service.address))
    resp = stub.Pin(pb.PinBlocksRequest(pin_id="system", model_id="demo", token_ids=tokens, block_hashes=hashes,
                                        replicas=2), timeout=5)
    holders = sorted(resp.node_ids)
    assert holders[0] == "A" and len(holders) == 2
    nodes = {"A": a, "B": b, "C": c}
    for name in holders:
        wait_until(lambda n=nodes[name]: n.engine.load().num_pinned_blocks == 3, what=f"{name} to pin")
    (spare,) = set(nodes) - set(holders)
    assert nodes[spare].engine.load().num_pinned_blocks == 0
    a.stop()  # a holder dies: after its TTL the spare's next heartbeat is assigned the pin
    wait_until(lambda: nodes[spare].engine.load().num_pinned_blocks == 3, what="the pin to be re-warmed")
    stats = stub.GetStats(pb.GetStatsRequest(), timeout=5)
    assert [sorted(p.node_ids) for p in stats.pins] == [sorted(set(holders) - {"A"} | {spare})]
    # Unpinning releases it everywhere (the next heartbeats carry an empty set).
    stub.Unpin(pb.PinBlocksRequest(pin_id="system"), timeout=5)
    for name in set(nodes) - {"A"}:
        wait_until(lambda n=nodes[name]: n.engine.load().num_pinned_blocks == 0, what=f"{name} to unpin")


def test_node_started_before_the_service_serves_then_registers(valkey_module, demo_model, make_node):
    from cache_service.embedded_redis import free_port

    port = free_port()
    a = make_node("A", cache_address=f"127.0.0.1:{port}", wait_registered_s=0)  # nothing listens there yet
    prompt = prompt_of(16 * 2 + 1, seed=20)
    (out,), (fetch,) = a.generate([prompt], PARAMS)
    assert fetch.outcome == FetchOutcome.NO_PEER and out.new_token_ids == cold_output(demo_model, prompt)
    wait_until(lambda: a.node.client.stats.num_heartbeat_failures > 2, what="failed registrations")
    assert a.node.client.epoch is None
    svc = CacheServiceThread(CacheServiceConfig(redis_url=valkey_module.url, port=port, sweep_interval_s=0.2))
    svc.start()
    try:
        wait_until(lambda: indexed(a, prompt, "A") == 2, what="A to register and publish its snapshot")
    finally:
        svc.stop()
