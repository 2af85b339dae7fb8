"""The fused CPU attention kernel (workers/model/csrc/attention.c via fused_attention.py) against float64
attention, and the engine that uses it against transformers.

What it must guarantee: the same output and log-sum-exp as plain attention, bottom-right causal, for every
work split it picks (up to 8 query rows per KV head: dot products; up to 32: rows as lanes; more: row tiles
over packed key blocks), for keys read in place from slot ranges, from a slot list, or per sequence (the
decode batch); within a work split, a row's result does not depend on which other rows are in the call; bad
slots are refused before the C code reads them; without a compiler or with the kernel off, attention falls
back to torch's kernels; and the engine's greedy output on a checkpoint with 64-wide heads (the kernel's
case) is token-identical to transformers at float32, cold, through a prefix hit and through shared-prefix
(cascade) decode.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import workers.model.attention_kernels as ak
from workers.model import fused_attention as fa
from tests.test_attention_kernels import reference

AVX512 = fa.AVX512 <= fa._cpu_flags()
HAVE_CC = shutil.which(os.environ.get("CC", "cc")) is not None
needs_kernel = pytest.mark.skipif(fa.kernel() is None, reason=f"fused kernel unavailable: {fa.why_not()}")

TOL = {torch.float32: (2e-6, 2e-6), torch.bfloat16: (2e-2, 1e-2)}  # (output, lse), relative to their scale


def test_kernel_is_built_where_it_can_be():
    """On an x86-64 machine with AVX-512 and a C compiler (this project's machines and CI) the kernel must
    build and load: otherwise every test below would skip and the engine would silently run the slow path."""
    if os.environ.get("PREFIXCACHE_FUSED_ATTENTION") == "0" or not (AVX512 and HAVE_CC):
        pytest.skip("no AVX-512 or no C compiler here")
    assert fa.kernel() is not None, fa.why_not()


def skip_without_bf16(dtype) -> None:
    if dtype == torch.bfloat16 and not fa.kernel().bf16:
        pytest.skip("no AVX512_BF16")


def close(out, lse, ref_out, ref_lse, dtype):
    out_tol, lse_tol = TOL[dtype]
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert (out.double() - ref_out).abs().max() <= out_tol * max(1.0, float(ref_out.abs().max()))
    assert (lse.double() - ref_lse).abs().max() <= lse_tol * max(1.0, float(ref_lse.abs().max()))


# (tokens, keys, causal offset), G=4: 1-2 tokens -> dot products; 3-4 -> 16 lanes; 5-8 -> 32 lanes; more ->
# row tiles; keys that are not a multiple of the 64-key block; a chunk after a cached prefix.
CASES = [(1, 1, 0), (1, 70, None), (2, 300, 298), (2, 17, None), (4, 90, 86), (3, 70, 67), (8, 130, None),
         (7, 7, 0), (9, 200, None), (40, 100, 60),
         (300, 300, 0), (64, 2112, 2048), (33, 257, None)]


@needs_kernel
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("head_dim", (64, 128))
def test_fused_equals_float64_attention(case, dtype, head_dim):
    skip_without_bf16(dtype)
    num_tokens, num_keys, offset = case
    gen = torch.Generator().manual_seed(num_tokens * 1000 + num_keys + head_dim)
    q = torch.randn(num_tokens, 8, head_dim, generator=gen).to(dtype)
    k, v = (torch.randn(num_keys, 2, head_dim, generator=gen).to(dtype) for _ in range(2))
    scale = head_dim ** -0.5
    out, lse = fa.attend_fused(q, k, v, scale, offset)
    close(out, lse, *reference(q, k, v, scale, offset), dtype)
    # attend() takes this kernel for such queries
    assert torch.equal(ak.attend(q, k, v, scale, offset)[0], out)


@needs_kernel
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_keys_read_in_place_from_runs_slots_and_per_sequence(dtype):
    skip_without_bf16(dtype)
    gen = torch.Generator().manual_seed(7)
    cache_k, cache_v = (torch.randn(600, 2, 64, generator=gen).to(dtype) for _ in range(2))
    runs = [(100, 228), (500, 532), (8, 9)]
    slots = torch.cat([torch.arange(a, b) for a, b in runs])
    k, v = cache_k.index_select(0, slots), cache_v.index_select(0, slots)
    for num_tokens in (1, 3, 8, 20):  # dot products, lanes (16, 32), row tiles
        q = torch.randn(num_tokens, 8, 64, generator=gen).to(dtype)
        want = fa.attend_fused(q, k, v, 0.125)
        for got in (fa.attend_fused(q, cache_k, cache_v, 0.125, runs=runs),
                    fa.attend_fused(q, cache_k, cache_v, 0.125, slots=slots),
                    ak.attend_cached(q, cache_k, cache_v, None, None, runs, None, 0.125)):
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        close(*want, *reference(q, k, v, 0.125, None), dtype)
    # the decode batch: each sequence's own slots, padded past its length
    lens = torch.tensor([5, 161, 1, 64])
    table = torch.zeros(4, 161, dtype=torch.long)
    for b, n in enumerate(lens.tolist()):
        table[b, :n] = torch.randperm(600, generator=gen)[:n]
    q = torch.randn(4, 8, 64, generator=gen).to(dtype)
    out, lse = fa.attend_fused_batch(q, cache_k, cache_v, table, lens, 0.125)
    for b, n in enumerate(lens.tolist()):
        rows = table[b, :n]
        want = reference(q[b : b + 1], cache_k[rows], cache_v[rows], 0.125, None)
        close(out[b : b + 1], lse[b : b + 1], *want, dtype)


@needs_kernel
def test_a_rows_result_does_not_depend_on_the_other_rows():
    """Bit for bit within a work split: a token alone or among others (up to 8 rows per KV head: dot products;
    up to 32: rows as lanes; more: row tiles) rounds alike; across the splits, alike up to rounding."""
    gen = torch.Generator().manual_seed(8)
    for dtype in (torch.float32,) + ((torch.bfloat16,) if fa.kernel().bf16 else ()):
        q = torch.randn(48, 8, 64, generator=gen).to(dtype)
        k, v = (torch.randn(500, 2, 64, generator=gen).to(dtype) for _ in range(2))
        for whole_range, parts in (((0, 2), ((0, 1), (1, 2))), ((0, 8), ((4, 7), (3, 7))),
                                   ((0, 48), ((10, 48), (1, 40)))):
            a0, b0 = whole_range
            whole, whole_lse = fa.attend_fused(q[a0:b0], k, v, 0.125)
            for a, b in parts:
                part, part_lse = fa.attend_fused(q[a:b], k, v, 0.125)
                assert torch.equal(part, whole[a - a0 : b - a0]) and torch.equal(part_lse, whole_lse[a - a0 : b - a0])
        tiles, tiles_lse = fa.attend_fused(q, k, v, 0.125)
        for n in (2, 8):
            part, part_lse = fa.attend_fused(q[:n], k, v, 0.125)
            tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {}
            torch.testing.assert_close(part, tiles[:n], **tol)
            torch.testing.assert_close(part_lse, tiles_lse[:n])


@needs_kernel
def test_amx_row_tiles_agree_with_float64_attention_and_the_avx512_ones():
    """Where the CPU has AMX (bfloat16 tiles), every bfloat16 call runs on its unit, whatever the row count
    (one split: a row rounds alike however its context is cut into calls); the AVX-512 row tiles are the
    same unit on VDPBF16PS. Both within bfloat16 rounding of float64 attention, for each head size, causal offsets, one
    16-row half of a tile and a partial last tile; and AMX is on wherever the CPU has it (unless
    PREFIXCACHE_AMX=0)."""
    lib = fa.kernel()
    if not lib.bf16:
        pytest.skip("no AVX512_BF16")
    has_amx = fa.AMX <= fa._cpu_flags()
    wanted = has_amx and os.environ.get("PREFIXCACHE_AMX", "1") != "0"
    try:
        on = bool(lib.amx(1))
        assert on == has_amx, "AMX tiles were not granted (arch_prctl) on a CPU that has them"
        if not on:
            pytest.skip("no AMX here")
        gen = torch.Generator().manual_seed(11)
        for num_tokens, num_keys, offset in ((9, 200, None), (300, 300, 0), (64, 2112, 2048), (33, 257, None),
                                             (1, 2048, None), (3, 300, 297), (8, 1000, None)):
            for head_dim in (64, 128, 256):
                q = torch.randn(num_tokens, 8, head_dim, generator=gen).to(torch.bfloat16)
                k, v = (torch.randn(num_keys, 2, head_dim, generator=gen).to(torch.bfloat16) for _ in range(2))
                scale = head_dim ** -0.5
                want = reference(q, k, v, scale, offset)
                lib.amx(1)
                tiles = fa.attend_fused(q, k, v, scale, offset)
                close(*tiles, *want, torch.bfloat16)
                lib.amx(0)
                close(*fa.attend_fused(q, k, v, scale, offset), *want, torch.bfloat16)
                lib.amx(1)  # a row alone in its tile rounds as it does among 31 others
                t = min(5, num_tokens - 1)
                alone = fa.attend_fused(q[t : t + 1].expand(9, -1, -1), k, v, scale,
                                        None if offset is None else offset + t)
                assert torch.equal(alone[0][0], tiles[0][t]) and torch.equal(alone[1][0], tiles[1][t])
    finally:
        lib.amx(int(wanted))


@needs_kernel
def test_bad_slots_are_refused_before_the_kernel_reads():
    cache = torch.zeros(64, 2, 64)
    q = torch.zeros(2, 8, 64)
    with pytest.raises(IndexError):
        fa.attend_fused(q, cache, cache, 0.1, runs=[(60, 70)])
    with pytest.raises(IndexError):
        fa.attend_fused(q, cache, cache, 0.1, slots=torch.tensor([1, 64]))
    with pytest.raises(IndexError):
        fa.attend_fused_batch(q, cache, cache, torch.tensor([[0, -1], [1, 2]]), torch.tensor([2, 2]), 0.1)
    with pytest.raises(ValueError):  # a length past the slot table's width
        fa.attend_fused_batch(q, cache, cache, torch.tensor([[0, 1], [1, 2]]), torch.tensor([3, 2]), 0.1)
    assert not fa.supports(torch.zeros(2, 8, 48))  # head size not a multiple of 64: torch's kernels


def test_without_the_kernel_attention_falls_back_to_torch(monkeypatch):
    monkeypatch.setitem(fa._state, "kernel", None)
    monkeypatch.setitem(fa._state, "why", "off for this test")
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(40, 8, 64, generator=gen)
    k, v = torch.randn(300, 2, 64, generator=gen), torch.randn(300, 2, 64, generator=gen)
    assert not fa.supports(q)
    out, lse = ak.attend(q, k, v, 0.125, 260)
    close(out, lse, *reference(q, k, v, 0.125, 260), torch.float32)
    cache = torch.randn(400, 2, 64, generator=gen)
    runs = [(0, 100), (200, 300)]
    got = ak.attend_cached(q, cache, cache, None, None, runs, None, 0.125)
    want = ak.attend(q, ak.read_rows(cache, None, runs, None, torch.float32),
                     ak.read_rows(cache, None, runs, None, torch.float32), 0.125)
    assert torch.equal(got[0], want[0])


@pytest.fixture(scope="module")
def wide_heads(tmp_path_factory):
    from tests.model_fixtures import build_tiny_checkpoint
    from workers.model import load_model

    path = build_tiny_checkpoint(tmp_path_factory.mktemp("wide"), "llama", seed=5, hidden=128, heads=4, kv_heads=2,
                                 head_dim=64, intermediate=256, vocab=320)
    return path, load_model(path)


@pytest.mark.parametrize("fused", (True, False), ids=("fused", "torch"))
def test_engine_with_64_wide_heads_matches_transformers(wide_heads, fused, monkeypatch):
    """Cold prefill in chunks, prefix hits, and decode of sequences sharing a 12-block prefix (cascade: a
    prefix pass read in place plus each row's own suffix) or none: token-identical to transformers."""
    from cache_service.records import SamplingParams
    from tests.model_fixtures import hf_greedy
    from workers.engine import Engine, EngineConfig

    if fused and fa.kernel() is None:
        pytest.skip(f"fused kernel unavailable: {fa.why_not()}")
    if not fused:
        monkeypatch.setitem(fa._state, "kernel", None)
        monkeypatch.setitem(fa._state, "why", "off for this test")
    path, lm = wide_heads
    system = [(11 * i + 5) % 300 + 3 for i in range(48)]
    prompts = [system + [200 + i, 17, 40 + i] for i in range(4)] + [[9, 8, 7, 6, 5] * 7]
    engine = Engine(EngineConfig(block_size=4, num_blocks=128, max_num_batched_tokens=32, max_num_seqs=8), loaded=lm)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    want = [hf_greedy(path, p, 12) for p in prompts]
    first = engine.generate(prompts, params)
    assert [o.new_token_ids for o in first] == want
    again = engine.generate(prompts, params)  # every prompt's full blocks are cached now
    assert [o.new_token_ids for o in again] == want
    assert all(o.cached_tokens >= 32 for o in again)
    engine.check_integrity()



def test_without_a_compiler_the_kernel_is_off_with_the_reason(tmp_path, monkeypatch):
    """A machine with no C compiler loads no kernel and says why (the engine then runs torch's kernels)."""
    if not AVX512:
        pytest.skip("no AVX-512: the kernel is off before any compiler is looked for")
    monkeypatch.setenv("PREFIXCACHE_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    loaded, why = fa._load()
    assert loaded is None and "could not build" in why
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


def test_a_compiler_without_amx_still_builds_the_kernel(tmp_path, monkeypatch):
    """A compiler that does not know the AMX flags (older gcc or clang) builds the kernel without AMX."""
    if not (AVX512 and HAVE_CC):
        pytest.skip("no AVX-512 or no C compiler here")
    cc = tmp_path / "cc-without-amx"
    cc.write_text(f'#!/bin/sh\nfor a in "$@"; do case "$a" in -mamx*) echo "unknown flag $a" >&2; exit 1;; esac; done\n'
                  f'exec {shutil.which(os.environ.get("CC", "cc"))} "$@"\n')
    cc.chmod(0o755)
    monkeypatch.setenv("PREFIXCACHE_KERNEL_DIR", str(tmp_path / "kernels"))
    monkeypatch.setenv("CC", str(cc))
    loaded, why = fa._load()
    assert loaded is not None, why
    assert loaded.amx(1) == 0  # built without AMX: the AVX-512 row tiles
