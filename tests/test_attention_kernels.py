"""The attention kernels and plans behind the engine's speed work, checked against plain float64 attention.

What each piece must guarantee (workers/model/attention_kernels.py, forward_batch.py, cascade.py, layers.py):
the GEMM kernel and the flash path compute the same attention and log-sum-exp, bottom-right causal; merging
two key ranges by LSE is attention over their concatenation; slot runs read as views equal a row gather
(fp8 included, bit for bit); prefill chunks that share a cached prefix get one prefix pass and give the
logits each chunk gets alone; a long ungrouped decode does not pad the others' suffixes; the packed linear
follows in-place weight edits.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import workers.model.attention_kernels as ak
from workers.model.kv_cache import gather_slots, quantize_fp8


def reference(q, k, v, scale, causal_offset):
    """float64 attention and LSE: q [T, H, D], k/v [S, KVH, D]."""
    num_tokens, num_heads, _ = q.shape
    num_keys, num_kv_heads, _ = k.shape
    g = num_heads // num_kv_heads
    qh = q.double().transpose(0, 1)
    kh = k.double().transpose(0, 1).repeat_interleave(g, 0)
    vh = v.double().transpose(0, 1).repeat_interleave(g, 0)
    s = qh @ kh.transpose(-1, -2) * scale
    if causal_offset is not None:
        allowed = torch.arange(num_keys)[None, :] <= causal_offset + torch.arange(num_tokens)[:, None]
        s = s.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(s, -1) @ vh).transpose(0, 1), torch.logsumexp(s, -1).transpose(0, 1)


CASES = [(5, 5, 0), (5, 12, 7), (1, 9, None), (7, 30, None), (300, 300, 0), (64, 320, 256), (40, 100, 60),
         (33, 257, None)]
TOL = {torch.float32: (2e-6, 2e-6), torch.bfloat16: (2e-2, 1e-5)}  # (output, lse)


@pytest.mark.parametrize("case,dtype,path", list(itertools.product(CASES, (torch.float32, torch.bfloat16),
                                                                    ("gemm", "flash", "reference"))))
def test_kernels_equal_float64_attention(case, dtype, path, monkeypatch):
    num_tokens, num_keys, offset = case
    gen = torch.Generator().manual_seed(num_tokens * 1000 + num_keys)
    q, k, v = (torch.randn(n, h, 16, generator=gen).to(dtype) for n, h in ((num_tokens, 8), (num_keys, 2), (num_keys, 2)))
    if path == "gemm":
        out, lse = ak._attend_gemm(q, k, v, 0.25, offset)
    elif path == "flash":
        out, lse = ak._attend_sdpa(q, k, v, 0.25, offset)
    else:  # the explicit softmax other devices use, in row tiles of a few scores
        monkeypatch.setattr(ak, "_CPU_FLASH", None)
        monkeypatch.setattr(ak, "REFERENCE_SCORES", 1 << 9)
        out, lse = ak._attend_sdpa(q, k, v, 0.25, offset)
    ref_out, ref_lse = reference(q, k, v, 0.25, offset)
    out_tol, lse_tol = TOL[dtype]
    if path == "reference" and dtype == torch.bfloat16:
        lse_tol = 2e-2  # its scores come out of a bfloat16 matmul
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert (out.double() - ref_out).abs().max() <= out_tol * max(1.0, float(ref_out.abs().max()))
    assert (lse.double() - ref_lse).abs().max() <= lse_tol * max(1.0, float(ref_lse.abs().max()))


def test_sdpa_causal_is_the_flash_output():
    gen = torch.Generator().manual_seed(3)
    for num_tokens, num_keys, offset in ((6, 6, 0), (6, 20, 14)):
        q, k, v = torch.randn(num_tokens, 4, 8, generator=gen), torch.randn(num_keys, 2, 8, generator=gen), \
            torch.randn(num_keys, 2, 8, generator=gen)
        expected, _ = reference(q, k, v, 0.3, offset)
        torch.testing.assert_close(ak.sdpa_causal(q, k, v, 0.3, offset).double(), expected, atol=2e-6, rtol=1e-5)


def test_merge_of_two_key_ranges_is_attention_over_both():
    gen = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(9, 8, 16, generator=gen), torch.randn(50, 2, 16, generator=gen), torch.randn(50, 2, 16, generator=gen)
    a = ak.attend(q, k[:30], v[:30], 0.25)
    b = ak.attend(q, k[30:], v[30:], 0.25)
    expected, _ = reference(q, k, v, 0.25, None)
    torch.testing.assert_close(ak.merge(*a, *b).double(), expected, atol=2e-6, rtol=1e-5)


def test_kernel_choice():
    q32, qbf = torch.zeros(1, 1, 1), torch.zeros(1, 1, 1, dtype=torch.bfloat16)
    assert ak._gemm_path(q32, 512, 2048, causal=True) and ak._gemm_path(q32, 512, 2048, causal=False)
    assert not ak._gemm_path(q32, 32, 2048, causal=True)  # few rows: flash
    assert not ak._gemm_path(q32, 512, 99, causal=True)  # few keys: flash
    for q in (q32, qbf):  # unmasked passes: the GEMMs from 256 rows, flash below
        assert ak._gemm_path(q, 256, 2048, causal=False) and not ak._gemm_path(q, 128, 2048, causal=False)


def test_slot_runs_and_read_rows_equal_a_gather():
    assert ak.slot_runs([3, 4, 5, 9, 10, 2], 4) == [(12, 24), (36, 44), (8, 12)]
    assert ak.slot_runs([3, 4, 5, 9], 4, start=5, end=14) == [(17, 24), (36, 38)]  # position 5: block 4, offset 1
    gen = torch.Generator().manual_seed(5)
    cache = torch.randn(64, 2, 8, generator=gen)
    blocks = [3, 4, 5, 9, 10, 2]
    runs = ak.slot_runs(blocks, 4, 2, 22)
    slots = torch.cat([torch.arange(a, b) for a, b in runs])
    assert torch.equal(ak.read_rows(cache, None, runs, None, torch.float32), cache.index_select(0, slots))
    one = ak.slot_runs(blocks, 4, 0, 12)
    assert len(one) == 1 and ak.read_rows(cache, None, one, None, torch.float32).data_ptr() == cache[12:24].data_ptr()
    values, scales = quantize_fp8(cache)
    assert torch.equal(ak.read_rows(values, scales, runs, None, torch.float32),
                       gather_slots(values, scales, slots, torch.float32))


def test_prefill_chunks_sharing_a_cached_prefix_get_one_pass():
    from workers.model.forward_batch import ForwardBatch, build_attention_plan

    bs = 4
    shared = list(range(10, 20))  # 10 consecutive blocks = 40 cached tokens
    tables = [shared + [40, 41], shared + [42, 43], list(range(60, 72))]
    # Chunks of 5, 3 and 6 new tokens after 40 cached ones; the third shares nothing.
    q_lens, ctx = [5, 3, 6], [45, 43, 46]
    ids = torch.zeros(sum(q_lens), dtype=torch.long)
    batch = ForwardBatch(ids, ids, ids, q_lens, ctx, torch.tensor(tables), tables)
    plan = build_attention_plan(batch, bs, torch.device("cpu"), None, torch.float32)
    assert [(p.num_tokens, p.slot_range) for p in plan.prefix_passes] == [(40, (40, 80))]
    assert plan.prefix_passes[0].token_idx.tolist() == list(range(8))  # both chunks' queries, one pass
    # Their rest is their own fresh K/V; the third chunk (own run below MIN_OWN_PREFIX_TOKENS) reads its
    # whole context, one consecutive run: a view.
    assert [(p.slots is None, p.prefix, p.causal_offset) for p in plan.prefills[:2]] == [(True, 40, 0), (True, 40, 0)]
    third = plan.prefills[2]
    assert (third.prefix, third.causal_offset, third.slot_range) == (0, 40, (240, 286))
    # An fp8 cache reads the chunk back from the cache (what it holds) instead of the fresh K/V.
    quantized = build_attention_plan(batch, bs, torch.device("cpu"), None, torch.float32, quantized=True)
    assert all(p.slots is not None for p in quantized.prefills)


def test_one_long_decode_does_not_pad_the_others():
    from workers.model.cascade import build_cascade_plan

    bs = 4
    shared = list(range(0, 8))
    tables = [shared + [20 + i] for i in range(4)] + [[40 + i for i in range(30) if i % 2 == 0] * 2]
    lens = [34, 35, 33, 34, 110]
    plan = build_cascade_plan(tables, lens, bs, torch.device("cpu"), torch.float32)
    assert [g.rows.tolist() for g in plan.groups] == [[0, 1, 2, 3]]
    widths = sorted((b.slots.shape[0], b.slots.shape[1]) for b in plan.buckets)
    assert widths == [(1, 110), (4, 3)]


@pytest.mark.parametrize("order", ("adjacent", "interleaved"))
def test_cascade_decode_equals_plain_attention_whether_group_rows_are_adjacent_or_not(order):
    """Two groups sharing different 8-block prefixes, their rows adjacent in the batch (read as views) or
    interleaved (gathered by index): each row's output is attention over its whole context."""
    from workers.model.cascade import build_cascade_plan, cascade_decode_attention

    bs, gen = 4, torch.Generator().manual_seed(12)
    k_cache, v_cache = (torch.randn(200, 2, 64, generator=gen) for _ in range(2))
    groups = [list(range(0, 8)), list(range(10, 18))]
    rows = [0, 0, 0, 1, 1, 1] if order == "adjacent" else [0, 1, 0, 1, 0, 1]
    tables = [groups[g] + [30 + i, 40 + i] for i, g in enumerate(rows)]
    lens = [32 + 3 + i for i in range(6)]
    plan = build_cascade_plan(tables, lens, bs, torch.device("cpu"), torch.float32)
    assert len(plan.groups) == 2
    assert all((g.row_range is not None) == (order == "adjacent") for g in plan.groups)
    q = torch.randn(6, 8, 64, generator=gen)
    out = cascade_decode_attention(q, k_cache, v_cache, plan, 0.125)
    for i, (t, n) in enumerate(zip(tables, lens)):
        slots = torch.tensor([t[j // bs] * bs + j % bs for j in range(n)])
        want, _ = reference(q[i : i + 1], k_cache[slots], v_cache[slots], 0.125, None)
        torch.testing.assert_close(out[i : i + 1].double(), want, atol=1e-5, rtol=1e-5)


def test_prefill_chunks_sharing_a_prefix_equal_each_alone():
    """Logits of three cached-prefix chunks in one batch (one shared prefix pass) equal each chunk alone."""
    from workers.model import KVCache, load_model
    from workers.model.forward_batch import ForwardBatch

    loaded = load_model("demo")
    bs = 16
    gen = torch.Generator().manual_seed(6)
    prefix = torch.randint(3, 250, (64,), generator=gen).tolist()  # 4 blocks: blocks 1..4
    tails = [torch.randint(3, 250, (n,), generator=gen).tolist() for n in (7, 12, 3)]
    tables = [[1, 2, 3, 4, 10 + i] for i in range(3)]

    def warm() -> KVCache:
        cache = KVCache(loaded.config, 32, bs, loaded.dtype, loaded.device)
        pos = torch.arange(64)
        loaded.model(ForwardBatch(torch.tensor(prefix), pos, pos + bs, [64], [64], torch.tensor([tables[0][:4]])), cache)
        return cache

    def chunk_batch(rows):
        ids, pos, slots = [], [], []
        for i in rows:
            ids += tails[i]
            pos += list(range(64, 64 + len(tails[i])))
            slots += [tables[i][4] * bs + j for j in range(len(tails[i]))]
        return ForwardBatch(torch.tensor(ids), torch.tensor(pos), torch.tensor(slots), [len(tails[i]) for i in rows],
                            [64 + len(tails[i]) for i in rows], torch.tensor([tables[i] for i in rows]))

    alone = [loaded.model(chunk_batch([i]), warm())[0] for i in range(3)]
    together = loaded.model(chunk_batch([0, 1, 2]), warm())
    for i in range(3):
        torch.testing.assert_close(together[i], alone[i], atol=5e-5, rtol=1e-5)


def test_packed_linear_follows_the_weight():
    from workers.model.layers import Linear

    gen = torch.Generator().manual_seed(7)
    layer = Linear(16, 12, bias=True)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(12, 16, generator=gen))
        layer.bias.copy_(torch.randn(12, generator=gen))
    x, res = torch.randn(5, 16, generator=gen), torch.randn(5, 12, generator=gen)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        layer.weight.mul_(2)  # an in-place edit: the packed copy is rebuilt
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x, res), res + F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
    gate, up = F.linear(x, layer.weight, layer.bias).split(6, dim=-1)
    torch.testing.assert_close(layer.silu_mul(x, 6), F.silu(gate) * up, atol=1e-5, rtol=1e-5)
