"""KV blocks between a KV manager + KV cache and the wire format of ``cache_service/block_wire.py``.

``export_blocks`` gathers a run of cached blocks into payloads; ``import_blocks`` checks each offered block
(its hash-chain link, then its payload) and writes it into a free block. The tensor side of the format
(``encode_block`` / ``decode_block``) is here because it needs torch; the format itself is the cache's. Blocks
are held and published through the ``KVManager``, the block pool's one door.

A quantized (fp8) cache exports each block's values with its scales (the payload's scales section) and imports
them the same way, so a transferred block is bit-identical to the one its peer computed. Blocks move only
between caches of the same KV dtype: the payload's dtype check refuses any other (``BlockImportError``).
"""

from __future__ import annotations

import torch

from cache_service.block_hash import BlockHash, hash_block, root_hash
from cache_service.block_wire import (
    ELEMENT_SIZES,
    SCALE_SIZES,
    BlockImportError,
    ExportedBlock,
    check_payload,
    data_layout,
    encode_payload,
)
from workers.block_pool import Block
from workers.kv_manager import KVManager
from workers.model.config import dtype_name
from workers.model.kv_cache import SCALE_DTYPE, KVCache


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()


def encode_block(model_id: str, block_hash: BlockHash, data: torch.Tensor, scales: torch.Tensor | None = None) -> bytes:
    """Serialize one block's tensor ``[layers, 2, block_size, kv_heads, head_dim]`` (any device) and, for a
    quantized dtype, its float32 scales ``[layers, 2, block_size, kv_heads]``."""
    name = dtype_name(data.dtype)
    if name not in ELEMENT_SIZES:
        raise ValueError(f"cannot export a block of dtype {data.dtype}")
    if (name in SCALE_SIZES) != (scales is not None):
        raise ValueError(f"a {name} block {'needs' if name in SCALE_SIZES else 'has no'} scales")
    if scales is not None and (scales.dtype != SCALE_DTYPE or tuple(scales.shape) != tuple(data.shape[:-1])):
        raise ValueError(f"block scales are {scales.dtype} {list(scales.shape)}, expected {SCALE_DTYPE} "
                         f"{list(data.shape[:-1])}")
    return encode_payload(model_id, block_hash, name, tuple(data.shape), _bytes(data),
                          b"" if scales is None else _bytes(scales))


def decode_block_scaled(
    payload: bytes | memoryview,
    *,
    model_id: str,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    block_hash: BlockHash,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Check a payload against what this engine expects; return its tensor and, for a quantized dtype, its
    scales ``shape[:-1]`` (else None), both on CPU."""
    name = dtype_name(dtype)
    raw = check_payload(payload, model_id=model_id, dtype=name, shape=shape, block_hash=block_hash)
    buf = bytearray(raw)  # one copy: the payload may be a read-only view into a received message
    values_nbytes, scales_nbytes = data_layout(name, tuple(shape))
    values = torch.frombuffer(buf, dtype=torch.uint8, count=values_nbytes).view(dtype).reshape(shape)
    if not scales_nbytes:
        return values, None
    scales = torch.frombuffer(buf, dtype=torch.uint8, count=scales_nbytes, offset=values_nbytes)
    return values, scales.view(SCALE_DTYPE).reshape(tuple(shape[:-1]))


def decode_block(
    payload: bytes | memoryview,
    *,
    model_id: str,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    block_hash: BlockHash,
) -> torch.Tensor:
    """Check a payload of an unquantized dtype against what this engine expects; return its tensor (CPU).
    A quantized block needs its scales too: ``decode_block_scaled``."""
    if dtype_name(dtype) in SCALE_SIZES:
        raise ValueError(f"a {dtype_name(dtype)} block has scales: decode it with decode_block_scaled")
    return decode_block_scaled(payload, model_id=model_id, dtype=dtype, shape=shape, block_hash=block_hash)[0]


# ---- between a KV manager + KV cache and bytes ----------------------------------------------------------
def export_blocks(kv: KVManager, kv_cache: KVCache, block_hashes) -> list[ExportedBlock]:
    """The leading run of ``block_hashes`` that ``kv`` holds, as payloads (stops at the first miss)."""
    blocks = kv.held_run(block_hashes)
    if not blocks:
        return []
    ids = [b.block_id for b in blocks]
    data = kv_cache.read_blocks(ids)  # one gather for the whole run
    scales = kv_cache.read_scales(ids)  # None unless the cache is quantized
    out = []
    for i, (block, tensor) in enumerate(zip(blocks, data)):
        assert block.block_hash is not None and block.token_ids is not None
        payload = encode_block(kv.model_id, block.block_hash, tensor, None if scales is None else scales[i])
        out.append(ExportedBlock(block.block_hash, block.token_ids, payload))
    return out


def import_blocks(
    kv: KVManager,
    kv_cache: KVCache,
    blocks,
    parent_hash: BlockHash | None = None,
    cache_salt: str | None = None,
) -> int:
    """Check and cache exported blocks (a chain continuing ``parent_hash``); returns how many ``kv`` now holds.

    Each block's link is checked (``hash_block(parent, tokens) == hash``), then its payload (header fields and
    checksum). Block 0's parent is ``parent_hash``, else the root of (model, ``cache_salt``) when a salt is
    given; with neither, block 0's own link cannot be checked (a hit still compares its tokens). Blocks already
    cached are kept as they are. A bad block stops the import: the good leading ones stay cached and
    ``BlockImportError`` says what was wrong. When every block is in use, it stops quietly (see the count).
    Imported blocks end up unreferenced, most recent in the LRU queue, the chain's head evicted last.
    """
    model_id = kv.model_id
    parent = parent_hash
    if parent is None and cache_salt is not None:
        parent = root_hash(model_id, cache_salt)
    event_parent = parent_hash  # a chain's first block has parent None in events, as after a prefill
    shape, dtype, bs = kv_cache.block_shape, kv_cache.dtype, kv.block_size
    held: list[Block] = []
    try:
        for i, eb in enumerate(blocks):
            tokens = tuple(int(t) for t in eb.token_ids)
            if len(tokens) != bs:
                raise BlockImportError(f"block {i} has {len(tokens)} tokens, block_size is {bs}")
            if parent is not None and hash_block(parent, tokens) != eb.block_hash:
                raise BlockImportError(
                    f"block {i} ({eb.block_hash.hex()}) does not continue the chain from {parent.hex()} with its tokens"
                )
            data, scales = decode_block_scaled(eb.payload, model_id=model_id, dtype=dtype, shape=shape,
                                               block_hash=eb.block_hash)
            # Held while later blocks are allocated, or one of them could evict it.
            existing = kv.hold_prefix([eb.block_hash], tokens)
            if existing:
                held.extend(existing)
            else:
                if kv.is_cached(eb.block_hash):
                    raise BlockImportError(
                        f"block {i} ({eb.block_hash.hex()}) collides with a cached block holding other tokens"
                    )
                new = kv.new_block()
                if new is None:
                    break
                held.append(new)
                kv_cache.write_block(new.block_id, data, scales)
                kv.publish(new, eb.block_hash, tokens, event_parent)
            parent = event_parent = eb.block_hash
        return len(held)
    finally:
        kv.release(held)
