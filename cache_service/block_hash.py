"""Block identity: the canonical, cluster-wide hash of a prompt's KV blocks.

Every process on every node must compute the same hash for the same tokens, so
this is xxh3_128 over explicit bytes (never Python's ``hash()``, never a random
seed). The router, the workers and the cache service all import this module, so
they agree by construction.

    root    = xxh3_128(b"prefixcache/v1\\0" + model_id + b"\\0" + cache_salt)
    hash_i  = xxh3_128(hash_{i-1} (16 bytes) + tokens of block i as little-endian uint32)
    hash_-1 = root

Only full blocks are hashed: the tail that does not fill a block is never shared.
A hash names a block *together with its whole prefix*, so equal hashes at
position i mean equal tokens in blocks 0..i (up to a 2^-128 collision, which
the block pool still guards against by comparing tokens on every hit).
"""

from __future__ import annotations

from typing import NewType, Sequence

import numpy as np
import xxhash

BlockHash = NewType("BlockHash", bytes)
"""16 bytes, big-endian digest of xxh3_128 (``xxhash.xxh3_128_digest``)."""

HASH_NBYTES = 16
_DOMAIN = b"prefixcache/v1\x00"
MAX_TOKEN_ID = 2**32 - 1


def root_hash(model_id: str, cache_salt: str = "") -> BlockHash:
    """The chain's parent for block 0: separates models and tenants (salts)."""
    payload = _DOMAIN + model_id.encode("utf-8") + b"\x00" + cache_salt.encode("utf-8")
    return BlockHash(xxhash.xxh3_128_digest(payload))


def _token_bytes(token_ids: Sequence[int]) -> bytes:
    arr = np.asarray(token_ids, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() > MAX_TOKEN_ID):
        raise ValueError("token ids must fit in uint32 to be hashed")
    return arr.astype("<u4").tobytes()


def hash_block(parent: BlockHash, token_ids: Sequence[int]) -> BlockHash:
    """Hash of one block given its parent's hash (the chain step)."""
    if len(parent) != HASH_NBYTES:
        raise ValueError(f"parent hash must be {HASH_NBYTES} bytes, got {len(parent)}")
    return BlockHash(xxhash.xxh3_128_digest(parent + _token_bytes(token_ids)))


def hash_prompt_blocks(
    token_ids: Sequence[int],
    block_size: int,
    model_id: str,
    cache_salt: str = "",
    *,
    parent: BlockHash | None = None,
) -> list[BlockHash]:
    """Hashes of every *full* block of ``token_ids``, chained from the root.

    ``parent`` continues an existing chain (e.g. hashing only the blocks a
    sequence filled during decode), in which case ``model_id``/``cache_salt``
    are not used.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    num_full = len(token_ids) // block_size
    if num_full == 0:
        return []
    # One conversion for the whole prompt; each block is then a bytes slice.
    raw = _token_bytes(token_ids[: num_full * block_size])
    step = block_size * 4
    h = root_hash(model_id, cache_salt) if parent is None else parent
    digest = xxhash.xxh3_128_digest
    hashes: list[BlockHash] = []
    for i in range(num_full):
        h = BlockHash(digest(h + raw[i * step : (i + 1) * step]))
        hashes.append(h)
    return hashes



def num_reusable_blocks(num_prompt_tokens: int, block_size: int) -> int:
    """How many leading blocks of a prompt may come from the cache: the full blocks, less the block that
    holds the prompt's last token when the prompt ends on a block boundary.

    The engine always computes the prompt's last token (its logits give the first output token), so the
    block holding it is never a hit. Every component that predicts, fetches or counts hits uses this one cap.
    """
    return max(0, (num_prompt_tokens - 1) // block_size)
