"""The engine's port side: what the cache service and a worker host use of an engine.

    static facts       model_id, block_size, num_blocks, block_nbytes (any thread: they never change)
    the prefix cache   num_cached_prefix_blocks, cached_hashes, cached_blocks, block_hashes, set_eviction_advisor,
                       reset_cache (every tier: the device pool, then host memory and disk when configured)
    pins               pin / unpin / pinned: the one pin table, keyed by pin id
    block transfer     export_blocks / import_blocks (the bytes: workers/block_io.py), verify_block (an
                       imported block recomputed by this engine's model: workers/block_verifier.py), evict
    reports            drain_events (``load`` is the engine's own: it needs the scheduler)

This is ``cache_service.engine_port.EnginePort`` less ``load``; ``workers.engine.Engine`` extends it with the
loop. Blocks are reached only through the ``KVManager``. Two things are asked of the engine: ``_warm_up`` (a
pin whose prefix is not cached yet is prefilled first) and ``loaded`` (the model, which ``verify_block`` runs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from typing import Sequence as Seq

from cache_service.block_hash import BlockHash, hash_prompt_blocks
from cache_service.block_wire import ExportedBlock
from cache_service.engine_port import EvictionAdvisor, PinId
from cache_service.peer_trust import VerifyResult
from cache_service.pin_keeper import pin_refusal
from cache_service.records import BlockEvent, HeldBlock, InvalidRequestError
from workers.block_io import export_blocks, import_blocks
from workers import block_verifier
from workers.block_pool import Block
from workers.kv_manager import KVManager
from workers.model.kv_cache import KVCache

if TYPE_CHECKING:
    from workers.model.loader import LoadedModel


class EngineCache:
    loaded: LoadedModel  # set by the engine: the model verify_block recomputes a block with

    def __init__(self, model_id: str, kv: KVManager, kv_cache: KVCache) -> None:
        self.model_id = model_id
        self.block_size = kv.block_size
        self.kv = kv
        self.kv_cache = kv_cache
        self._pins: dict[PinId, list[Block]] = {}  # the one pin table: pin id -> the blocks it holds

    def _warm_up(self, token_ids: list[int], cache_salt: str) -> None:
        """Prefill ``token_ids`` (whole blocks) so that they end up cached; the engine runs its loop for it."""
        raise NotImplementedError

    # ---- static facts ---------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.kv.num_blocks

    @property
    def block_nbytes(self) -> int:
        return self.kv_cache.block_nbytes()

    # ---- the prefix cache -----------------------------------------------------------------------------
    def block_hashes(self, token_ids: Seq[int], cache_salt: str = "") -> list[BlockHash]:
        return hash_prompt_blocks(token_ids, self.block_size, self.model_id, cache_salt)

    def num_cached_prefix_blocks(self, block_hashes: Seq[BlockHash]) -> int:
        return self.kv.num_cached_prefix_blocks(block_hashes)

    def cached_hashes(self) -> list[BlockHash]:
        return self.kv.cached_hashes()

    def cached_blocks(self) -> list[HeldBlock]:
        """Every block held, with the fastest tier holding it (the snapshot a worker publishes)."""
        return self.kv.cached_blocks()

    def set_eviction_advisor(self, advisor: EvictionAdvisor | None) -> None:
        self.kv.set_eviction_advisor(advisor)

    def reset_cache(self) -> bool:
        """Forget every cached block (benchmarks between runs); False while requests or pins hold blocks."""
        return self.kv.reset_cache()

    def evict(self, block_hashes: Seq[BlockHash]) -> int:
        """Forget these cached, unreferenced blocks now, as the LRU would (a run that failed verification;
        tests stage a stale index entry); returns how many went."""
        return self.kv.evict(list(block_hashes))

    def drain_events(self) -> list[BlockEvent]:
        return self.kv.drain_events()

    # ---- pins -------------------------------------------------------------------------------------------
    def pin(self, pin_id: PinId, token_ids: Seq[int], cache_salt: str = "") -> int:
        """Cache the full blocks of ``token_ids`` (prefilling them if needed) and hold them until ``unpin``.

        Idempotent per pin id. Two pin ids over the same prefix each hold their own reference, so releasing
        one never releases the other. A pinned block is referenced, so it never leaves the device pool for a
        lower tier (a pin whose prefix sits in host memory or on disk is loaded back by its warm-up).
        """
        if pin_id in self._pins:
            return len(self._pins[pin_id])
        tokens = [int(t) for t in token_ids]
        num_full = len(tokens) // self.block_size
        full = tokens[: num_full * self.block_size]
        if num_full == 0:
            return 0
        # A pin never takes the pool's last free blocks: requests must keep being served (pin_keeper).
        if refused := pin_refusal(self.kv.num_free_blocks, self.kv.num_blocks, self.block_size, num_full):
            raise InvalidRequestError(f"{refused} (pin {pin_id!r})")
        hashes = self.block_hashes(full, cache_salt)
        if len(self.kv.cached_prefix(hashes, full)) < num_full:
            self._warm_up(full, cache_salt)
        blocks = self.kv.hold_prefix(hashes, full)
        self._pins[pin_id] = blocks
        return len(blocks)

    def unpin(self, pin_id: PinId) -> int:
        blocks = self._pins.pop(pin_id, None)
        if blocks is None:
            return 0
        self.kv.release(blocks)
        return len(blocks)

    def pinned(self) -> dict[PinId, int]:
        return {pin_id: len(blocks) for pin_id, blocks in self._pins.items()}

    @property
    def num_pinned_blocks(self) -> int:
        return sum(len(blocks) for blocks in self._pins.values())

    # ---- block transfer -----------------------------------------------------------------------------------
    def export_blocks(self, block_hashes: Seq[BlockHash]) -> list[ExportedBlock]:
        """The leading blocks of ``block_hashes`` this engine holds, as bytes (stops at the first miss): the
        device pool's run, continued from host memory and disk (``export_below``)."""
        out = export_blocks(self.kv, self.kv_cache, block_hashes)
        return out + self.export_below(block_hashes[len(out):]) if len(out) < len(block_hashes) else out

    def export_below(self, block_hashes: Seq[BlockHash]) -> list[ExportedBlock]:
        """The leading run of ``block_hashes`` held in the tiers under the device pool, as bytes; a peer is
        served from them without loading anything back into the pool."""
        return self.kv.export_below(list(block_hashes))

    def import_blocks(
        self, blocks: Seq[ExportedBlock], parent_hash: BlockHash | None = None, *, cache_salt: str | None = None
    ) -> int:
        """Validate and cache another engine's exported blocks; returns how many of them this engine now holds.

        See ``workers.block_io.import_blocks``: a bad block raises ``BlockImportError`` after the good leading
        ones were kept; ``cache_salt`` (when ``parent_hash`` is None) lets block 0's link be checked too.
        """
        return import_blocks(self.kv, self.kv_cache, blocks, parent_hash, cache_salt)

    def verify_block(self, token_ids: Seq[int], cache_salt: str, block_index: int) -> VerifyResult | None:
        """Recompute cached block ``block_index`` of ``token_ids`` with this engine's model over the cached blocks
        before it, and compare (``workers.block_verifier``); None when it cannot be done now. Never changes
        what is cached: dropping a run that failed is the caller's ``evict``."""
        return block_verifier.verify_block(self.loaded.model, self.kv, self.kv_cache, token_ids, cache_salt,
                                           block_index)
