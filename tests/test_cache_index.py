"""The Redis index (cache_service/index.py + lua_scripts.py) on a real embedded Valkey."""

from __future__ import annotations

import asyncio
import functools
import os

import pytest
from valkey_fixtures import redis_dump, valkey, valkey_module  # noqa: F401  (pytest fixtures)

from cache_service.block_hash import hash_prompt_blocks
from cache_service.embedded_redis import connect
from cache_service.index import (
    ClusterIndex,
    IndexUnavailable,
    NodeExpired,
    NodeNotFound,
    PinNotYours,
    PinQuotaExceeded,
    StaleEpoch,
    heartbeat_key,
    node_ids_key,
    pin_key,
)
from cache_service.records import AllBlocksCleared, BlockRemoved, BlockStored, Tier, WorkerLoad
from cache_service.types import NodeInfo, PinSpec, PrefixMatch, TierCounts, TransferCounts
from cache_service.validation import MAX_COUNTER_DELTA

MODEL = "m"
HASHES = hash_prompt_blocks(list(range(16 * 8)), 16, MODEL)  # 8 blocks
HANG_GUARD_S = 30.0  # far above the Redis client's own timeouts (embedded_redis): only a hang reaches it


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


async def expire_node(index, node_id) -> int:
    """What the node's heartbeat TTL running out does, now: its heartbeat key is gone.

    Returns the TTL the key had left (ms), to show it was going to expire on its own."""
    idx = await index.redis.hget(node_ids_key(index.prefix), node_id)
    key = heartbeat_key(index.prefix, idx.decode())
    ttl_left_ms = await index.redis.pttl(key)
    assert await index.redis.delete(key) == 1
    return ttl_left_ms


async def redis_time_ms(index) -> int:
    seconds, micros = await index.redis.time()
    return seconds * 1000 + micros // 1000


@async_test
async def test_lookup_returns_each_nodes_prefix_longest_first(valkey_module):
    index = await make_index(valkey_module)
    ea, eb, ec = [await register(index, n) for n in ("A", "B", "C")]
    assert await index.publish("A", ea, stored(HASHES[:5])) == 5
    assert await index.publish("B", eb, stored(HASHES[:2])) == 2
    # C holds blocks 1.. but not block 0: not a prefix, no match.
    assert await index.publish("C", ec, stored(HASHES[1:8])) == 7
    assert await index.lookup(HASHES) == [
        PrefixMatch("A", 5, "127.0.0.1:1001", TierCounts(5)),
        PrefixMatch("B", 2, "127.0.0.1:1001", TierCounts(2)),
    ]
    assert await index.lookup(HASHES[:1]) == [PrefixMatch("A", 1, "127.0.0.1:1001", TierCounts(1)),
                                               PrefixMatch("B", 1, "127.0.0.1:1001", TierCounts(1))]
    assert await index.lookup(HASHES[5:]) == [PrefixMatch("C", 3, "127.0.0.1:1001", TierCounts(3))]
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
    ea = await register(index, "A")
    eb = await register(index, "B")
    await index.publish("A", ea, stored(HASHES))
    await index.publish("B", eb, stored(HASHES[:3]))
    assert [m.node_id for m in await index.lookup(HASHES)] == ["A", "B"]
    assert 0 < await expire_node(index, "A") <= 30_000  # A's heartbeat key (PX 30 s) expires
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
    ea = await register(index, "A")
    eb = await register(index, "B")
    ec = await register(index, "C")
    await register(index, "D", model="other")
    tokens = list(range(16 * 3))
    hashes = HASHES[:3]
    await index.publish("A", ea, stored(hashes))  # A holds the prefix: preferred
    await index.heartbeat("B", eb, WorkerLoad(num_running=5))  # B busier than C
    spec = PinSpec("sys", MODEL, hashes, tokens, "", replicas=2)
    assert await index.pin(spec) == ["A", "C"]
    hb = await index.heartbeat("C", ec, WorkerLoad())
    assert [(p.pin_id, p.token_ids, p.num_blocks) for p in hb.pins] == [("sys", tuple(tokens), 3)]
    assert (await index.heartbeat("B", eb, WorkerLoad(num_running=5))).pins == []  # not a holder, pin full
    await expire_node(index, "A")  # A dies
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
    before_ms = await redis_time_ms(index)
    assert await index.pin(PinSpec("p", MODEL, HASHES[:1], list(range(16)), ttl_seconds=1)) == ["A"]
    after_ms = await redis_time_ms(index)
    # The TTL is a deadline on Redis's clock: 1 s after the pin was made.
    expire_ms = int(await index.redis.hget(pin_key(index.prefix, "p"), "expire_ms"))
    assert before_ms + 1000 <= expire_ms <= after_ms + 1000
    assert [p.pin_id for p in (await index.heartbeat("A", ea, WorkerLoad())).pins] == ["p"]
    # The deadline passes (moved to before the pin was made, instead of waiting for it) ...
    await index.redis.hset(pin_key(index.prefix, "p"), "expire_ms", str(before_ms - 1))
    # ... and the next heartbeat drops the pin: from the node's pins and from Redis.
    assert (await index.heartbeat("A", ea, WorkerLoad())).pins == []
    assert await index.redis.exists(pin_key(index.prefix, "p")) == 0
    assert (await index.stats()).pins == []
    await index.close()


@async_test
async def test_redis_down_fails_fast_and_an_empty_restart_is_survived(valkey):
    index = await make_index(valkey, flush=False)
    epoch = await register(index, "A")
    await index.publish("A", epoch, stored(HASHES))
    valkey.stop()
    # Fails (the client's own short socket timeouts), never hangs: wait_for is only a hang guard.
    with pytest.raises(IndexUnavailable, match="Redis"):
        await asyncio.wait_for(index.lookup(HASHES), HANG_GUARD_S)
    with pytest.raises(IndexUnavailable):
        await asyncio.wait_for(index.heartbeat("A", epoch, WorkerLoad()), HANG_GUARD_S)
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


@async_test
async def test_counters_saturate_and_heartbeats_keep_delivering_pins(valkey_module):
    index = await make_index(valkey_module)
    epoch = await register(index, "A")
    await index.pin(PinSpec("p", MODEL, HASHES[:1], list(range(16))))
    names = ("transfers", "transfers_failed", "transferred_blocks", "transferred_bytes")
    huge = TransferCounts(2**63 - 1, 2**63 - 1, 2**64 - 1, 2**63 - 1)
    for _ in range(2):  # the second used to overflow INT64_MAX and fail (and every later heartbeat with it)
        hb = await index.heartbeat("A", epoch, WorkerLoad(), huge)
        assert (hb.known, [p.pin_id for p in hb.pins]) == (True, ["p"])
    counters = (await index.stats()).counters
    assert [counters[k] for k in names] == [2 * MAX_COUNTER_DELTA] * 4  # each delta clamped
    # Totals left at the edge (as an earlier version could leave them): the next count saturates them.
    await index.redis.hset(index.prefix + "ctr", mapping={"transfers": 2**63 - 1, "transferred_bytes": 2**62 - 1})
    hb = await index.heartbeat("A", epoch, WorkerLoad(), TransferCounts(1, 0, 1, 5))
    assert [p.pin_id for p in hb.pins] == ["p"]
    counters = (await index.stats()).counters
    assert [counters[k] for k in names] == [2**62, 2 * MAX_COUNTER_DELTA, 2 * MAX_COUNTER_DELTA + 1, 2**62]
    # The script saturates by itself too, whoever calls it with whatever delta.
    out = await index._run(index._heartbeat, ["A", epoch, 0, 0, 0, 0, 0, 2**64 - 1, 0, 0])
    assert [int(x) for x in out[:1]] == [1]
    assert (await index.stats()).counters["transfers_failed"] == 2**62
    await index.close()


@async_test
async def test_pins_have_an_owner_and_a_quota(valkey_module):
    index = await make_index(valkey_module)
    await index.register(NodeInfo("A", "127.0.0.1:1001", MODEL, capacity_blocks=40), 30)
    await index.register(NodeInfo("B", "127.0.0.1:1002", MODEL, capacity_blocks=64), 30)
    await index.register(NodeInfo("C", "127.0.0.1:1003", "other", capacity_blocks=8), 30)  # not this model's
    tokens = list(range(16 * 8))

    def spec(pin_id: str, num_blocks: int, tenant: str) -> PinSpec:
        return PinSpec(pin_id, MODEL, HASHES[:num_blocks], tokens[: 16 * num_blocks], "salt", 1, 0, tenant)

    # The default quota: a quarter of the smallest live node of the model (A: 40 blocks -> 10).
    assert await index.pin(spec("a1", 8, "alpha")) == ["A"]
    before = redis_dump(valkey_module)
    with pytest.raises(PinQuotaExceeded, match=r"^tenant 'alpha' has 8 pinned blocks; 3 more would exceed its "
                                               r"quota of 10 blocks \(unpin some first\)$"):
        await index.pin(spec("a2", 3, "alpha"))
    with pytest.raises(PinNotYours, match="^pin 'a1' belongs to another tenant$"):
        await index.unpin("a1", "beta")
    with pytest.raises(PinNotYours, match="^pin 'a1' belongs to another tenant$"):
        await index.pin(spec("a1", 8, "beta"))
    assert redis_dump(valkey_module) == before  # refused: nothing written
    assert await index.pin(spec("a2", 2, "alpha")) == ["A"]  # exactly the quota
    assert await index.pin(spec("a1", 8, "ops"), operator=True) == ["A"]  # an operator's re-pin: still alpha's
    assert await index.pin(spec("b1", 8, "beta")) == ["A"]  # its own quota
    stats = await index.stats()
    assert [(p.pin_id, p.tenant, p.num_blocks, p.num_tokens) for p in stats.pins] == \
        [("a1", "alpha", 8, 128), ("a2", "alpha", 2, 32), ("b1", "beta", 8, 128)]
    # An expired pin counts no more; an explicit quota replaces the default.
    await index.redis.hset(pin_key(index.prefix, "a2"), "expire_ms", "1")
    assert await index.pin(spec("a3", 2, "alpha")) == ["A"]
    with pytest.raises(PinQuotaExceeded, match="1 more would exceed its quota of 0 blocks"):
        await index.pin(spec("g1", 1, "gamma"), quota_blocks=0)
    assert await index.unpin("a1", "ops", operator=True) == (True, ["A"])
    assert await index.unpin("b1", "beta") == (True, ["A"])
    await index.close()


def at(tier, hashes):
    return [BlockStored(h, tier=tier) for h in hashes]


async def entry_tiers(index, node_id, hashes) -> list[int]:
    """The tier in the low 2 bits of each block's entry for ``node_id`` (the schema's value)."""
    idx = await index.redis.hget(node_ids_key(index.prefix), node_id)
    values = [await index.redis.hget(index.prefix.encode() + b"b:" + h, idx) for h in hashes]
    return [int(v) % 4 for v in values]


@async_test
async def test_a_stored_event_moves_a_held_block_between_tiers(valkey_module):
    index = await make_index(valkey_module)
    ea, eb = await register(index, "A"), await register(index, "B")
    await index.publish("A", ea, stored(HASHES[:6]))
    await index.publish("B", eb, at(Tier.HOST, HASHES[:2]))  # B's first stores are already below device
    assert await entry_tiers(index, "A", HASHES[:6]) == [0] * 6
    assert await index.lookup(HASHES) == [PrefixMatch("A", 6, "127.0.0.1:1001", TierCounts(6, 0, 0)),
                                          PrefixMatch("B", 2, "127.0.0.1:1001", TierCounts(0, 2, 0))]
    # A's tail goes to host, then its last block to disk: the same entries, new tiers.
    assert await index.publish("A", ea, at(Tier.HOST, HASHES[3:6])) == 3
    assert await index.publish("A", ea, at(Tier.DISK, HASHES[5:6])) == 1
    assert await entry_tiers(index, "A", HASHES[:6]) == [0, 0, 0, 1, 1, 2]
    assert (await index.lookup(HASHES))[0] == PrefixMatch("A", 6, "127.0.0.1:1001", TierCounts(3, 2, 1))
    assert (await index.lookup(HASHES[:4]))[0].tiers == TierCounts(3, 1, 0)  # counted along each prefix only
    # A move changes no count: still 6 + 2 entries over 6 distinct blocks.
    stats = await index.stats()
    assert (stats.num_blocks, stats.num_entries) == (6, 8)
    # Loaded back to device, then removed from every tier (the disk block, evicted for good).
    await index.publish("A", ea, stored(HASHES[3:4]) + removed(HASHES[5:6]))
    assert await index.lookup(HASHES) == [PrefixMatch("A", 5, "127.0.0.1:1001", TierCounts(4, 1, 0)),
                                          PrefixMatch("B", 2, "127.0.0.1:1001", TierCounts(0, 2, 0))]
    # A full snapshot carries tiers too.
    await index.publish("A", ea, at(Tier.DISK, HASHES[:1]) + stored(HASHES[1:2]), full_snapshot=True)
    assert (await index.lookup(HASHES))[0] == PrefixMatch("A", 2, "127.0.0.1:1001", TierCounts(1, 0, 1))
    await index.check_integrity()
    await index.close()
