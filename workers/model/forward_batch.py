"""One model step's input (``ForwardBatch``) and the attention plan derived from it once per step.

The batch is a flat run of new tokens, sequence after sequence:

    input_ids    [ a0 a1 a2 a3 | b0 | c0 ]         query_lens   [4, 1, 1]
    positions    [ 16 17 18 19 | 40 | 7 ]          context_lens [20, 41, 8]   (cached + new)

Sequence ``a`` is a prefill chunk after 16 cached tokens; ``b`` and ``c`` are decodes. The plan precomputes,
for all layers at once, which cache slots each sequence reads and which mask it needs:

  * decodes (query_len == 1) are gathered into one padded ``[B, max_ctx]`` slot matrix with a key-padding mask,
    so each layer attends all of them with a single SDPA call; when groups of decodes share leading blocks
    (a cached common prefix), a ``CascadePlan`` reads each shared prefix once per group instead (cascade.py);
  * prefill chunks (query_len > 1) each get their own slot list and a bottom-right-aligned causal mask (or
    ``is_causal`` when nothing is cached before them), one SDPA call each.
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
    token_start: int  # first index of this sequence's tokens in the flat batch
    num_tokens: int
    slots: torch.Tensor  # [context_len] cache slots of the whole context, in position order
    mask: torch.Tensor | None  # [num_tokens, context_len] additive (0 attend, -inf not); None -> is_causal


@dataclass(slots=True)
class AttentionPlan:
    num_tokens: int
    decode_token_idx: torch.Tensor | None = None  # [B] positions of decode tokens in the flat batch
    decode_slots: torch.Tensor | None = None  # [B, max_ctx] cache slots (padding -> slot 0, masked)
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, max_ctx] additive; None when nothing is masked
    decodes_are_whole_batch: bool = False  # every sequence is a decode: token i is sequence i
    decode_cascade: CascadePlan | None = None  # set instead of decode_slots/decode_mask when prefixes are shared
    prefills: list[PrefillPlan] = field(default_factory=list)


def _context_slots(block_table: torch.Tensor, context_len: int, block_size: int) -> torch.Tensor:
    pos = torch.arange(context_len, device=block_table.device)
    return block_table[pos // block_size] * block_size + pos % block_size


def _window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    allowed = k_pos[None, :] <= q_pos[:, None]
    if sliding_window is not None:
        allowed &= k_pos[None, :] > q_pos[:, None] - sliding_window
    return allowed


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool (True = attend) -> 0 / -inf in ``dtype``: SDPA would otherwise convert a bool mask in every layer."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def build_attention_plan(
    batch: ForwardBatch,
    block_size: int,
    device: torch.device,
    sliding_window: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> AttentionPlan:
    """Everything attention needs that does not depend on the layer (computed once per forward).
    Masks are additive (0 / -inf) in ``dtype``, the dtype of the queries."""
    block_tables = batch.block_tables.to(device=device, dtype=torch.long, non_blocking=True)
    plan = AttentionPlan(num_tokens=batch.num_tokens)
    decode_seqs: list[int] = []
    decode_tokens: list[int] = []
    start = 0
    for i, (q_len, ctx_len) in enumerate(zip(batch.query_lens, batch.context_lens)):
        if q_len == 1:
            decode_seqs.append(i)
            decode_tokens.append(start)
        else:
            slots = _context_slots(block_tables[i], ctx_len, block_size)
            num_cached = ctx_len - q_len
            mask = None
            if num_cached or (sliding_window is not None and ctx_len > sliding_window):
                k_pos = torch.arange(ctx_len, device=device)
                mask = _additive(_window_mask(k_pos[num_cached:], k_pos, sliding_window), dtype)
            plan.prefills.append(PrefillPlan(start, q_len, slots, mask))
        start += q_len
    if decode_seqs:
        num_decodes = len(decode_seqs)
        ctx = torch.tensor([batch.context_lens[i] for i in decode_seqs], dtype=torch.long)
        max_ctx = int(ctx.max())
        min_ctx = int(ctx.min())
        need_window = sliding_window is not None and max_ctx > sliding_window
        if not need_window:  # the cascade's prefix pass has no mask, so it cannot honour a window
            host_tables = batch.block_tables.cpu().index_select(0, torch.tensor(decode_seqs))
            lens = [batch.context_lens[i] for i in decode_seqs]
            rows = [t[: (c + block_size - 1) // block_size] for t, c in zip(host_tables.tolist(), lens)]
            plan.decode_cascade = build_cascade_plan(rows, lens, block_size, device, dtype)
        if plan.decode_cascade is None:
            ctx = ctx.to(device)
            pos = torch.arange(max_ctx, device=device)
            seq_idx = torch.tensor(decode_seqs, dtype=torch.long, device=device)
            tables = block_tables.index_select(0, seq_idx)[:, : (max_ctx + block_size - 1) // block_size]
            valid = pos[None, :] < ctx[:, None]  # [B, max_ctx]
            slots = tables[:, pos // block_size] * block_size + (pos % block_size)[None, :]
            plan.decode_slots = torch.where(valid, slots, torch.zeros_like(slots))
            if need_window:
                valid &= pos[None, :] > (ctx[:, None] - 1) - sliding_window
            if need_window or min_ctx != max_ctx:
                plan.decode_mask = _additive(valid[:, None, None, :], dtype)
        plan.decode_token_idx = torch.tensor(decode_tokens, dtype=torch.long, device=device)
        plan.decodes_are_whole_batch = num_decodes == batch.num_seqs
    return plan
