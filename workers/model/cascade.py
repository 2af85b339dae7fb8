"""Shared-prefix ("cascade") decode attention: read a prefix that several sequences share once, not once each.

After a prefix-cache hit, sequences with the same system prompt have block tables that start with the same
physical block ids. Attending every decode to its whole context would copy that prefix out of the paged cache
once per sequence and layer (the dominant cost of a shared-prefix decode step). Instead, per group:

    prefix part: the group's queries, GQA-folded to [KVH, n_seqs * G, D], against the prefix K/V read once
                 (a plain view of the cache when the prefix blocks are consecutive): no mask needed, every
                 decode token sees its whole prefix;
    suffix part: each sequence against its own remaining context (padded, key-padding mask);

and the two partial softmaxes are merged with their log-sum-exps: exactly attention over the concatenation.
The groups are found once per forward on the CPU block tables and shared by all layers. An fp8 cache is
dequantized where it is read: the prefix once per group (from its view), the suffixes in their gather.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.model.kv_cache import dequantize, gather_slots

# Below this many shared blocks a separate prefix pass costs more than the copy it saves.
MIN_SHARED_BLOCKS = 4


@dataclass(slots=True)
class PrefixGroup:
    rows: torch.Tensor  # [n] rows of the decode batch sharing the prefix (n >= 2)
    num_tokens: int  # shared prefix length (whole blocks)
    slot_range: tuple[int, int] | None  # [start, end) cache slots when the prefix blocks are consecutive
    slots: torch.Tensor | None  # [num_tokens] cache slots otherwise


@dataclass(slots=True)
class CascadePlan:
    groups: list[PrefixGroup]
    suffix_slots: torch.Tensor  # [B, max_suffix] each decode's context after its group's prefix (padding -> 0)
    suffix_mask: torch.Tensor | None  # [B, 1, 1, max_suffix] additive key-padding mask; None if no padding


def find_prefix_groups(
    tables: list[list[int]], context_lens: list[int], block_size: int, min_blocks: int = MIN_SHARED_BLOCKS
) -> list[tuple[list[int], int]]:
    """Groups of decode rows whose block tables start with the same ``>= min_blocks`` block ids, as
    (rows, number of shared blocks). Only blocks wholly before each row's last token count, so every row keeps
    a non-empty suffix (its own new token) and the shared blocks are full. Pure CPU bookkeeping."""
    usable = [(c - 1) // block_size for c in context_lens]
    by_head: dict[tuple[int, ...], list[int]] = {}
    for row, (table, n) in enumerate(zip(tables, usable)):
        if n >= min_blocks:  # keyed by the first min_blocks ids: an early divergence cannot spoil a group
            by_head.setdefault(tuple(table[:min_blocks]), []).append(row)
    groups = []
    for rows in by_head.values():
        if len(rows) < 2:
            continue
        first = tables[rows[0]]
        shared = min(usable[r] for r in rows)
        for r in rows[1:]:
            other = tables[r]
            i = min_blocks
            while i < shared and other[i] == first[i]:
                i += 1
            shared = i
        groups.append((rows, shared))
    return groups


def build_cascade_plan(
    tables: list[list[int]],
    context_lens: list[int],
    block_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> CascadePlan | None:
    """The cascade plan for a decode batch (row i: block table ``tables[i]``, ``context_lens[i]`` tokens), or
    None when no group shares enough blocks to be worth it."""
    found = find_prefix_groups(tables, context_lens, block_size)
    if not found:
        return None
    start = [0] * len(context_lens)
    groups = []
    for rows, num_blocks in found:
        blocks = tables[rows[0]][:num_blocks]
        num_tokens = num_blocks * block_size
        for r in rows:
            start[r] = num_tokens
        consecutive = all(b == blocks[0] + i for i, b in enumerate(blocks))
        slot_range, slots = None, None
        if consecutive:
            slot_range = (blocks[0] * block_size, blocks[0] * block_size + num_tokens)
        else:
            ids = torch.tensor(blocks, dtype=torch.long)
            slots = (ids[:, None] * block_size + torch.arange(block_size)).reshape(-1).to(device)
        groups.append(PrefixGroup(torch.tensor(rows, dtype=torch.long, device=device), num_tokens, slot_range, slots))
    suffix_lens = [c - s for c, s in zip(context_lens, start)]
    width = max(suffix_lens)
    num_cols = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (num_cols - len(t)) for t in tables], dtype=torch.long)
    pos = torch.tensor(start)[:, None] + torch.arange(width)[None, :]  # [B, width] absolute positions
    valid = pos < torch.tensor(context_lens)[:, None]
    pos = torch.where(valid, pos, torch.zeros_like(pos))
    slots = padded.gather(1, pos // block_size) * block_size + pos % block_size
    suffix_slots = torch.where(valid, slots, torch.zeros_like(slots)).to(device)
    mask = None
    if min(suffix_lens) != width:
        mask = torch.zeros(valid.shape, dtype=dtype).masked_fill_(~valid, float("-inf"))[:, None, None, :].to(device)
    return CascadePlan(groups, suffix_slots, mask)


_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def attend_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention [N, heads, L, D] x [N, heads, S, D] -> (out [N, heads, L, D], lse fp32 [N, heads, L]).
    On CPU torch's flash kernel returns the log-sum-exp itself; elsewhere an explicit matmul/softmax does."""
    if q.device.type == "cpu" and _CPU_FLASH is not None and q.dtype in (torch.float32, torch.bfloat16, torch.float16):
        out, lse = _CPU_FLASH(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
        return out, lse.float()
    return attend_with_lse_reference(q, k, v, scale, mask)


def attend_with_lse_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attend_with_lse`` with plain matmuls (any device); scores and softmax in fp32."""
    s = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if mask is not None:
        s = s + mask.float()
    lse = torch.logsumexp(s, dim=-1)
    return torch.matmul(torch.exp(s - lse[..., None]).to(v.dtype), v), lse


def cascade_decode_attention(
    q: torch.Tensor,  # [B, H, D] one decode token per row
    k_cache: torch.Tensor,  # [num_slots, KVH, D]
    v_cache: torch.Tensor,
    plan: CascadePlan,
    scale: float,
    k_scale: torch.Tensor | None = None,  # [num_slots, KVH] for an fp8 cache (values dequantized on read)
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    # Suffix: every row against its own context after its group's prefix (the whole context if ungrouped).
    width = plan.suffix_slots.shape[1]
    flat = plan.suffix_slots.reshape(-1)
    shape = (num_seqs, width, num_kv_heads, head_dim)
    k_suf = gather_slots(k_cache, k_scale, flat, q.dtype).view(shape).transpose(1, 2)
    v_suf = gather_slots(v_cache, v_scale, flat, q.dtype).view(shape).transpose(1, 2)
    q_fold = q.view(num_seqs, num_kv_heads, group, head_dim)  # query heads h*G..h*G+G-1 read KV head h
    out, lse = attend_with_lse(q_fold, k_suf.to(q.dtype), v_suf.to(q.dtype), scale, plan.suffix_mask)
    pre_out = torch.zeros_like(out)
    pre_lse = torch.full_like(lse, float("-inf"))  # ungrouped rows: weight 0 in the merge
    for g in plan.groups:
        if g.slot_range is not None:
            a, b = g.slot_range
            k_pre, v_pre = k_cache[a:b], v_cache[a:b]
            if k_scale is not None:  # fp8: the group's one read of its prefix is where it is dequantized
                k_pre, v_pre = dequantize(k_pre, k_scale[a:b], q.dtype), dequantize(v_pre, v_scale[a:b], q.dtype)
        else:
            k_pre = gather_slots(k_cache, k_scale, g.slots, q.dtype)
            v_pre = gather_slots(v_cache, v_scale, g.slots, q.dtype)
        n = g.rows.shape[0]
        # [n, KVH, G, D] -> [1, KVH, n*G, D]: all the group's queries against one copy of the prefix.
        qg = q_fold.index_select(0, g.rows).transpose(0, 1).reshape(1, num_kv_heads, n * group, head_dim)
        o, l = attend_with_lse(
            qg, k_pre.transpose(0, 1).unsqueeze(0).to(q.dtype), v_pre.transpose(0, 1).unsqueeze(0).to(q.dtype), scale
        )
        pre_out.index_copy_(0, g.rows, o.view(num_kv_heads, n, group, head_dim).transpose(0, 1))
        pre_lse.index_copy_(0, g.rows, l.view(num_kv_heads, n, group).transpose(0, 1))
    m = torch.maximum(lse, pre_lse)
    w_suf = torch.exp(lse - m).unsqueeze(-1)
    w_pre = torch.exp(pre_lse - m).unsqueeze(-1)
    merged = (out.float() * w_suf + pre_out.float() * w_pre) / (w_suf + w_pre)
    return merged.to(q.dtype).reshape(num_seqs, num_heads, head_dim)
