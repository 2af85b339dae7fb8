"""``BlockChunk`` wire encoding by hand: the transfer hot path without protobuf's extra copies.

A block chunk is mostly one large ``bytes`` field. Building a protobuf
message, serializing it and parsing it on the other side copies that field
three more times than needed, which on loopback costs more than the socket
itself. So the BlockTransfer endpoint encodes and decodes ``BlockChunk``
directly in the protobuf wire format (byte-identical to
``BlockChunk.SerializeToString()``, see tests): a message is assembled from
parts with one ``join`` (the payload's one copy on the sending side) and
its payloads are received as ``memoryview`` slices.

    field 1 block_index  varint      field 5 data        bytes
    field 2 block_hash   bytes       field 6 token_ids   packed varints
    field 3 chunk_index  varint      field 7 bundled     BlockChunk (repeated):
    field 4 num_chunks   varint                          the chunks that follow, same message
                                     field 8 raw_stream_address  string (the raw stream's answer)

Zero-valued scalars and empty fields are omitted (proto3 canonical form);
the decoder accepts any field order and skips unknown fields.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

Part = bytes | bytearray | memoryview


class ChunkView(NamedTuple):
    """One chunk as either stream delivers it to the requester's checks (a raw-stream block is one chunk)."""

    block_index: int
    block_hash: bytes
    chunk_index: int
    num_chunks: int
    data: memoryview | bytes
    token_ids: tuple[int, ...]
    raw_stream_address: str = ""  # field 8: only in the answer that hands the fetch to the raw stream


class ChunkDecodeError(ValueError):
    """The bytes are not a well-formed BlockChunk."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def chunk_parts(
    block_index: int,
    block_hash: bytes,
    chunk_index: int,
    num_chunks: int,
    data: Part,
    token_ids: Sequence[int] = (),
) -> tuple[list[Part], int]:
    """One BlockChunk as a list of byte parts (``data`` is not copied) and its total length."""
    head = bytearray()
    if block_index:
        head += b"\x08" + _varint(block_index)
    if block_hash:
        head += b"\x12" + _varint(len(block_hash)) + block_hash
    if chunk_index:
        head += b"\x18" + _varint(chunk_index)
    if num_chunks:
        head += b"\x20" + _varint(num_chunks)
    parts: list[Part] = [head]
    if len(data):
        head += b"\x2a" + _varint(len(data))
        parts.append(data)
    if token_ids:
        packed = b"".join(_varint(int(t)) for t in token_ids)
        parts.append(b"\x32" + _varint(len(packed)) + packed)
    return parts, sum(len(p) for p in parts)


def bundle(chunks: Sequence[tuple[list[Part], int]]) -> bytes:
    """Serialize chunks as one message: the first at top level, the rest in ``bundled``."""
    parts, _ = chunks[0]
    out = list(parts)
    for inner, size in chunks[1:]:
        out.append(b"\x3a" + _varint(size))
        out.extend(inner)
    return b"".join(out)  # the one copy of the payloads


def encode_chunk(block_index: int, block_hash: bytes, chunk_index: int, num_chunks: int, data: Part,
                 token_ids: Sequence[int] = ()) -> bytes:
    return bundle([chunk_parts(block_index, block_hash, chunk_index, num_chunks, data, token_ids)])


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise ChunkDecodeError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ChunkDecodeError("varint longer than 64 bits")


def _decode(buf: memoryview, pos: int, end: int, out: list[ChunkView], depth: int) -> None:
    scalars = {1: 0, 3: 0, 4: 0}
    block_hash = b""
    data: memoryview = buf[0:0]
    tokens: list[int] = []
    nested: list[tuple[int, int]] = []
    raw_address = ""
    while pos < end:
        key, pos = _read_varint(buf, pos, end)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos, end)
            if num in scalars:
                scalars[num] = value
            elif num == 6:
                tokens.append(value)  # unpacked repeated encoding
        elif wire == 2:
            length, pos = _read_varint(buf, pos, end)
            stop = pos + length
            if stop > end:
                raise ChunkDecodeError(f"field {num} runs past the end of the message")
            if num == 2:
                block_hash = bytes(buf[pos:stop])
            elif num == 5:
                data = buf[pos:stop]
            elif num == 6:
                p = pos
                while p < stop:
                    value, p = _read_varint(buf, p, stop)
                    tokens.append(value)
            elif num == 7:
                nested.append((pos, stop))
            elif num == 8:
                try:
                    raw_address = str(buf[pos:stop], "utf-8")
                except UnicodeDecodeError:
                    raise ChunkDecodeError("raw_stream_address is not UTF-8") from None
            pos = stop
        elif wire == 5:
            pos += 4
        elif wire == 1:
            pos += 8
        else:
            raise ChunkDecodeError(f"unsupported wire type {wire} for field {num}")
    if pos != end:
        raise ChunkDecodeError("message ends inside a field")
    out.append(ChunkView(scalars[1], block_hash, scalars[3], scalars[4], data, tuple(tokens), raw_address))
    if nested and depth > 0:
        raise ChunkDecodeError("a bundled chunk carries bundled chunks itself")
    for start, stop in nested:
        _decode(buf, start, stop, out, depth + 1)


def decode_chunks(raw: Part) -> list[ChunkView]:
    """Parse a serialized BlockChunk: itself, then its bundled chunks (``data`` are views into ``raw``)."""
    buf = memoryview(raw)
    out: list[ChunkView] = []
    _decode(buf, 0, len(buf), out, 0)
    return out
