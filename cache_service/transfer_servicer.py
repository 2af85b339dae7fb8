"""BlockTransfer's gRPC stream: ``FetchBlocks`` streams the KV blocks of a prefix chain to a peer.

The servicer serves from its ``BlockSource`` (``transfer_source``: the
request check and the grouped exports both streams share) and cuts each
block's payload into chunks of at most ``max_chunk_bytes``; the block's
token ids ride on its first chunk:

    block 0: chunk 0 (token_ids, data[0:C]) chunk 1 (data[C:2C]) ...
    block 1: chunk 0 (token_ids, ...) ...

The stream ends at the first block the worker does not hold. A requester
that accepts bundles gets consecutive small chunks in one message (see
``BlockChunk.bundled``); one that accepts the raw stream, while this worker
has one, gets a single message naming it instead (``raw_frames``). Chunks
are encoded by hand (``chunk_codec``: the same wire bytes as protobuf,
fewer copies).

On a server with a cluster credential (``TransferServer(member=...)``) the interceptor has authenticated
the caller; this servicer answers PERMISSION_DENIED to a caller that is not a node, or that asks for
blocks on behalf of another requester (``access.check_fetch``).
"""

from __future__ import annotations

from contextlib import aclosing
from typing import AsyncIterator

import grpc

from cache_service import access
from cache_service import validation as v
from cache_service.block_hash import BlockHash
from cache_service.block_wire import ExportedBlock
from cache_service.chunk_codec import Part, bundle, chunk_parts
from cache_service.transfer_settings import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES, MIN_CHUNK_BYTES, SERVICE_NAME
from cache_service.transfer_source import BlockSource
from common.cluster_auth import PermissionDenied
from common.member_interceptor import current_caller
from protos.prefixcache.v1 import cache_pb2 as pb


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


class BlockTransferServicer(BlockSource):
    """Yields serialized ``BlockChunk``s: register it with ``add_transfer_servicer`` (not the generated
    ``add_BlockTransferServicer_to_server``, which would serialize them again).

    It is the worker's ``BlockSource`` too: ``TransferServer`` hands it to the raw stream's listener, so
    both streams share its stats and faults."""

    # Set by TransferServer while its raw block stream listens; "" = every fetch streams here.
    raw_stream_address: str = ""

    async def _emit(self, chunks: list[tuple[list[Part], int]]) -> bytes:
        message = bundle(chunks)
        await self.faults.pause()
        message = self.faults.alter_message(message)
        self.stats.num_bytes += len(message)
        return message

    async def FetchBlocks(self, request: pb.FetchBlocksRequest, context: grpc.aio.ServicerContext
                          ) -> AsyncIterator[bytes]:
        try:
            access.check_fetch(current_caller(), request.requester)
            hashes = self.check(request)
        except PermissionDenied as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except v.InvalidRequest as exc:
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
