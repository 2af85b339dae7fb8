"""The engine port: the narrow interface through which the cache side (and a worker host) uses an engine.

    CacheNode / PrefixFetcher / PinKeeper / TransferServer      (cache_service, any host)
    WorkerActor / LocalCacheNode                                (the hosts that own an engine)
        |  engine_call(fn)  ->  fn(port) on the engine's thread
        v
    EnginePort: lookup, cached set, pins, export / import / verify, events, load      (workers.engine.Engine)

Nothing outside ``workers/`` reaches into an engine's block pool, KV manager or scheduler: what the cache
needs is here, and the engine implements it. The Protocol lives in ``cache_service`` because its users do
(a lower layer cannot import ``workers``); the engine owns the behaviour. Every method must run on the
engine's thread (the engine is single-threaded); the static facts (model id, block size, pool size, block
bytes) never change and may be read from any thread.
"""

from __future__ import annotations

from typing import Awaitable, Callable, Protocol, Sequence, TypeVar

from cache_service.block_hash import BlockHash
from cache_service.block_wire import ExportedBlock
from cache_service.peer_trust import VerifyResult
from cache_service.records import BlockEvent, HeldBlock, WorkerLoad

T = TypeVar("T")
PinId = str


class EvictionAdvisor(Protocol):
    """The cluster's view, consulted when a cached block must be evicted.

    ``is_replicated(h)`` is True when another node holds a copy of ``h``: such a block is cheaper to lose
    than the cluster's last copy.
    """

    def is_replicated(self, block_hash: BlockHash) -> bool: ...


class EnginePort(Protocol):
    # ---- static facts (any thread) --------------------------------------------------------------------
    @property
    def model_id(self) -> str: ...

    @property
    def block_size(self) -> int: ...

    @property
    def num_blocks(self) -> int: ...

    @property
    def block_nbytes(self) -> int: ...

    # ---- the prefix cache ------------------------------------------------------------------------------
    def num_cached_prefix_blocks(self, block_hashes: Sequence[BlockHash]) -> int:
        """Leading blocks of ``block_hashes`` held (cached or in use), in any tier: a block in host memory or on
        disk is loaded back at admission, cheaper than a transfer."""
        ...

    def cached_hashes(self) -> list[BlockHash]:
        """Every block hash held now, in any tier (a snapshot for an index that tracks holders only)."""
        ...

    def cached_blocks(self) -> list[HeldBlock]:
        """Every block held now with the fastest tier holding it (a snapshot for an index that tracks tiers);
        the same blocks as ``cached_hashes``."""
        ...

    def set_eviction_advisor(self, advisor: EvictionAdvisor | None) -> None: ...

    # ---- pins: one table, keyed by pin id ---------------------------------------------------------------
    def pin(self, pin_id: PinId, token_ids: Sequence[int], cache_salt: str = "") -> int:
        """Cache the full blocks of ``token_ids`` (prefilling what is missing) and hold them; idempotent per
        pin id; returns the number of blocks held."""
        ...

    def unpin(self, pin_id: PinId) -> int:
        """Release a pin; returns the blocks it held (0: unknown pin id)."""
        ...

    def pinned(self) -> dict[PinId, int]:
        """Pin id -> blocks held."""
        ...

    # ---- block transfer -----------------------------------------------------------------------------------
    def export_blocks(self, block_hashes: Sequence[BlockHash]) -> list[ExportedBlock]:
        """The leading blocks of ``block_hashes`` held, as payloads, read from the device pool, then host memory,
        then disk (stops at the first block no tier holds)."""
        ...

    def import_blocks(self, blocks: Sequence[ExportedBlock], parent_hash: BlockHash | None = None, *,
                      cache_salt: str | None = None) -> int: ...

    def verify_block(self, token_ids: Sequence[int], cache_salt: str, block_index: int) -> VerifyResult | None:
        """Recompute cached block ``block_index`` of ``token_ids`` with the engine's own model, over the cached
        blocks before it, and compare it with the cached copy (``cache_service/peer_trust.py``: why, and what
        to verify). None when it cannot be done now; the cache is never changed either way."""
        ...

    def evict(self, block_hashes: Sequence[BlockHash]) -> int:
        """Drop these cached, unreferenced blocks now (a run that failed verification); how many went."""
        ...

    # ---- what the engine reports --------------------------------------------------------------------------
    def drain_events(self) -> list[BlockEvent]: ...

    def load(self) -> WorkerLoad: ...


# Runs fn(port) on the engine's thread and returns its result.
EngineCall = Callable[[Callable[[EnginePort], T]], Awaitable[T]]
