"""Paged attention over the KV cache, built on ``torch.nn.functional.scaled_dot_product_attention``.

Works on any device torch supports (no custom kernels). Grouped-query attention without copying K/V:
  * prefill: SDPA's ``enable_gqa``;
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
    for p in plan.prefills:
        end = p.token_start + p.num_tokens
        q_seq = q[p.token_start : end].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        if p.mask is None and k_scale is None:
            # Nothing cached before this chunk: its own fresh K/V are the whole context.
            k_seq, v_seq = k[p.token_start : end], v[p.token_start : end]
        else:
            k_seq = gather_slots(k_cache, k_scale, p.slots, q.dtype)
            v_seq = gather_slots(v_cache, v_scale, p.slots, q.dtype)
        k_seq = k_seq.to(q.dtype).transpose(0, 1).unsqueeze(0)  # [1, KVH, ctx, D]
        v_seq = v_seq.to(q.dtype).transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(
            q_seq, k_seq, v_seq, attn_mask=p.mask, is_causal=p.mask is None, scale=scale, enable_gqa=True
        )
        out[p.token_start : end] = o[0].transpose(0, 1)
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
