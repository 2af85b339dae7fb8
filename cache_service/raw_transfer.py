"""The raw block stream: BlockTransfer's bulk path, FetchBlocks framed on a plain TCP socket.

Why it exists: on loopback, grpcio's Python streaming path often moves less than half of what a plain
socket moves (HTTP/2 framing, and copies into and out of gRPC's buffers for every message; see the
README's cache-service benchmarks), so a prefix that crosses nodes through gRPC alone pays that in wire
time. Production data planes (Mooncake's transfer engine, NIXL) keep the control exchange and the bulk
bytes apart for the same reason. Here gRPC
``FetchBlocks`` stays the entry point, the control path and the fallback: a requester that sets
``accept_raw_stream`` gets a one-message answer naming this stream (``BlockChunk.raw_stream_address``),
and from then on sends the same ``FetchBlocksRequest`` over a persistent TCP connection to it:

    requester -> worker   R  meta = FetchBlocksRequest (serialized)
    worker -> requester   B  meta = block index u32 | hash 16 B | n u32 | n token ids u32,
                             then data_len bytes: the block's payload      (one B per block, in order)
                          E  the chain ends here on this worker (the connection can take the next R)
                          X  meta = "CODE: message" (the fetch failed; the worker closes the connection)

    every frame starts with a 16-byte header (little endian):  kind u8 | 3 pad | meta_len u32 | data_len u64

The requester reads each block's meta, payload and the next frame's header with one ``recv_into`` loop
into one uninitialised buffer (the kernel's copy and nothing else; the payload is a view into it), and
runs the same checks as on the gRPC stream (order, hashes, token ids: ``_Assembler``); the payload's own
checksum is verified when the blocks are imported. A connection carries one fetch at a
time; any error, deadline or cancel closes it, because its position in the stream is then unknown.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from contextlib import aclosing
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from cache_service import validation as v
from cache_service.chunk_codec import ChunkView
from protos.prefixcache.v1 import cache_pb2 as pb

if TYPE_CHECKING:
    from cache_service.transfer_server import BlockTransferServicer

log = logging.getLogger(__name__)

HEADER = struct.Struct("<B3xIQ")
BLOCK_META = struct.Struct("<I16sI")  # block index, block hash, number of token ids (then the ids, u32 each)
KIND_REQUEST, KIND_BLOCK, KIND_END, KIND_ERROR = b"RBEX"
MAX_META_BYTES = 1 << 20  # a request of 8,192 hashes is ~150 KiB; a block's meta is its token ids
MAX_BLOCK_BYTES = 256 << 20  # one block's payload (a 16-token block of a 70B model in fp16 is ~5 MiB)
MAX_IDLE_PER_PEER = 4
SEND_BATCH_BYTES = 1 << 20
SEND_BATCH_PARTS = 64  # well under the kernel's 1,024 buffers per sendmsg
# Socket buffers of both ends: a whole 128 KiB..4 MiB block fits in flight, so a send or a receive
# of one block is one or two system calls rather than a wake-up of the event loop per 64 KiB.
SOCKET_BUFFER_BYTES = 4 << 20


class RawStreamError(RuntimeError):
    """The raw stream broke the protocol, failed, or the peer reported an error (``str`` says which)."""


class RawConnectError(RawStreamError):
    """No connection could be made (or a pooled one was found closed before any answer)."""


def tune_socket(sock: socket.socket) -> None:
    """The options of both ends of a raw stream (the transfer benchmark gives its baseline the same)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # an end frame must not wait for an ACK
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
        except OSError:  # capped or refused by the system: keep its default
            pass


def _frame(kind: int, meta: bytes = b"", data_len: int = 0) -> bytes:
    return HEADER.pack(kind, len(meta), data_len) + meta


def _error_frame(code: str, message: str) -> bytes:
    return _frame(KIND_ERROR, f"{code}: {message}".encode())


async def _recv_into(loop: asyncio.AbstractEventLoop, sock: socket.socket, view: memoryview) -> None:
    """Fill ``view``; ``EOFError`` if the peer closes first."""
    n, got = len(view), 0
    while got < n:
        try:
            k = sock.recv_into(view[got:])  # what has arrived already, without a trip through the loop
        except (BlockingIOError, InterruptedError):
            k = await loop.sock_recv_into(sock, view[got:])
        if k == 0:
            raise EOFError(f"connection closed after {got} of {n} bytes")
        got += k


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> memoryview:
    """``n`` bytes into a fresh, uninitialised buffer (no zero fill: it is overwritten at once)."""
    view = memoryview(np.empty(n, np.uint8))
    await _recv_into(loop, sock, view)
    return view


async def _send_parts(loop: asyncio.AbstractEventLoop, sock: socket.socket, parts: Sequence) -> None:
    """Send ``parts`` in order, gathered by one ``sendmsg`` when the socket takes them (no join, no copy)."""
    views = [memoryview(p).cast("B") for p in parts]
    try:
        sent = sock.sendmsg(views)
    except (BlockingIOError, InterruptedError):
        sent = 0
    for view in views:
        if sent >= len(view):
            sent -= len(view)
            continue
        await loop.sock_sendall(sock, view[sent:])
        sent = 0


def block_meta(index: int, block_hash: bytes, token_ids: Sequence[int]) -> bytes:
    return BLOCK_META.pack(index, block_hash, len(token_ids)) + struct.pack(f"<{len(token_ids)}I", *token_ids)


async def _linger(loop: asyncio.AbstractEventLoop, sock: socket.socket, timeout_s: float = 1.0) -> None:
    """Close politely after an error frame: closing with unread bytes in the socket would send a reset,
    and the requester could lose the frame that says what was wrong."""
    sock.shutdown(socket.SHUT_WR)
    drained = 0
    try:
        while drained < MAX_META_BYTES:
            got = await asyncio.wait_for(loop.sock_recv(sock, 65536), timeout_s)
            if not got:
                return
            drained += len(got)
    except (TimeoutError, OSError):
        pass


# ---- the worker's side ----------------------------------------------------------------------------
class RawStreamListener:
    """Serves the raw block stream for a ``BlockTransferServicer`` on the current event loop."""

    def __init__(self, servicer: BlockTransferServicer, host: str, *, advertise_host: str,
                 max_concurrent: int = 16) -> None:
        self.servicer = servicer
        self.host = host
        self.advertise_host = advertise_host
        self.max_concurrent = max_concurrent
        self.port = 0
        self.num_active = 0
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task | None = None
        self._conns: dict[socket.socket, asyncio.Task] = {}

    @property
    def address(self) -> str:
        return f"{self.advertise_host}:{self.port}"

    async def start(self) -> str:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, 0))
        listener.listen(64)
        listener.setblocking(False)
        self._listener, self.port = listener, listener.getsockname()[1]
        self._accept_task = asyncio.ensure_future(self._accept_loop(listener))
        return self.address

    async def stop(self) -> None:
        listener, self._listener = self._listener, None
        if self._accept_task is not None:
            self._accept_task.cancel()
            await asyncio.gather(self._accept_task, return_exceptions=True)
            self._accept_task = None
        if listener is not None:
            listener.close()
        tasks = list(self._conns.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as exc:  # e.g. out of file descriptors: keep serving the others
                log.warning("raw block stream: accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            tune_socket(conn)
            self._conns[conn] = asyncio.ensure_future(self._serve(conn))

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    head = await _recv_exactly(loop, conn, HEADER.size)
                except EOFError:
                    return  # the requester closed its connection
                kind, meta_len, data_len = HEADER.unpack(head)
                if kind != KIND_REQUEST or data_len or meta_len > MAX_META_BYTES:
                    problem = f"malformed request frame (kind {kind}, meta {meta_len} B, data {data_len} B)"
                    await loop.sock_sendall(conn, _error_frame("INVALID_ARGUMENT", problem))
                    return await _linger(loop, conn)
                try:
                    request = pb.FetchBlocksRequest.FromString(bytes(await _recv_exactly(loop, conn, meta_len)))
                except EOFError:
                    return
                except Exception:  # protobuf's DecodeError
                    await loop.sock_sendall(conn, _error_frame("INVALID_ARGUMENT",
                                                               "the request is not a FetchBlocksRequest"))
                    return await _linger(loop, conn)
                if not await self._answer(loop, conn, request):
                    return await _linger(loop, conn)
        except (ConnectionError, OSError, EOFError):
            pass  # the requester went away mid-answer (deadline, cancel, death)
        finally:
            conn.close()
            self._conns.pop(conn, None)

    async def _answer(self, loop: asyncio.AbstractEventLoop, conn: socket.socket,
                      request: pb.FetchBlocksRequest) -> bool:
        """Stream one fetch; False when the connection must close (after an error frame)."""
        servicer = self.servicer
        try:
            hashes = servicer.check(request)
        except v.InvalidRequest as exc:
            servicer.stats.num_rejected += 1
            await loop.sock_sendall(conn, _error_frame("INVALID_ARGUMENT", str(exc)))
            return False
        if self.num_active >= self.max_concurrent:
            # As the gRPC server's cap: the requester recomputes instead of queueing behind us.
            await loop.sock_sendall(conn, _error_frame("RESOURCE_EXHAUSTED",
                                                       f"{self.max_concurrent} fetches in flight"))
            return False
        self.num_active += 1
        servicer.stats.num_raw_requests += 1
        faults = servicer.faults
        sent = []
        # Frames wait here and go out together: one sendmsg for up to SEND_BATCH_BYTES of blocks, not
        # one system call and one trip through the loop per block.
        parts: list = []
        pending = 0
        try:
            async with aclosing(servicer.exported(hashes)) as blocks:
                async for block in blocks:
                    index, block_hash, token_ids, payload = len(sent), block.block_hash, block.token_ids, block.payload
                    if faults.delay_s:
                        await asyncio.sleep(faults.delay_s)
                    if faults.corrupt is not None:
                        altered = faults.corrupt(pb.BlockChunk(block_index=index, block_hash=block_hash,
                                                               num_chunks=1, data=bytes(payload), token_ids=token_ids))
                        index, block_hash = altered.block_index, altered.block_hash
                        token_ids, payload = tuple(altered.token_ids), altered.data
                    meta = block_meta(index, block_hash, token_ids)
                    parts += (_frame(KIND_BLOCK, meta, len(payload)), payload)  # the payload is not copied
                    size = HEADER.size + len(meta) + len(payload)
                    pending += size
                    servicer.stats.num_bytes += size
                    sent.append(block.block_hash)
                    if pending >= SEND_BATCH_BYTES or len(parts) >= SEND_BATCH_PARTS or faults.delay_s:
                        await _send_parts(loop, conn, parts)
                        parts, pending = [], 0
        finally:
            self.num_active -= 1
        parts.append(_frame(KIND_END))
        await _send_parts(loop, conn, parts)
        servicer.finish(request.requester, sent)
        return True


# ---- the requester's side -------------------------------------------------------------------------
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
        message = _frame(KIND_REQUEST, request.SerializeToString())
        idle = self._idle.get(address) or []
        while True:
            reused = bool(idle)
            sock = idle.pop() if reused else await self._connect(loop, address)
            try:
                await loop.sock_sendall(sock, message)
                head = await _recv_exactly(loop, sock, HEADER.size)
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
        finally:
            if ok and len(self._idle.setdefault(address, [])) < MAX_IDLE_PER_PEER:
                self._idle[address].append(sock)
            else:
                sock.close()

    async def _read_answer(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, address: str,
                           head: memoryview, add: Callable[[ChunkView], None]) -> int:
        num_bytes = 0
        while True:
            kind, meta_len, data_len = HEADER.unpack(head)
            if meta_len > MAX_META_BYTES or data_len > MAX_BLOCK_BYTES:
                raise RawStreamError(f"{address} sent a frame of {meta_len} + {data_len} bytes, over the limits")
            if kind == KIND_END:
                return num_bytes
            if kind == KIND_ERROR:
                message = bytes(await _recv_exactly(loop, sock, meta_len)).decode("utf-8", "replace")
                raise RawStreamError(f"{address} answered {message}")
            if kind != KIND_BLOCK:
                raise RawStreamError(f"{address} sent an unknown frame kind {kind}")
            if meta_len < BLOCK_META.size:
                raise RawStreamError(f"{address} sent a block header of {meta_len} bytes")
            # This block's meta and payload, and the header of the frame after it (there always is one).
            buf = await _recv_exactly(loop, sock, meta_len + data_len + HEADER.size)
            index, block_hash, num_tokens = BLOCK_META.unpack_from(buf)
            if BLOCK_META.size + 4 * num_tokens != meta_len:
                raise RawStreamError(f"{address} sent a block header of {meta_len} bytes for {num_tokens} tokens")
            token_ids = struct.unpack_from(f"<{num_tokens}I", buf, BLOCK_META.size)
            add(ChunkView(index, block_hash, 0, 1, buf[meta_len : meta_len + data_len], token_ids))
            num_bytes += data_len
            head = buf[meta_len + data_len :]

    def forget(self, address: str) -> None:
        for sock in self._idle.pop(address, []):
            sock.close()

    def close(self) -> None:
        for address in list(self._idle):
            self.forget(address)


def raw_handoff(chunks: Sequence[ChunkView]) -> str:
    """The raw stream address of a FetchBlocks answer that hands the fetch over, else ''."""
    return chunks[0].raw_stream_address if len(chunks) == 1 and not chunks[0].data else ""
