"""The block wire format: one exported KV block as a self-describing payload (torch-free).

All integers little-endian:

    offset  size  field
    0       4     magic b"PCKV"
    4       2     format version (1)
    6       2     len(model_id), then model_id (utf-8)
    .       1     len(dtype), then dtype name (utf-8: "float32" | "bfloat16" | "float16" | "float8_e4m3fn")
    .       1     ndim (5), then ndim x uint32: [layers, 2, block_size, kv_heads, head_dim]
    .       16    block hash (cache_service.block_hash)
    .       8     xxh3_64 of the data
    .       8     len(data)
    .       ...   data: the block's tensor, C-contiguous, native element bytes;
                  for a scaled dtype ("float8_e4m3fn") followed by its scales section:
    .       ...   scales: float32 [layers, 2, block_size, kv_heads], C-contiguous (one per token slot, K/V,
                  kv head: value = fp8 * scale), covered by the same checksum and length

The scales section was added compatibly: payloads of unscaled dtypes are byte-for-byte what version 1
always was, and an engine that predates fp8 refuses an fp8 payload on its dtype (a clear
``BlockImportError``) before it looks at a length. ``check_payload`` checks every field against what the
importer expects and raises ``BlockImportError`` naming the first mismatch, so a block from another model,
KV dtype or layout, a truncated or bit-flipped payload, or one filed under the wrong hash is never written
into a cache. Turning the data into tensors is the engine's side (``workers/block_io.py``); the transfer
code only moves payloads.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import xxhash

from cache_service.block_hash import HASH_NBYTES, BlockHash

MAGIC = b"PCKV"
VERSION = 1
ELEMENT_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1}
# Dtypes whose values carry a scales section: dtype -> bytes of one scale (float32, one per head_dim values).
SCALE_SIZES = {"float8_e4m3fn": 4}


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


def data_layout(dtype: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """(bytes of the values, bytes of the scales section: 0 for an unscaled dtype) of a block."""
    num_values = 1
    for d in shape:
        num_values *= d
    num_scales = num_values // shape[-1] if dtype in SCALE_SIZES and shape else 0
    return num_values * ELEMENT_SIZES[dtype], num_scales * SCALE_SIZES.get(dtype, 0)


def encode_payload(model_id: str, block_hash: BlockHash, dtype: str, shape: tuple[int, ...], raw: bytes,
                   scales: bytes = b"") -> bytes:
    """Header + ``raw`` (the block's tensor bytes, C-contiguous) + ``scales`` (a scaled dtype's section)."""
    if dtype not in ELEMENT_SIZES:
        raise ValueError(f"cannot export a block of dtype {dtype}")
    if len(block_hash) != HASH_NBYTES:
        raise ValueError(f"block hash must be {HASH_NBYTES} bytes")
    values_nbytes, scales_nbytes = data_layout(dtype, shape)
    if (len(raw), len(scales)) != (values_nbytes, scales_nbytes):
        raise ValueError(f"a {dtype} block of shape {list(shape)} has {values_nbytes} bytes of values and "
                         f"{scales_nbytes} of scales, got {len(raw)} and {len(scales)}")
    if scales:
        raw = raw + scales
    mid = model_id.encode("utf-8")
    dt = dtype.encode("ascii")
    header = b"".join(
        [
            MAGIC,
            struct.pack("<HH", VERSION, len(mid)),
            mid,
            struct.pack("<B", len(dt)),
            dt,
            struct.pack("<B", len(shape)),
            struct.pack(f"<{len(shape)}I", *shape),
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


def check_payload(
    payload: bytes | memoryview,
    *,
    model_id: str,
    dtype: str,
    shape: tuple[int, ...],
    block_hash: BlockHash,
) -> memoryview:
    """Check a payload against what the importer expects; return its data bytes (no copy): the values, then
    for a scaled dtype the scales section (``data_layout`` says where it starts)."""
    h = read_header(payload)
    if h.model_id != model_id:
        raise BlockImportError(f"block is for model {h.model_id!r}, this engine runs {model_id!r}")
    if h.dtype != dtype:
        # Peers exchange blocks only in the same KV dtype (e.g. --kv-cache-dtype fp8 on both): the fetch
        # that sees this recomputes instead.
        raise BlockImportError(f"block has dtype {h.dtype}, this engine's KV cache is {dtype} "
                               f"(blocks move only between engines of the same KV cache dtype)")
    if h.shape != tuple(shape):
        raise BlockImportError(f"block has shape {list(h.shape)}, this engine expects {list(shape)}")
    if h.block_hash != block_hash:
        raise BlockImportError(f"block payload is for hash {h.block_hash.hex()}, offered as {block_hash.hex()}")
    expected = sum(data_layout(dtype, tuple(shape)))
    if h.data_nbytes != expected or len(payload) - h.data_offset != expected:
        raise BlockImportError(
            f"block data is {len(payload) - h.data_offset} bytes (header says {h.data_nbytes}), expected {expected}"
        )
    raw = memoryview(payload)[h.data_offset :]  # no copy before the checksum
    if xxhash.xxh3_64_intdigest(raw) != h.checksum:
        raise BlockImportError(f"block {block_hash.hex()} failed its checksum (corrupted in transit)")
    return raw
