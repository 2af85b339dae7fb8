"""KV blocks between a KV manager + KV cache and the wire format of ``cache_service/block_wire.py``.

``export_blocks`` gathers a run of cached blocks into payloads; ``import_blocks`` checks each offered block
(its hash-chain link, then its payload) and writes it into a free block. The tensor side of the format
(``encode_block`` / ``decode_block``) is here because it needs torch; the format itself is the cache's. Blocks
are held and published through the ``KVManager``, the block pool's one door.
"""

from __future__ import annotations

import torch

from cache_service.block_hash import BlockHash, hash_block, root_hash
from cache_service.block_wire import BlockImportError, ExportedBlock, check_payload, encode_payload
from workers.block_pool import Block
from workers.kv_manager import KVManager
from workers.model.config import SUPPORTED_DTYPES, dtype_name
from workers.model.kv_cache import KVCache


def encode_block(model_id: str, block_hash: BlockHash, data: torch.Tensor) -> bytes:
    """Serialize one block's tensor ``[layers, 2, block_size, kv_heads, head_dim]`` (any device)."""
    name = dtype_name(data.dtype)
    if name not in SUPPORTED_DTYPES:
        raise ValueError(f"cannot export a block of dtype {data.dtype}")
    raw = data.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
    return encode_payload(model_id, block_hash, name, tuple(data.shape), raw)


def decode_block(
    payload: bytes | memoryview,
    *,
    model_id: str,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    block_hash: BlockHash,
) -> torch.Tensor:
    """Check a payload against what this engine expects; return its tensor (CPU)."""
    raw = check_payload(payload, model_id=model_id, dtype=dtype_name(dtype), shape=shape, block_hash=block_hash)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)


# ---- between a KV manager + KV cache and bytes ----------------------------------------------------------
def export_blocks(kv: KVManager, kv_cache: KVCache, block_hashes) -> list[ExportedBlock]:
    """The leading run of ``block_hashes`` that ``kv`` holds, as payloads (stops at the first miss)."""
    blocks = kv.held_run(block_hashes)
    if not blocks:
        return []
    data = kv_cache.read_blocks([b.block_id for b in blocks])  # one gather for the whole run
    out = []
    for block, tensor in zip(blocks, data):
        assert block.block_hash is not None and block.token_ids is not None
        payload = encode_block(kv.model_id, block.block_hash, tensor)
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
            data = decode_block(eb.payload, model_id=model_id, dtype=dtype, shape=shape, block_hash=eb.block_hash)
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
                kv_cache.write_block(new.block_id, data)
                kv.publish(new, eb.block_hash, tokens, event_parent)
            parent = event_parent = eb.block_hash
        return len(held)
    finally:
        kv.release(held)
