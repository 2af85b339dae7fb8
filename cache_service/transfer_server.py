"""BlockTransfer: a worker streams the KV blocks of a prefix chain to a peer (data plane).

The worker provides ``export``: hashes -> the leading blocks it holds, as
``ExportedBlock``s (``Engine.export_blocks`` run on the engine's thread; it
may be sync or async). The servicer exports in groups (so that reading the
cache overlaps with sending) and cuts each block's payload into chunks of at
most ``max_chunk_bytes``; the block's token ids ride on its first chunk:

    block 0: chunk 0 (token_ids, data[0:C]) chunk 1 (data[C:2C]) ...
    block 1: chunk 0 (token_ids, ...) ...

The stream ends at the first block the worker does not hold. Integrity is
the payload's own checksum, verified by the importer. Chunks are encoded by
hand (``chunk_codec``: the same wire bytes as protobuf, fewer copies).

``TransferFaults`` are test-only hooks (a delay before each chunk, a
function that may alter a chunk in transit) used to exercise the fallbacks
on a real gRPC stream.
"""

from __future__ import annotations

import asyncio
import inspect
from contextlib import aclosing
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

import grpc

from cache_service import validation as v
from cache_service.block_hash import BlockHash
from cache_service.chunk_codec import Part, bundle, chunk_parts
from cache_service.raw_transfer import RawStreamListener
from protos.prefixcache.v1 import cache_pb2 as pb
from cache_service.block_wire import ExportedBlock

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["BlockTransfer"].full_name
FETCH_METHOD = f"/{SERVICE_NAME}/FetchBlocks"
DEFAULT_CHUNK_BYTES = 1 << 20
MIN_CHUNK_BYTES = 4 << 10
MAX_CHUNK_BYTES = 4 << 20
MAX_FETCH_BLOCKS = 8_192
EXPORT_GROUP_BLOCKS = 32
# Message caps for both ends: a chunk plus its token ids and framing.
TRANSFER_MESSAGE_BYTES = MAX_CHUNK_BYTES + (1 << 20)
# HTTP/2 tuning for both ends (measured with benchmarks/bench_cache.py, serving side in another process):
# the largest frame HTTP/2 allows, and a receive window that lets several 1 MiB messages be in flight.
HTTP2_MAX_FRAME_BYTES = (1 << 24) - 1
STREAM_WINDOW_BYTES = 8 << 20

ExportFn = Callable[[Sequence[BlockHash]], "list[ExportedBlock] | Awaitable[list[ExportedBlock]]"]


@dataclass(slots=True)
class TransferFaults:
    """Test-only fault injection on the sending side."""

    delay_s: float = 0.0  # sleep before every chunk
    corrupt: Callable[[pb.BlockChunk], pb.BlockChunk] | None = None  # may alter a chunk in transit


@dataclass(slots=True)
class TransferServerStats:
    num_requests: int = 0
    num_blocks: int = 0
    num_bytes: int = 0
    num_rejected: int = 0
    num_raw_requests: int = 0  # of num_requests, those served on the raw block stream


def block_chunk_parts(index: int, block: ExportedBlock, chunk_bytes: int) -> list[tuple[list[Part], int]]:
    """One block as BlockChunks of at most ``chunk_bytes`` of data each (token ids on the first)."""
    payload = block.payload
    num_chunks = max(1, -(-len(payload) // chunk_bytes))
    if num_chunks == 1:  # the common case: no slicing at all
        return [chunk_parts(index, block.block_hash, 0, 1, payload, block.token_ids)]
    view = memoryview(payload)
    return [
        chunk_parts(index, block.block_hash, c, num_chunks, view[c * chunk_bytes : (c + 1) * chunk_bytes],
                    block.token_ids if c == 0 else ())
        for c in range(num_chunks)
    ]


class BlockTransferServicer:
    """Yields serialized ``BlockChunk``s: register it with ``add_transfer_servicer`` (not the generated
    ``add_BlockTransferServicer_to_server``, which would serialize them again)."""

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
        self.raw_stream_address = ""  # set by TransferServer when its raw block stream listens

    async def _export(self, hashes: Sequence[BlockHash]) -> list[ExportedBlock]:
        out = self.export(hashes)
        if inspect.isawaitable(out):
            out = await out
        return list(out)  # type: ignore[arg-type]

    def check(self, request: pb.FetchBlocksRequest) -> list[BlockHash]:
        """The request's hashes, or ``InvalidRequest`` naming what is wrong (both data paths)."""
        hashes = v.check_hashes(request.block_hashes, "block_hashes", MAX_FETCH_BLOCKS)
        if request.model_id and request.model_id != self.model_id:
            raise v.InvalidRequest(f"model_id {request.model_id!r} does not match this worker's "
                                   f"model {self.model_id!r}")
        return [BlockHash(h) for h in hashes]

    async def exported(self, hashes: Sequence[BlockHash]) -> AsyncIterator[ExportedBlock]:
        """The leading blocks of ``hashes`` this worker holds, in order (both data paths).

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
                for block in blocks:
                    yield block
                    self.stats.num_blocks += 1
                if not complete:
                    break  # the chain ends here on this worker
        finally:
            if next_export is not None and not next_export.done():
                next_export.cancel()  # the requester went away (deadline, cancel)

    def finish(self, requester: str, sent: Sequence[BlockHash]) -> None:
        if sent and self.on_export is not None:
            self.on_export(requester, sent)

    async def _emit(self, chunks: list[tuple[list[Part], int]]) -> bytes:
        message = bundle(chunks)
        faults = self.faults
        if faults.delay_s:
            await asyncio.sleep(faults.delay_s)
        if faults.corrupt is not None:
            message = faults.corrupt(pb.BlockChunk.FromString(message)).SerializeToString()
        self.stats.num_bytes += len(message)
        return message

    async def FetchBlocks(self, request: pb.FetchBlocksRequest, context: grpc.aio.ServicerContext
                          ) -> AsyncIterator[bytes]:
        try:
            hashes = self.check(request)
        except v.InvalidRequest as exc:
            self.stats.num_rejected += 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if request.accept_raw_stream and self.raw_stream_address:
            # Hand the fetch to the raw stream: the requester sends this request again there.
            yield pb.BlockChunk(raw_stream_address=self.raw_stream_address).SerializeToString()
            return
        chunk_bytes = request.max_chunk_bytes or DEFAULT_CHUNK_BYTES
        chunk_bytes = min(max(chunk_bytes, MIN_CHUNK_BYTES), MAX_CHUNK_BYTES)
        sent: list[BlockHash] = []
        # Chunks waiting to go out in one message (bundling: see BlockChunk.bundled).
        pending: list[tuple[list[Part], int]] = []
        pending_bytes = 0
        async with aclosing(self.exported(hashes)) as blocks:
            async for block in blocks:
                for chunk in block_chunk_parts(len(sent), block, chunk_bytes):
                    if pending and (not request.accept_bundles or pending_bytes + chunk[1] > chunk_bytes):
                        yield await self._emit(pending)
                        pending, pending_bytes = [], 0
                    pending.append(chunk)
                    pending_bytes += chunk[1]
                sent.append(block.block_hash)
        if pending:
            yield await self._emit(pending)
        self.finish(request.requester, sent)


def add_transfer_servicer(servicer: BlockTransferServicer, server: grpc.aio.Server) -> None:
    """Register BlockTransfer/FetchBlocks with a pass-through response serializer."""
    handler = grpc.method_handlers_generic_handler(SERVICE_NAME, {
        "FetchBlocks": grpc.unary_stream_rpc_method_handler(
            servicer.FetchBlocks,
            request_deserializer=pb.FetchBlocksRequest.FromString,
            response_serializer=None,  # already wire bytes (chunk_codec)
        ),
    })
    server.add_generic_rpc_handlers((handler,))


class TransferServer:
    """A grpc.aio server hosting BlockTransfer on the *current* event loop."""

    def __init__(
        self,
        servicer: BlockTransferServicer,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        advertise_host: str | None = None,
        max_concurrent_rpcs: int = 16,
        raw_stream: bool = True,
    ) -> None:
        self.servicer = servicer
        self.host = host
        self.port = port
        self.advertise_host = advertise_host or host
        self.max_concurrent_rpcs = max_concurrent_rpcs
        self._server: grpc.aio.Server | None = None
        # The bulk path beside gRPC (raw_transfer); off, every fetch streams through gRPC.
        self.raw: RawStreamListener | None = (
            RawStreamListener(servicer, host, advertise_host=self.advertise_host, max_concurrent=max_concurrent_rpcs)
            if raw_stream else None)

    @property
    def address(self) -> str:
        """host:port that peers dial (what the cache service records)."""
        return f"{self.advertise_host}:{self.port}"

    async def start(self) -> str:
        # Beyond max_concurrent_rpcs in flight, new fetches get RESOURCE_EXHAUSTED
        # and their requester recomputes instead of queueing behind us.
        server = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", TRANSFER_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", 1 << 20),  # requests carry only hashes
                # A ~1 MiB message in one HTTP/2 frame instead of 64 of 16 KiB (the peer must allow it too).
                ("grpc.http2.max_frame_size", HTTP2_MAX_FRAME_BYTES),
            ],
            maximum_concurrent_rpcs=self.max_concurrent_rpcs,
        )
        add_transfer_servicer(self.servicer, server)
        port = server.add_insecure_port(f"{self.host}:{self.port}")
        if port == 0:
            raise OSError(f"cannot bind BlockTransfer to {self.host}:{self.port}")
        await server.start()
        self._server, self.port = server, port
        if self.raw is not None:
            self.servicer.raw_stream_address = await self.raw.start()
        log.info("BlockTransfer listening on %s (raw block stream: %s)", self.address,
                 self.servicer.raw_stream_address or "off")
        return self.address

    async def stop(self, grace_s: float = 0.5) -> None:
        server, self._server = self._server, None
        if self.raw is not None:
            self.servicer.raw_stream_address = ""
            await self.raw.stop()
        if server is not None:
            await server.stop(grace_s)


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
