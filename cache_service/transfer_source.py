"""What a worker serves blocks from: the part of BlockTransfer that its two streams (gRPC, raw) share.

The worker provides ``export``: hashes -> the leading blocks it holds, as
``ExportedBlock``s (``Engine.export_blocks`` run on the engine's thread; it
may be sync or async). ``BlockSource`` checks a request, exports its chain in
groups (so that reading the cache overlaps with sending), and tells who
received which blocks; the streams only frame and send what it yields:

    FetchBlocksRequest --check--> hashes --exported--> group 0 | group 1 | ...  (the next group is read
                                                                                  while this one is sent)
    stream sends the blocks, then --finish(requester, sent)--> on_export (the replica mirror)

The chain ends at the first block the worker does not hold. Integrity is
the payload's own checksum, verified by the importer.

``TransferFaults`` are test-only hooks (a delay before each chunk, a
function that may alter a chunk in transit, one that may replace an
exported block before it is sent: a sender whose values are wrong but whose
blocks pass every structural check) used to exercise the fallbacks and the
importer's verification on a real stream; both streams apply them.
"""

from __future__ import annotations

import asyncio
import inspect
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

from cache_service import validation as v
from cache_service.block_hash import BlockHash
from cache_service.block_wire import ELEMENT_SIZES, ExportedBlock, data_layout, encode_payload, read_header
from protos.prefixcache.v1 import cache_pb2 as pb

MAX_FETCH_BLOCKS = 8_192
EXPORT_GROUP_BLOCKS = 32

ExportFn = Callable[[Sequence[BlockHash]], "list[ExportedBlock] | Awaitable[list[ExportedBlock]]"]


@dataclass(slots=True)
class TransferFaults:
    """Test-only fault injection on the sending side."""

    delay_s: float = 0.0  # sleep before every message (gRPC stream) or block (raw stream)
    corrupt: Callable[[pb.BlockChunk], pb.BlockChunk] | None = None  # may alter a chunk in transit
    # May replace block i of a requested run before it is sent (both streams): the sender's own bug.
    alter_export: Callable[[int, ExportedBlock], ExportedBlock] | None = None

    async def pause(self) -> None:
        """The delay before each message of the gRPC stream and each block of the raw stream."""
        if self.delay_s:
            await asyncio.sleep(self.delay_s)

    def alter_message(self, message: bytes) -> bytes:
        """A serialized BlockChunk (bundled chunks included) as ``corrupt`` leaves it (gRPC stream)."""
        if self.corrupt is None:
            return message
        return self.corrupt(pb.BlockChunk.FromString(message)).SerializeToString()

    def alter_block(self, index: int, block: ExportedBlock) -> tuple[int, bytes, tuple[int, ...], Any]:
        """(index, hash, token ids, payload) of one raw-stream block as ``corrupt`` leaves it: it is shown
        the block as a one-chunk BlockChunk, so one ``corrupt`` serves both streams."""
        if self.corrupt is None:
            return index, block.block_hash, block.token_ids, block.payload
        altered = self.corrupt(pb.BlockChunk(block_index=index, block_hash=block.block_hash, num_chunks=1,
                                             data=bytes(block.payload), token_ids=block.token_ids))
        return altered.block_index, altered.block_hash, tuple(altered.token_ids), altered.data


def flip_one_byte(chunk_index: int = 0, block_index: int = 0, offset: int = -1) -> Callable[[Any], Any]:
    """A ``TransferFaults.corrupt`` that flips one byte of one chunk's data (tests)."""

    def corrupt(message: pb.BlockChunk) -> pb.BlockChunk:
        out = pb.BlockChunk()
        out.CopyFrom(message)
        for chunk in [out, *out.bundled]:
            if chunk.block_index == block_index and chunk.chunk_index == chunk_index and chunk.data:
                data = bytearray(chunk.data)
                data[offset] ^= 0xFF
                chunk.data = bytes(data)
        return out

    return corrupt


# Little-endian byte and bit of each element's highest mantissa bit, per dtype.
_TOP_MANTISSA_BIT = {"float32": (2, 6), "bfloat16": (0, 6), "float16": (1, 1), "float8_e4m3fn": (0, 2)}


def _flip_table(dtype: str) -> bytes:
    """byte -> byte with the top mantissa bit flipped (a ``bytes.translate`` table). e4m3fn has NaN codes
    (s1111111) that a flip could reach from s1111011: those take the largest finite value's code instead."""
    bit = 1 << _TOP_MANTISSA_BIT[dtype][1]
    table = [b ^ bit for b in range(256)]
    if dtype == "float8_e4m3fn":
        table = [t ^ 0x01 if t & 0x7F == 0x7F else t for t in table]
    return bytes(table)


def wrong_values(block_indices: Sequence[int] | None = None) -> Callable[[int, ExportedBlock], ExportedBlock]:
    """A ``TransferFaults.alter_export`` that sends wrong KV values under a valid header and checksum: it flips
    the highest mantissa bit of every element of the chosen blocks of a run (None: every block), so each
    value keeps its sign and exponent (it looks plausible) but is off by a quarter to a half of itself; the
    hash, tokens, shape, dtype and an fp8 block's scales are untouched and the checksum is recomputed
    (tests)."""
    chosen = None if block_indices is None else frozenset(block_indices)

    def alter(index: int, block: ExportedBlock) -> ExportedBlock:
        if chosen is not None and index not in chosen:
            return block
        h = read_header(block.payload)
        data = memoryview(block.payload)[h.data_offset :]
        values_nbytes, _ = data_layout(h.dtype, h.shape)
        values, scales = bytearray(data[:values_nbytes]), bytes(data[values_nbytes:])
        byte, step = _TOP_MANTISSA_BIT[h.dtype][0], ELEMENT_SIZES[h.dtype]
        values[byte::step] = bytes(values[byte::step]).translate(_flip_table(h.dtype))
        payload = encode_payload(h.model_id, h.block_hash, h.dtype, h.shape, bytes(values), scales)
        return ExportedBlock(block.block_hash, block.token_ids, payload)

    return alter


@dataclass(slots=True)
class TransferServerStats:
    num_requests: int = 0
    num_blocks: int = 0
    num_bytes: int = 0
    num_rejected: int = 0
    num_raw_requests: int = 0  # of num_requests, those served on the raw block stream


class BlockSource:
    """A worker's blocks as both streams serve them: the request check, grouped exports, who got what."""

    def __init__(
        self,
        export: ExportFn,
        model_id: str,
        *,
        on_export: Callable[[str, Sequence[BlockHash]], None] | None = None,
        faults: TransferFaults | None = None,
    ) -> None:
        self.export = export
        self.model_id = model_id
        # Told who received which blocks (the replica mirror: the peer now holds a copy).
        self.on_export = on_export
        self.faults = faults or TransferFaults()
        self.stats = TransferServerStats()

    async def _export(self, hashes: Sequence[BlockHash]) -> list[ExportedBlock]:
        out = self.export(hashes)
        if inspect.isawaitable(out):
            out = await out
        return list(out)  # type: ignore[arg-type]

    def check(self, request: pb.FetchBlocksRequest) -> list[BlockHash]:
        """The request's hashes, or ``InvalidRequest`` naming what is wrong (counted as rejected)."""
        try:
            hashes = v.check_hashes(request.block_hashes, "block_hashes", MAX_FETCH_BLOCKS)
            if request.model_id and request.model_id != self.model_id:
                raise v.InvalidRequest(f"model_id {request.model_id!r} does not match this worker's "
                                       f"model {self.model_id!r}")
        except v.InvalidRequest:
            self.stats.num_rejected += 1
            raise
        return [BlockHash(h) for h in hashes]

    async def exported(self, hashes: Sequence[BlockHash]) -> AsyncIterator[ExportedBlock]:
        """The leading blocks of ``hashes`` this worker holds, in order.

        Exported in groups: the next group is read (on the engine's thread) while this one is sent.
        """
        self.stats.num_requests += 1
        groups = [hashes[i : i + EXPORT_GROUP_BLOCKS] for i in range(0, len(hashes), EXPORT_GROUP_BLOCKS)]
        next_export = asyncio.ensure_future(self._export(groups[0])) if groups else None
        try:
            for g, group in enumerate(groups):
                assert next_export is not None
                blocks = await next_export
                complete = len(blocks) == len(group)
                next_export = (asyncio.ensure_future(self._export(groups[g + 1]))
                               if complete and g + 1 < len(groups) else None)
                alter = self.faults.alter_export
                for i, block in enumerate(blocks, start=g * EXPORT_GROUP_BLOCKS):
                    yield block if alter is None else alter(i, block)
                    self.stats.num_blocks += 1
                if not complete:
                    break  # the chain ends here on this worker
        finally:
            if next_export is not None and not next_export.done():
                next_export.cancel()  # the requester went away (deadline, cancel)

    def finish(self, requester: str, sent: Sequence[BlockHash]) -> None:
        """Called by a stream once it has sent its last block (not when it broke off): tells ``on_export``."""
        if sent and self.on_export is not None:
            self.on_export(requester, sent)
