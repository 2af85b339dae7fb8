"""Host and disk tiers under the device pool, on real engines (the demo model, float32, CPU): a prefix evicted
from the pool and loaded back is token-identical to one that never left it; a restarted engine hits its disk
cache on its first request; corrupt, truncated and foreign files are dropped and recomputed; snapshots, the
worker's poll and exports say and serve every tier. (The pool-level transitions and their exact events are in
test_block_pool.py.)"""

from __future__ import annotations

import asyncio
import random

import pytest

from cache_service.block_hash import hash_prompt_blocks
from cache_service.records import BlockRemoved, BlockStored, GenerateCall, HeldBlock, SamplingParams, Tier
from workers.engine import Engine, EngineConfig
from workers.model import load_model

BS = 4
PARAMS = SamplingParams(max_tokens=6, ignore_eos=True)
PROMPT_LEN = 30  # 7 reusable blocks (the 8th holds the last prompt token); 36 tokens with the output
NUM_BLOCKS = 9  # exactly one request: the next one evicts all of its 8 cached blocks


@pytest.fixture(scope="module")
def lm():
    return load_model("demo")


@pytest.fixture(scope="module")
def block_gb(lm):
    # One block in GiB, exactly (block bytes / 2**30 and back is exact in binary floating point).
    engine = Engine(EngineConfig(block_size=BS, num_blocks=1), loaded=lm)
    return engine.block_nbytes / 2**30


def prompt(seed: int, n: int = PROMPT_LEN) -> list[int]:
    rng = random.Random(seed)
    return [1] + [rng.randrange(3, 259) for _ in range(n - 1)]


A, B, C = prompt(1), prompt(2), prompt(3)


def hashes_of(p: list[int]) -> list:
    return hash_prompt_blocks(p, BS, "demo")


def make(lm, **kw) -> Engine:
    cfg = dict(block_size=BS, num_blocks=NUM_BLOCKS, max_num_seqs=4, max_num_batched_tokens=64)
    cfg.update(kw)
    return Engine(EngineConfig(**cfg), loaded=lm)


@pytest.fixture(scope="module")
def never_left(lm):
    """The oracle: each prompt run twice on a pool that never evicts (the second run hits 28 tokens)."""
    engine = make(lm, num_blocks=64)
    out = {}
    for name, p in (("A", A), ("B", B), ("C", C)):
        first, again = engine.generate([p], PARAMS)[0], engine.generate([p], PARAMS)[0]
        assert first.new_token_ids == again.new_token_ids and again.cached_tokens == 28
        out[name] = first.new_token_ids
    return out


def run(engine: Engine, p: list[int]):
    out = engine.generate([p], PARAMS)[0]
    engine.check_integrity()
    return out


PROMPTS = {"A": A, "B": B, "C": C}


@pytest.fixture(scope="module")
def cached8(never_left):
    """The 8 blocks a run of each prompt caches (prompt + output: 35 of its 36 tokens are computed)."""
    return {name: hashes_of(p + never_left[name])[:8] for name, p in PROMPTS.items()}


def tiers_of(engine: Engine, hashes: list) -> list[Tier | None]:
    held = dict(engine.cached_blocks())
    return [held.get(h) for h in hashes]


# ---- loading back ----------------------------------------------------------------------------------------
def test_a_prefix_loaded_back_from_host_memory_is_token_identical(lm, block_gb, never_left, cached8):
    engine = make(lm, host_cache_gb=16 * block_gb)
    assert run(engine, A).new_token_ids == never_left["A"]
    assert tiers_of(engine, cached8["A"]) == [Tier.DEVICE] * 8
    run(engine, B)  # takes the whole pool: A's 8 blocks move to host memory
    assert tiers_of(engine, cached8["A"]) == [Tier.HOST] * 8 and tiers_of(engine, cached8["B"]) == [Tier.DEVICE] * 8
    again = run(engine, A)
    assert again.new_token_ids == never_left["A"]
    assert again.cached_tokens == 28  # the same hit as on a pool that never evicted it
    load = engine.load()
    assert (load.prefix_hit_tokens, load.prefix_host_hit_tokens, load.prefix_disk_hit_tokens) == (28, 28, 0)
    # A's 7 loaded blocks are back on the device (its 8th was recomputed: it holds the last prompt token),
    # B went down in their place.
    assert tiers_of(engine, cached8["A"])[:7] == [Tier.DEVICE] * 7
    assert load.num_host_blocks == 8 and load.num_cached_blocks == 8


def test_a_prefix_loaded_back_from_disk_is_token_identical(lm, block_gb, never_left, cached8, tmp_path):
    engine = make(lm, host_cache_gb=2 * block_gb, disk_cache_dir=str(tmp_path))
    run(engine, A)
    run(engine, B)  # A's blocks: the last two spilled stay in the host slots, the six before go to disk
    assert tiers_of(engine, cached8["A"]) == [Tier.HOST] * 2 + [Tier.DISK] * 6
    again = run(engine, A)
    assert again.new_token_ids == never_left["A"] and again.cached_tokens == 28
    load = engine.load()
    assert (load.prefix_host_hit_tokens, load.prefix_disk_hit_tokens) == (8, 20)
    # A third prompt pushes B down and A again: A's files were kept (the disk is inclusive), so nothing of
    # A is rewritten and A is back on disk with all 8 blocks.
    files = {p.name: p.stat().st_mtime_ns for p in engine.kv.tiers.disk.directory.iterdir()}
    run(engine, C)
    assert tiers_of(engine, cached8["A"])[2:] == [Tier.DISK] * 6
    for h in hashes_of(A)[2:7]:
        assert f"{h.hex()}.kvb" in files
    assert run(engine, A).new_token_ids == never_left["A"]


def test_a_restarted_engine_hits_its_disk_cache_on_its_first_request(lm, never_left, cached8, tmp_path):
    first = make(lm, disk_cache_dir=str(tmp_path))
    run(first, A)
    run(first, B)  # no host tier: A's 8 blocks go straight to disk
    assert tiers_of(first, cached8["A"]) == [Tier.DISK] * 8
    del first

    restarted = make(lm, disk_cache_dir=str(tmp_path))
    announced = restarted.drain_events()
    assert {ev.block_hash for ev in announced} == set(cached8["A"])
    assert all(isinstance(ev, BlockStored) and ev.tier is Tier.DISK for ev in announced)
    assert sorted(restarted.cached_blocks()) == sorted(HeldBlock(h, Tier.DISK) for h in cached8["A"])
    out = run(restarted, A)
    assert out.new_token_ids == never_left["A"]
    assert out.cached_tokens == 28 and restarted.load().prefix_disk_hit_tokens == 28


def _file(engine: Engine, block_hash):
    return engine.kv.tiers.disk.path(block_hash)


def test_corrupt_truncated_and_foreign_files_are_dropped_and_recomputed(lm, never_left, tmp_path):
    first = make(lm, disk_cache_dir=str(tmp_path))
    run(first, A)
    run(first, B)
    ha = hashes_of(A)
    # Block 3: one bit flipped in its K/V (the header still reads fine: caught by the checksum at load).
    data = bytearray(_file(first, ha[3]).read_bytes())
    data[-1] ^= 0x01
    _file(first, ha[3]).write_bytes(bytes(data))
    # Block 5: truncated (caught by its size at start-up).
    _file(first, ha[5]).write_bytes(_file(first, ha[5]).read_bytes()[:-100])
    # Block 6: another model's block under this one's name (caught by its header at start-up).
    other = make(load_model("demo", "bfloat16"), disk_cache_dir=str(tmp_path))
    assert other.kv.tiers.disk.directory != first.kv.tiers.disk.directory  # a dtype of its own: a folder of its own
    assert other.drain_events() == [] and run(other, A).cached_tokens == 0  # float32 files are not its own
    run(other, B)
    _file(first, ha[6]).write_bytes(_file(other, hashes_of(A)[6]).read_bytes())
    # A write a crash cut short: a temp file.
    (first.kv.tiers.disk.directory / f".{ha[0].hex()}.kvb.123.tmp").write_bytes(b"partial")
    del first

    restarted = make(lm, disk_cache_dir=str(tmp_path))
    disk = restarted.kv.tiers.disk
    assert disk.num_dropped == 2 and ha[5] not in disk and ha[6] not in disk and ha[3] in disk
    assert not list(disk.directory.glob("*.tmp"))
    restarted.drain_events()
    out = run(restarted, A)
    assert out.new_token_ids == never_left["A"]  # identical to a cold run: nothing corrupt was used
    assert out.cached_tokens == 12  # blocks 0-2 from disk; 3 failed its checksum, so 3.. were recomputed
    assert disk.num_dropped == 3 and ha[3] not in disk and not _file(restarted, ha[3]).exists()
    removed = [ev for ev in restarted.drain_events() if isinstance(ev, BlockRemoved)]
    assert removed[0] == BlockRemoved(ha[3])
    restarted.check_integrity()


# ---- pins, peers, eviction, reset --------------------------------------------------------------------------
def test_a_pinned_prefix_never_leaves_the_device_pool(lm, block_gb, cached8):
    engine = make(lm, num_blocks=16, host_cache_gb=16 * block_gb)
    assert engine.pin("sys", A[:16]) == 4
    run(engine, B)
    run(engine, C)
    assert tiers_of(engine, cached8["A"])[:4] == [Tier.DEVICE] * 4  # held: never in the free queue, never spilled
    assert engine.unpin("sys") == 4
    run(engine, B)
    run(engine, C)
    assert Tier.HOST in tiers_of(engine, cached8["A"])[:4]  # released, it goes down like any other block


def test_a_peer_is_served_from_every_tier(lm, block_gb, never_left, cached8, tmp_path):
    source = make(lm, host_cache_gb=2 * block_gb, disk_cache_dir=str(tmp_path))
    run(source, A)
    run(source, B)
    ha = hashes_of(A)[:7]
    assert [dict(source.cached_blocks())[h] for h in ha] == [Tier.HOST] * 2 + [Tier.DISK] * 5
    exported = source.export_blocks(ha)
    assert [b.block_hash for b in exported] == ha
    assert tiers_of(source, cached8["A"])[:7] == [Tier.HOST] * 2 + [Tier.DISK] * 5  # served without loading anything back
    peer = make(lm, num_blocks=64)
    assert peer.import_blocks(exported, cache_salt="") == 7
    out = run(peer, A)
    assert out.new_token_ids == never_left["A"] and out.cached_tokens == 28
    # A disk file that fails its checksum ends the export there: never served.
    data = bytearray(_file(source, ha[4]).read_bytes())
    data[-1] ^= 0x01
    _file(source, ha[4]).write_bytes(bytes(data))
    assert [b.block_hash for b in source.export_blocks(ha)] == ha[:4]


def test_evict_and_reset_reach_every_tier(lm, block_gb, cached8, tmp_path):
    engine = make(lm, host_cache_gb=2 * block_gb, disk_cache_dir=str(tmp_path))
    run(engine, A)
    run(engine, B)
    ha = cached8["A"]
    engine.drain_events()
    assert engine.evict([ha[0], ha[7]]) == 2  # a host block and a disk block
    assert engine.drain_events() == [BlockRemoved(ha[0]), BlockRemoved(ha[7])]
    assert ha[0] not in dict(engine.cached_blocks()) and not _file(engine, ha[7]).exists()
    assert engine.num_cached_prefix_blocks(ha) == 0  # block 0 is gone: no prefix left
    assert engine.reset_cache()
    assert engine.cached_blocks() == [] and not list(engine.kv.tiers.disk.directory.iterdir())
    engine.check_integrity()


# ---- the worker: snapshots and polls say the tier ----------------------------------------------------------
def test_the_workers_snapshot_reports_the_tier_after_every_transition(block_gb, cached8, tmp_path):
    from workers.ray_worker import WorkerActor, WorkerConfig

    actor = WorkerActor(WorkerConfig("w-tiers", block_size=BS, num_blocks=NUM_BLOCKS, enable_transfer_server=False,
                                     host_cache_gb=3 * block_gb, disk_cache=str(tmp_path), disk_cache_gb=1.0))
    a8, b8 = cached8["A"], cached8["B"]

    async def snapshot() -> dict:
        poll = await actor.poll("", 0)  # an unknown epoch: the full snapshot
        assert poll.snapshot is not None and {h for h, _ in poll.snapshot} == set(await actor.cached_hashes())
        return dict(poll.snapshot)

    async def generate(rid, p):
        return [d async for d in actor.generate(GenerateCall(rid, p, PARAMS))]

    async def go():
        await actor.start()
        assert (tmp_path / "w-tiers").is_dir()  # each worker keeps its files in its own folder
        await generate("a", A)
        assert [(await snapshot())[h] for h in a8] == [Tier.DEVICE] * 8
        await generate("b", B)  # A down: its last 3 spilled (the chain's head) in host memory, the rest on disk
        snap = await snapshot()
        assert [snap[h] for h in a8] == [Tier.HOST] * 3 + [Tier.DISK] * 5
        assert [snap[h] for h in b8] == [Tier.DEVICE] * 8
        first = await actor.poll("", 0)
        deltas = await generate("a2", A)  # back up: A's 7 reusable blocks on the device again
        usage = deltas[-1].usage
        assert (usage.cached_tokens, usage.host_cached_tokens, usage.disk_cached_tokens) == (28, 12, 16)
        snap = await snapshot()
        assert [snap[h] for h in a8[:7]] == [Tier.DEVICE] * 7
        assert [snap[h] for h in b8] == [Tier.HOST] * 3 + [Tier.DISK] * 5
        # The incremental feed says the same: the last event of each block gives its tier.
        later = await actor.poll(first.feed_epoch, first.feed_seq)
        last = {}
        for ev in later.events:
            last[ev.block_hash] = ev.tier if isinstance(ev, BlockStored) else None
        assert all(last[h] is Tier.DEVICE for h in a8[:7]) and all(last[h] is snap[h] for h in b8)
        assert (later.load.prefix_host_hit_tokens, later.load.prefix_disk_hit_tokens) == (12, 16)
        # Gone from every tier: out of the snapshot.
        await actor.loop.call(lambda e: e.evict(b8[:2]))
        snap = await snapshot()
        assert b8[0] not in snap and b8[1] not in snap and snap[b8[2]] is Tier.HOST
        await actor.check_integrity()

    try:
        asyncio.run(go())
    finally:
        asyncio.run(actor.shutdown())


# ---- the flags ----------------------------------------------------------------------------------------------
def test_generate_flags_keep_a_disk_cache_across_runs(never_left, tmp_path):
    import json

    from deploy.cli import main

    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps({"token_ids": p, "max_tokens": 6, "ignore_eos": True})
                                                 for p in (A, B)) + "\n")
    argv = ["generate", "--model", "demo", "--input", str(tmp_path / "in.jsonl"), "--block-size", str(BS),
            "--num-blocks", str(NUM_BLOCKS), "--max-num-seqs", "1", "--host-cache-gb", "0.00002",
            "--disk-cache", str(tmp_path / "kv"), "--disk-cache-gb", "1"]
    assert main(argv + ["--output", str(tmp_path / "first.jsonl")]) == 0
    first = [json.loads(line) for line in (tmp_path / "first.jsonl").read_text().splitlines()]
    assert [r["cached_tokens"] for r in first] == [0, 0]
    # The second run starts with nothing on the device or in host memory: its hits come from the files the
    # first run left (A went down when B ran, written through to disk; B stayed on the device).
    assert main(argv + ["--output", str(tmp_path / "second.jsonl")]) == 0
    second = [json.loads(line) for line in (tmp_path / "second.jsonl").read_text().splitlines()]
    assert [r["token_ids"] for r in second] == [never_left["A"], never_left["B"]]
    assert [r["cached_tokens"] for r in second] == [28, 0]
    assert main(argv[:-1] + ["0", "--output", str(tmp_path / "x.jsonl")]) == 2  # --disk-cache-gb 0: refused


# ---- the disk tier alone ------------------------------------------------------------------------------------
def test_disk_lru_order_and_bound_survive_a_restart(tmp_path):
    import os

    from cache_service.block_hash import BlockHash
    from cache_service.block_wire import encode_payload
    from workers.disk_tier import DiskTier

    shape = (1, 2, BS, 1, 2)  # 64 bytes of float32

    def open_disk(capacity):
        return DiskTier(tmp_path, capacity, model_id="m", dtype="float32", block_shape=shape)

    def payload(h):
        return encode_payload("m", h, "float32", shape, bytes(range(64)))

    hs = [BlockHash(bytes([i + 1]) * 16) for i in range(3)]
    disk = open_disk(10**6)
    for h in hs:
        assert disk.put(h, (1, 2, 3, 4), payload(h)) == [] and h in disk
    size = disk.get(hs[0]).num_bytes
    # The order a restart reads back is the files' modification times: written h0, h1, h2, then h0 used.
    for i, h in enumerate(hs):
        os.utime(disk.path(h), ns=(10**18 + i, 10**18 + i))
    os.utime(disk.path(hs[0]), ns=(2 * 10**18, 2 * 10**18))
    again = open_disk(2 * size)  # a smaller bound than before: the least recently used file goes
    assert list(again.hashes()) == [hs[2], hs[0]] and not again.path(hs[1]).exists()
    assert again.num_bytes == 2 * size and again.num_dropped == 0
    assert again.put(hs[1], (1, 2, 3, 4), payload(hs[1])) == [hs[2]]  # room made, least recently used first
    assert again.read(hs[0]) == payload(hs[0])  # checked, and now the most recent
    assert list(again.hashes()) == [hs[1], hs[0]]
    assert again.put(hs[2], (1, 2, 3, 4), payload(hs[2]) + b"x" * 10**6) == [] and hs[2] not in again  # too big
    again.check_integrity()


def test_an_fp8_cache_moves_its_scales_through_host_memory_and_disk(lm, tmp_path):
    fp8 = {"kv_cache_dtype": "fp8"}
    oracle = make(lm, num_blocks=64, **fp8)
    want = run(oracle, A).new_token_ids  # fp8 against fp8: the same KV bytes must give the same tokens
    assert run(oracle, A).new_token_ids == want
    block_gb = make(lm, num_blocks=1, **fp8).block_nbytes / 2**30  # values + per-slot scales
    engine = make(lm, host_cache_gb=2 * block_gb, disk_cache_dir=str(tmp_path), **fp8)
    assert engine.kv.tiers.disk.directory.name.startswith("demo-float8_e4m3fn-")
    run(engine, A)
    run(engine, B)
    again = run(engine, A)
    assert again.new_token_ids == want and again.cached_tokens == 28
    load = engine.load()
    assert (load.prefix_host_hit_tokens, load.prefix_disk_hit_tokens) == (8, 20)
    restarted = make(lm, disk_cache_dir=str(tmp_path), **fp8)
    out = run(restarted, A)
    assert out.new_token_ids == want and out.cached_tokens == 28
    assert run(make(lm, disk_cache_dir=str(tmp_path)), A).cached_tokens == 0  # float32 keeps its own folder
