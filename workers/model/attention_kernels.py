"""Attention kernels with their log-sum-exp, one KV head at a time: the pieces paged and cascade attention merge.

``attend(q, k, v, scale, causal_offset)``: queries ``q [T, H, D]`` (all heads of ``T`` tokens, as the QKV
projection produces them) against keys/values ``k, v [S, KVH, D]`` (tokens-major, as the cache stores them:
a view of consecutive cache slots, a gather, or the batch's fresh K/V). Query heads ``h*G .. h*G+G-1`` read
KV head ``h``. ``causal_offset=c``: query token ``t`` sees keys ``0 .. c + t`` (bottom-right aligned: a
chunk of new tokens after ``c`` earlier ones); ``None``: every query sees every key. Returns the output
``[T, H, D]`` in the queries' dtype and the log-sum-exp ``[T, H]`` in float32, so that attention over a
concatenation of key ranges is the LSE-weighted merge of attention over each range (``merge``).

On x86-64 CPUs with AVX-512, ``attend`` and ``attend_cached`` run the fused C kernel (fused_attention.py:
one pass per KV head and query tile with an online softmax, reading cache runs or slots in place; 1.5-2.8x
the kernels below on this project's machine). Without it (another CPU, no compiler,
``PREFIXCACHE_FUSED_ATTENTION=0``), on CPU a causal chunk of 64+ query rows over 256+ keys (and an
unmasked prefix pass of 256+ rows) is row-tiled GEMMs through oneDNN with a float32 softmax
(``_attend_gemm``: 1.4-1.7x torch's CPU flash kernel there); the rest is torch's CPU flash kernel, which
returns the LSE itself, on GQA-folded queries when unmasked. Other devices use an explicit float32 softmax
(device-agnostic; see ``_attend_sdpa``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import workers.model.fused_attention as fused_attention
from workers.model.kv_cache import dequantize, gather_slots

_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None)

# Scores of one row tile are [tile_rows, S] float32, ~4 MiB. Measured (median of 5 interleaved runs, GFLOP/s,
# 1 / 2 threads, bfloat16; the 2048-token causal prefill, a 448-token group pass over 2048 keys): 1 MiB tiles
# 116-151 / 127-201, 2 MiB 129-165 / 168-241, 4 MiB 100-103 / 134-271 (out of L2 with one thread). With the
# engine's heap setting (model_runner.tune_host_allocator: a freed tile's pages stay mapped), 2 threads, ms:
# causal 2048 float32 20.8 / 18.9 / 19.2 (2 / 4 / 8 MiB), bfloat16 19.9 / 17.9 / 18.3; the 448-token pass
# 7.2 / 6.9 / 7.3 and 6.6 / 6.4 / 6.7: 4 MiB.
TILE_SCORES = 1 << 20
# Scores are computed and exponentiated in float32 for bfloat16 models too, as torch's flash kernel does:
# the bfloat16 x bfloat16 -> float32 products cost a conversion of the tile's queries and the keys, and a
# softmax on bfloat16 scores was the slow path (3.6 ms vs 0.41 ms for 512 x 2048, one thread).
SCORE_DTYPE: dict[torch.dtype, torch.dtype] = {torch.bfloat16: torch.float32}
_TRIU_CACHE: dict[tuple[int, int, torch.dtype, torch.device], torch.Tensor] = {}


# A prefix made of at most this many runs of consecutive cache slots is read as views joined by one memcpy
# (torch.cat) rather than a row gather: a shared prefix whose prompt was prefilled in two chunks is two runs,
# and index_select of 2048 slot rows measured 4-8x slower than copying the two ranges.
MAX_RUNS = 16


def slot_runs(blocks: list[int], block_size: int, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """Positions ``start .. end-1`` of a sequence with block table ``blocks`` as ``[a, b)`` slot ranges, one per
    run of consecutive blocks (so one range when the whole span is consecutive)."""
    if end is None:
        end = len(blocks) * block_size
    runs: list[tuple[int, int]] = []
    p = start
    while p < end:
        b = p // block_size
        off = p % block_size
        a = blocks[b] * block_size + off
        take = min(block_size - off, end - p)
        if runs and runs[-1][1] == a:
            runs[-1] = (runs[-1][0], a + take)
        else:
            runs.append((a, a + take))
        p += take
    return runs


def read_rows(cache: torch.Tensor, scales: torch.Tensor | None, runs: list[tuple[int, int]] | None,
              slots: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Rows of a layer's K or V ``[num_slots, KVH, D]`` in ``dtype``: slot ranges ``runs`` (one range: a view,
    no copy, when unquantized; a few: one copy of the ranges) or else the ``slots`` gather. fp8 caches are
    dequantized from the same views / gathers."""
    if runs is not None:
        if len(runs) == 1:
            a, b = runs[0]
            values = cache[a:b]
            sc = None if scales is None else scales[a:b]
        else:
            values = torch.cat([cache[a:b].view(torch.uint8) if scales is not None else cache[a:b] for a, b in runs])
            if scales is not None:
                values = values.view(cache.dtype)
            sc = None if scales is None else torch.cat([scales[a:b] for a, b in runs])
        return values.to(dtype) if sc is None else dequantize(values, sc, dtype)
    return gather_slots(cache, scales, slots, dtype).to(dtype)


# Which kernel, measured (median of 5 interleaved runs; ms for a pass over 2048 keys, 8 heads, G=4, 1 / 2
# threads; flash on GQA-folded queries):
#
#   unmasked (prefix passes)   tokens  float32 flash / GEMM          bfloat16 flash / GEMM
#                              16      0.81 / 1.49  0.49 / 1.15      0.89 / 0.69  0.54 / 0.62
#                              64      2.92 / 3.75  1.57 / 2.69      3.11 / 3.39  1.83 / 2.62
#                              128     5.84 / 6.82  3.07 / 4.68      6.32 / 5.42  3.61 / 4.88
#                              448     19.5 / 19.8  10.4 / 12.7      20.4 / 16.0  10.5 / 9.6
#   causal, 2048-token prefill GFLOP/s 72-76 / 106-122 (1 thread), 131-149 / 162-198 (2), both dtypes alike
#
# so unmasked passes used flash, except bfloat16 ones from 256 rows (in the engine, workload A at 2 threads:
# 4.79-4.87 s with 256, 4.99-5.05 s with 1024), and causal chunks use the GEMMs from 64 rows and 256 keys.
# Below that flash was as fast (96-99 keys: 29-44 vs 17-32 GFLOP/s) and, being one kernel, rounds a chunk's
# attention exactly alike whatever follows it (block_verifier.py's bfloat16 recomputation of a short run
# matches the prefill that made it bit for bit). Flash is also one parallel region where a GEMM tile loop is a
# dozen, each a wake-up of the other OpenMP threads: steadier on a busy machine. The choice never depends on
# the thread count, so a run rounds alike with 1 or N threads.
#
# The float32 figures above were taken without the engine's heap setting, which made each fresh score tile
# page-fault. With it (2 threads, ms, flash / GEMM): 64 tokens 1.55 / 1.14, 448 tokens 10.1 / 6.9, so float32
# unmasked passes take the GEMMs from 256 rows too (workload A's prefix passes 1.16 -> 0.95 s).
GEMM_MIN_ROWS = 64  # query rows per KV head (tokens x G), causal chunks
GEMM_MIN_KEYS = 256
GEMM_MIN_ROWS_UNMASKED = 256


def _gemm_path(q: torch.Tensor, rows: int, keys: int, causal: bool) -> bool:
    if q.device.type != "cpu" or _LINEAR is None or not torch.backends.mkldnn.is_available():
        return False
    if keys < GEMM_MIN_KEYS or rows < GEMM_MIN_ROWS:
        return False
    if not causal and rows < GEMM_MIN_ROWS_UNMASKED:
        return False
    if q.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return q.dtype == torch.float32


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal_offset: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with GQA: ``q [T, H, D]`` x ``k, v [S, KVH, D]`` -> (out ``[T, H, D]``, lse ``[T, H]``)."""
    if fused_attention.supports(q):
        return fused_attention.attend_fused(q, k, v, scale, causal_offset)
    if _gemm_path(q, q.shape[0] * (q.shape[1] // k.shape[1]), k.shape[0], causal_offset is not None):
        return _attend_gemm(q, k, v, scale, causal_offset)
    return _attend_sdpa(q, k, v, scale, causal_offset)


def attend_cached(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None, runs: list[tuple[int, int]] | None, slots: torch.Tensor | None, scale: float,
    causal_offset: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attend`` over cache rows: the slot ranges ``runs`` in order, else the slots ``slots``. The fused kernel
    reads them in place (no gather, no concatenation of runs); otherwise they are read (``read_rows``:
    dequantized for an fp8 cache) and attended."""
    if fused_attention.supports_cache(q, k_cache, k_scale, v_cache):
        return fused_attention.attend_fused(q, k_cache, v_cache, scale, causal_offset, runs=runs,
                                            slots=None if runs is not None else slots)
    k = read_rows(k_cache, k_scale, runs, slots, q.dtype)
    v = read_rows(v_cache, v_scale, runs, slots, q.dtype)
    return attend(q, k, v, scale, causal_offset)


def _causal_mask(num_tokens: int, num_keys: int, offset: int, dtype, device) -> torch.Tensor:
    """Additive [T, S] mask: token t sees keys <= offset + t."""
    key = (num_tokens, num_keys - offset, dtype, device)
    tri = _TRIU_CACHE.get(key)
    if tri is None:
        pos = torch.arange(num_keys - offset, device=device)
        tri = torch.zeros((num_tokens, num_keys - offset), dtype=dtype, device=device)
        tri.masked_fill_(pos[None, :] > torch.arange(num_tokens, device=device)[:, None], float("-inf"))
        if len(_TRIU_CACHE) > 64:
            _TRIU_CACHE.clear()
        _TRIU_CACHE[key] = tri
    if offset == 0:
        return tri
    return torch.cat([torch.zeros((num_tokens, offset), dtype=dtype, device=device), tri], dim=1)


def sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal_offset: int) -> torch.Tensor:
    """``attend``'s output alone through ``F.scaled_dot_product_attention`` (bottom-right causal), for any
    device: where no LSE is needed, the device's fused kernels never materialize the scores."""
    num_tokens, num_keys = q.shape[0], k.shape[0]
    is_causal = causal_offset == 0 and num_keys == num_tokens
    mask = None if is_causal else _causal_mask(num_tokens, num_keys, causal_offset, q.dtype, q.device)
    o = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                                       v.transpose(0, 1).unsqueeze(0), attn_mask=mask, is_causal=is_causal,
                                       scale=scale, enable_gqa=True)
    return o[0].transpose(0, 1)


# The explicit-softmax path materializes [heads, rows, keys] float32 scores: at most this many at a time.
REFERENCE_SCORES = 1 << 26


def _attend_sdpa(q, k, v, scale, causal_offset):
    num_tokens, num_heads, head_dim = q.shape
    num_keys, num_kv_heads = k.shape[0], k.shape[1]
    qh = q.transpose(0, 1).unsqueeze(0)  # [1, H, T, D]
    kh = k.transpose(0, 1).unsqueeze(0)  # [1, KVH, S, D]
    vh = v.transpose(0, 1).unsqueeze(0)
    mask, is_causal = None, False
    if causal_offset is not None:
        if causal_offset == 0 and num_keys == num_tokens:
            is_causal = True
        else:
            mask = _causal_mask(num_tokens, num_keys, causal_offset, q.dtype, q.device)
    if q.device.type == "cpu" and _CPU_FLASH is not None and q.dtype in (torch.float32, torch.bfloat16, torch.float16):
        group = num_heads // num_kv_heads
        if causal_offset is None and group > 1:
            # Unmasked: the G query heads of a KV head fold into its query axis ([1, KVH, T*G, D], row t*G+g),
            # as transformers' repeat_kv pairs them: longer query blocks for the kernel (decode-group prefix
            # passes, 8 tokens x G=4: 1.3-1.5x faster than 8 queries on each of the 8 heads).
            qf = q.view(num_tokens, num_kv_heads, group, head_dim).transpose(0, 1)
            qf = qf.reshape(1, num_kv_heads, num_tokens * group, head_dim)
            out, lse = _CPU_FLASH(qf, kh, vh, 0.0, False, scale=scale)
            out = out[0].view(num_kv_heads, num_tokens, group, head_dim).transpose(0, 1).reshape(q.shape)
            return out, lse[0].view(num_kv_heads, num_tokens, group).transpose(0, 1).reshape(num_tokens, num_heads).float()
        # GQA as is: the CPU flash op reads KV head h // G for query head h (no expanded K/V copy).
        out, lse = _CPU_FLASH(qh, kh, vh, 0.0, is_causal, attn_mask=mask, scale=scale)
        return out[0].transpose(0, 1), lse[0].transpose(0, 1).float()
    # Any device: explicit scores in float32 (off CPU this is what cascade.attend_with_lse_reference does),
    # in row tiles so that a long prefix pass never holds more than REFERENCE_SCORES scores.
    g = num_heads // num_kv_heads
    kh = kh.repeat_interleave(g, dim=1)
    vh = vh.repeat_interleave(g, dim=1)
    if is_causal:
        mask = _causal_mask(num_tokens, num_keys, 0, torch.float32, q.device)
    out = torch.empty_like(qh)
    lse = torch.empty(qh.shape[:-1], dtype=torch.float32, device=q.device)
    step = max(1, REFERENCE_SCORES // max(1, num_heads * num_keys))
    for t0 in range(0, num_tokens, step):
        t1 = min(num_tokens, t0 + step)
        s = torch.matmul(qh[:, :, t0:t1], kh.transpose(-1, -2)).float() * scale
        if mask is not None:
            s = s + mask[t0:t1].float()
        lse[:, :, t0:t1] = torch.logsumexp(s, dim=-1)
        out[:, :, t0:t1] = torch.matmul(torch.exp(s - lse[:, :, t0:t1, None]).to(v.dtype), vh)
    return out[0].transpose(0, 1), lse[0].transpose(0, 1)


def _attend_gemm(q, k, v, scale, causal_offset, score_dtype=None):
    """Row tiles of (q_tile @ K^T -> float32 softmax -> @ V) through oneDNN, one KV head at a time.

    Per tile: the scores GEMM (the scale folded into the queries in float32 first), one fused float32
    softmax, the probabilities in the queries' dtype for the P @ V GEMM, and the log-sum-exp from the
    softmax's own output (``lse = max(s) - log(max(p))``: the probability at the row max is exactly
    ``exp(max - lse)``), so that a tile costs two GEMMs and four passes over its scores. P @ V is oneDNN's
    linear on a contiguous V^T for tiles of 64 rows and more (1.5x torch.matmul there; float32 matmul is MKL,
    slow on this AMD EPYC), torch.matmul below (oneDNN for bfloat16; its setup cost is lower for few rows).
    """
    score_dtype = score_dtype or SCORE_DTYPE.get(q.dtype, q.dtype)
    num_tokens, num_heads, head_dim = q.shape
    num_keys, num_kv_heads = k.shape[0], k.shape[1]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    lse = torch.empty((num_tokens, num_heads), dtype=torch.float32, device=q.device)
    tile = max(1, min(num_tokens, TILE_SCORES // max(1, num_keys * group)))
    if causal_offset is not None:
        # A causal tile computes its whole [tile, keys] block and masks the upper triangle of its diagonal
        # part: tiles of an eighth of the keys keep that waste under ~6% (one 512-token tile ran at 25
        # GFLOP/s where the same chunk in 64-token tiles ran like the 2048-token prefill's 128-token ones).
        tile = min(tile, max(32, num_keys // 8))
    for h in range(num_kv_heads):
        # oneDNN's linear needs a contiguous weight (a strided one runs a reference kernel, ~1000x slower).
        k_h = k[:, h].to(score_dtype).contiguous()  # [S, D]: the "weight" of the scores GEMM
        linear_pv = tile * group >= 64
        v_h = v[:, h].t().contiguous() if linear_pv else v[:, h].contiguous()  # [D, S] / [S, D]
        # [T*G, D], row t*G + g: query head h*G+g of token t, scaled once for all tiles.
        q_h = (q[:, h * group : (h + 1) * group].float() * scale).to(score_dtype).reshape(num_tokens * group, head_dim)
        for t0 in range(0, num_tokens, tile):
            t1 = min(num_tokens, t0 + tile)
            n = t1 - t0
            keys = num_keys if causal_offset is None else min(num_keys, causal_offset + t1)
            rows = q_h[t0 * group : t1 * group]
            s = _LINEAR(rows, k_h[:keys] if keys < num_keys else k_h, None, "none", [], "")
            if causal_offset is not None and causal_offset + t0 + 1 < keys:
                # The tile's diagonal: token t0+i sees keys <= causal_offset + t0 + i.
                first = causal_offset + t0
                tri = _causal_mask(n, keys - first, 0, s.dtype, q.device)  # [n, keys - first]
                s.view(n, group, keys)[:, :, first:].add_(tri[:, None, :])
            m = s.amax(dim=-1)
            p = torch.softmax(s, dim=-1, dtype=torch.float32)
            tile_lse = m.float() - p.amax(dim=-1).log()
            if linear_pv:
                o = _LINEAR(p.to(q.dtype), v_h if keys == num_keys else v_h[:, :keys].contiguous(), None, "none", [], "")
            else:
                o = torch.matmul(p.to(q.dtype), v_h[:keys])
            out[t0:t1, h * group : (h + 1) * group] = o.view(n, group, head_dim)
            lse[t0:t1, h * group : (h + 1) * group] = tile_lse.view(n, group)
    return out, lse


def merge(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    """Attention over keys A and B from attention over each: ``out [..., D]``, ``lse [...]`` (fp32)."""
    m = torch.maximum(lse_a, lse_b)
    w_a = torch.exp(lse_a - m).unsqueeze(-1)
    w_b = torch.exp(lse_b - m).unsqueeze(-1)
    merged = (out_a.float() * w_a + out_b.float() * w_b) / (w_a + w_b)
    return merged.to(out_a.dtype)


__all__ = ["MAX_RUNS", "attend", "attend_cached", "merge", "read_rows", "slot_runs"]
