"""The worker actor's logic in-process (the class without Ray): engine loop thread, streaming, aborts,
the router's event feed (incremental + snapshot), pins. Ray itself is exercised by test_serving.py."""

from __future__ import annotations

import asyncio
import random

import pytest

from cache_service.block_hash import hash_prompt_blocks
from router.index_mirror import IndexMirror
from workers.engine import Engine, EngineConfig
from cache_service.records import BlockRemoved, BlockStored, GenerateCall, SamplingParams, Tier
from workers.event_feed import EventFeed
from workers.ray_worker import WorkerActor, WorkerConfig

BS = 16


@pytest.fixture(scope="module")
def actor():
    a = WorkerActor(WorkerConfig("worker-t", num_blocks=64, block_size=BS, enable_transfer_server=False))
    asyncio.run(a.start())
    yield a
    asyncio.run(a.shutdown())


@pytest.fixture(scope="module")
def cold_engine():
    return Engine(EngineConfig(model="demo", num_blocks=64, block_size=BS, enable_prefix_caching=False))


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(n)]


async def collect(actor, rid, ids, params, salt=""):
    return [c async for c in actor.generate(GenerateCall(rid, ids, params, salt))]


def test_generate_streams_what_a_cold_engine_computes(actor, cold_engine):
    ids = prompt(1, 50)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    chunks = asyncio.run(collect(actor, "a", ids, params))
    assert [c.finished for c in chunks] == [False] * (len(chunks) - 1) + [True]
    last = chunks[-1]
    assert (last.finish_reason, last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.cached_tokens) \
        == ("length", 50, 10, 0)
    (ref,) = cold_engine.generate([ids], params)
    assert [t for c in chunks for t in c.token_ids] == ref.new_token_ids
    assert "".join(c.text for c in chunks) == ref.new_text
    again = asyncio.run(collect(actor, "b", ids, params))
    assert again[-1].usage.cached_tokens == 48  # 3 full blocks; the last token is always prefilled


def test_invalid_request_comes_back_as_an_invalid_delta(actor):
    chunks = asyncio.run(collect(actor, "big", prompt(2, 64 * BS), SamplingParams(max_tokens=4)))
    assert len(chunks) == 1 and chunks[0].failure.invalid and chunks[0].finish_reason == "error"
    assert "KV blocks" in chunks[0].failure.message


def test_closing_the_stream_aborts_the_request(actor):
    async def go():
        gen = actor.generate(GenerateCall("long", prompt(3, 20), SamplingParams(max_tokens=500, ignore_eos=True)))
        first = await gen.__anext__()
        await gen.aclose()
        for _ in range(200):
            if actor.loop.load.num_running == 0 and not await actor.loop.call(lambda e: e.has_unfinished_requests()):
                return first
            await asyncio.sleep(0.01)
        raise AssertionError("the aborted request kept running")

    assert asyncio.run(go()).token_ids


def test_poll_feeds_a_mirror_incrementally_and_by_snapshot(actor):
    async def go():
        mirror = IndexMirror()
        first = await actor.poll("", 0)  # unknown epoch: snapshot
        assert first.snapshot is not None and first.events == []
        assert all(tier is Tier.DEVICE for _, tier in first.snapshot)  # no tiers under this worker's pool
        mirror.replace_worker("w", [h for h, _ in first.snapshot])
        ids = prompt(4, 70)
        await collect(actor, "c", ids, SamplingParams(max_tokens=2))
        second = await actor.poll(first.feed_epoch, first.feed_seq)
        assert second.snapshot is None and second.feed_seq > first.feed_seq
        assert all(isinstance(ev, BlockStored) for ev in second.events)
        mirror.apply_events("w", second.events)
        hashes = hash_prompt_blocks(ids, BS, "demo")
        assert mirror.lookup(hashes) == {"w": 4}
        assert second.load.capacity_blocks == 64 and second.load.num_running == 0
        assert second.counters.num_blocks_stored >= 4
        stale = await actor.poll("another-epoch", 0)
        assert stale.snapshot is not None and {h for h, _ in stale.snapshot} == set(await actor.cached_hashes())

    asyncio.run(go())


def test_event_feed_asks_for_a_snapshot_when_a_reader_falls_behind():
    a, b, c = (BlockStored(bytes([i]) * 16) for i in range(3))
    feed = EventFeed(capacity=3)
    feed.push([a, b])
    assert feed.read(feed.epoch, 0) == (2, [a, b])
    assert feed.read(feed.epoch, 1) == (2, [b])
    assert feed.read(feed.epoch, 2) == (2, [])
    feed.push([BlockRemoved(a.block_hash), c])
    assert feed.read(feed.epoch, 1) == (4, [b, BlockRemoved(a.block_hash), c])
    assert feed.read(feed.epoch, 0) is None  # event 1 fell out of the buffer
    assert feed.read("old", 4) is None
    assert feed.read(feed.epoch, 5) is None  # a seq from the future: another incarnation


def test_pin_holds_the_prefix_and_unpin_releases_it(actor):
    async def go():
        ids = prompt(5, 3 * BS + 5)
        assert await actor.pin("p1", ids) == 3
        assert actor.pinned() == ["p1"]
        assert (await actor.load()).num_pinned_blocks == 3
        assert (await actor.poll("", 0)).pins == ["p1"]
        chunks = await collect(actor, "d", ids + [1, 2, 3], SamplingParams(max_tokens=2))
        assert chunks[-1].usage.cached_tokens == 3 * BS
        assert await actor.unpin("p1") == 3
        assert await actor.unpin("p1") == 0
        assert (await actor.load()).num_pinned_blocks == 0
        await actor.check_integrity()

    asyncio.run(go())
