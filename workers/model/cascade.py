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

A decode that shares nothing gets the same split with a group of one (``CascadePlan.own``) when its full
blocks lie in a few runs of consecutive blocks (its prompt, allocated a chunk at a time): they are read as
views and only its last, partial block is gathered, instead of copying its whole context out of the cache
every step. A prefix in a few runs (a prompt prefilled in two chunks while others allocated between them)
is read as those runs joined by one copy (attention_kernels.read_rows), not a row gather. Suffixes of very
different lengths go in separate padded batches (``SuffixBucket``): one long ungrouped context in a step
padded every row's suffix to its length (measured: 32 rows x 2115 slots gathered per layer where ~100 each
were needed, 29% of a shared-prefix workload's time).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from workers.model.kv_cache import gather_slots

# Below this many shared blocks a separate prefix pass costs more than the copy it saves.
MIN_SHARED_BLOCKS = 4
# A sequence's own consecutive leading blocks get a prefix pass of their own (a view instead of a gather)
# from this many tokens: below it the gather is cheap, and one pass over the whole context rounds exactly as
# the prefill that computed it (block_verifier.py's bfloat16 recomputation relies on that for short runs).
MIN_OWN_PREFIX_TOKENS = 256


@dataclass(slots=True)
class PrefixGroup:
    rows: torch.Tensor  # [n] rows of the decode batch sharing the prefix (n >= 2)
    num_tokens: int  # shared prefix length (whole blocks)
    slot_range: tuple[int, int] | None  # [start, end) cache slots when the prefix blocks are consecutive
    slots: torch.Tensor | None  # [num_tokens] cache slots when they are in more than MAX_RUNS runs
    runs: list[tuple[int, int]] | None = None  # the slot ranges otherwise (one: slot_range)
    row_range: tuple[int, int] | None = None  # [a, b) when ``rows`` are consecutive: views, not gathers


@dataclass(slots=True)
class SuffixBucket:
    rows: torch.Tensor | None  # [n] rows of the decode batch in this bucket; None: all rows, in order
    slots: torch.Tensor  # [n, width] each row's context after its prefix (padding -> slot 0)
    mask: torch.Tensor | None  # [n, 1, 1, width] additive key-padding mask; None if no padding
    lens: torch.Tensor | None = None  # [n] each row's suffix length (its valid slots), int64


@dataclass(slots=True)
class CascadePlan:
    groups: list[PrefixGroup]  # prefixes shared by >= 2 rows
    buckets: list[SuffixBucket]
    own: list[PrefixGroup] = field(default_factory=list)  # a row's own consecutive leading blocks (n == 1)


def _buckets(widths: list[int]) -> list[list[int]]:
    """Rows grouped so that padding each group to its longest suffix wastes little: sorted longest first, a
    row joins the current group while the group's width is within 2x (or 64 slots) of its own."""
    order = sorted(range(len(widths)), key=lambda r: -widths[r])
    groups: list[list[int]] = []
    width = -1
    for r in order:
        if groups and (width <= 2 * widths[r] or width - widths[r] <= 64):
            groups[-1].append(r)
        else:
            groups.append([r])
            width = widths[r]
    return groups


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
    own_prefixes: bool = False,
) -> CascadePlan | None:
    """The cascade plan for a decode batch (row i: block table ``tables[i]``, ``context_lens[i]`` tokens), or
    None when no prefix is worth a separate pass. ``own_prefixes``: rows outside every group whose first
    ``MIN_SHARED_BLOCKS`` or more blocks are consecutive read them as a view too (a group of one)."""
    from workers.model.attention_kernels import MAX_RUNS, slot_runs

    found = find_prefix_groups(tables, context_lens, block_size)
    start = [0] * len(context_lens)
    own: list[tuple[list[int], int]] = []
    if own_prefixes:
        grouped = {r for rows, _ in found for r in rows}
        for r, (t, c) in enumerate(zip(tables, context_lens)):
            usable = (c - 1) // block_size
            if r not in grouped and usable * block_size >= MIN_OWN_PREFIX_TOKENS:
                if len(slot_runs(t[:usable], block_size)) <= MAX_RUNS:
                    own.append(([r], usable))
    if not found and not own:
        return None

    def prefix_group(rows: list[int], num_blocks: int) -> PrefixGroup:
        blocks = tables[rows[0]][:num_blocks]
        num_tokens = num_blocks * block_size
        for r in rows:
            start[r] = num_tokens
        slot_range, slots, runs = None, None, slot_runs(blocks, block_size)
        if len(runs) == 1:
            slot_range = runs[0]
        elif len(runs) > MAX_RUNS:
            runs = None
            ids = torch.tensor(blocks, dtype=torch.long)
            slots = (ids[:, None] * block_size + torch.arange(block_size)).reshape(-1).to(device)
        consecutive = rows == list(range(rows[0], rows[0] + len(rows)))
        return PrefixGroup(torch.tensor(rows, dtype=torch.long, device=device), num_tokens, slot_range, slots, runs,
                           (rows[0], rows[0] + len(rows)) if consecutive else None)

    groups = [prefix_group(rows, n) for rows, n in found]
    own_groups = [prefix_group(rows, n) for rows, n in own]
    widths = [c - s for c, s in zip(context_lens, start)]
    buckets = []
    split = _buckets(widths)
    for rows in split:
        rows = sorted(rows)
        width = max(widths[r] for r in rows)
        slot_rows = []
        for r in rows:
            t, a, c = tables[r], start[r], context_lens[r]
            row = []
            p = a
            while p < c:  # block by block: a suffix spans few blocks
                off = p % block_size
                take = min(block_size - off, c - p)
                base = t[p // block_size] * block_size + off
                row.extend(range(base, base + take))
                p += take
            slot_rows.append(row + [0] * (width - len(row)))
        mask = None
        if any(widths[r] != width for r in rows):
            valid = torch.tensor([[j < widths[r] for j in range(width)] for r in rows])
            mask = torch.zeros(valid.shape, dtype=dtype).masked_fill_(~valid, float("-inf"))[:, None, None, :]
            mask = mask.to(device)
        in_order = len(split) == 1
        buckets.append(SuffixBucket(
            None if in_order else torch.tensor(rows, dtype=torch.long, device=device),
            torch.tensor(slot_rows, dtype=torch.long, device=device), mask,
            torch.tensor([widths[r] for r in rows], dtype=torch.long, device=device)))
    return CascadePlan(groups, buckets, own_groups)


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
    import workers.model.fused_attention as fused_attention
    from workers.model.attention_kernels import attend_cached

    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    q_fold = q.view(num_seqs, num_kv_heads, group, head_dim)  # query heads h*G..h*G+G-1 read KV head h
    # Suffix: every row against its own context after its prefix (the whole context if it has none).
    out = lse = None
    fused = fused_attention.supports_cache(q, k_cache, k_scale, v_cache)
    for b in plan.buckets:
        n, width = b.slots.shape
        if fused and b.lens is not None:  # each row's suffix read in place from its slots, one call for the bucket
            q_b = q if b.rows is None else q.index_select(0, b.rows)
            o, l = fused_attention.attend_fused_batch(q_b, k_cache, v_cache, b.slots, b.lens, scale)
            o, l = o.view(n, num_kv_heads, group, head_dim), l.view(n, num_kv_heads, group)
        else:
            flat = b.slots.reshape(-1)
            shape = (n, width, num_kv_heads, head_dim)
            k_suf = gather_slots(k_cache, k_scale, flat, q.dtype).view(shape).transpose(1, 2)
            v_suf = gather_slots(v_cache, v_scale, flat, q.dtype).view(shape).transpose(1, 2)
            q_b = q_fold if b.rows is None else q_fold.index_select(0, b.rows)
            o, l = attend_with_lse(q_b, k_suf.to(q.dtype), v_suf.to(q.dtype), scale, b.mask)
        if b.rows is None:
            out, lse = o, l
            break
        if out is None:
            out = torch.empty((num_seqs, num_kv_heads, group, head_dim), dtype=o.dtype, device=q.device)
            lse = torch.empty((num_seqs, num_kv_heads, group), dtype=torch.float32, device=q.device)
        out.index_copy_(0, b.rows, o)
        lse.index_copy_(0, b.rows, l)
    pre_out = torch.zeros_like(out)
    pre_lse = torch.full_like(lse, float("-inf"))  # rows without a prefix: weight 0 in the merge
    for g in plan.groups + plan.own:
        # All the group's queries against one read of the prefix: [n, H, D] x [P, KVH, D] (fp8: dequantized
        # there; the fused kernel reads the runs in place).
        q_g = q.index_select(0, g.rows) if g.row_range is None else q[g.row_range[0] : g.row_range[1]]
        o, l = attend_cached(q_g, k_cache, v_cache, k_scale, v_scale, g.runs, g.slots, scale)
        o, l = o.view(-1, num_kv_heads, group, head_dim), l.view(-1, num_kv_heads, group)
        if g.row_range is None:
            pre_out.index_copy_(0, g.rows, o)
            pre_lse.index_copy_(0, g.rows, l)
        else:  # a group's rows are usually adjacent in the batch (admitted together)
            pre_out[g.row_range[0] : g.row_range[1]] = o
            pre_lse[g.row_range[0] : g.row_range[1]] = l
    m = torch.maximum(lse, pre_lse)
    w_suf = torch.exp(lse - m).unsqueeze(-1)
    w_pre = torch.exp(pre_lse - m).unsqueeze(-1)
    merged = (out.float() * w_suf + pre_out.float() * w_pre) / (w_suf + w_pre)
    return merged.to(q.dtype).reshape(num_seqs, num_heads, head_dim)
