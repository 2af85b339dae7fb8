"""The paged KV block pool: ref counts, the prefix cache and LRU eviction.

Every KV block is in exactly one of three states:

    used    ref_count > 0            owned by running sequences (or pinned)
    cached  ref_count == 0, hashed   in the free queue *and* the hash map: reusable
                                     on a hit, evictable when blocks run out
    free    ref_count == 0, no hash  in the free queue only

so ``num_free_blocks`` (the free queue's length, cached blocks included) is
what an allocation can get, and ``free + cached + used == total`` always holds
(``check_integrity``).

The free queue is an intrusive doubly linked list (the links live in the
``Block`` objects), so taking a block out of the middle on a cache hit,
appending and popping are O(1) and allocate nothing:

    head (evicted first) <-> ... <-> tail (most recently freed)

Unhashed blocks are worth nothing, so they go to the head; cached blocks go to
the tail. A finished sequence frees its blocks last-first, so the tail blocks
of a chain sit nearer the head and are evicted before the prefix they extend
(a chain whose head survives is still useful; a head without its tail is too,
but not the reverse).

Every change of the cached set becomes an event (``BlockStored`` /
``BlockRemoved``) that the cache service's client drains and publishes.

Tiers below the pool (host memory, disk: ``workers/lower_tiers.py``) hang on
the ``lower`` hook. When ``allocate`` reuses a cached block, the block leaves
the hash map first and is then handed to ``lower.spill`` while its K/V is
still intact (nothing writes a block before ``allocate`` returns it), so the
data can be copied down. The hook then says where the block went, with
``BlockStored(h, tier=HOST | DISK)`` or ``BlockRemoved(h)`` on the pool's one
event stream (``emit``); without a hook the pool says ``BlockRemoved`` itself.
A referenced block (a running sequence's, a pin's) is never in the free queue,
so it never leaves the device pool.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, NamedTuple, Protocol, Sequence

from cache_service.block_hash import BlockHash
from cache_service.engine_port import EvictionAdvisor
from cache_service.records import AllBlocksCleared, BlockEvent, BlockRemoved, BlockStored


@dataclass(slots=True, eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None
    # The tokens this block holds once it is full and hashed: compared on every
    # hit so that a hash collision can never produce a wrong answer.
    token_ids: tuple[int, ...] | None = None
    prev_free: Block | None = None
    next_free: Block | None = None

    def __repr__(self) -> str:
        h = self.block_hash.hex()[:8] if self.block_hash else None
        return f"Block(id={self.block_id}, ref={self.ref_count}, hash={h})"


class Evicted(NamedTuple):
    """A cached block ``allocate`` is reusing: out of the hash map already, its K/V still in ``block_id``."""

    block_hash: BlockHash
    token_ids: tuple[int, ...]
    block_id: int


class LowerTier(Protocol):
    """What the pool needs of the tiers below it."""

    def spill(self, evicted: Sequence[Evicted]) -> None:
        """Keep these blocks below the pool where there is room (copying their K/V now: the caller writes
        the blocks once ``allocate`` returns) and emit one event each, in order: the tier that took it, or
        ``BlockRemoved``."""
        ...


class FreeBlockQueue:
    """Doubly linked list of blocks with ref_count 0, threaded through Block."""

    def __init__(self, blocks: Sequence[Block]) -> None:
        self._head = Block(-1)  # sentinels: no None checks in the hot path
        self._tail = Block(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free_blocks = 0
        for block in blocks:
            self.append(block)

    def append(self, block: Block) -> None:
        self._insert_after(self._tail.prev_free, block)

    def appendleft(self, block: Block) -> None:
        self._insert_after(self._head, block)

    def _insert_after(self, prev: Block, block: Block) -> None:
        assert block.prev_free is None and block.next_free is None, f"{block} already queued"
        nxt = prev.next_free
        block.prev_free, block.next_free = prev, nxt
        prev.next_free = block
        nxt.prev_free = block
        self.num_free_blocks += 1

    def remove(self, block: Block) -> None:
        prev, nxt = block.prev_free, block.next_free
        assert prev is not None and nxt is not None, f"{block} is not in the free queue"
        prev.next_free, nxt.prev_free = nxt, prev
        block.prev_free = block.next_free = None
        self.num_free_blocks -= 1

    def popleft(self) -> Block:
        block = self._head.next_free
        assert block is not self._tail, "free queue is empty"
        self.remove(block)
        return block

    def iter_from_head(self, limit: int | None = None) -> Iterator[Block]:
        block = self._head.next_free
        n = 0
        while block is not self._tail and (limit is None or n < limit):
            nxt = block.next_free
            yield block
            block = nxt
            n += 1


class BlockPool:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        enable_caching: bool = True,
        eviction_advisor: EvictionAdvisor | None = None,
        eviction_window: int = 16,
        lower: LowerTier | None = None,
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.eviction_advisor = eviction_advisor
        # How far from the LRU head we look for a replicated victim: bounded so
        # that allocation stays O(1) and LRU order still dominates.
        self.eviction_window = eviction_window
        self.lower = lower  # where evicted cached blocks go (None: they are forgotten)
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[BlockHash, Block] = {}
        self._events: list[BlockEvent] = []
        self.num_evicted = 0
        self.num_stored = 0

    # ---- queries ---------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can get (free + cached-unreferenced)."""
        return self.free_queue.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.free_queue.num_free_blocks

    def get_cached_block(self, block_hash: BlockHash, token_ids: Sequence[int]) -> Block | None:
        """The cached block for this hash if its tokens match, else None."""
        block = self.cached.get(block_hash)
        if block is None or block.token_ids != tuple(token_ids):
            return None
        return block

    def find_cached_prefix(
        self, block_hashes: Sequence[BlockHash], token_ids: Sequence[int]
    ) -> list[Block]:
        """The longest run of cached blocks matching the prompt from block 0."""
        hits: list[Block] = []
        if not self.enable_caching:
            return hits
        bs = self.block_size
        for i, h in enumerate(block_hashes):
            block = self.get_cached_block(h, token_ids[i * bs : (i + 1) * bs])
            if block is None:
                break
            hits.append(block)
        return hits

    def count_cached_prefix(self, block_hashes: Sequence[BlockHash]) -> int:
        """Number of leading hashes present (no token check: for routing hints)."""
        n = 0
        for h in block_hashes:
            if h not in self.cached:
                break
            n += 1
        return n

    # ---- mutations -------------------------------------------------------
    def touch(self, blocks: Sequence[Block]) -> None:
        """Take a reference on cache hits (removing them from the free queue)."""
        for block in blocks:
            if block.ref_count == 0:
                self.free_queue.remove(block)
            block.ref_count += 1

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.free_queue.num_free_blocks

    def allocate(self, num_blocks: int) -> list[Block] | None:
        """``num_blocks`` fresh blocks (evicting cached ones), or None if they do not fit."""
        if not self.can_allocate(num_blocks):
            return None
        out = []
        evicted: list[Evicted] = []
        for _ in range(num_blocks):
            block = self._pick_victim()
            self.free_queue.remove(block)
            if block.block_hash is not None:
                if self.lower is not None:
                    evicted.append(Evicted(block.block_hash, block.token_ids, block.block_id))
                self._evict(block, announce=self.lower is None)
            block.ref_count = 1
            out.append(block)
        if evicted:
            # All victims are out of the hash map before the tiers below see them: the tiers' events then
            # describe a state in which none of them is on the device any more.
            self.lower.spill(evicted)
        return out

    def _pick_victim(self) -> Block:
        head = None
        advisor = self.eviction_advisor
        for block in self.free_queue.iter_from_head(self.eviction_window if advisor else 1):
            if head is None:
                head = block
            if block.block_hash is None or advisor is None:
                return block
            if advisor.is_replicated(block.block_hash):
                return block  # another node keeps a copy: lose this one first
        assert head is not None, "free queue is empty"
        return head

    def _evict(self, block: Block, announce: bool = True) -> None:
        """Forget ``block``'s hash; ``announce=False`` when the tiers below emit the event (they took it)."""
        h = block.block_hash
        assert h is not None
        if self.cached.get(h) is block:
            del self.cached[h]
            if announce:
                self._events.append(BlockRemoved(h))
            self.num_evicted += 1
        block.block_hash = None
        block.token_ids = None

    def cache_block(
        self,
        block: Block,
        block_hash: BlockHash,
        token_ids: Sequence[int],
        parent_hash: BlockHash | None,
    ) -> bool:
        """Register a full block under its hash. False if an equal block is already cached.

        Two sequences can compute the same block concurrently; the first one
        stays the cached copy and the duplicate is freed as an ordinary block.
        """
        assert block.ref_count > 0, "only a referenced (just written) block can be cached"
        assert len(token_ids) == self.block_size, "only full blocks are cached"
        if not self.enable_caching or block.block_hash is not None:
            return False
        if block_hash in self.cached:
            return False
        block.block_hash = block_hash
        block.token_ids = tuple(token_ids)
        self.cached[block_hash] = block
        self._events.append(BlockStored(block_hash, parent_hash, block.token_ids, block.block_id))
        self.num_stored += 1
        return True

    def free(self, blocks: Sequence[Block]) -> None:
        """Drop one reference from each block, last block first (see module doc)."""
        for block in reversed(blocks):
            assert block.ref_count > 0, f"double free of {block}"
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.block_hash is not None and self.cached.get(block.block_hash) is block:
                    self.free_queue.append(block)
                else:
                    # A duplicate of a cached block, or never filled: worthless.
                    block.block_hash = None
                    block.token_ids = None
                    self.free_queue.appendleft(block)

    def evict(self, block_hash: BlockHash) -> bool:
        """Drop an unreferenced cached block now (cluster-driven eviction): ``BlockRemoved``, nothing spills
        (the KV manager drops the copies below first)."""
        block = self.cached.get(block_hash)
        if block is None or block.ref_count > 0:
            return False
        self._evict(block)
        self.free_queue.remove(block)
        self.free_queue.appendleft(block)
        return True

    def reset_cache(self) -> bool:
        """Forget every cached block; False (nothing done) while any block is in use."""
        if self.num_used_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
            block.token_ids = None
        self.cached.clear()
        self._events.append(AllBlocksCleared())
        return True

    def emit(self, event: BlockEvent) -> None:
        """Append to the pool's event stream: the tiers below emit here, so that one ordered stream says
        where every block went."""
        self._events.append(event)

    def drain_events(self) -> list[BlockEvent]:
        events, self._events = self._events, []
        return events

    def cached_hashes(self) -> list[BlockHash]:
        return list(self.cached)

    # ---- invariants ------------------------------------------------------
    def check_integrity(self) -> None:
        queued = list(self.free_queue.iter_from_head())
        assert len(queued) == self.free_queue.num_free_blocks
        assert len({b.block_id for b in queued}) == len(queued), "block queued twice"
        num_cached_free = 0
        for b in queued:
            assert b.ref_count == 0, f"{b} is queued but referenced"
            if b.block_hash is not None:
                assert self.cached.get(b.block_hash) is b
                num_cached_free += 1
        num_used = sum(1 for b in self.blocks if b.ref_count > 0)
        num_free = len(queued) - num_cached_free
        assert num_free + num_cached_free + num_used == self.num_blocks, "free + cached + used != total"
        for h, b in self.cached.items():
            assert b.block_hash == h and b.token_ids is not None
            assert len(b.token_ids) == self.block_size
