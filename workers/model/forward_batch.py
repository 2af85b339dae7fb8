"""One model step's input (``ForwardBatch``) and the attention plan derived from it once per step.

The batch is a flat run of new tokens, sequence after sequence:

    input_ids    [ a0 a1 a2 a3 | b0 | c0 ]         query_lens   [4, 1, 1]
    positions    [ 16 17 18 19 | 40 | 7 ]          context_lens [20, 41, 8]   (cached + new)

Sequence ``a`` is a prefill chunk after 16 cached tokens; ``b`` and ``c`` are decodes. The plan precomputes,
for all layers at once, which cache slots each sequence reads and which mask it needs:

  * decodes (query_len == 1) are gathered into one padded ``[B, max_ctx]`` slot matrix with a key-padding mask,
    so each layer attends all of them with a single SDPA call; when decodes share leading blocks (a cached
    common prefix) or hold a long run of consecutive leading blocks, a ``CascadePlan`` reads each such prefix
    once per layer as a view of the cache and only the rest is gathered (cascade.py);
  * prefill chunks (query_len > 1) are split the same way: chunks whose cached part starts with the same
    blocks read that shared prefix in one pass for all their queries (a ``PrefixPass``), a chunk alone reads
    its own consecutive cached blocks as a view, and the rest of each context (usually just the chunk's
    own fresh K/V, causal) is one call per chunk; the parts are merged by their log-sum-exps.

Why the split: gathering a cached 2048-token prefix out of the paged cache for every chunk and layer, and
attending it once per sequence, was most of a shared-prefix prefill (bench_vs_vllm workload A); reading it
once per group from a view keeps one large, unmasked attention call instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from workers.model.cascade import CascadePlan, build_cascade_plan


@dataclass(slots=True)
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64, new tokens of every sequence, concatenated
    positions: torch.Tensor  # [T] int64, absolute position of each new token
    slot_mapping: torch.Tensor  # [T] int64, block_id * block_size + offset receiving each new token's K/V
    query_lens: list[int]  # per sequence: number of new tokens
    context_lens: list[int]  # per sequence: tokens in the KV cache after this step (cached + new)
    block_tables: torch.Tensor  # [num_seqs, max_num_blocks] int64, padded (padding never read)
    # The same block ids as host lists, unpadded, when the caller has them (model_runner.py): the plan reads
    # them instead of copying block_tables back with .tolist() every step.
    tables: list[list[int]] | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def validate(self, block_size: int, num_blocks: int, max_positions: int | None = None) -> None:
        """Cheap shape / bookkeeping checks (raises ValueError naming the inconsistency)."""
        num_tokens = self.num_tokens
        if len(self.context_lens) != len(self.query_lens) or not self.query_lens:
            raise ValueError("query_lens and context_lens must be non-empty and of equal length")
        if sum(self.query_lens) != num_tokens:
            raise ValueError(f"sum(query_lens)={sum(self.query_lens)} != number of input tokens {num_tokens}")
        if self.positions.shape != (num_tokens,) or self.slot_mapping.shape != (num_tokens,):
            raise ValueError("positions and slot_mapping must have one entry per input token")
        if self.block_tables.dim() != 2 or self.block_tables.shape[0] != len(self.query_lens):
            raise ValueError("block_tables must be [num_seqs, max_num_blocks]")
        max_blocks = self.block_tables.shape[1]
        for q, c in zip(self.query_lens, self.context_lens):
            if q < 1 or c < q:
                raise ValueError(f"need 1 <= query_len <= context_len, got query_len={q} context_len={c}")
            if c > max_blocks * block_size:
                raise ValueError(f"context_len {c} does not fit in {max_blocks} blocks of {block_size}")
        if num_tokens and int(self.slot_mapping.max()) >= num_blocks * block_size:
            raise ValueError("slot_mapping points past the end of the KV cache")
        if max_positions is not None and max(self.context_lens) > max_positions:
            raise ValueError(
                f"context of {max(self.context_lens)} tokens exceeds the model's max_position_embeddings ({max_positions})"
            )


@dataclass(slots=True)
class PrefillPlan:
    """One prefill chunk's attention beyond its prefix pass (if any): its queries against ``rest`` keys."""

    token_start: int  # first index of this sequence's tokens in the flat batch
    num_tokens: int
    # Cache slots of the context read here, in position order (positions prefix .. context_len-1); None: the
    # chunk's own fresh K/V are all of it (nothing cached after the prefix and the cache stores them as is).
    slots: torch.Tensor | None
    mask: torch.Tensor | None  # [num_tokens, rest] additive, sliding window only; None -> causal_offset
    causal_offset: int = 0  # keys read here before the chunk's first token (bottom-right causal)
    slot_range: tuple[int, int] | None = None  # the slots are consecutive: a view of the cache
    prefix: int = 0  # context tokens before ``slots``, attended by a PrefixPass (0: none)
    runs: list[tuple[int, int]] | None = None  # the slots as at most MAX_RUNS ranges (read as views)


@dataclass(slots=True)
class PrefixPass:
    """A cached prefix attended by several prefill chunks' queries in one call (or by one chunk, from a view)."""

    token_idx: torch.Tensor  # [n] flat-batch indices of every query token reading this prefix
    num_tokens: int  # prefix length (whole blocks)
    slot_range: tuple[int, int] | None  # [start, end) cache slots when the prefix blocks are consecutive
    slots: torch.Tensor | None  # [num_tokens] cache slots when they are in more than MAX_RUNS runs
    runs: list[tuple[int, int]] | None = None  # the slot ranges otherwise (read as views)


@dataclass(slots=True)
class AttentionPlan:
    num_tokens: int
    decode_token_idx: torch.Tensor | None = None  # [B] positions of decode tokens in the flat batch
    decode_slots: torch.Tensor | None = None  # [B, max_ctx] cache slots (padding -> slot 0, masked)
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, max_ctx] additive; None when nothing is masked
    decode_lens: torch.Tensor | None = None  # [B] context lengths (int64) when no window applies
    decodes_are_whole_batch: bool = False  # every sequence is a decode: token i is sequence i
    decode_cascade: CascadePlan | None = None  # set instead of decode_slots/decode_mask when prefixes are shared
    prefills: list[PrefillPlan] = field(default_factory=list)
    prefix_passes: list[PrefixPass] = field(default_factory=list)  # of prefill chunks (decodes: decode_cascade)
    # Flat-batch indices of the prefill tokens some PrefixPass reads for (their outputs are merged by LSE).
    prefix_token_idx: torch.Tensor | None = None


def _context_slots(block_table: torch.Tensor, context_len: int, block_size: int) -> torch.Tensor:
    pos = torch.arange(context_len, device=block_table.device)
    return block_table[pos // block_size] * block_size + pos % block_size


def _slots_of(table: list[int], start: int, end: int, block_size: int, device: torch.device):
    """Cache slots of positions start..end-1: (slot ranges, or None when more than MAX_RUNS; slots tensor)."""
    from workers.model.attention_kernels import MAX_RUNS, slot_runs

    runs = slot_runs(table, block_size, start, end)
    slots = torch.cat([torch.arange(a, b, dtype=torch.long) for a, b in runs]).to(device)
    return (runs if len(runs) <= MAX_RUNS else None), slots


def _window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    allowed = k_pos[None, :] <= q_pos[:, None]
    if sliding_window is not None:
        allowed &= k_pos[None, :] > q_pos[:, None] - sliding_window
    return allowed


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool (True = attend) -> 0 / -inf in ``dtype``: SDPA would otherwise convert a bool mask in every layer."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _plan_prefills(batch: ForwardBatch, rows: list[int], starts: list[int], tables: list[list[int]],
                   block_size: int, device: torch.device, sliding_window: int | None, dtype: torch.dtype,
                   fresh_ok: bool, plan: AttentionPlan) -> None:
    """Prefix passes and rest plans of the prefill chunks ``rows`` (sequence indices)."""
    from workers.model.attention_kernels import MAX_RUNS, slot_runs
    from workers.model.cascade import MIN_OWN_PREFIX_TOKENS, find_prefix_groups

    q_lens, ctx_lens = batch.query_lens, batch.context_lens
    prefix = {i: 0 for i in rows}
    passes: list[tuple[list[int], int]] = []  # (sequence indices, prefix blocks)
    # A window the context exceeds cannot be honoured by an unmasked prefix pass: those keep the mask path.
    eligible = [i for i in rows if ctx_lens[i] > q_lens[i]
                and (sliding_window is None or ctx_lens[i] <= sliding_window)]
    if eligible:
        # Whole blocks before each chunk's first token: what a prefix pass may cover.
        found = find_prefix_groups([tables[i] for i in eligible], [ctx_lens[i] - q_lens[i] + 1 for i in eligible],
                                   block_size)
        grouped = set()
        for members, num_blocks in found:
            seqs = [eligible[m] for m in members]
            passes.append((seqs, num_blocks))
            grouped.update(seqs)
        for i in eligible:
            usable = (ctx_lens[i] - q_lens[i]) // block_size
            if i not in grouped and usable * block_size >= MIN_OWN_PREFIX_TOKENS:
                if len(slot_runs(tables[i][:usable], block_size)) <= MAX_RUNS:
                    passes.append(([i], usable))
    for seqs, num_blocks in passes:
        first = tables[seqs[0]]
        idx: list[int] = []
        for i in seqs:
            prefix[i] = num_blocks * block_size
            idx.extend(range(starts[i], starts[i] + q_lens[i]))
        runs, slots = _slots_of(first, 0, num_blocks * block_size, block_size, device)
        plan.prefix_passes.append(PrefixPass(
            torch.tensor(idx, dtype=torch.long, device=device), num_blocks * block_size,
            runs[0] if runs is not None and len(runs) == 1 else None, None if runs is not None else slots, runs))
    if plan.prefix_passes:
        plan.prefix_token_idx = torch.cat([p.token_idx for p in plan.prefix_passes])
    for i in rows:
        q_len, ctx_len, pre = q_lens[i], ctx_lens[i], prefix[i]
        num_cached = ctx_len - q_len
        mask = None
        if sliding_window is not None and ctx_len > sliding_window:
            k_pos = torch.arange(ctx_len, device=device)
            mask = _additive(_window_mask(k_pos[num_cached:], k_pos, sliding_window), dtype)
        if pre == num_cached and fresh_ok and mask is None:
            plan.prefills.append(PrefillPlan(starts[i], q_len, None, None, 0, None, pre))
            continue
        runs, slots = _slots_of(tables[i], pre, ctx_len, block_size, device)
        slot_range = runs[0] if runs is not None and len(runs) == 1 else None
        plan.prefills.append(PrefillPlan(starts[i], q_len, slots, mask, num_cached - pre, slot_range, pre, runs))


def build_attention_plan(
    batch: ForwardBatch,
    block_size: int,
    device: torch.device,
    sliding_window: int | None = None,
    dtype: torch.dtype = torch.float32,
    quantized: bool = False,
) -> AttentionPlan:
    """Everything attention needs that does not depend on the layer (computed once per forward).
    Masks are additive (0 / -inf) in ``dtype``, the dtype of the queries. ``quantized``: the cache stores
    K/V quantized (fp8), so attention reads a chunk's own K/V back from the cache rather than the fresh ones."""
    plan = AttentionPlan(num_tokens=batch.num_tokens)
    tables = batch.tables
    if tables is None:
        tables = batch.block_tables.tolist()
    decode_seqs: list[int] = []
    decode_tokens: list[int] = []
    prefill_seqs: list[int] = []
    starts: list[int] = []
    start = 0
    for i, q_len in enumerate(batch.query_lens):
        starts.append(start)
        if q_len == 1:
            decode_seqs.append(i)
            decode_tokens.append(start)
        else:
            prefill_seqs.append(i)
        start += q_len
    if prefill_seqs:
        _plan_prefills(batch, prefill_seqs, starts, tables, block_size, device, sliding_window, dtype,
                       not quantized, plan)
    if decode_seqs:
        num_decodes = len(decode_seqs)
        lens = [batch.context_lens[i] for i in decode_seqs]
        max_ctx, min_ctx = max(lens), min(lens)
        need_window = sliding_window is not None and max_ctx > sliding_window
        if not need_window:  # the cascade's prefix pass has no mask, so it cannot honour a window
            rows = [tables[i][: (c + block_size - 1) // block_size] for i, c in zip(decode_seqs, lens)]
            plan.decode_cascade = build_cascade_plan(rows, lens, block_size, device, dtype, own_prefixes=True)
        if plan.decode_cascade is None:
            ctx = torch.tensor(lens, dtype=torch.long, device=device)
            block_tables = batch.block_tables.to(device=device, dtype=torch.long, non_blocking=True)
            pos = torch.arange(max_ctx, device=device)
            seq_idx = torch.tensor(decode_seqs, dtype=torch.long, device=device)
            tables_t = block_tables.index_select(0, seq_idx)[:, : (max_ctx + block_size - 1) // block_size]
            valid = pos[None, :] < ctx[:, None]  # [B, max_ctx]
            slots = tables_t[:, pos // block_size] * block_size + (pos % block_size)[None, :]
            plan.decode_slots = torch.where(valid, slots, torch.zeros_like(slots))
            if not need_window:
                plan.decode_lens = ctx
            if need_window:
                valid &= pos[None, :] > (ctx[:, None] - 1) - sliding_window
            if need_window or min_ctx != max_ctx:
                plan.decode_mask = _additive(valid[:, None, None, :], dtype)
        plan.decode_token_idx = torch.tensor(decode_tokens, dtype=torch.long, device=device)
        plan.decodes_are_whole_batch = num_decodes == batch.num_seqs
    return plan
