"""KV blocks as bytes, for moving them between engines (and nodes).

One exported block is a self-describing payload, all integers little-endian:

    offset  size  field
    0       4     magic b"PCKV"
    4       2     format version (1)
    6       2     len(model_id), then model_id (utf-8)
    .       1     len(dtype), then dtype name (utf-8: "float32" | "bfloat16" | "float16")
    .       1     ndim (5), then ndim x uint32: [layers, 2, block_size, kv_heads, head_dim]
    .       16    block hash (cache_service.block_hash)
    .       8     xxh3_64 of the data
    .       8     len(data)
    .       ...   data: the block's tensor, C-contiguous, native element bytes

Decoding checks every field against what the importer expects and raises ``BlockImportError`` naming the
first mismatch, so a block from another model, dtype or layout, a truncated or bit-flipped payload, or one
filed under the wrong hash is never written into a cache.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import torch
import xxhash

from cache_service.block_hash import HASH_NBYTES, BlockHash, hash_block, root_hash
from workers.block_pool import Block, BlockPool
from workers.model import KVCache

MAGIC = b"PCKV"
VERSION = 1
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BlockImportError(ValueError):
    """An exported block cannot be imported; the message says what is wrong with it."""


class ExportedBlock(NamedTuple):
    block_hash: BlockHash
    token_ids: tuple[int, ...]
    # bytes, or a read-only memoryview into a received message (a fetch keeps it instead of copying it).
    payload: bytes | memoryview


class BlockHeader(NamedTuple):
    model_id: str
    dtype: str
    shape: tuple[int, ...]
    block_hash: BlockHash
    checksum: int
    data_offset: int
    data_nbytes: int


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def encode_block(model_id: str, block_hash: BlockHash, data: torch.Tensor) -> bytes:
    """Serialize one block's tensor ``[layers, 2, block_size, kv_heads, head_dim]`` (any device)."""
    name = dtype_name(data.dtype)
    if name not in _DTYPES:
        raise ValueError(f"cannot export a block of dtype {data.dtype}")
    if len(block_hash) != HASH_NBYTES:
        raise ValueError(f"block hash must be {HASH_NBYTES} bytes")
    raw = data.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
    mid = model_id.encode("utf-8")
    dt = name.encode("ascii")
    header = b"".join(
        [
            MAGIC,
            struct.pack("<HH", VERSION, len(mid)),
            mid,
            struct.pack("<B", len(dt)),
            dt,
            struct.pack("<B", data.dim()),
            struct.pack(f"<{data.dim()}I", *data.shape),
            bytes(block_hash),
            struct.pack("<QQ", xxhash.xxh3_64_intdigest(raw), len(raw)),
        ]
    )
    return header + raw


class _Reader:
    def __init__(self, buf: bytes | memoryview) -> None:
        self.buf = memoryview(buf)
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.buf):
            raise BlockImportError(f"block payload is truncated (reading {what} at byte {self.pos})")
        out = bytes(self.buf[self.pos : self.pos + n])  # header fields only: a few bytes
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> tuple:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))


def read_header(payload: bytes | memoryview) -> BlockHeader:
    r = _Reader(payload)
    if r.take(4, "magic") != MAGIC:
        raise BlockImportError("not a prefixcache KV block (bad magic)")
    version, mid_len = r.unpack("<HH", "version")
    if version != VERSION:
        raise BlockImportError(f"unsupported block format version {version} (this engine reads {VERSION})")
    try:
        model_id = r.take(mid_len, "model id").decode("utf-8")
        (dt_len,) = r.unpack("<B", "dtype")
        dtype = r.take(dt_len, "dtype").decode("ascii")
    except UnicodeDecodeError:
        raise BlockImportError("block header is corrupt (undecodable model id or dtype)") from None
    (ndim,) = r.unpack("<B", "ndim")
    shape = tuple(r.unpack(f"<{ndim}I", "shape"))
    block_hash = BlockHash(r.take(HASH_NBYTES, "block hash"))
    checksum, nbytes = r.unpack("<QQ", "checksum")
    return BlockHeader(model_id, dtype, shape, block_hash, checksum, r.pos, nbytes)


def decode_block(
    payload: bytes | memoryview,
    *,
    model_id: str,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    block_hash: BlockHash,
) -> torch.Tensor:
    """Check a payload against what this engine expects; return its tensor (CPU)."""
    h = read_header(payload)
    if h.model_id != model_id:
        raise BlockImportError(f"block is for model {h.model_id!r}, this engine runs {model_id!r}")
    if h.dtype != dtype_name(dtype):
        raise BlockImportError(f"block has dtype {h.dtype}, this engine's KV cache is {dtype_name(dtype)}")
    if h.shape != tuple(shape):
        raise BlockImportError(f"block has shape {list(h.shape)}, this engine expects {list(shape)}")
    if h.block_hash != block_hash:
        raise BlockImportError(f"block payload is for hash {h.block_hash.hex()}, offered as {block_hash.hex()}")
    elem = torch.empty((), dtype=dtype).element_size()
    expected = elem
    for d in shape:
        expected *= d
    if h.data_nbytes != expected or len(payload) - h.data_offset != expected:
        raise BlockImportError(
            f"block data is {len(payload) - h.data_offset} bytes (header says {h.data_nbytes}), expected {expected}"
        )
    raw = memoryview(payload)[h.data_offset :]  # no copy before the checksum
    if xxhash.xxh3_64_intdigest(raw) != h.checksum:
        raise BlockImportError(f"block {block_hash.hex()} failed its checksum (corrupted in transit)")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)


# ---- between a block pool + KV cache and bytes ---------------------------------------------------------
def export_blocks(pool: BlockPool, kv_cache: KVCache, model_id: str, block_hashes) -> list[ExportedBlock]:
    """The leading run of ``block_hashes`` that ``pool`` holds, as payloads (stops at the first miss)."""
    blocks: list[Block] = []
    for h in block_hashes:
        block = pool.cached.get(h)
        if block is None:
            break
        blocks.append(block)
    if not blocks:
        return []
    data = kv_cache.read_blocks([b.block_id for b in blocks])  # one gather for the whole run
    out = []
    for block, tensor in zip(blocks, data):
        assert block.block_hash is not None and block.token_ids is not None
        out.append(ExportedBlock(block.block_hash, block.token_ids, encode_block(model_id, block.block_hash, tensor)))
    return out


def import_blocks(
    pool: BlockPool,
    kv_cache: KVCache,
    model_id: str,
    blocks,
    parent_hash: BlockHash | None = None,
    cache_salt: str | None = None,
) -> int:
    """Check and cache exported blocks (a chain continuing ``parent_hash``); returns how many ``pool`` now holds.

    Each block's link is checked (``hash_block(parent, tokens) == hash``), then its payload (header fields and
    checksum). Block 0's parent is ``parent_hash``, else the root of (model, ``cache_salt``) when a salt is
    given; with neither, block 0's own link cannot be checked (a hit still compares its tokens). Blocks already
    cached are kept as they are. A bad block stops the import: the good leading ones stay cached and
    ``BlockImportError`` says what was wrong. When every block is in use, it stops quietly (see the count).
    Imported blocks end up unreferenced, most recent in the LRU queue, the chain's head evicted last.
    """
    parent = parent_hash
    if parent is None and cache_salt is not None:
        parent = root_hash(model_id, cache_salt)
    event_parent = parent_hash  # a chain's first block has parent None in events, as after a prefill
    shape, dtype, bs = kv_cache.block_shape, kv_cache.dtype, pool.block_size
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
            existing = pool.get_cached_block(eb.block_hash, tokens)
            if existing is not None:
                pool.touch([existing])  # held while later blocks are allocated, or one could evict it
                held.append(existing)
            else:
                if eb.block_hash in pool.cached:
                    raise BlockImportError(
                        f"block {i} ({eb.block_hash.hex()}) collides with a cached block holding other tokens"
                    )
                new = pool.allocate(1)
                if new is None:
                    break
                held.append(new[0])
                kv_cache.write_block(new[0].block_id, data)
                pool.cache_block(new[0], eb.block_hash, tokens, event_parent)
            parent = event_parent = eb.block_hash
        return len(held)
    finally:
        pool.free(held)
