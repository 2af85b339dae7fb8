"""The worker's side of the raw block stream: accept requesters, answer each FetchBlocksRequest in frames.

Each accepted connection is served by its own task, one fetch at a time, for as long as the requester
keeps it open (the frames: ``raw_frames``):

    accept -> read R -> check (BlockSource) -> B B B ... E -> read the next R ...
                     -> X if malformed, rejected or over the cap -> linger -> close
    accept -> X RESOURCE_EXHAUSTED -> close, when max_connections are open already
    no complete R within idle_timeout_s (idle, or half sent) -> close, without a frame

With a cluster credential (``member``) only members are served, and only for themselves (``access``):

    shared secret   accept -> read A (the requester's token) -> A (our proof) -> read R ...
                    -> X "UNAUTHENTICATED: ..." -> linger -> close   when the first frame is not a valid A
    mutual TLS      accept -> TLS handshake (a client certificate of the CA, or closed) -> read R ...
    either          R from a non-node, or for another requester -> X "PERMISSION_DENIED: ..." -> close

Every connection is bounded (trust model: one requester cannot hurt the others): at most
``max_connections`` open, a request frame of at most ``MAX_REQUEST_BYTES`` (above the largest valid
request; more is INVALID_ARGUMENT), ``idle_timeout_s`` to send a whole request and the same
for every gathered send of the answer to make progress. An idle pooled connection closed that way
costs its requester one reconnect (``raw_client`` retries a pooled connection found closed).

The blocks come from the same ``BlockSource`` as the gRPC stream's (``transfer_source``: request check,
grouped exports, stats, test faults), so the two streams answer alike. Frames wait and go out together,
one gathered ``sendmsg`` for up to ``SEND_BATCH_BYTES`` (the payloads are not copied). Any error frame
closes the connection: after it, the requester cannot know where the stream stands.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from contextlib import aclosing

from cache_service import access
from cache_service import validation as v
from cache_service.raw_conn import PlainConn, TlsConn
from cache_service.raw_frames import (
    HEADER,
    KIND_AUTH,
    KIND_BLOCK,
    KIND_END,
    MAX_META_BYTES,
    RAW_STREAM_METHOD,
    FrameError,
    block_meta,
    error_frame,
    frame,
    request_header,
)
from cache_service.raw_socket import tune_socket
from cache_service.transfer_source import MAX_FETCH_BLOCKS, BlockSource
from common.cluster_auth import AuthError, Caller, Member, Token, peer_names
from common.logs import get_logger
from protos.prefixcache.v1 import cache_pb2 as pb

log = get_logger("transfer")

SEND_BATCH_BYTES = 1 << 20
SEND_BATCH_PARTS = 64  # well under the kernel's 1,024 buffers per sendmsg
DEFAULT_MAX_CONNECTIONS = 256  # requesters keep up to 4 open each (raw_client.MAX_IDLE_PER_PEER)
DEFAULT_IDLE_TIMEOUT_S = 30.0
LISTEN_BACKLOG = 512
# The largest FetchBlocksRequest the worker reads, on either stream: MAX_FETCH_BLOCKS hashes (18 bytes each
# on the wire: ~144 KiB) plus a model id and a requester name fit well within it.
MAX_REQUEST_BYTES = 256 << 10
assert MAX_FETCH_BLOCKS * 18 + (8 << 10) <= MAX_REQUEST_BYTES


async def _linger(conn: PlainConn, timeout_s: float = 1.0) -> None:
    """Close politely after an error frame: closing with unread bytes in the socket would send a reset,
    and the requester could lose the frame that says what was wrong."""
    try:
        conn.shutdown_write()
        drained = 0
        while drained < MAX_META_BYTES:
            got = await asyncio.wait_for(conn.recv_some(65536), timeout_s)
            if not got:
                return
            drained += len(got)
    except (TimeoutError, OSError, EOFError, ssl.SSLError):
        pass


class _Refused(Exception):
    """A connection that does not authenticate: ``frame`` says why (None: close without a word, as after a
    failed TLS handshake, where no frame can be read by the other side)."""

    def __init__(self, frame: bytes | None) -> None:
        super().__init__()
        self.frame = frame


class RawStreamListener:
    """Serves the raw block stream for a ``BlockSource`` on the current event loop."""

    def __init__(self, source: BlockSource, host: str, *, advertise_host: str, max_concurrent: int = 16,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S, member: Member | None = None) -> None:
        self.source = source
        self.member = member  # None: anyone may fetch (tests, one process)
        self.host = host
        self.advertise_host = advertise_host
        self.max_concurrent = max_concurrent  # fetches being answered
        self.max_connections = max_connections  # connections open (answering or waiting for a request)
        self.idle_timeout_s = idle_timeout_s
        self.port = 0
        self.num_active = 0
        self.num_refused = 0  # connections turned away: max_connections were open
        self.num_timed_out = 0  # connections closed: no complete request, or no progress sending, in time
        self.num_unauthenticated = 0  # connections closed: no valid token, or a failed TLS handshake
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
        listener.listen(LISTEN_BACKLOG)
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
                log.warning("raw block stream: accept failed", extra={"address": self.address, "error": str(exc)})
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            if len(self._conns) >= self.max_connections:
                self._refuse(conn)
                continue
            tune_socket(conn)
            self._conns[conn] = asyncio.ensure_future(self._serve(conn))

    def _refuse(self, conn: socket.socket) -> None:
        """Say why in one frame (a fresh socket's buffer takes it whole, or it is lost) and close at once: a
        refused connection holds nothing, and its requester recomputes (or retries) at once. Under TLS no
        plain frame can be read by the requester: it only sees the connection close."""
        self.num_refused += 1
        if self.member is None or not self.member.tls:
            try:
                conn.send(error_frame("RESOURCE_EXHAUSTED", f"{len(self._conns)} raw stream connections are open; "
                                                            f"the limit is {self.max_connections}"))
            except OSError:
                pass
        conn.close()

    async def _open(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> tuple[PlainConn, Caller | None]:
        """The connection and its verified caller (None without a credential); ``_Refused`` when it does not
        authenticate, ``EOFError`` when the requester closed first."""
        member = self.member
        if member is None:
            return PlainConn(loop, sock), None
        context = member.server_ssl_context()
        if context is not None:  # mutual TLS: the handshake is the authentication
            conn = TlsConn(loop, sock, context, server_side=True)
            try:
                await conn.handshake()
            except (ssl.SSLError, OSError) as exc:  # no certificate, another CA, plaintext, ...
                log.info("raw block stream: TLS handshake refused", extra={"error": str(exc)[:200]})
                raise _Refused(None) from None
            return conn, Caller(peer_names(conn.peer_cert()))
        conn = PlainConn(loop, sock)
        head = await conn.recv_exactly(HEADER.size)
        try:
            token = Token.from_bytes(await conn.recv_exactly(request_header(head, KIND_AUTH)))
            caller = member.verify_token(token, RAW_STREAM_METHOD)
        except FrameError:
            raise _Refused(error_frame("UNAUTHENTICATED", "the raw block stream serves cluster members only: a "
                                                          "connection opens with an A frame carrying a token")) from None
        except AuthError as exc:
            raise _Refused(error_frame(exc.code, str(exc))) from None
        await conn.sendall(frame(KIND_AUTH, member.prove(token.nonce).encode() if token.nonce else b""))
        return conn, caller

    async def _serve(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        conn: PlainConn = PlainConn(loop, sock)
        try:
            try:
                async with asyncio.timeout(self.idle_timeout_s):
                    conn, caller = await self._open(loop, sock)
            except _Refused as refused:
                self.num_unauthenticated += 1
                if refused.frame is not None:
                    await conn.sendall(refused.frame)
                    await _linger(conn)
                return
            while True:
                try:
                    async with asyncio.timeout(self.idle_timeout_s):
                        request = await self._read_request(conn)
                except TimeoutError:
                    self.num_timed_out += 1
                    return  # idle or half sent: close (a pooled requester reconnects on its next fetch)
                if request is None:
                    return  # the requester closed its connection
                if isinstance(request, bytes):  # the error frame that answers a malformed request
                    await conn.sendall(request)
                    return await _linger(conn)
                if not await self._answer(conn, request, caller):
                    return await _linger(conn)
        except TimeoutError:
            self.num_timed_out += 1  # no handshake in time, or the requester stopped reading the answer
        except (ConnectionError, OSError, EOFError, ssl.SSLError):
            pass  # the requester went away mid-answer (deadline, cancel, death)
        finally:
            conn.close()
            self._conns.pop(sock, None)

    @staticmethod
    async def _read_request(conn: PlainConn) -> pb.FetchBlocksRequest | bytes | None:
        """The next request; None when the requester closed the connection; or the error frame to send back."""
        try:
            head = await conn.recv_exactly(HEADER.size)
        except EOFError:
            return None
        try:
            meta_len = request_header(head)
        except FrameError as exc:
            return error_frame("INVALID_ARGUMENT", str(exc))
        if meta_len > MAX_REQUEST_BYTES:  # refused before a buffer of that size is made
            return error_frame("INVALID_ARGUMENT", f"a request frame of {meta_len} bytes is over the limit of "
                                                   f"{MAX_REQUEST_BYTES} bytes")
        try:
            meta = await conn.recv_exactly(meta_len)
        except EOFError:
            return None
        try:
            return pb.FetchBlocksRequest.FromString(bytes(meta))
        except Exception:  # protobuf's DecodeError
            return error_frame("INVALID_ARGUMENT", "the request is not a FetchBlocksRequest")

    async def _send(self, conn: PlainConn, parts: list) -> None:
        # A requester that stops reading must not hold a fetch slot (and its exported blocks) forever.
        async with asyncio.timeout(self.idle_timeout_s):
            await conn.send_parts(parts)

    async def _answer(self, conn: PlainConn, request: pb.FetchBlocksRequest, caller: Caller | None) -> bool:
        """Stream one fetch; False when the connection must close (after an error frame)."""
        source = self.source
        try:
            access.check_fetch(caller, request.requester)
            hashes = source.check(request)
        except AuthError as exc:
            await conn.sendall(error_frame(exc.code, str(exc)))
            return False
        except v.InvalidRequest as exc:
            await conn.sendall(error_frame("INVALID_ARGUMENT", str(exc)))
            return False
        if self.num_active >= self.max_concurrent:
            # As the gRPC server's cap: the requester recomputes instead of queueing behind us.
            await conn.sendall(error_frame("RESOURCE_EXHAUSTED", f"{self.max_concurrent} fetches in flight"))
            return False
        self.num_active += 1
        source.stats.num_raw_requests += 1
        faults = source.faults
        sent = []
        # Frames wait here and go out together: one sendmsg for up to SEND_BATCH_BYTES of blocks, not
        # one system call and one trip through the loop per block.
        parts: list = []
        pending = 0
        try:
            async with aclosing(source.exported(hashes)) as blocks:
                async for block in blocks:
                    await faults.pause()
                    index, block_hash, token_ids, payload = faults.alter_block(len(sent), block)
                    meta = block_meta(index, block_hash, token_ids)
                    parts += (frame(KIND_BLOCK, meta, len(payload)), payload)  # the payload is not copied
                    size = HEADER.size + len(meta) + len(payload)
                    pending += size
                    source.stats.num_bytes += size
                    sent.append(block.block_hash)
                    if pending >= SEND_BATCH_BYTES or len(parts) >= SEND_BATCH_PARTS or faults.delay_s:
                        await self._send(conn, parts)
                        parts, pending = [], 0
        finally:
            self.num_active -= 1
        parts.append(frame(KIND_END))
        await self._send(conn, parts)
        source.finish(request.requester, sent)
        return True
