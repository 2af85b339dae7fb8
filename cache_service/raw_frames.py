"""The raw block stream's frame format: BlockTransfer's bulk path, FetchBlocks framed on a plain TCP socket.

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

Between members holding a shared secret (``common/cluster_auth.py``), a connection opens with one A frame
each way, sent together with the first R (no extra round trip):

    requester -> worker   A  meta = the requester's token for RAW_STREAM_METHOD (identity, time, MAC, nonce)
    worker -> requester   A  meta = the worker's proof: HMAC(its member key, nonce), hex
                          (or X "UNAUTHENTICATED: ..." and close, before anything else)

Under mutual TLS the connection is TLS (``raw_conn``) and the handshake does this instead: no A frames.

This module is the format alone, both directions, no sockets: ``raw_socket`` moves the bytes,
``raw_listener`` is the worker's side, ``raw_client`` the requester's.
"""

from __future__ import annotations

import struct
from typing import Sequence

HEADER = struct.Struct("<B3xIQ")
BLOCK_META = struct.Struct("<I16sI")  # block index, block hash, number of token ids (then the ids, u32 each)
KIND_REQUEST, KIND_BLOCK, KIND_END, KIND_ERROR, KIND_AUTH = b"RBEXA"
# What the A frame's token is made for: not a gRPC method, so that no gRPC token opens a raw stream.
RAW_STREAM_METHOD = "raw-stream:/prefixcache.v1.BlockTransfer/FetchBlocks"
MAX_AUTH_BYTES = 1024  # an A frame's meta: a token or a proof is ~250 bytes
MAX_META_BYTES = 1 << 20  # a request of 8,192 hashes is ~150 KiB; a block's meta is its token ids
MAX_BLOCK_BYTES = 256 << 20  # one block's payload (a 16-token block of a 70B model in fp16 is ~5 MiB)
_ANSWER_KINDS = (KIND_BLOCK, KIND_END, KIND_ERROR, KIND_AUTH)


class FrameError(ValueError):
    """Bytes that break the frame format; the message says how (the caller names the peer)."""


# ---- encoding -------------------------------------------------------------------------------------
def frame(kind: int, meta: bytes = b"", data_len: int = 0) -> bytes:
    """A frame's header and meta; its ``data_len`` bytes of data follow separately (never copied in)."""
    return HEADER.pack(kind, len(meta), data_len) + meta


def error_frame(code: str, message: str) -> bytes:
    return frame(KIND_ERROR, f"{code}: {message}".encode())


def block_meta(index: int, block_hash: bytes, token_ids: Sequence[int]) -> bytes:
    return BLOCK_META.pack(index, block_hash, len(token_ids)) + struct.pack(f"<{len(token_ids)}I", *token_ids)


# ---- decoding -------------------------------------------------------------------------------------
def request_header(head: bytes | memoryview, kind_expected: int = KIND_REQUEST) -> int:
    """The meta length of a requester's frame header; ``FrameError`` unless it is a well-formed R (or A)."""
    kind, meta_len, data_len = HEADER.unpack(head)
    limit = MAX_AUTH_BYTES if kind_expected == KIND_AUTH else MAX_META_BYTES
    if kind != kind_expected or data_len or meta_len > limit:
        raise FrameError(f"malformed {'auth' if kind_expected == KIND_AUTH else 'request'} frame (kind {kind}, "
                         f"meta {meta_len} B, data {data_len} B)")
    return meta_len


def answer_header(head: bytes | memoryview) -> tuple[int, int, int]:
    """(kind, meta_len, data_len) of a worker's frame header, checked before anything more is read:
    within the limits, a kind an answer may have, and a block's meta long enough for its fixed part."""
    kind, meta_len, data_len = HEADER.unpack(head)
    if meta_len > MAX_META_BYTES or data_len > MAX_BLOCK_BYTES:
        raise FrameError(f"sent a frame of {meta_len} + {data_len} bytes, over the limits")
    if kind not in _ANSWER_KINDS:
        raise FrameError(f"sent an unknown frame kind {kind}")
    if kind == KIND_BLOCK and meta_len < BLOCK_META.size:
        raise FrameError(f"sent a block header of {meta_len} bytes")
    if kind == KIND_AUTH and (meta_len > MAX_AUTH_BYTES or data_len):
        raise FrameError(f"sent an auth frame of {meta_len} + {data_len} bytes")
    return kind, meta_len, data_len


def read_block_meta(buf: memoryview, meta_len: int) -> tuple[int, bytes, tuple[int, ...]]:
    """(block index, block hash, token ids) from the first ``meta_len`` bytes of ``buf`` (a B frame's meta)."""
    index, block_hash, num_tokens = BLOCK_META.unpack_from(buf)
    if BLOCK_META.size + 4 * num_tokens != meta_len:
        raise FrameError(f"sent a block header of {meta_len} bytes for {num_tokens} tokens")
    return index, block_hash, struct.unpack_from(f"<{num_tokens}I", buf, BLOCK_META.size)


def error_message(meta: bytes | memoryview) -> str:
    """An X frame's "CODE: message" (undecodable bytes replaced: it is only ever shown)."""
    return bytes(meta).decode("utf-8", "replace")
