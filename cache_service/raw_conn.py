"""One raw block stream connection, plain TCP or TLS, behind the few calls both ends make.

    PlainConn   the bytes as ``raw_socket`` moves them: recv_into the caller's buffer, gathered sendmsg
    TlsConn     the same calls through an ``ssl.SSLObject`` over memory BIOs (mutual TLS between members)

Why memory BIOs and not ``ssl.SSLSocket``: an SSLSocket reads a TLS record (16 KiB) per system call, and an
asyncio loop's ``sock_*`` calls refuse it. Here ciphertext moves between the kernel and OpenSSL in pieces
of up to ``TLS_IO_BYTES`` (one ``recv_into``, one ``sendall`` each), and OpenSSL only encrypts and decrypts
in memory, straight into the caller's buffer on the receiving side:

    send   payload --SSLObject.write (encrypt)--> outgoing BIO --read, sendall--> socket
    recv   socket --recv_into--> scratch --write--> incoming BIO --SSLObject.read (decrypt)--> caller's buffer

Both kinds are driven by the running event loop and never block it. A TLS handshake or a read that fails
verification raises ``ssl.SSLError`` (the caller says who could not prove what); a peer that closes raises
``EOFError``, as ``raw_socket`` does.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any, Sequence

import numpy as np

from cache_service.raw_socket import recv_into, send_parts

TLS_IO_BYTES = 1 << 20  # ciphertext per system call (kernel <-> OpenSSL)


class PlainConn:
    tls = False

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self.loop = loop
        self.sock = sock

    async def recv_into(self, view: memoryview) -> None:
        await recv_into(self.loop, self.sock, view)

    async def recv_exactly(self, n: int) -> memoryview:
        view = memoryview(np.empty(n, np.uint8))  # uninitialised: overwritten at once
        await self.recv_into(view)
        return view

    async def recv_some(self, max_bytes: int) -> bytes:
        return await self.loop.sock_recv(self.sock, max_bytes)

    async def send_parts(self, parts: Sequence[Any]) -> None:
        await send_parts(self.loop, self.sock, parts)

    async def sendall(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    def shutdown_write(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()


class TlsConn(PlainConn):
    tls = True

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, context: ssl.SSLContext, *,
                 server_side: bool, server_hostname: str | None = None) -> None:
        super().__init__(loop, sock)
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side,
                                    server_hostname=server_hostname)
        self._scratch = memoryview(bytearray(TLS_IO_BYTES))

    async def handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
        await self._flush()  # the last flight (the client's Finished, the server's tickets)

    def peer_cert(self) -> dict[str, Any]:
        return self.obj.getpeercert() or {}

    async def _fill(self) -> None:
        """More ciphertext from the kernel into the incoming BIO; ``EOFError`` when the peer closed."""
        try:
            k = self.sock.recv_into(self._scratch)
        except (BlockingIOError, InterruptedError):
            k = await self.loop.sock_recv_into(self.sock, self._scratch)
        if k == 0:
            self._incoming.write_eof()
            raise EOFError("the peer closed the TLS connection")
        self._incoming.write(self._scratch[:k])

    async def _flush(self) -> None:
        if self._outgoing.pending:
            await self.loop.sock_sendall(self.sock, self._outgoing.read())

    async def recv_into(self, view: memoryview) -> None:
        n, got = len(view), 0
        while got < n:
            try:
                k = self.obj.read(n - got, view[got:])  # decrypts what the BIO holds, up to a record
            except ssl.SSLWantReadError:
                await self._flush()  # a post-handshake message may want an answer
                await self._fill()
                continue
            except ssl.SSLZeroReturnError:
                raise EOFError(f"the peer closed the TLS connection after {got} of {n} bytes") from None
            if k == 0:
                raise EOFError(f"connection closed after {got} of {n} bytes")
            got += k

    async def recv_some(self, max_bytes: int) -> bytes:
        view = memoryview(bytearray(max_bytes))
        while True:
            try:
                k = self.obj.read(max_bytes, view)
                return bytes(view[:k])
            except ssl.SSLWantReadError:
                await self._flush()
                try:
                    await self._fill()
                except EOFError:
                    return b""
            except ssl.SSLZeroReturnError:
                return b""

    async def send_parts(self, parts: Sequence[Any]) -> None:
        for part in parts:
            view = memoryview(part).cast("B")
            for i in range(0, len(view), TLS_IO_BYTES):
                self.obj.write(view[i : i + TLS_IO_BYTES])  # encrypts into the outgoing BIO (never blocks)
                if self._outgoing.pending >= TLS_IO_BYTES:
                    await self._flush()
        await self._flush()

    async def sendall(self, data: bytes) -> None:
        await self.send_parts([data])

    def shutdown_write(self) -> None:
        try:
            self.obj.unwrap()  # queues close_notify (the peer's answer is not awaited)
        except ssl.SSLError:
            pass
        if self._outgoing.pending:
            try:
                self.sock.send(self._outgoing.read())
            except OSError:
                pass
        self.sock.shutdown(socket.SHUT_WR)
