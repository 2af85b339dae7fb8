"""Verification by recomputation: is a cached block what this engine's own model computes for its tokens?

An imported run passed every check its sender can satisfy (hash chain, tokens, checksum); this one the
sender cannot fake. To verify block ``k`` of a cached chain 0..k, prefill block k's ``block_size`` tokens
again with blocks 0..k-1 *as cached* for context, writing the new K/V into a scratch block, and compare
them with the cached block k:

    block table   [ b0  b1  ...  b(k-1) | scratch ]        query: tokens of block k, positions k*bs ..
    attention     reads b0..b(k-1) (the imported K/V) + scratch (written by this very forward)
    compare       scratch vs b(k), per (layer, K|V) slice, within the dtype's tolerance

Why one block covers the run (up to dilution, below): the K/V of layer l > 0 for block k are projections
of its hidden state after l attention layers over the whole context, so wrong values anywhere in blocks
0..k-1 change them (through attention at layer 1 and up), and wrong values in block k itself differ from
the recomputation directly (at layer 0 already: layer 0's K/V depend only on block k's tokens and
positions). The last block of a run is the strongest choice: every other block of the run is in its
context.

An honest peer's block differs from the recomputation only by rounding (the peer computed block k in
another chunk, batch shape and reduction order), so the comparison is relative to each slice's scale
(its largest recomputed magnitude) and loose enough for that; wrong values are off by a large fraction
of the scale. Measured on CPU (max |diff| / scale of the worst slice; honest: every block of 2048-token
prompts prefilled in chunks of 48 to 2048 beside other requests, and blocks made by batched decode steps,
on the demo model, a tiny Llama and the 57M Llama of the benchmarks; wrong: ``TransferFaults``'
``wrong_values`` in one block of a 32-block run, the last block verified):

    dtype      honest      honest     tolerance   wrong: the verified   wrong: an earlier block (57M Llama;
               prefilled   decoded                block itself          demo model: 0.33-0.53)
    float32    1.1e-6      3.2e-6     1e-3        0.37-0.42             0.049-0.051   caught
    bfloat16   0           1.8e-2     1e-1        0.37-0.42             0.047         missed
    float16    1.3e-3      2.4e-3     2e-2        0.37-0.42             0.050-0.052   caught
    fp8 KV     7.2e-2      7.5e-2     1.5e-1      0.29                  0.078-0.081   missed
    (float8 e4m3 storage, float32 or bfloat16 compute: one e4m3 rounding step of a slot's largest value is
    32/448 = 7.1% of it, and an honest recomputation crosses a rounding boundary now and then)

A block made by decode steps differs most from a prefill's recomputation (matrix-vector products round
differently). Through attention, one wrong block among n earlier ones is diluted roughly n-fold in a model
whose attention is spread evenly (the random 57M Llama): bfloat16's and fp8's rounding noise then hides it,
and only wrong values in the verified block itself, or spread over more of the run, are caught. An fp8
cache's blocks are compared dequantized (values x scales), as the model reads them. Deeper models and
GPU kernels will widen the honest figures: re-measure there (``benchmarks/bench_verify.py`` prints the
honest diff of every run).

``verify_block`` changes nothing in the cache whatever the outcome: it holds the run while it works,
takes one free block as scratch (as any allocation would, evicting an unreferenced block only when no
free one is left) and gives it back unhashed. Dropping a run that failed is the caller's decision.
"""

from __future__ import annotations

from typing import Sequence as Seq

import torch

from cache_service.block_hash import hash_prompt_blocks
from cache_service.peer_trust import VerifyResult
from workers.kv_manager import KVManager
from workers.model.forward_batch import ForwardBatch
from workers.model.kv_cache import FP8_DTYPE, KVCache, dequantize

# Max |imported - recomputed| allowed per (layer, K|V) slice, as a fraction of the slice's scale.
REL_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 1e-1, torch.float16: 2e-2}
# fp8 (e4m3) storage: honest diffs reach one rounding step (see the module doc).
FP8_REL_TOLERANCE = 0.15


def tolerance_for(kv_cache: KVCache) -> float:
    """The relative tolerance of a cache's blocks: its compute dtype's, widened for fp8 storage."""
    rel = REL_TOLERANCE[kv_cache.compute_dtype]
    return max(rel, FP8_REL_TOLERANCE) if kv_cache.dtype == FP8_DTYPE else rel


# A slice whose recomputed values are all (near) zero is compared against this scale instead.
MIN_SCALE = 1e-6


def recompute_block(model, kv_cache: KVCache, token_ids: Seq[int], context_block_ids: Seq[int],
                    scratch_block_id: int, block_index: int) -> torch.Tensor:
    """Block ``block_index``'s K/V ``[layers, 2, block_size, kv_heads, head_dim]`` computed into
    ``scratch_block_id`` over the cached context ``context_block_ids`` (blocks 0..block_index-1)."""
    bs = kv_cache.block_size
    assert len(context_block_ids) == block_index
    start = block_index * bs
    batch = ForwardBatch(
        input_ids=torch.tensor([int(t) for t in token_ids[start : start + bs]], dtype=torch.long),
        positions=torch.arange(start, start + bs, dtype=torch.long),
        slot_mapping=torch.arange(scratch_block_id * bs, (scratch_block_id + 1) * bs, dtype=torch.long),
        query_lens=[bs],
        context_lens=[start + bs],
        block_tables=torch.tensor([[*context_block_ids, scratch_block_id]], dtype=torch.long),
    )
    model(batch, kv_cache)  # the logits of the last token are not needed; the K/V written are
    return block_values(kv_cache, scratch_block_id)


def block_values(kv_cache: KVCache, block_id: int) -> torch.Tensor:
    """One block's K/V as the model reads them: as stored, or dequantized (fp8 values x their scales)."""
    values = kv_cache.read_blocks([block_id])[0]
    scales = kv_cache.read_scales([block_id])
    return values if scales is None else dequantize(values, scales[0], torch.float32)


def compare_blocks(imported: torch.Tensor, recomputed: torch.Tensor, rel_tolerance: float,
                   block_index: int = 0) -> VerifyResult:
    """Per (layer, K|V) slice: ok when max |imported - recomputed| <= rel_tolerance x the slice's scale.
    A NaN or infinity in the imported block fails (its difference is never <= anything)."""
    a, b = imported.float(), recomputed.float()
    dims = tuple(range(2, a.dim()))  # [layers, 2, ...] -> one figure per (layer, K|V)
    diff = (a - b).abs().amax(dim=dims)
    scale = b.abs().amax(dim=dims).clamp_min(MIN_SCALE)
    tol = scale * rel_tolerance
    ok = bool((diff <= tol).all())  # NaN <= x is False
    worst = int(torch.nan_to_num(diff / tol, nan=float("inf")).argmax())
    return VerifyResult(ok, float(diff.flatten()[worst]), float(tol.flatten()[worst]),
                        float(scale.flatten()[worst]), block_index)


def verify_block(model, kv: KVManager, kv_cache: KVCache, token_ids: Seq[int], cache_salt: str,
                 block_index: int, rel_tolerance: float | None = None) -> VerifyResult | None:
    """Recompute cached block ``block_index`` of ``token_ids`` (salted with ``cache_salt``) and compare it with
    the cached copy; None when it cannot be done now (blocks 0..block_index are not all cached with these
    tokens, or no block is free for the scratch copy). The cache is left as it was either way."""
    bs = kv.block_size
    if block_index < 0 or len(token_ids) < (block_index + 1) * bs:
        raise ValueError(f"block {block_index} is not a full block of {len(token_ids)} tokens (block_size {bs})")
    tokens = [int(t) for t in token_ids[: (block_index + 1) * bs]]
    if rel_tolerance is None:
        rel_tolerance = tolerance_for(kv_cache)
    hashes = hash_prompt_blocks(tokens, bs, kv.model_id, cache_salt)
    held = kv.hold_prefix(hashes, tokens)  # so that the scratch allocation cannot evict them
    try:
        if len(held) < block_index + 1:
            return None
        scratch = kv.new_block()
        if scratch is None:
            return None
        try:
            recomputed = recompute_block(model, kv_cache, tokens, [b.block_id for b in held[:block_index]],
                                         scratch.block_id, block_index)
        finally:
            kv.release([scratch])  # never hashed: back to the free queue's head, worth nothing
        return compare_blocks(block_values(kv_cache, held[block_index].block_id), recomputed, rel_tolerance,
                              block_index)
    finally:
        kv.release(held)
