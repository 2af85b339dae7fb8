"""The disk tier: one file per block in a local directory, bounded in bytes, LRU by access time, kept across
restarts.

Where (one folder per model, KV dtype and block shape, so engines of different models can share a root):

    <root>/<model id>-<dtype>-<8 hex of the block shape>/<32 hex of the block hash>.kvb

A file (little endian):

    offset  size  field
    0       4     magic b"PCDB"
    4       2     file version (1)
    6       2     n: tokens in the block
    8       4n    the block's token ids (u32): a hit still compares them with the prompt
    .       8     xxh3_64 of the bytes above
    .       ...   the block as one block-wire payload (cache_service/block_wire.py): its own header (model id,
                  dtype, shape, block hash) and the xxh3_64 of the K/V

Checks: at start-up every file's header is read (not its data) and a file that is not ours, of another
model, dtype or shape, filed under another hash, or whose size disagrees with its header is deleted; the rest
is published as held. A hit reads the whole file and checks the payload's checksum before anything is copied
into the device pool or sent to a peer; a file that fails is deleted and the block recomputed. A block is
written to ``.<name>.<pid>.tmp`` and renamed over its final name, so a crash leaves a stray temp file (deleted
at the next start), never a half-written block under a real name; ``fsync=True`` also survives a power cut.

LRU order lives in memory and in the files' modification times (a hit sets it), so a restart keeps it. The
sum of file sizes stays within ``capacity_bytes``: putting a block deletes the least recently used files first.
Everything runs on the caller's (the engine's) thread.
"""

from __future__ import annotations

import os
import re
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import xxhash

from cache_service.block_hash import HASH_NBYTES, BlockHash
from cache_service.block_wire import BlockImportError, check_payload, read_header

FILE_MAGIC = b"PCDB"
FILE_VERSION = 1
SUFFIX = ".kvb"
_HEADER_READ = 8192  # enough for the file header and the payload header of any block we write
_NAME = re.compile(r"^[0-9a-f]{32}\.kvb$")


@dataclass(slots=True)
class DiskEntry:
    token_ids: tuple[int, ...]
    num_bytes: int


def folder_name(model_id: str, dtype: str, block_shape: tuple[int, ...]) -> str:
    """The folder of one model + KV dtype + block shape (block size, layers, heads) under the root."""
    safe = re.sub(r"[^A-Za-z0-9._@-]", "_", model_id)[:96]
    shape = xxhash.xxh3_64_hexdigest(",".join(map(str, block_shape)).encode())[:8]
    return f"{safe}-{dtype}-{shape}"


def encode_file(token_ids: tuple[int, ...], payload: bytes) -> bytes:
    head = FILE_MAGIC + struct.pack("<HH", FILE_VERSION, len(token_ids)) + struct.pack(f"<{len(token_ids)}I", *token_ids)
    return head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head)) + payload


def decode_file_header(buf: bytes | memoryview) -> tuple[tuple[int, ...], int]:
    """(token ids, offset of the payload) of a file's first bytes; BlockImportError when they are not ours."""
    buf = memoryview(buf)
    if len(buf) < 8 or bytes(buf[:4]) != FILE_MAGIC:
        raise BlockImportError("not a prefixcache disk block (bad magic)")
    version, n = struct.unpack_from("<HH", buf, 4)
    if version != FILE_VERSION:
        raise BlockImportError(f"unsupported disk block version {version}")
    end = 8 + 4 * n
    if len(buf) < end + 8:
        raise BlockImportError("disk block header is truncated")
    (checksum,) = struct.unpack_from("<Q", buf, end)
    if xxhash.xxh3_64_intdigest(buf[:end]) != checksum:
        raise BlockImportError("disk block header failed its checksum")
    return tuple(struct.unpack_from(f"<{n}I", buf, 8)), end + 8


class DiskTier:
    def __init__(self, root: str | os.PathLike, capacity_bytes: int, *, model_id: str, dtype: str,
                 block_shape: tuple[int, ...], fsync: bool = False) -> None:
        if capacity_bytes < 1:
            raise ValueError(f"the disk tier needs a positive capacity, got {capacity_bytes} bytes")
        self.model_id = model_id
        self.dtype = dtype
        self.block_shape = tuple(block_shape)
        self.block_size = self.block_shape[2]
        self.capacity_bytes = capacity_bytes
        self.fsync = fsync
        self.directory = Path(root) / folder_name(model_id, dtype, self.block_shape)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.entries: OrderedDict[BlockHash, DiskEntry] = OrderedDict()  # least recently used first
        self.num_bytes = 0
        self.num_dropped = 0  # files deleted as corrupt, truncated or foreign
        self.num_written = 0
        self._scan()

    # ---- start-up --------------------------------------------------------
    def _scan(self) -> None:
        found: list[tuple[int, str, BlockHash, DiskEntry]] = []
        with os.scandir(self.directory) as it:
            for item in it:
                if item.name.endswith(".tmp"):
                    self._unlink(Path(item.path))  # a write cut short by a crash
                    continue
                if not item.is_file():
                    continue
                if not _NAME.match(item.name):
                    continue  # not a block file (left alone)
                h = BlockHash(bytes.fromhex(item.name[: 2 * HASH_NBYTES]))
                st = item.stat()
                tokens = self._check_header(Path(item.path), h, st.st_size)
                if tokens is None:
                    self.num_dropped += 1
                    self._unlink(Path(item.path))
                    continue
                found.append((st.st_mtime_ns, item.name, h, DiskEntry(tokens, st.st_size)))
        for _, _, h, entry in sorted(found, key=lambda f: (f[0], f[1])):
            self.entries[h] = entry
            self.num_bytes += entry.num_bytes
        self._make_room(0)  # a smaller --disk-cache-gb than last time: the oldest go (nothing published yet)

    def _check_header(self, path: Path, block_hash: BlockHash, size: int) -> tuple[int, ...] | None:
        """The file's token ids if its header is this tier's and its size is what the header says."""
        try:
            with open(path, "rb") as f:
                head = f.read(_HEADER_READ)
            tokens, offset = decode_file_header(head)
            h = read_header(head[offset:])
        except (OSError, BlockImportError, struct.error):
            return None
        if (h.model_id, h.dtype, h.shape, h.block_hash) != (self.model_id, self.dtype, self.block_shape, block_hash):
            return None  # another model's, dtype's or layout's block, or filed under another name
        if len(tokens) != self.block_size or size != offset + h.data_offset + h.data_nbytes:
            return None
        return tokens

    # ---- queries ---------------------------------------------------------
    def __contains__(self, block_hash: BlockHash) -> bool:
        return block_hash in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, block_hash: BlockHash) -> DiskEntry | None:
        return self.entries.get(block_hash)

    def hashes(self) -> Iterator[BlockHash]:
        return iter(self.entries)

    def path(self, block_hash: BlockHash) -> Path:
        return self.directory / f"{block_hash.hex()}{SUFFIX}"

    # ---- reads -----------------------------------------------------------
    def read(self, block_hash: BlockHash) -> bytes | None:
        """The block's payload, checked (header fields and checksum), most recent now; None when the file is
        missing or bad (then it is deleted: the caller announces the loss)."""
        entry = self.entries.get(block_hash)
        if entry is None:
            return None
        path = self.path(block_hash)
        try:
            data = path.read_bytes()
            tokens, offset = decode_file_header(data)
            payload = memoryview(data)[offset:]
            if tokens != entry.token_ids:
                raise BlockImportError("disk block's tokens changed since it was indexed")
            check_payload(payload, model_id=self.model_id, dtype=self.dtype, shape=self.block_shape,
                          block_hash=block_hash)
        except (OSError, BlockImportError, struct.error):
            self.num_dropped += 1
            self.discard(block_hash)
            return None
        self.touch(block_hash)
        return bytes(payload)

    def touch(self, block_hash: BlockHash) -> None:
        self.entries.move_to_end(block_hash)
        try:
            os.utime(self.path(block_hash))  # the LRU order a restart reads back
        except OSError:
            pass

    # ---- writes ----------------------------------------------------------
    def put(self, block_hash: BlockHash, token_ids: tuple[int, ...], payload: bytes) -> list[BlockHash]:
        """Write a block (payload: its block-wire bytes) as the most recent; returns the blocks deleted to make
        room. Afterwards ``block_hash in self`` says whether it was kept (not when it is larger than the whole
        tier or the write failed)."""
        if block_hash in self.entries:
            self.touch(block_hash)
            return []
        data = encode_file(token_ids, payload)
        if len(data) > self.capacity_bytes:
            return []
        evicted = self._make_room(len(data))
        path = self.path(block_hash)
        tmp = self.directory / f".{path.name}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic: the real name only ever names a whole block
        except OSError:  # a full or failing disk: the block is simply not kept
            self._unlink(tmp)
            return evicted
        self.entries[block_hash] = DiskEntry(tuple(token_ids), len(data))
        self.num_bytes += len(data)
        self.num_written += 1
        return evicted

    def _make_room(self, num_bytes: int) -> list[BlockHash]:
        evicted = []
        while self.entries and self.num_bytes + num_bytes > self.capacity_bytes:
            h = next(iter(self.entries))
            self.discard(h)
            evicted.append(h)
        return evicted

    def discard(self, block_hash: BlockHash) -> bool:
        entry = self.entries.pop(block_hash, None)
        if entry is None:
            return False
        self.num_bytes -= entry.num_bytes
        self._unlink(self.path(block_hash))
        return True

    def clear(self) -> None:
        for h in list(self.entries):
            self.discard(h)

    @staticmethod
    def _unlink(path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass

    # ---- invariants ------------------------------------------------------
    def check_integrity(self) -> None:
        assert self.num_bytes == sum(e.num_bytes for e in self.entries.values()), "disk bytes out of step"
        assert self.num_bytes <= self.capacity_bytes, "disk tier over its capacity"
