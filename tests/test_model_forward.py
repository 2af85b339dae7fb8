"""CausalLM.forward over the paged KV cache vs transformers (the oracle): token-identical greedy output,
chunked prefill, mixed prefill/decode batches, and KV blocks moved between caches."""

from __future__ import annotations

import pytest
import torch

from model_fixtures import build_tiny_checkpoint, engine_greedy, hf_greedy, hf_last_logits, single_thread
from workers.model import ForwardBatch, KVCache, load_model

TEXTS = [
    "hello world, the cache",
    "alpha beta",
    "the quick brown fox hit the router worker node and the prefix block was evicted",
]
NUM_NEW = 20

CHECKPOINTS = {
    "llama": dict(arch="llama"),
    "llama-sharded": dict(arch="llama", sharded=True, seed=1),
    "llama-bias": dict(arch="llama", seed=2, attention_bias=True, mlp_bias=True, tie=True),
    "llama-linear-rope": dict(arch="llama", seed=3, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "llama3-head-dim": dict(arch="llama3", head_dim=24),
    "mistral": dict(arch="mistral"),
    "mistral-window": dict(arch="mistral", sliding_window=12, name="mistral-window"),
    "qwen2-sharded-tied": dict(arch="qwen2", sharded=True),
    "qwen2-untied": dict(arch="qwen2", tie=False, seed=4),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {key: build_tiny_checkpoint(root, **kw) for key, kw in CHECKPOINTS.items()}


def _prompts(loaded):
    return [loaded.tokenizer.encode(t) for t in TEXTS]


@pytest.mark.parametrize("key", list(CHECKPOINTS))
def test_greedy_matches_transformers(checkpoints, key):
    path = checkpoints[key]
    loaded = load_model(path)
    prompts = _prompts(loaded)
    expected = [hf_greedy(path, p, NUM_NEW) for p in prompts]
    assert engine_greedy(loaded, prompts, NUM_NEW) == expected
    # Same through chunked prefill (chunks cross block boundaries: block_size 4, chunk 3 / 5).
    assert engine_greedy(loaded, prompts, NUM_NEW, chunk_size=3) == expected
    assert engine_greedy(loaded, prompts, NUM_NEW, chunk_size=5, block_size=8) == expected
    # Varied output, so that equality means something.
    assert all(len(set(e)) >= 8 for e in expected)


def test_prefill_logits_match_transformers(checkpoints):
    path = checkpoints["llama3-head-dim"]
    loaded = load_model(path)
    ids = loaded.tokenizer.encode(TEXTS[2])
    cache = KVCache(loaded.config, 16, 4, loaded.dtype, loaded.device)
    n = len(ids)
    table = torch.arange(16).view(1, -1)
    batch = ForwardBatch(torch.tensor(ids), torch.arange(n), torch.arange(n), [n], [n], table)
    logits = loaded.model(batch, cache)
    assert logits.dtype == torch.float32 and logits.shape == (1, loaded.config.vocab_size)
    torch.testing.assert_close(logits[0], hf_last_logits(path, ids), atol=1e-4, rtol=1e-4)


def test_sliding_window_is_applied(checkpoints):
    """The window changes the logits of a long prompt, and transformers agrees with the windowed result."""
    windowed = load_model(checkpoints["mistral-window"])
    ids = windowed.tokenizer.encode(TEXTS[2])
    assert len(ids) > 12 + 4
    full = load_model(build_tiny_checkpoint(checkpoints["mistral-window"].parent, "mistral", name="mistral-nowin"))
    outs = {}
    for key, loaded in (("windowed", windowed), ("full", full)):
        cache = KVCache(loaded.config, 16, 4, loaded.dtype, loaded.device)
        n = len(ids)
        batch = ForwardBatch(torch.tensor(ids), torch.arange(n), torch.arange(n), [n], [n], torch.arange(16).view(1, -1))
        outs[key] = loaded.model(batch, cache)[0]
    assert windowed.config.sliding_window == 12 and full.config.sliding_window is None
    assert not torch.allclose(outs["windowed"], outs["full"], atol=1e-3)
    torch.testing.assert_close(outs["windowed"], hf_last_logits(checkpoints["mistral-window"], ids), atol=1e-4, rtol=1e-4)


def _slots(table: list[int], positions: range, block_size: int) -> list[int]:
    return [table[p // block_size] * block_size + p % block_size for p in positions]


@pytest.mark.parametrize("key", ["llama", "qwen2-sharded-tied", "mistral-window"])
def test_mixed_batch_equals_separate_runs(checkpoints, key):
    """One forward with [prefill chunk of A after a cached prefix, decode of B, decode of C] gives the logits of
    the three run one at a time; the cache ends up with the same K/V either way."""
    loaded = load_model(checkpoints[key])
    bs = 4
    c, b, a = _prompts(loaded)
    assert len(a) >= 15 and len(c) <= 40
    b = b + c[:5]  # make B and C decodes at different context lengths (padding + mask in the decode batch)
    tables = {"a": [7, 2, 9, 4, 11, 0, 13, 15], "b": [1, 3, 5, 6], "c": [8, 10, 12, 14, 16, 17, 18, 19, 20, 21]}
    num_blocks = 24

    def run(cache, name, ids, start, end):
        pos = range(start, end)
        return loaded.model(
            ForwardBatch(torch.tensor(ids[start:end]), torch.tensor(list(pos)),
                         torch.tensor(_slots(tables[name], pos, bs)), [end - start], [end],
                         torch.tensor([tables[name]])),
            cache,
        )[0]

    def warm():  # A has its first 6 tokens cached; B and C have all but their last token cached
        cache = KVCache(loaded.config, num_blocks, bs, loaded.dtype, loaded.device)
        run(cache, "a", a, 0, 6)
        run(cache, "b", b, 0, len(b) - 1)
        run(cache, "c", c, 0, len(c) - 1)
        return cache

    separate = warm()
    expected = [run(separate, "a", a, 6, 15), run(separate, "b", b, len(b) - 1, len(b)),
                run(separate, "c", c, len(c) - 1, len(c))]

    mixed = warm()
    width = max(len(t) for t in tables.values())
    # Padding with -1: the model must never read past a sequence's own blocks.
    padded = torch.tensor([t + [-1] * (width - len(t)) for t in (tables["a"], tables["b"], tables["c"])])
    # Order: decode, prefill chunk, decode (a prefill is not necessarily first).
    order = [("b", b, len(b) - 1, len(b)), ("a", a, 6, 15), ("c", c, len(c) - 1, len(c))]
    ids, pos, slots = [], [], []
    for name, seq, start, end in order:
        ids += seq[start:end]
        pos += list(range(start, end))
        slots += _slots(tables[name], range(start, end), bs)
    batch = ForwardBatch(torch.tensor(ids), torch.tensor(pos), torch.tensor(slots),
                         [end - start for _, _, start, end in order], [end for *_, end in order],
                         padded[[1, 0, 2]])
    got = loaded.model(batch, mixed)
    got.mul_(1.0)  # an ordinary tensor (not an inference tensor): samplers may modify logits in place
    torch.testing.assert_close(got[0], expected[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[2], expected[2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed.tensor, separate.tensor, atol=1e-5, rtol=1e-5)


def test_blocks_moved_to_another_cache_continue_identically(checkpoints):
    """Prefill a prompt on cache 1, export its full blocks (read_block), import them into cache 2 under
    different block ids (write_block), prefill only the tail there, then decode: same tokens as one cache."""
    loaded = load_model(checkpoints["llama"])
    prompt = _prompts(loaded)[2]
    bs, num_cached_blocks = 4, 4
    expected = engine_greedy(loaded, [prompt], NUM_NEW, block_size=bs)[0]

    src = KVCache(loaded.config, 32, bs, loaded.dtype, loaded.device)
    src_table = list(range(5, 5 + 16))
    n = num_cached_blocks * bs
    loaded.model(ForwardBatch(torch.tensor(prompt[:n]), torch.arange(n), torch.tensor(_slots(src_table, range(n), bs)),
                              [n], [n], torch.tensor([src_table])), src)

    dst = KVCache(loaded.config, 32, bs, loaded.dtype, loaded.device)
    dst_table = [30, 1, 17, 9] + list(range(10, 16)) + list(range(18, 28))
    for i in range(num_cached_blocks):
        dst.write_block(dst_table[i], src.read_block(src_table[i]))
    seq = list(prompt)
    out = []
    start = n
    while len(out) < NUM_NEW:
        end = len(seq)
        logits = loaded.model(
            ForwardBatch(torch.tensor(seq[start:end]), torch.arange(start, end),
                         torch.tensor(_slots(dst_table, range(start, end), bs)), [end - start], [end],
                         torch.tensor([dst_table])), dst)
        token = int(logits[0].argmax())
        out.append(token)
        seq.append(token)
        start = end
    assert out == expected


def _run(loaded, cache, table: list[int], ids: list[int], start: int, end: int, bs: int) -> torch.Tensor:
    pos = range(start, end)
    batch = ForwardBatch(torch.tensor(ids[start:end]), torch.tensor(list(pos)), torch.tensor(_slots(table, pos, bs)),
                         [end - start], [end], torch.tensor([table]))
    return loaded.model(batch, cache)[0]


# Logits here reach ~10: fp32 summation-order noise is ~1e-5 for any two attention schedules (the padded
# decode batch vs one sequence alone differs by up to 1.2e-5 too); the attention itself is checked to 1e-6 below.
TOL = 5e-5


@pytest.mark.parametrize("key", ["llama", "qwen2-sharded-tied", "mistral-window"])
def test_shared_prefix_decode_batch_equals_separate_runs(checkpoints, key):
    """Decodes whose block tables share cached prefix blocks (cascade attention: a consecutive prefix read as a
    view, a scattered one gathered, a row sharing nothing, a row sharing too little) give the logits of each
    sequence decoded alone; a cached-prefix prefill chunk in the same batch matches too."""
    from workers.model.cascade import MIN_SHARED_BLOCKS
    from workers.model.forward_batch import build_attention_plan

    loaded = load_model(checkpoints[key])
    bs = 4
    c, b, a = _prompts(loaded)
    prefix_a, prefix_b = a[:20], (c + a)[:16]  # 5 and 4 blocks
    assert MIN_SHARED_BLOCKS == 4 and len(a) >= 20 and len(c) + len(a) >= 24
    tails = [b[:3], b[1:6], c[:2], b[2:4], c[:5], c[1:4], b[:2]]
    # name: (block table, prompt); the first blocks of a1..a3 (10..14) are consecutive, of b1/b2 scattered.
    seqs = {
        "a1": ([10, 11, 12, 13, 14, 40, 41], prefix_a + tails[0]),
        "a2": ([10, 11, 12, 13, 14, 42, 43], prefix_a + tails[1]),
        "b1": ([30, 2, 25, 7, 44, 45], prefix_b + tails[2]),
        "a3": ([10, 11, 12, 13, 14, 46, 47], prefix_a + tails[3]),
        "b2": ([30, 2, 25, 7, 48, 49, 50], prefix_b + tails[4]),
        "solo": ([51, 52, 53, 54, 55, 56, 57], prefix_a + tails[5]),  # same tokens, own blocks: no sharing
        "short": ([30, 2, 58, 59], prefix_b[:8] + tails[6]),  # shares 2 blocks only: below the minimum
    }
    num_blocks = 64

    def warm():
        cache = KVCache(loaded.config, num_blocks, bs, loaded.dtype, loaded.device)
        _run(loaded, cache, seqs["a1"][0], prefix_a, 0, 20, bs)
        _run(loaded, cache, seqs["b1"][0], prefix_b, 0, 16, bs)
        for name, (table, ids) in seqs.items():
            start = 0 if name in ("solo", "short") else (20 if name[0] == "a" else 16)
            if name == "short":
                start = 8
            _run(loaded, cache, table, ids, start, len(ids) - 1, bs)
        # a cached-prefix prefill chunk that joins the decode batch: prefix_a cached, 6 new tokens
        return cache

    chunk_table, chunk_ids = [10, 11, 12, 13, 14, 60, 61], prefix_a + a[3:9]
    separate = warm()
    expected = {name: _run(loaded, separate, t, ids, len(ids) - 1, len(ids), bs) for name, (t, ids) in seqs.items()}
    expected["chunk"] = _run(loaded, separate, chunk_table, chunk_ids, 20, 26, bs)

    mixed = warm()
    order = list(seqs)
    ids, pos, slots, tables = [], [], [], []
    for name in order:
        t, s = seqs[name]
        ids.append(s[-1])
        pos.append(len(s) - 1)
        slots += _slots(t, [len(s) - 1], bs)
        tables.append(t)
    width = max(len(t) for t in tables + [chunk_table])
    decode_batch = ForwardBatch(torch.tensor(ids), torch.tensor(pos), torch.tensor(slots), [1] * len(order),
                                [len(seqs[n][1]) for n in order],
                                torch.tensor([t + [-1] * (width - len(t)) for t in tables]))
    plan = build_attention_plan(decode_batch, bs, loaded.device, loaded.config.sliding_window, loaded.dtype)
    if loaded.config.sliding_window is None:  # a window the prefix could exceed keeps the masked path
        groups = plan.decode_cascade.groups
        assert sorted(g.rows.tolist() for g in groups) == [[0, 1, 3], [2, 4]]
        assert sorted((g.num_tokens, g.slot_range is not None) for g in groups) == [(16, False), (20, True)]
    else:
        assert plan.decode_cascade is None
    got = loaded.model(decode_batch, mixed)
    for i, name in enumerate(order):
        torch.testing.assert_close(got[i], expected[name], atol=TOL, rtol=1e-5)
    # The same decodes with a cached-prefix prefill chunk in the batch (decode path inside a mixed batch).
    mixed = warm()
    n_new = 6
    batch = ForwardBatch(torch.tensor(chunk_ids[20:] + ids), torch.tensor(list(range(20, 26)) + pos),
                         torch.tensor(_slots(chunk_table, range(20, 26), bs) + slots), [n_new] + [1] * len(order),
                         [26] + [len(seqs[n][1]) for n in order],
                         torch.tensor([chunk_table + [-1] * (width - len(chunk_table))]
                                      + [t + [-1] * (width - len(t)) for t in tables]))
    got = loaded.model(batch, mixed)
    torch.testing.assert_close(got[0], expected["chunk"], atol=TOL, rtol=1e-5)
    for i, name in enumerate(order):
        torch.testing.assert_close(got[i + 1], expected[name], atol=TOL, rtol=1e-5)
    torch.testing.assert_close(mixed.tensor, separate.tensor, atol=TOL, rtol=1e-5)


def test_cascade_attention_equals_padded_decode_attention():
    """The cascade kernel alone on random K/V: same output as the padded whole-context decode attention."""
    from workers.model.attention import _decode_attention
    from workers.model.cascade import build_cascade_plan, cascade_decode_attention
    from workers.model.forward_batch import AttentionPlan

    gen = torch.Generator().manual_seed(0)
    bs, num_blocks, kvh, heads, hd = 4, 64, 2, 8, 16
    k_cache, v_cache = torch.randn(num_blocks * bs, kvh, hd, generator=gen), torch.randn(num_blocks * bs, kvh, hd, generator=gen)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    shared = perm[:6]
    tables = [shared + perm[6 + 3 * i : 9 + 3 * i] for i in range(5)] + [perm[40:48], list(range(50, 58))]
    tables[1][:6] = list(range(20, 26))  # rows 1, 4 share consecutive blocks 20..25 (a view), 0, 2, 3 scattered ones
    tables[4][:6] = list(range(20, 26))
    lens = [26, 33, 25, 36, 30, 29, 32]
    plan = build_cascade_plan(tables, lens, bs, torch.device("cpu"), torch.float32)
    assert sorted(g.rows.tolist() for g in plan.groups) == [[0, 2, 3], [1, 4]]
    q = torch.randn(len(tables), heads, hd, generator=gen)
    got = cascade_decode_attention(q, k_cache, v_cache, plan, hd**-0.5)
    max_ctx = max(lens)
    pos = torch.arange(max_ctx)
    padded = torch.tensor([t + [0] * (max_ctx // bs + 1 - len(t)) for t in tables])
    valid = pos[None] < torch.tensor(lens)[:, None]
    slots = torch.where(valid, padded[:, pos // bs] * bs + pos % bs, 0)
    mask = torch.zeros(valid.shape).masked_fill_(~valid, float("-inf"))[:, None, None]
    expected = _decode_attention(q, k_cache, v_cache, AttentionPlan(0, decode_slots=slots, decode_mask=mask), hd**-0.5)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_attend_with_lse_kernel_equals_reference():
    """The CPU flash kernel path and the plain-matmul path (used off CPU) agree on output and log-sum-exp."""
    from workers.model.cascade import attend_with_lse, attend_with_lse_reference

    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, 2, n, 16, generator=gen) for n in (5, 7, 7))
    mask = torch.zeros(3, 1, 1, 7)
    mask[1, ..., 5:] = float("-inf")
    for m in (None, mask):
        out, lse = attend_with_lse(q, k, v, 0.25, m)
        ref_out, ref_lse = attend_with_lse_reference(q, k, v, 0.25, m)
        torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(lse, ref_lse, atol=1e-6, rtol=1e-5)
