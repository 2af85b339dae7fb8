"""The engine on real (tiny, random) checkpoints: token-identical to transformers under continuous batching,
chunked prefill, prefix-cache hits, export/import between engines and preemption; exact eviction and events."""

from __future__ import annotations

import inspect

import pytest

from cache_service.block_hash import hash_prompt_blocks
from tests.model_fixtures import ARCHITECTURES, build_tiny_checkpoint, hf_greedy
from cache_service.block_wire import BlockImportError
from cache_service.engine_port import EnginePort
from cache_service.records import BlockRemoved, BlockStored
from workers.engine import Engine, EngineConfig
from workers.model import load_model
from cache_service.records import SamplingParams

BS = 4
MAX_NEW = 10
GREEDY = SamplingParams(max_tokens=MAX_NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {arch: build_tiny_checkpoint(root, arch, seed=3) for arch in ARCHITECTURES}


@pytest.fixture(scope="module")
def loaded(checkpoints):
    return {arch: load_model(path) for arch, path in checkpoints.items()}


def make_engine(lm, **kw) -> Engine:
    cfg = dict(block_size=BS, num_blocks=64, max_num_batched_tokens=16, max_num_seqs=8)
    cfg.update(kw)
    return Engine(EngineConfig(**cfg), loaded=lm)


def prompts_for(vocab: int) -> list[list[int]]:
    base = [0] + [(7 * i + 3) % (vocab - 3) + 3 for i in range(30)]
    return [
        base[:23],  # two prompts sharing 5 full blocks
        base[:23] + [11, 12, 13, 14],
        [0, 200, 201, 202, 5],
        base[:9] + [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55],  # 25 tokens: two 16-chunks
    ]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_matches_transformers_batched_chunked_and_cached(arch, checkpoints, loaded):
    path, lm = checkpoints[arch], loaded[arch]
    engine = make_engine(lm)
    prompts = prompts_for(lm.config.vocab_size)
    want = [hf_greedy(path, p, MAX_NEW) for p in prompts]

    outs = engine.generate(prompts, GREEDY)
    assert [o.new_token_ids for o in outs] == want
    assert all(o.finish_reason == "length" and o.completion_tokens == MAX_NEW for o in outs)
    # Submitted together, 16 tokens a step: step 1 prefills prompt 0's first chunk (4 blocks get cached).
    # Step 2 finishes prompt 0's prefill, so prompt 1 (sharing 5 blocks) waits a step to hit all 5, while
    # prompts 2 and 3 are admitted (3 hits the 2 blocks it shares).
    assert [o.cached_tokens for o in outs] == [0, 20, 0, 8]
    engine.check_integrity()

    # Second round: repeats hit up to a block boundary below the prompt's end; a follow-up turn
    # (prompt + answer + more) hits the generated blocks too.
    turn2 = prompts[0] + want[0] + [9, 8, 7]  # 23 + 10 + 3 = 36 tokens; 32 were computed and cached
    again = engine.generate([prompts[0], prompts[1], turn2], GREEDY)
    assert [o.cached_tokens for o in again] == [20, 24, 32]
    assert [o.new_token_ids for o in again[:2]] == want[:2]
    assert again[2].new_token_ids == hf_greedy(path, turn2, MAX_NEW)
    stats = engine.load()
    assert stats.prefix_hit_tokens == 20 + 8 + 20 + 24 + 32
    assert stats.num_active_blocks == 0
    engine.check_integrity()


def test_export_import_between_engines(checkpoints, loaded):
    path, lm = checkpoints["llama"], loaded["llama"]
    prompt = prompts_for(lm.config.vocab_size)[1]  # 27 tokens: 6 full blocks
    a = make_engine(lm)
    [cold] = a.generate([prompt], GREEDY)
    hashes = a.block_hashes(prompt)
    assert len(hashes) == 6 and a.num_cached_prefix_blocks(hashes) == 6
    exported = a.export_blocks(hashes)
    assert [e.block_hash for e in exported] == hashes
    assert exported[2].token_ids == tuple(prompt[8:12])

    b = make_engine(lm)
    assert b.num_cached_prefix_blocks(hashes) == 0
    assert b.import_blocks(exported, cache_salt="") == 6
    events = b.drain_events()
    assert [(type(e), e.block_hash) for e in events] == [(BlockStored, h) for h in hashes]
    assert events[0].parent_hash is None and events[3].parent_hash == hashes[2]
    assert b.num_cached_prefix_blocks(hashes) == 6
    b.check_integrity()
    assert b.import_blocks(exported) == 6  # already held: nothing changes
    assert b.drain_events() == []
    [warm] = b.generate([prompt], GREEDY)
    assert warm.cached_tokens == 24
    assert warm.new_token_ids == cold.new_token_ids == hf_greedy(path, prompt, MAX_NEW)
    assert b.load().prefix_hit_tokens == 24

    # A salted tenant's chain is another chain: checked against its own root, never mixed.
    c = make_engine(lm)
    with pytest.raises(BlockImportError, match="does not continue the chain"):
        c.import_blocks(exported, cache_salt="tenant-a")
    assert c.num_cached_prefix_blocks(hashes) == 0


def test_import_keeps_good_leading_blocks_and_names_the_bad_one(loaded):
    lm = loaded["llama"]
    prompt = prompts_for(lm.config.vocab_size)[1]
    a = make_engine(lm)
    a.generate([prompt], GREEDY)
    exported = a.export_blocks(a.block_hashes(prompt))
    bad = list(exported)
    payload = bytearray(bad[3].payload)
    payload[-5] ^= 0x10
    bad[3] = bad[3]._replace(payload=bytes(payload))
    b = make_engine(lm)
    with pytest.raises(BlockImportError, match="checksum"):
        b.import_blocks(bad)
    assert b.num_cached_prefix_blocks(a.block_hashes(prompt)) == 3
    b.check_integrity()
    # Wrong tokens for a hash (a forged / misfiled block) break the chain check.
    forged = [exported[0], exported[1]._replace(token_ids=(1, 2, 3, 4))]
    with pytest.raises(BlockImportError, match="block 1 .* does not continue the chain"):
        make_engine(lm).import_blocks(forged)
    # Blocks from another model are refused by their header.
    other = make_engine(loaded["qwen2"])
    with pytest.raises(BlockImportError, match="is for model"):
        other.import_blocks(exported[:1])


def test_preemption_under_a_tiny_pool_keeps_outputs_exact(checkpoints, loaded):
    path, lm = checkpoints["mistral"], loaded["mistral"]
    prompts = [[0] + [(13 * i + k) % 300 + 3 for i in range(14)] for k in range(4)]  # 15 tokens each
    max_new = 14
    # Each sequence grows to 28 computed tokens = 7 blocks; four of them cannot run together in 16 blocks.
    engine = make_engine(lm, num_blocks=16, max_num_batched_tokens=64)
    outs = engine.generate(prompts, SamplingParams(max_tokens=max_new, ignore_eos=True))
    assert engine.load().num_preemptions > 0
    assert [o.new_token_ids for o in outs] == [hf_greedy(path, p, max_new) for p in prompts]
    assert [o.completion_tokens for o in outs] == [max_new] * 4
    engine.check_integrity()
    assert engine.load().num_active_blocks == 0


def test_exact_eviction_order_and_events(loaded):
    lm = loaded["llama"]
    engine = make_engine(lm, num_blocks=8, max_num_batched_tokens=64)
    one = SamplingParams(max_tokens=1, ignore_eos=True)
    a = [0] + list(range(10, 18))  # 9 tokens: 2 full blocks + 1 token
    b = [0] + list(range(30, 38))
    c = [0] + list(range(50, 66))  # 17 tokens: 4 full blocks + 1
    ha, hb, hc = (hash_prompt_blocks(p, BS, engine.model_id) for p in (a, b, c))

    engine.generate([a], one)
    assert engine.drain_events() == [BlockStored(ha[0], None, tuple(a[:4]), 0),
                                     BlockStored(ha[1], ha[0], tuple(a[4:8]), 1)]
    # A's blocks are freed last-first: its partial block 2 is worthless (LRU head), then A1, then A0.
    engine.generate([b], one)  # takes blocks 2, 3, 4
    assert engine.drain_events() == [BlockStored(hb[0], None, tuple(b[:4]), 2),
                                     BlockStored(hb[1], hb[0], tuple(b[4:8]), 3)]
    # Free queue now (head first): 4 5 6 7 | A1 A0 | B1 B0. C needs 5 blocks: 4 5 6 7 and A's tail A1.
    engine.generate([c], one)
    assert engine.drain_events() == [
        BlockRemoved(ha[1]),
        BlockStored(hc[0], None, tuple(c[0:4]), 4),
        BlockStored(hc[1], hc[0], tuple(c[4:8]), 5),
        BlockStored(hc[2], hc[1], tuple(c[8:12]), 6),
        BlockStored(hc[3], hc[2], tuple(c[12:16]), 7),
    ]
    assert [engine.num_cached_prefix_blocks(h) for h in (ha, hb, hc)] == [1, 2, 4]
    # Queue now: [C's partial block] A0 B1 B0 C3 C2 C1 C0. A hit on A0 makes it the most recent...
    [again] = engine.generate([a[:5]], one)
    assert again.cached_tokens == 4
    engine.drain_events()
    # ... so a 13-token prompt (4 blocks) evicts B (older than C) tail first, then C's tail: never A0.
    d = [0] + list(range(80, 92))
    engine.generate([d], one)
    removed = [e.block_hash for e in engine.drain_events() if isinstance(e, BlockRemoved)]
    assert removed == [hb[1], hb[0], hc[3]]
    assert [engine.num_cached_prefix_blocks(h) for h in (ha, hb, hc)] == [1, 0, 3]
    engine.check_integrity()


def test_pin_survives_pressure_and_unpin_releases(loaded):
    lm = loaded["llama"]
    engine = make_engine(lm, num_blocks=10, max_num_batched_tokens=64)
    system = [0] + list(range(100, 115))  # 16 tokens = 4 full blocks
    hashes = engine.block_hashes(system)
    assert engine.pin("sys", system) == 4
    assert engine.pin("sys", system) == 4  # idempotent per pin id: no second reference
    assert engine.pinned() == {"sys": 4}
    assert engine.load().num_pinned_blocks == 4 and engine.load().num_active_blocks == 4
    # Fill the rest of the pool twice over with other prompts: the pinned prefix must survive.
    for k in range(3):
        engine.generate([[0] + list(range(150 + 20 * k, 169 + 20 * k))], SamplingParams(max_tokens=4, ignore_eos=True))
    assert engine.num_cached_prefix_blocks(hashes) == 4
    [out] = engine.generate([system + [5, 6]], SamplingParams(max_tokens=2, ignore_eos=True))
    assert out.cached_tokens == 16
    assert engine.unpin("sys") == 4 and engine.unpin("sys") == 0 and engine.pinned() == {}
    assert engine.load().num_active_blocks == 0
    engine.check_integrity()


def _clean_substring(text: str, start: int, length: int) -> str:
    for i in range(start, len(text) - length):
        piece = text[i : i + length]
        if piece.isascii() and piece.isprintable() and piece.strip() == piece:
            return piece
    raise AssertionError(f"no clean substring in {text!r}")


def test_stop_strings_cut_the_text_and_stream_consistently(loaded):
    lm = loaded["llama"]
    tok = lm.tokenizer
    prompt = tok.encode("the cache block")
    engine = make_engine(lm, max_num_batched_tokens=64)
    [full] = engine.generate([prompt], SamplingParams(max_tokens=30, ignore_eos=True))
    assert tok.decode(full.new_token_ids) == full.new_text
    stop = _clean_substring(full.new_text, 8, 2)
    cut = full.new_text.find(stop)
    num_ids = next(k for k in range(1, 31) if stop in tok.decode(full.new_token_ids[:k]))

    params = SamplingParams(max_tokens=30, ignore_eos=True, stop=("never-there", stop))
    engine.add_request("s", prompt, params)
    engine.add_request("other", prompt[:4], SamplingParams(max_tokens=3, ignore_eos=True))
    texts, ids, last = [], [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == "s":
                assert stop not in "".join(texts) + out.new_text
                texts.append(out.new_text)
                ids.extend(out.new_token_ids)
                last = out
    assert last.finished and last.finish_reason == "stop"
    assert "".join(texts) == full.new_text[:cut]
    assert ids == full.new_token_ids[:num_ids]  # the token completing the stop string is kept
    assert last.completion_tokens == num_ids


def test_eos_ignore_eos_and_max_tokens(loaded):
    import dataclasses

    lm = loaded["llama"]
    prompt = lm.tokenizer.encode("hello world")
    [ref] = make_engine(lm).generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True))
    ids = ref.new_token_ids
    k = next(i for i in range(3, 12) if ids[i] not in ids[:i])
    # The same weights, with a checkpoint whose EOS is the token greedy emits at step k.
    eos_model = dataclasses.replace(lm, config=dataclasses.replace(lm.config, eos_token_ids=(ids[k],)))
    engine = make_engine(eos_model)
    stopped, ignored, short = engine.generate(
        [prompt] * 3,
        [SamplingParams(max_tokens=12), SamplingParams(max_tokens=12, ignore_eos=True), SamplingParams(max_tokens=2)],
    )
    assert (stopped.new_token_ids, stopped.finish_reason) == (ids[: k + 1], "stop")
    assert (ignored.new_token_ids, ignored.finish_reason) == (ids, "length")
    assert (short.new_token_ids, short.finish_reason, short.completion_tokens) == (ids[:2], "length", 2)


def test_every_validation_error_while_the_batch_completes(loaded):
    lm = loaded["llama"]
    engine = make_engine(lm)  # vocab 320, context 1024, 64 blocks of 4 tokens
    ok = [0, 5, 6, 7, 8]
    cases = [
        ([], SamplingParams(), "prompt is empty"),
        ([0, 5, 320], SamplingParams(), r"prompt token id 320 is outside the vocabulary \(vocab_size 320"),
        ([0, -1], SamplingParams(), "prompt token id -1 is outside the vocabulary"),
        ([5] * 1000, SamplingParams(max_tokens=30), r"prompt \(1000 tokens\) \+ max_tokens \(30\) = 1030 tokens is "
                                                     r"longer than the model's context \(1024 tokens\)"),
        ([5] * 250, SamplingParams(max_tokens=30), "needs 70 KV blocks of 4 tokens but the KV cache has only 64"),
        (ok, SamplingParams(max_tokens=0), "max_tokens must be a positive integer, got 0"),
        (ok, SamplingParams(temperature=-1.0), "temperature must be >= 0"),
        (ok, SamplingParams(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
        (ok, SamplingParams(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
        (ok, SamplingParams(top_k=-2), "top_k must be an integer >= 0"),
    ]
    good = SamplingParams(max_tokens=MAX_NEW, ignore_eos=True)
    prompts = [ok] + [c[0] for c in cases] + [ok + [9]]
    params = [good] + [c[1] for c in cases] + [good]
    outs = engine.generate(prompts, params)
    for out, (_, _, message) in zip(outs[1:-1], cases):
        assert out.finished and out.finish_reason == "error" and out.completion_tokens == 0
        assert out.error is not None and __import__("re").search(message, out.error), out.error
    for out, p in ((outs[0], ok), (outs[-1], ok + [9])):
        assert out.error is None and out.new_token_ids == engine.generate([p], good)[0].new_token_ids
        assert len(out.new_token_ids) == MAX_NEW
    with pytest.raises(ValueError, match="top_p"):
        engine.add_request("x", ok, SamplingParams(top_p=2.0))
    engine.add_request("dup", ok, good)
    with pytest.raises(ValueError, match="already in the engine"):
        engine.add_request("dup", ok, good)
    engine.abort_request("dup")
    assert [(o.request_id, o.finished, o.finish_reason) for o in engine.step()] == [("dup", True, "abort")]
    assert not engine.has_unfinished_requests()


def test_abort_mid_generation_frees_blocks(loaded):
    engine = make_engine(loaded["llama"])
    engine.add_request("a", list(range(3, 30)), SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("b", list(range(40, 50)), SamplingParams(max_tokens=3, ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert engine.load().num_active_blocks > 0
    engine.abort_request("a")
    outs = []
    while engine.has_unfinished_requests():
        outs.extend(engine.step())
    assert ("a", "abort") in [(o.request_id, o.finish_reason) for o in outs if o.finished]
    assert engine.load().num_active_blocks == 0
    engine.check_integrity()


def test_engine_has_every_engine_port_member_with_its_signature(loaded):
    # Structural conformance, member by member (isinstance on a Protocol checks names only).
    engine = make_engine(loaded["llama"])
    members = {name: m for name, m in vars(EnginePort).items() if not name.startswith("_")}
    assert sorted(members) == [
        "block_nbytes", "block_size", "cached_blocks", "cached_hashes", "drain_events", "evict", "export_blocks",
        "import_blocks", "load", "model_id", "num_blocks", "num_cached_prefix_blocks", "pin", "pinned",
        "set_eviction_advisor", "unpin", "verify_block",
    ]
    for name, member in members.items():
        if isinstance(member, property):  # a static fact: a plain value of the annotated type
            assert type(getattr(engine, name)).__name__ == inspect.signature(member.fget).return_annotation, name
        else:
            want = inspect.signature(member).parameters.values()
            got = inspect.signature(getattr(Engine, name)).parameters.values()
            assert [(p.name, p.kind, p.default) for p in got] == [(p.name, p.kind, p.default) for p in want], name
    assert (engine.model_id, engine.block_size, engine.num_blocks) == (loaded["llama"].model_id, BS, 64)
