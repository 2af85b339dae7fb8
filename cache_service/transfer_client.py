"""Pull a prefix chain's blocks from a peer's BlockTransfer endpoint and reassemble them.

``fetch_blocks`` returns the leading blocks the peer sent (possibly fewer
than asked: the peer may have evicted the rest since the index was told) or
raises ``TransferError`` saying what went wrong: deadline exceeded, peer
unreachable, or a stream that breaks the protocol (blocks out of order, a
hash that was not asked for, missing chunks, no token ids). The payload
checksum is verified when the blocks are imported.

    first fetch from a peer:  gRPC FetchBlocks (accept_raw_stream) --> chunks, or one answer naming
                              its raw block stream --> the same request again there (raw_client)
    later fetches:            the raw stream while it answers; gRPC for a while after it cannot be reached

Both streams deliver ``ChunkView``s (``chunk_codec``) to one ``_Assembler``, so one set of protocol
checks and one reassembly serve both.

Blocks are taken only from the member the index named (``peer``), when the client has a credential
(``member``): under a shared secret each gRPC fetch carries the node's token and a nonce, and the peer's
first message counts only if its initial metadata proves the peer's key (x-pc-proof); under mutual TLS
the channel checks that the peer's certificate, signed by the cluster CA, names ``peer``. The raw stream
does the same on its own connection (``raw_client``). A peer that cannot prove it fails the fetch: the
request recomputes.
"""

from __future__ import annotations

import asyncio
from typing import Sequence

import grpc

from cache_service.block_hash import BlockHash
from cache_service.block_wire import ExportedBlock
from cache_service.chunk_codec import ChunkDecodeError, ChunkView, decode_chunks
from cache_service.raw_client import RawConnectError, RawStreamError, RawStreamPool
from cache_service.transfer_settings import (
    DEFAULT_CHUNK_BYTES,
    FETCH_METHOD,
    HTTP2_MAX_FRAME_BYTES,
    STREAM_WINDOW_BYTES,
    TRANSFER_MESSAGE_BYTES,
)
from common.cluster_auth import PROOF_KEY, Member, new_nonce
from common.logs import request_id_metadata
from protos.prefixcache.v1 import cache_pb2 as pb

RAW_RETRY_AFTER_S = 30.0  # after a raw stream could not be reached, use gRPC for this long


class TransferError(RuntimeError):
    """A fetch from a peer failed; the caller recomputes instead."""


def _raw_handoff(chunks: Sequence[ChunkView]) -> str:
    """The raw stream address of a FetchBlocks answer that hands the fetch over, else ''."""
    return chunks[0].raw_stream_address if len(chunks) == 1 and not chunks[0].data else ""


class _Assembler:
    """Checks the chunk stream against the protocol and rebuilds each block's payload."""

    def __init__(self, hashes: Sequence[BlockHash]) -> None:
        self.hashes = hashes
        self.blocks: list[ExportedBlock] = []
        self._parts: list[memoryview | bytes] = []
        self._tokens: tuple[int, ...] = ()
        self._num_chunks = 0
        self.num_bytes = 0

    def add(self, chunk: ChunkView | pb.BlockChunk) -> None:
        i = len(self.blocks)
        if chunk.block_index != i:
            raise TransferError(f"peer sent block {chunk.block_index} while block {i} was expected")
        if i >= len(self.hashes):
            raise TransferError(f"peer sent more blocks than the {len(self.hashes)} requested")
        if chunk.block_hash != self.hashes[i]:
            raise TransferError(f"block {i}: peer sent hash {chunk.block_hash.hex()}, requested "
                                f"{bytes(self.hashes[i]).hex()}")
        if chunk.chunk_index != len(self._parts):
            raise TransferError(f"block {i}: chunk {chunk.chunk_index} arrived while chunk {len(self._parts)} "
                                f"was expected")
        if chunk.chunk_index == 0:
            if chunk.num_chunks < 1:
                raise TransferError(f"block {i}: num_chunks is {chunk.num_chunks}")
            if not chunk.token_ids:
                raise TransferError(f"block {i}: the first chunk carries no token ids")
            self._num_chunks = chunk.num_chunks
            self._tokens = tuple(chunk.token_ids)
        elif chunk.num_chunks != self._num_chunks:
            raise TransferError(f"block {i}: num_chunks changed from {self._num_chunks} to {chunk.num_chunks}")
        self._parts.append(chunk.data)
        self.num_bytes += len(chunk.data)
        if len(self._parts) == self._num_chunks:
            # A one-chunk block keeps its view into the received message (no copy: the import
            # reads it in place); a block cut into chunks is joined once.
            payload = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
            self.blocks.append(ExportedBlock(self.hashes[i], self._tokens, payload))
            self._parts = []

    def finish(self) -> list[ExportedBlock]:
        if self._parts:
            raise TransferError(f"block {len(self.blocks)}: stream ended after {len(self._parts)} of "
                                f"{self._num_chunks} chunks")
        return self.blocks


class TransferClient:
    """Fetches from peers; keeps one channel per peer address (on the current event loop)."""

    def __init__(self, requester: str = "", max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 raw_stream: bool = True, member: Member | None = None) -> None:
        self.requester = requester
        self.max_chunk_bytes = max_chunk_bytes
        self.raw_stream = raw_stream  # ask peers for their raw block stream (raw_client)
        self.member = member  # the requester's cluster identity; None: peers are not checked (tests)
        if member is not None and member.identity != requester:
            raise ValueError(f"requester {requester!r} holds the credential of {member.identity!r}")
        # (address, the peer's identity) -> channel: under TLS a channel checks the certificate of one identity.
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}
        # Per peer (its gRPC address): its raw stream address, "" when it has none. Learnt on the first fetch.
        self._raw_addresses: dict[str, str] = {}
        self._raw_down_until: dict[str, float] = {}  # raw stream unreachable: gRPC until then
        self._raw = RawStreamPool(member)
        self.num_raw_fetches = 0
        self.num_grpc_fetches = 0

    def _fetch_method(self, address: str, peer: str) -> grpc.aio.UnaryStreamMultiCallable:
        channel = self._channels.get((address, peer))
        if channel is None:
            options = [
                ("grpc.max_receive_message_length", TRANSFER_MESSAGE_BYTES),
                ("grpc.max_send_message_length", 4 << 20),
                # Fail fast on a dead peer instead of waiting for it to come back, and
                # find a restarted one quickly (gRPC's default backoff grows to minutes).
                ("grpc.enable_retries", 0),
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
                # Throughput (see transfer_settings): big frames, and a stream window that keeps the
                # sender from waiting for window updates between 1 MiB messages.
                ("grpc.http2.max_frame_size", HTTP2_MAX_FRAME_BYTES),
                ("grpc.http2.lookahead_bytes", STREAM_WINDOW_BYTES),
            ]
            channel = (self.member.channel(address, peer, options) if self.member is not None
                       else grpc.aio.insecure_channel(address, options=options))
            self._channels[(address, peer)] = channel
        # Responses stay raw bytes: chunk_codec parses them without copying the payload.
        return channel.unary_stream(FETCH_METHOD, request_serializer=pb.FetchBlocksRequest.SerializeToString,
                                    response_deserializer=None)

    def raw_address(self, address: str) -> str | None:
        """The raw stream learnt for the peer at ``address`` ("" = it has none; None = not asked yet)."""
        return self._raw_addresses.get(address)

    async def forget(self, address: str) -> None:
        raw = self._raw_addresses.pop(address, "")
        if raw:
            self._raw.forget(raw)
        for key in [k for k in self._channels if k[0] == address]:
            await self._channels.pop(key).close()

    async def fetch_blocks(
        self, address: str, block_hashes: Sequence[BlockHash], *, peer: str = "", model_id: str = "",
        timeout_s: float = 5.0,
    ) -> tuple[list[ExportedBlock], int]:
        """(blocks, bytes received) for the leading blocks of ``block_hashes`` the peer holds.

        ``peer``: the node id the index named for ``address``; with a credential, the peer must prove it.

        Over the peer's raw block stream when it has one (learnt from its first gRPC answer), else over
        the gRPC stream; a raw stream that cannot be reached sends this fetch, and the next ones for a
        while, through gRPC.
        """
        if not block_hashes:
            return [], 0
        if self.member is not None and not peer:
            raise TransferError(f"fetch from {address}: no peer identity to authenticate it against")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        request = pb.FetchBlocksRequest(
            block_hashes=[bytes(h) for h in block_hashes], model_id=model_id,
            max_chunk_bytes=self.max_chunk_bytes, requester=self.requester, accept_bundles=True,
        )
        raw = self._raw_addresses.get(address, "") if self.raw_stream else ""
        if raw and self._raw_down_until.get(raw, 0.0) <= loop.time():
            try:
                return await self._fetch_raw(address, raw, peer, request, block_hashes, timeout_s)
            except RawConnectError:
                self._raw_down_until[raw] = loop.time() + RAW_RETRY_AFTER_S  # gRPC meanwhile
        request.accept_raw_stream = self.raw_stream and address not in self._raw_addresses
        blocks = await self._fetch_grpc(address, peer, request, block_hashes, max(0.0, deadline - loop.time()))
        if blocks is None:  # handed over to the raw stream: send the request again there
            return await self.fetch_blocks(address, block_hashes, peer=peer, model_id=model_id,
                                           timeout_s=max(0.0, deadline - loop.time()))
        return blocks

    async def _fetch_raw(self, address: str, raw: str, peer: str, request: pb.FetchBlocksRequest,
                         block_hashes: Sequence[BlockHash], timeout_s: float) -> tuple[list[ExportedBlock], int]:
        assembler = _Assembler(block_hashes)
        self.num_raw_fetches += 1
        try:
            num_bytes = await asyncio.wait_for(self._raw.fetch(raw, request, assembler.add, peer), timeout_s)
        except asyncio.TimeoutError:
            raise TransferError(f"fetch from {address} (raw stream {raw}) exceeded its {timeout_s:.2f} s "
                                f"deadline after {len(assembler.blocks)} blocks") from None
        except RawConnectError:
            raise
        except RawStreamError as exc:
            raise TransferError(f"fetch from {address} failed: {exc}") from exc
        return assembler.finish(), num_bytes

    async def _fetch_grpc(self, address: str, peer: str, request: pb.FetchBlocksRequest,
                          block_hashes: Sequence[BlockHash], timeout_s: float
                          ) -> tuple[list[ExportedBlock], int] | None:
        """The fetch over the gRPC stream; None when the peer hands it to its raw stream."""
        assembler = _Assembler(block_hashes)
        self.num_grpc_fetches += 1
        member = self.member
        nonce = new_nonce() if member is not None and not member.tls else ""  # TLS: the channel checks the peer
        auth = member.call_metadata(FETCH_METHOD, nonce) if member is not None else ()
        call = self._fetch_method(address, peer)(request, timeout=timeout_s, wait_for_ready=False,
                                                 metadata=(*request_id_metadata(), *auth))
        first = request.accept_raw_stream
        unproven = bool(nonce)
        try:
            async for raw in call:
                if unproven:  # nothing the peer sends counts before it proved who it is
                    await self._check_proof(call, address, peer, nonce)
                    unproven = False
                try:
                    chunks = decode_chunks(raw)
                except ChunkDecodeError as exc:
                    raise TransferError(f"malformed chunk from {address}: {exc}") from exc
                if first:
                    first = False
                    handoff = _raw_handoff(chunks)
                    self._raw_addresses[address] = handoff
                    if handoff:
                        call.cancel()
                        return None
                for chunk in chunks:
                    assembler.add(chunk)
        except TransferError:
            call.cancel()
            raise
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise TransferError(f"fetch from {address} exceeded its {timeout_s:.2f} s deadline "
                                    f"after {len(assembler.blocks)} blocks") from exc
            if code == grpc.StatusCode.UNAVAILABLE:
                await self.forget(address)
            raise TransferError(f"fetch from {address} failed: {code.name}: {exc.details()}") from exc
        except asyncio.CancelledError:
            call.cancel()
            raise
        return assembler.finish(), assembler.num_bytes

    async def _check_proof(self, call: grpc.aio.UnaryStreamCall, address: str, peer: str, nonce: str) -> None:
        assert self.member is not None
        proof = next((v for k, v in await call.initial_metadata() or () if k == PROOF_KEY), "")
        if not self.member.proves(peer, nonce, proof if isinstance(proof, str) else proof.decode("ascii", "replace")):
            raise TransferError(f"{address} did not prove it is {peer!r}: "
                                f"{'a proof that does not verify' if proof else 'no proof in its answer'}")

    async def close(self) -> None:
        self._raw.close()
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()
