"""The Redis index (cache_service/index.py + lua_scripts.py) on a real embedded Valkey."""

from __future__ import annotations

import asyncio
import functools
import os
import time

import pytest
from valkey_fixtures import valkey, valkey_module  # noqa: F401  (pytest fixtures)

from cache_service.block_hash import hash_prompt_blocks
from cache_service.embedded_redis import connect
from cache_service.index import (
    ClusterIndex,
    IndexUnavailable,
    NodeExpired,
    NodeNotFound,
    StaleEpoch,
)
from cache_service.records import AllBlocksCleared, BlockRemoved, BlockStored, WorkerLoad
from cache_service.types import NodeInfo, PinSpec, PrefixMatch, TransferCounts

MODEL = "m"
HASHES = hash_prompt_blocks(list(range(16 * 8)), 16, MODEL)  # 8 blocks


def async_test(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))

    return wrapper


def stored(hashes):
    return [BlockStored(h) for h in hashes]


def removed(hashes):
    return [BlockRemoved(h) for h in hashes]


async def make_index(server, flush: bool = True) -> ClusterIndex:
    index = ClusterIndex(connect(server.url))
    if flush:
        await index.redis.flushall()
    return index


async def register(index, node_id, ttl_s=30.0, model=MODEL):
    return (await index.register(NodeInfo(node_id, f"127.0.0.1:{1000 + len(node_id)}", model), ttl_s)).epoch


@async_test
async def test_lookup_returns_each_nodes_prefix_longest_first(valkey_module):
    index = await make_index(valkey_module)
    ea, eb, ec = [await register(index, n) for n in ("A", "B", "C")]
    assert await index.publish("A", ea, stored(HASHES[:5])) == 5
    assert await index.publish("B", eb, stored(HASHES[:2])) == 2
    # C holds blocks 1.. but not block 0: not a prefix, no match.
    assert await index.publish("C", ec, stored(HASHES[1:8])) == 7
    assert await index.lookup(HASHES) == [
        PrefixMatch("A", 5, "127.0.0.1:1001"),
        PrefixMatch("B", 2, "127.0.0.1:1001"),
    ]
    assert await index.lookup(HASHES[:1]) == [PrefixMatch("A", 1, "127.0.0.1:1001"),
                                               PrefixMatch("B", 1, "127.0.0.1:1001")]
    assert await index.lookup(HASHES[5:]) == [PrefixMatch("C", 3, "127.0.0.1:1001")]
    assert await index.lookup([os.urandom(16)]) == []
    # A model filter drops nodes of other models.
    assert await index.lookup(HASHES, model_id="other") == []
    await index.check_integrity()
    await index.close()


@async_test
async def test_removals_clear_and_snapshot_update_prefix_lengths(valkey_module):
    index = await make_index(valkey_module)
    ea, eb = await register(index, "A"), await register(index, "B")
    await index.publish("A", ea, stored(HASHES))
    await index.publish("B", eb, stored(HASHES[:3]))
    assert await index.publish("A", ea, removed([HASHES[4]])) == 1  # evicted in the middle
    assert [(m.node_id, m.num_blocks) for m in await index.lookup(HASHES)] == [("A", 4), ("B", 3)]
    await index.publish("B", eb, [AllBlocksCleared()])
    assert [(m.node_id, m.num_blocks) for m in await index.lookup(HASHES)] == [("A", 4)]
    # A full snapshot replaces everything the node had.
    await index.publish("A", ea, stored(HASHES[:2]), full_snapshot=True)
    assert [(m.node_id, m.num_blocks) for m in await index.lookup(HASHES)] == [("A", 2)]
    stats = await index.stats()
    assert (stats.num_blocks, stats.num_entries) == (2, 2)
    assert stats.counters["publishes"] == 5
    await index.check_integrity()
    await index.close()


@async_test
async def test_large_publish_is_chunked(valkey_module):
    index = await make_index(valkey_module)
    epoch = await register(index, "A")
    hashes = [os.urandom(16) for _ in range(10_000)]  # > PUBLISH_CHUNK: a pipeline of several scripts
    assert await index.publish("A", epoch, stored(hashes)) == 10_000
    stats = await index.stats()
    assert (stats.num_blocks, stats.num_entries) == (10_000, 10_000)
    assert stats.counters["publishes"] == 1
    assert await index.publish("A", epoch, stored(hashes[:10]), full_snapshot=True) == 10
    assert (await index.stats()).num_entries == 10
    await index.check_integrity()
    await index.close()


@async_test
async def test_registration_epochs_and_rejections(valkey_module):
    index = await make_index(valkey_module)
    e1 = await register(index, "A")
    await index.publish("A", e1, stored(HASHES[:3]))
    e2 = await register(index, "A")  # a restarted node: new epoch, old entries dropped
    assert e2 == e1 + 1
    assert await index.lookup(HASHES) == []
    with pytest.raises(StaleEpoch, match="epoch 1 is stale"):
        await index.publish("A", e1, stored(HASHES[:1]))
    with pytest.raises(NodeNotFound, match="'ghost' is not registered"):
        await index.publish("ghost", 1, stored(HASHES[:1]))
    assert await index.lookup(HASHES) == []
    assert (await index.heartbeat("ghost", 1, WorkerLoad())).known is False
    assert (await index.heartbeat("A", e1, WorkerLoad())).known is False  # stale epoch
    load = WorkerLoad("A", num_running=1, num_waiting=2, num_free_blocks=3, num_cached_blocks=4)
    assert (await index.heartbeat("A", e2, load, TransferCounts(2, 1, 5, 500))).known is True
    stats = await index.stats()
    (node,) = stats.nodes
    assert (node.load.num_running, node.load.num_waiting, node.load.num_free_blocks, node.load.num_cached_blocks) \
        == (1, 2, 3, 4)
    assert node.alive and node.epoch == e2
    assert [stats.counters[k] for k in ("transfers", "transfers_failed", "transferred_blocks", "transferred_bytes")] \
        == [2, 1, 5, 500]
    await index.close()


@async_test
async def test_dead_node_vanishes_from_lookup_then_from_redis(valkey_module):
    index = await make_index(valkey_module)
    ea = await register(index, "A", ttl_s=1.0)
    eb = await register(index, "B", ttl_s=30.0)
    await index.publish("A", ea, stored(HASHES))
    await index.publish("B", eb, stored(HASHES[:3]))
    assert [m.node_id for m in await index.lookup(HASHES)] == ["A", "B"]
    await asyncio.sleep(1.3)  # A's heartbeat key expires
    # Ignored at once, before any sweep ...
    assert [(m.node_id, m.num_blocks) for m in await index.lookup(HASHES)] == [("B", 3)]
    assert (await index.stats()).num_entries == 11
    # ... and its entries are gone after the sweep.
    result = await index.sweep(batch=3)  # a small batch: several SPOP rounds
    assert (result.num_dead_nodes, result.num_removed_entries) == (1, 8)
    stats = await index.stats()
    assert (stats.num_blocks, stats.num_entries) == (3, 3)
    assert [(n.info.node_id, n.alive) for n in stats.nodes] == [("A", False), ("B", True)]
    with pytest.raises(NodeExpired):
        await index.publish("A", ea, stored(HASHES[:1]))
    assert (await index.heartbeat("A", ea, WorkerLoad())).known is False
    # A dead node is forgotten after forget_after_s.
    assert (await index.sweep(forget_after_s=0.0)).num_forgotten_nodes == 1
    assert [n.info.node_id for n in (await index.stats()).nodes] == ["B"]
    await index.check_integrity()
    await index.close()


@async_test
async def test_pins_are_kept_on_replicas_and_reassigned_when_a_holder_dies(valkey_module):
    index = await make_index(valkey_module)
    ea = await register(index, "A", ttl_s=1.0)
    eb = await register(index, "B", ttl_s=30.0)
    ec = await register(index, "C", ttl_s=30.0)
    await register(index, "D", ttl_s=30.0, model="other")
    tokens = list(range(16 * 3))
    hashes = HASHES[:3]
    await index.publish("A", ea, stored(hashes))  # A holds the prefix: preferred
    await index.heartbeat("B", eb, WorkerLoad(num_running=5))  # B busier than C
    spec = PinSpec("sys", MODEL, hashes, tokens, "", replicas=2)
    assert await index.pin(spec) == ["A", "C"]
    hb = await index.heartbeat("C", ec, WorkerLoad())
    assert [(p.pin_id, p.token_ids, p.num_blocks) for p in hb.pins] == [("sys", tuple(tokens), 3)]
    assert (await index.heartbeat("B", eb, WorkerLoad(num_running=5))).pins == []  # not a holder, pin full
    await asyncio.sleep(1.3)  # A dies
    hb = await index.heartbeat("B", eb, WorkerLoad())
    assert [p.pin_id for p in hb.pins] == ["sys"]  # B replaces A
    stats = await index.stats()
    assert [(p.pin_id, p.replicas, p.num_blocks, p.num_tokens, p.node_ids) for p in stats.pins] == \
        [("sys", 2, 3, 48, ["B", "C"])]
    assert stats.counters["pin_assignments"] == 1
    assert await index.unpin("sys") == (True, ["B", "C"])
    assert await index.unpin("sys") == (False, [])
    assert (await index.heartbeat("B", eb, WorkerLoad())).pins == []
    await index.close()


@async_test
async def test_pin_ttl_expires(valkey_module):
    index = await make_index(valkey_module)
    ea = await register(index, "A")
    assert await index.pin(PinSpec("p", MODEL, HASHES[:1], list(range(16)), ttl_seconds=1)) == ["A"]
    assert [p.pin_id for p in (await index.heartbeat("A", ea, WorkerLoad())).pins] == ["p"]
    await asyncio.sleep(1.1)
    assert (await index.heartbeat("A", ea, WorkerLoad())).pins == []
    assert (await index.stats()).pins == []
    await index.close()


@async_test
async def test_redis_down_fails_fast_and_an_empty_restart_is_survived(valkey):
    index = await make_index(valkey, flush=False)
    epoch = await register(index, "A")
    await index.publish("A", epoch, stored(HASHES))
    valkey.stop()
    t0 = time.monotonic()
    with pytest.raises(IndexUnavailable, match="Redis"):
        await index.lookup(HASHES)
    with pytest.raises(IndexUnavailable):
        await index.heartbeat("A", epoch, WorkerLoad())
    assert time.monotonic() - t0 < 5.0  # fails, never hangs (the limit is generous on purpose)
    valkey.start()  # same port, empty dataset, no scripts loaded (NOSCRIPT -> reloaded)
    assert (await index.heartbeat("A", epoch, WorkerLoad())).known is False
    epoch = await register(index, "A")
    await index.publish("A", epoch, stored(HASHES[:4]), full_snapshot=True)
    assert [(m.node_id, m.num_blocks) for m in await index.lookup(HASHES)] == [("A", 4)]
    await index.close()


@async_test
async def test_memory_per_block_holder_entry_is_small(valkey_module):
    index = await make_index(valkey_module)
    epochs = [await register(index, n) for n in ("A", "B")]
    n = 5_000
    hashes = [os.urandom(16) for _ in range(n)]
    before = int((await index.redis.info("memory"))["used_memory"])
    for node, epoch in zip(("A", "B"), epochs):
        await index.publish(node, epoch, stored(hashes))
    after = int((await index.redis.info("memory"))["used_memory"])
    per_entry = (after - before) / (2 * n)
    assert per_entry <= 200, f"{per_entry:.0f} bytes per (block, holder) entry"
    await index.close()


def test_embedded_redis_on_a_unix_socket_and_url_checks(tmp_path):
    from cache_service.embedded_redis import EmbeddedRedis, connect_sync

    server = EmbeddedRedis(unix_socket_path=str(tmp_path / "valkey.sock"))
    assert server.start() == f"unix://{tmp_path / 'valkey.sock'}"
    try:
        client = connect_sync(server.url.replace("unix://", "valkey+unix://"))
        client.set("k", "v")
        assert client.get("k") == b"v"
        client.close()
    finally:
        server.stop()
    assert not server.is_running()
    with pytest.raises(ValueError, match="unsupported Redis URL 'http://x'"):
        connect_sync("http://x")
