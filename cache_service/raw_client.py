"""The requester's side of the raw block stream: kept-open connections per peer, and reading an answer.

``RawStreamPool.fetch`` sends a FetchBlocksRequest as an R frame (``raw_frames``) on a pooled connection,
or a fresh one, and reads the answer block by block:

    send   R header | FetchBlocksRequest
    recv   header 1 | meta 1 + payload 1 + header 2 | meta 2 + payload 2 + header 3 | ...   (until an E header)
                      '--- one recv_into loop ----'   '--- one recv_into loop ----'

Each block's meta, payload and the next frame's header arrive with one ``recv_into`` loop into one
uninitialised buffer (the kernel's copy and nothing else; the payload is a view into it) and go to the
caller's ``add`` as a ``ChunkView``, the shape the gRPC stream decodes to as well: ``transfer_client``
runs one set of checks (order, hashes, token ids) on both streams. The payload's own checksum is
verified when the blocks are imported. A connection carries one fetch at a time; any error, deadline or
cancel closes it, because its position in the stream is then unknown. A pooled connection the peer
closed while idle is replaced by a fresh one; a peer that cannot be reached at all is a
``RawConnectError``, which lets the caller fall back to gRPC.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Callable

from cache_service.chunk_codec import ChunkView
from cache_service.raw_frames import (
    HEADER,
    KIND_END,
    KIND_ERROR,
    KIND_REQUEST,
    FrameError,
    answer_header,
    error_message,
    frame,
    read_block_meta,
)
from cache_service.raw_socket import recv_exactly, tune_socket
from protos.prefixcache.v1 import cache_pb2 as pb

MAX_IDLE_PER_PEER = 4


class RawStreamError(RuntimeError):
    """The raw stream broke the protocol, failed, or the peer reported an error (``str`` says which)."""


class RawConnectError(RawStreamError):
    """No connection could be made (or a pooled one was found closed before any answer)."""


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise RawConnectError(f"bad raw stream address {address!r}")
    return host.strip("[]"), int(port)


class RawStreamPool:
    """Connections to peers' raw block streams (idle ones are kept for the next fetch), on one loop."""

    def __init__(self) -> None:
        self._idle: dict[str, list[socket.socket]] = {}

    async def _connect(self, loop: asyncio.AbstractEventLoop, address: str) -> socket.socket:
        host, port = _split_address(address)
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            family, kind, proto, _, sockaddr = infos[0]
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            raise RawConnectError(f"cannot reach {address}: {exc}") from exc
        sock.setblocking(False)
        tune_socket(sock)
        try:
            await loop.sock_connect(sock, sockaddr)
        except BaseException as exc:
            sock.close()
            if isinstance(exc, OSError):
                raise RawConnectError(f"cannot connect to {address}: {exc}") from exc
            raise
        return sock

    async def fetch(self, address: str, request: pb.FetchBlocksRequest, add: Callable[[ChunkView], None]) -> int:
        """Send ``request`` and pass each block to ``add(ChunkView)``; the number of payload bytes.

        Raises ``RawConnectError`` when nothing was received (the caller may try gRPC instead) and
        ``RawStreamError`` for everything else. Wrap in a deadline: a cancel closes the connection.
        """
        loop = asyncio.get_running_loop()
        message = frame(KIND_REQUEST, request.SerializeToString())
        idle = self._idle.get(address) or []
        while True:
            reused = bool(idle)
            sock = idle.pop() if reused else await self._connect(loop, address)
            try:
                await loop.sock_sendall(sock, message)
                head = await recv_exactly(loop, sock, HEADER.size)
            except (OSError, EOFError) as exc:
                sock.close()
                if reused:
                    continue  # the peer closed an idle connection (e.g. it restarted): try a fresh one
                raise RawConnectError(f"{address} closed the connection before answering: {exc}") from exc
            except BaseException:
                sock.close()
                raise
            break
        ok = False
        try:
            num_bytes = await self._read_answer(loop, sock, address, head, add)
            ok = True
            return num_bytes
        except (OSError, EOFError) as exc:
            raise RawStreamError(f"raw stream from {address} broke: {exc}") from exc
        except FrameError as exc:
            raise RawStreamError(f"{address} {exc}") from None
        finally:
            if ok and len(self._idle.setdefault(address, [])) < MAX_IDLE_PER_PEER:
                self._idle[address].append(sock)
            else:
                sock.close()

    async def _read_answer(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, address: str,
                           head: memoryview, add: Callable[[ChunkView], None]) -> int:
        num_bytes = 0
        while True:
            kind, meta_len, data_len = answer_header(head)
            if kind == KIND_END:
                return num_bytes
            if kind == KIND_ERROR:
                message = error_message(await recv_exactly(loop, sock, meta_len))
                raise RawStreamError(f"{address} answered {message}")
            # A block: its meta and payload, and the header of the frame after it (there always is one).
            buf = await recv_exactly(loop, sock, meta_len + data_len + HEADER.size)
            index, block_hash, token_ids = read_block_meta(buf, meta_len)
            add(ChunkView(index, block_hash, 0, 1, buf[meta_len : meta_len + data_len], token_ids))
            num_bytes += data_len
            head = buf[meta_len + data_len :]

    def forget(self, address: str) -> None:
        for sock in self._idle.pop(address, []):
            sock.close()

    def close(self) -> None:
        for address in list(self._idle):
            self.forget(address)
