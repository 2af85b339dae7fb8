"""BlockTransfer: a worker streams the KV blocks of a prefix chain to a peer (data plane).

``TransferServer`` hosts both of the worker's endpoints on the current event loop, serving one
``BlockTransferServicer``:

    TransferServer
      |- grpc.aio server: BlockTransfer/FetchBlocks   entry point, control path, fallback  (transfer_servicer)
      '- RawStreamListener: the raw block stream      bulk path, named by FetchBlocks       (raw_listener)
           both serve from the servicer's BlockSource: checks, grouped exports, stats, faults  (transfer_source)

The modules of the data plane, each importing only those below it:

    serving:     transfer_server -> transfer_servicer -> transfer_source, chunk_codec, transfer_settings
                                 -> raw_listener      -> transfer_source, raw_frames, raw_socket
    requesting:  transfer_client -> raw_client        -> raw_frames, raw_socket, chunk_codec
                                 -> chunk_codec, transfer_settings
    both streams' connections (plain or TLS): raw_conn; who may fetch: access

With a ``member`` (the worker's identity and the cluster credential) both endpoints serve members only:
the gRPC server checks every call (``common/member_interceptor.py``; under mutual TLS it requires a client
certificate of the cluster CA), and the raw stream authenticates each connection (``raw_listener``).
"""

from __future__ import annotations

import grpc

from cache_service.raw_listener import MAX_REQUEST_BYTES, RawStreamListener
from cache_service.transfer_servicer import BlockTransferServicer, add_transfer_servicer
from cache_service.transfer_settings import DEFAULT_CHUNK_BYTES, HTTP2_MAX_FRAME_BYTES, TRANSFER_MESSAGE_BYTES
from cache_service.transfer_source import TransferFaults
from common.cluster_auth import Member
from common.grpc_edge import EdgeInterceptor
from common.logs import RequestIdInterceptor, get_logger
from common.member_interceptor import MemberInterceptor

log = get_logger("transfer")

# Kept importable from here for cache_node.py and local_node.py (their home modules are named above).
__all__ = ["BlockTransferServicer", "DEFAULT_CHUNK_BYTES", "TransferFaults", "TransferServer"]


class TransferServer:
    """A grpc.aio server hosting BlockTransfer on the *current* event loop, and the raw block stream beside it."""

    def __init__(
        self,
        servicer: BlockTransferServicer,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        advertise_host: str | None = None,
        max_concurrent_rpcs: int = 16,
        raw_stream: bool = True,
        member: Member | None = None,
    ) -> None:
        self.servicer = servicer
        self.member = member  # None: anyone may fetch (tests, one process)
        self.host = host
        self.port = port
        self.advertise_host = advertise_host or host
        self.max_concurrent_rpcs = max_concurrent_rpcs
        self._server: grpc.aio.Server | None = None
        # The bulk path beside gRPC (raw_listener); off, every fetch streams through gRPC.
        self.raw: RawStreamListener | None = (
            RawStreamListener(servicer, host, advertise_host=self.advertise_host, max_concurrent=max_concurrent_rpcs,
                              member=member)
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
                ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),  # requests carry only hashes
                ("grpc.max_metadata_size", 8 << 10),  # a request id (gRPC's default, made explicit)
                # A ~1 MiB message in one HTTP/2 frame instead of 64 of 16 KiB (the peer must allow it too).
                ("grpc.http2.max_frame_size", HTTP2_MAX_FRAME_BYTES),
            ],
            maximum_concurrent_rpcs=self.max_concurrent_rpcs,
            # Request ids; members only (before anything is parsed); status codes at the edge.
            interceptors=[RequestIdInterceptor(), *([MemberInterceptor(self.member)] if self.member else []),
                          EdgeInterceptor(log)],
        )
        add_transfer_servicer(self.servicer, server)
        address = f"{self.host}:{self.port}"
        port = self.member.add_port(server, address) if self.member else server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot bind BlockTransfer to {self.host}:{self.port}")
        await server.start()
        self._server, self.port = server, port
        if self.raw is not None:
            self.servicer.raw_stream_address = await self.raw.start()
        log.info("BlockTransfer listening", extra={"address": self.address,
                                                   "raw_stream_address": self.servicer.raw_stream_address or "off"})
        return self.address

    async def stop(self, grace_s: float = 0.5) -> None:
        server, self._server = self._server, None
        if self.raw is not None:
            self.servicer.raw_stream_address = ""
            await self.raw.stop()
        if server is not None:
            await server.stop(grace_s)
