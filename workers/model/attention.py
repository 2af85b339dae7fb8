"""Paged attention over the KV cache.

On x86-64 CPUs with AVX-512 the fused C kernel (fused_attention.py, csrc/attention.c) computes every pass,
reading cache slots in place; elsewhere (other CPUs, CUDA, the kernel switched off) attention_kernels.py's
torch kernels do (torch's flash kernel, row-tiled oneDNN GEMMs, or ``scaled_dot_product_attention``), on any
device torch supports. Grouped-query attention without copying K/V:
  * prefill: the chunk's queries against the rest of its context (its own fresh K/V when everything before
    it is read by a prefix pass, else its cache slots: a view when they are consecutive), bottom-right
    causal; a cached prefix that chunks share, or one chunk's own consecutive cached blocks, is attended in
    one unmasked pass for all the queries reading it (``PrefixPass``), merged by log-sum-exp;
  * decode: the ``G`` query heads that share one KV head are folded into SDPA's query-length axis
    (query heads ``h*G .. h*G+G-1`` read KV head ``h``, as in transformers' ``repeat_kv``), which needs no
    causal mask because a decode token sees its whole context;
  * decodes that share cached prefix blocks: cascade attention (cascade.py).

A quantized (fp8) cache is written by ``write_kv`` (each new token quantized with its own scales) and every
read gathers values and scales and dequantizes to the queries' dtype (``kv_cache.gather_slots``). With fp8,
a prefill chunk with nothing cached before it also reads its own K/V back from the cache rather than using
the fresh ones: attention then always sees what the cache holds, so a prompt gets the same output whether its
prefix was computed here, found cached or transferred.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import workers.model.fused_attention as fused_attention
from workers.model.attention_kernels import attend, attend_cached, merge, read_rows, sdpa_causal
from workers.model.cascade import cascade_decode_attention
from workers.model.forward_batch import AttentionPlan
from workers.model.kv_cache import LayerKV, gather_slots, quantize_fp8


def write_kv(kv: LayerKV, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Store the batch's new K/V ``[T, KVH, D]`` in slots ``slot_mapping`` (quantized for an fp8 cache)."""
    if kv.k_scale is None:
        kv.k.index_copy_(0, slot_mapping, k.to(kv.k.dtype))
        kv.v.index_copy_(0, slot_mapping, v.to(kv.v.dtype))
        return
    for cache, scales, x in ((kv.k, kv.k_scale, k), (kv.v, kv.v_scale, v)):
        values, s = quantize_fp8(x)
        # A byte view: index_copy_ is not implemented for fp8 on CPU.
        cache.view(torch.uint8).index_copy_(0, slot_mapping, values.view(torch.uint8))
        scales.index_copy_(0, slot_mapping, s)


def paged_attention(
    q: torch.Tensor,  # [T, H, D] (rope applied)
    k: torch.Tensor,  # [T, KVH, D] the batch's new keys (already written to the cache)
    v: torch.Tensor,  # [T, KVH, D]
    kv: LayerKV,  # this layer's cache: [num_slots, KVH, D] values (+ [num_slots, KVH] scales for fp8)
    plan: AttentionPlan,
    scale: float,
) -> torch.Tensor:
    """Attention output [T, H, D] for every new token of the batch."""
    k_cache, v_cache, k_scale, v_scale = kv
    if plan.decodes_are_whole_batch:
        return _decode_attention(q, k_cache, v_cache, plan, scale, k_scale, v_scale)
    out = torch.empty_like(q)
    rest_lse = None
    if plan.prefix_passes:
        rest_lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    for p in plan.prefills:
        end = p.token_start + p.num_tokens
        if p.slots is None:  # everything before the chunk is read by its prefix pass: its own K/V are the rest
            k_seq, v_seq = k[p.token_start : end].to(q.dtype), v[p.token_start : end].to(q.dtype)
        elif p.mask is None and q.device.type == "cpu":
            o, lse = attend_cached(q[p.token_start : end], k_cache, v_cache, k_scale, v_scale, p.runs, p.slots,
                                   scale, p.causal_offset)
            if p.prefix:
                rest_lse[p.token_start : end] = lse
            out[p.token_start : end] = o
            continue
        else:
            k_seq = read_rows(k_cache, k_scale, p.runs, p.slots, q.dtype)
            v_seq = read_rows(v_cache, v_scale, p.runs, p.slots, q.dtype)
        if p.mask is not None:  # a sliding window the context exceeds: explicit mask, no prefix pass
            o = F.scaled_dot_product_attention(
                q[p.token_start : end].transpose(0, 1).unsqueeze(0), k_seq.transpose(0, 1).unsqueeze(0),
                v_seq.transpose(0, 1).unsqueeze(0), attn_mask=p.mask, scale=scale, enable_gqa=True)
            out[p.token_start : end] = o[0].transpose(0, 1)
            continue
        if p.prefix or q.device.type == "cpu":
            o, lse = attend(q[p.token_start : end], k_seq, v_seq, scale, p.causal_offset)
            if p.prefix:
                rest_lse[p.token_start : end] = lse
        else:  # no LSE needed: the device's own SDPA kernels (flash / memory-efficient on CUDA)
            o = sdpa_causal(q[p.token_start : end], k_seq, v_seq, scale, p.causal_offset)
        out[p.token_start : end] = o
    for pp in plan.prefix_passes:
        o, lse = attend_cached(q.index_select(0, pp.token_idx), k_cache, v_cache, k_scale, v_scale, pp.runs,
                               pp.slots, scale)
        rest = out.index_select(0, pp.token_idx)
        out.index_copy_(0, pp.token_idx, merge(rest, rest_lse.index_select(0, pp.token_idx), o, lse))
    if plan.decode_token_idx is not None:
        q_dec = q.index_select(0, plan.decode_token_idx)
        dec = _decode_attention(q_dec, k_cache, v_cache, plan, scale, k_scale, v_scale)
        out.index_copy_(0, plan.decode_token_idx, dec)
    return out


def _decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: AttentionPlan, scale: float,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [B, H, D], one token per sequence -> [B, H, D]."""
    if plan.decode_cascade is not None:
        return cascade_decode_attention(q, k_cache, v_cache, plan.decode_cascade, scale, k_scale, v_scale)
    assert plan.decode_slots is not None
    if plan.decode_lens is not None and fused_attention.supports_cache(q, k_cache, k_scale, v_cache):
        return fused_attention.attend_fused_batch(q, k_cache, v_cache, plan.decode_slots, plan.decode_lens, scale)[0]
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    max_ctx = plan.decode_slots.shape[1]
    flat = plan.decode_slots.reshape(-1)
    shape = (num_seqs, max_ctx, num_kv_heads, head_dim)
    # [B, max_ctx, KVH, D] -> [B, KVH, max_ctx, D]
    k_ctx = gather_slots(k_cache, k_scale, flat, q.dtype).view(shape).transpose(1, 2)
    v_ctx = gather_slots(v_cache, v_scale, flat, q.dtype).view(shape).transpose(1, 2)
    if k_ctx.dtype != q.dtype:
        k_ctx, v_ctx = k_ctx.to(q.dtype), v_ctx.to(q.dtype)
    q_fold = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    o = F.scaled_dot_product_attention(q_fold, k_ctx, v_ctx, attn_mask=plan.decode_mask, scale=scale)
    return o.reshape(num_seqs, num_heads, head_dim)
