"""Socket I/O for the raw block stream on an asyncio loop: both ends' options, the receive loop, gathered sends.

Both ends use non-blocking sockets driven by the running event loop (``loop.sock_*``), and try the system
call first: what has already arrived, or what the kernel's buffer takes, costs no trip through the loop.
Received bytes land in one uninitialised buffer each (the kernel's copy and nothing else: the payloads are
views into it); sent payloads go out as they are, gathered by ``sendmsg`` (no join, no copy).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Sequence

import numpy as np

# Socket buffers of both ends: a whole 128 KiB..4 MiB block fits in flight, so a send or a receive
# of one block is one or two system calls rather than a wake-up of the event loop per 64 KiB.
SOCKET_BUFFER_BYTES = 4 << 20


def tune_socket(sock: socket.socket) -> None:
    """The options of both ends of a raw stream (the transfer benchmark gives its baseline the same)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # an end frame must not wait for an ACK
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
        except OSError:  # capped or refused by the system: keep its default
            pass


async def recv_into(loop: asyncio.AbstractEventLoop, sock: socket.socket, view: memoryview) -> None:
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


async def recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> memoryview:
    """``n`` bytes into a fresh, uninitialised buffer (no zero fill: it is overwritten at once)."""
    view = memoryview(np.empty(n, np.uint8))
    await recv_into(loop, sock, view)
    return view


async def send_parts(loop: asyncio.AbstractEventLoop, sock: socket.socket, parts: Sequence) -> None:
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
