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

With a cluster credential (``member``) the requester also makes sure the peer is the member the index named
(``peer``) before it reads a block: under a shared secret a fresh connection sends an A frame (its token
and a nonce) with the first request, and the answer must open with the peer's A frame proving its key;
under mutual TLS the TLS handshake checks the peer's certificate names ``peer``. A peer that cannot prove
it is refused: ``RawStreamError``, and the request recomputes.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Callable

from cache_service.chunk_codec import ChunkView
from cache_service.raw_conn import PlainConn, TlsConn
from cache_service.raw_frames import (
    HEADER,
    KIND_AUTH,
    KIND_END,
    KIND_ERROR,
    KIND_REQUEST,
    RAW_STREAM_METHOD,
    FrameError,
    answer_header,
    error_message,
    frame,
    read_block_meta,
)
from cache_service.raw_socket import tune_socket
from common.cluster_auth import Member, new_nonce
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

    def __init__(self, member: Member | None = None) -> None:
        self.member = member  # None: peers are not asked who they are (tests, one process)
        # (address, the peer's identity) -> authenticated idle connections.
        self._idle: dict[tuple[str, str], list[PlainConn]] = {}

    async def _connect(self, loop: asyncio.AbstractEventLoop, address: str, peer: str) -> PlainConn:
        sock = await self._connect_socket(loop, address)
        context = self.member.client_ssl_context() if self.member is not None else None
        if context is None:
            return PlainConn(loop, sock)
        if not peer:
            sock.close()
            raise RawStreamError(f"no identity to check {address}'s certificate against")
        conn = TlsConn(loop, sock, context, server_side=False, server_hostname=peer)
        try:
            await conn.handshake()
        except ssl.SSLCertVerificationError as exc:  # another CA, or a certificate that does not name `peer`
            sock.close()
            raise RawStreamError(f"{address} did not prove it is {peer!r}: {exc.verify_message}") from None
        except (OSError, EOFError) as exc:  # ssl.SSLError included: refused by the peer, or the network
            sock.close()
            raise RawConnectError(f"TLS handshake with {address} failed: {exc}") from None
        except BaseException:  # the deadline, a cancel
            sock.close()
            raise
        return conn

    async def _connect_socket(self, loop: asyncio.AbstractEventLoop, address: str) -> socket.socket:
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

    async def fetch(self, address: str, request: pb.FetchBlocksRequest, add: Callable[[ChunkView], None],
                    peer: str = "") -> int:
        """Send ``request`` and pass each block to ``add(ChunkView)``; the number of payload bytes.

        ``peer``: the identity the index named for ``address``, checked when the pool has a credential.
        Raises ``RawConnectError`` when nothing was received (the caller may try gRPC instead) and
        ``RawStreamError`` for everything else. Wrap in a deadline: a cancel closes the connection.
        """
        loop = asyncio.get_running_loop()
        message = frame(KIND_REQUEST, request.SerializeToString())
        key = (address, peer)
        idle = self._idle.get(key) or []
        while True:
            reused = bool(idle)
            conn = idle.pop() if reused else await self._connect(loop, address, peer)
            nonce = ""
            first = message
            if not reused and self.member is not None and not conn.tls:  # a shared secret: A first
                nonce = new_nonce()
                first = frame(KIND_AUTH, self.member.token(RAW_STREAM_METHOD, nonce).to_bytes()) + message
            try:
                await conn.sendall(first)
                head = await conn.recv_exactly(HEADER.size)
            except (OSError, EOFError) as exc:
                conn.close()
                if reused:
                    continue  # the peer closed an idle connection (e.g. it restarted): try a fresh one
                raise RawConnectError(f"{address} closed the connection before answering: {exc}") from exc
            except BaseException:
                conn.close()
                raise
            break
        ok = False
        try:
            if nonce:
                head = await self._check_proof(conn, address, peer, nonce, head)
            num_bytes = await self._read_answer(conn, address, head, add)
            ok = True
            return num_bytes
        except (OSError, EOFError) as exc:  # ssl.SSLError included
            raise RawStreamError(f"raw stream from {address} broke: {exc}") from exc
        except FrameError as exc:
            raise RawStreamError(f"{address} {exc}") from None
        finally:
            if ok and len(self._idle.setdefault(key, [])) < MAX_IDLE_PER_PEER:
                self._idle[key].append(conn)
            else:
                conn.close()

    async def _check_proof(self, conn: PlainConn, address: str, peer: str, nonce: str, head: memoryview) -> memoryview:
        """The answer's first frame must be the peer's A proving ``peer``'s key; the header after it."""
        assert self.member is not None
        kind, meta_len, _ = answer_header(head)
        if kind == KIND_ERROR:
            raise RawStreamError(f"{address} answered {error_message(await conn.recv_exactly(meta_len))}")
        if kind != KIND_AUTH:
            raise RawStreamError(f"{address} did not prove it is {peer!r} (its answer opens without an A frame)")
        buf = await conn.recv_exactly(meta_len + HEADER.size)
        proof = bytes(buf[:meta_len]).decode("ascii", "replace")
        if not self.member.proves(peer, nonce, proof):
            raise RawStreamError(f"{address} did not prove it is {peer!r} (its proof does not verify)")
        return buf[meta_len:]

    async def _read_answer(self, conn: PlainConn, address: str, head: memoryview,
                           add: Callable[[ChunkView], None]) -> int:
        num_bytes = 0
        while True:
            kind, meta_len, data_len = answer_header(head)
            if kind == KIND_END:
                return num_bytes
            if kind == KIND_ERROR:
                message = error_message(await conn.recv_exactly(meta_len))
                raise RawStreamError(f"{address} answered {message}")
            if kind == KIND_AUTH:
                raise FrameError("sent an A frame in the middle of an answer")
            # A block: its meta and payload, and the header of the frame after it (there always is one).
            buf = await conn.recv_exactly(meta_len + data_len + HEADER.size)
            index, block_hash, token_ids = read_block_meta(buf, meta_len)
            add(ChunkView(index, block_hash, 0, 1, buf[meta_len : meta_len + data_len], token_ids))
            num_bytes += data_len
            head = buf[meta_len + data_len :]

    def forget(self, address: str) -> None:
        for key in [k for k in self._idle if k[0] == address]:
            for conn in self._idle.pop(key):
                conn.close()

    def close(self) -> None:
        for address in {k[0] for k in self._idle}:
            self.forget(address)
