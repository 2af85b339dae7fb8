"""Admission with transfer: pull a longer cached prefix from a peer when that beats recomputing.

For a prompt arriving on this node:

    hashes  = the prompt's full blocks, capped like the engine's hit: num_reusable_blocks(len)
    local   = leading blocks this engine holds
    peer    = the live node with the longest prefix (the router's answer when it gave one, else Lookup)
    missing = hashes[local:peer.num_blocks]
    if predicted transfer(missing bytes) beats recompute(missing tokens):
        fetch missing from the peer (deadline), import them, report

Any failure (stale index entry, dead or slow peer, a corrupted chunk caught by
the import's checksum) ends in ``FetchResult`` with ``error`` set; the caller
then simply adds the request and the engine recomputes whatever is not
cached. A bad block stops the import but keeps the good leading ones, so a
partial fetch still saves its part. Nothing here can produce a wrong answer:
imported blocks are hash-chain- and checksum-verified and every hit is
token-checked by the block pool.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence

from cache_service.block_hash import BlockHash, hash_prompt_blocks, num_reusable_blocks
from cache_service.block_wire import BlockImportError
from cache_service.engine_port import EngineCall, EnginePort
from cache_service.peers import best_peer
from cache_service.records import PeerHint
from cache_service.replica_mirror import ReplicaMirror
from cache_service.transfer_client import TransferClient, TransferError
from cache_service.transfer_policy import TransferPolicy
from cache_service.types import PrefixMatch
from common.logs import get_logger

log = get_logger("cache_service")

LookupFn = Callable[[Sequence[BlockHash]], Awaitable[list[PrefixMatch]]]


class FetchOutcome(str, enum.Enum):
    LOCAL = "local"  # this node already holds every block a peer could give
    NO_PEER = "no_peer"  # no live peer holds more
    RECOMPUTE = "recompute"  # a peer holds more, but recomputing is predicted cheaper
    TRANSFERRED = "transferred"  # every missing block was fetched and imported
    PARTIAL = "partial"  # some leading blocks were imported, then the peer ran out (stale entry)
    FAILED = "failed"  # nothing usable arrived: the engine recomputes


@dataclass(slots=True)
class FetchResult:
    outcome: FetchOutcome
    num_local_blocks: int = 0
    num_peer_blocks: int = 0  # what the peer was believed to hold
    num_blocks: int = 0  # blocks imported from the peer
    num_tokens: int = 0  # tokens those blocks cover
    num_bytes: int = 0
    seconds: float = 0.0
    peer: str | None = None
    error: str | None = None
    predicted_transfer_s: float = 0.0
    predicted_recompute_s: float = 0.0

    @property
    def attempted(self) -> bool:
        return self.outcome in (FetchOutcome.TRANSFERRED, FetchOutcome.PARTIAL, FetchOutcome.FAILED)

    @property
    def ok(self) -> bool:
        return self.outcome is FetchOutcome.TRANSFERRED

    @property
    def imported(self) -> bool:
        """Some blocks were imported (all, or a leading part)."""
        return self.outcome in (FetchOutcome.TRANSFERRED, FetchOutcome.PARTIAL)


@dataclass(slots=True)
class FetcherConfig:
    # Deadline of one fetch: ``deadline_factor`` x the predicted recompute time,
    # clamped: past that point recomputing would have been faster anyway.
    deadline_factor: float = 3.0
    min_deadline_s: float = 0.5
    max_deadline_s: float = 10.0
    always_transfer: bool = False  # skip the cost test (benchmarks, tests)


class PrefixFetcher:
    def __init__(
        self,
        node_id: str,
        model_id: str,
        block_size: int,
        block_nbytes: int,
        *,
        engine_call: EngineCall,
        lookup: LookupFn,
        transfer: TransferClient,
        policy: TransferPolicy | None = None,
        mirror: ReplicaMirror | None = None,
        config: FetcherConfig | None = None,
        on_transfer: Callable[[FetchResult], None] | None = None,
    ) -> None:
        self.node_id = node_id
        self.model_id = model_id
        self.block_size = block_size
        self.block_nbytes = block_nbytes
        self.engine_call = engine_call
        self.lookup = lookup
        self.transfer = transfer
        self.policy = policy or TransferPolicy()
        self.mirror = mirror
        self.config = config or FetcherConfig()
        self.on_transfer = on_transfer

    async def fetch_prefix(
        self, prompt_ids: Sequence[int], cache_salt: str = "", peer: PeerHint | None = None, *,
        peer_known: bool = False,
    ) -> FetchResult:
        """``peer_known``: ``peer`` is the router's answer (None: no peer holds more), so no Lookup is made."""
        started = time.perf_counter()
        max_blocks = num_reusable_blocks(len(prompt_ids), self.block_size)
        hashes = hash_prompt_blocks(prompt_ids[: max_blocks * self.block_size], self.block_size,
                                    self.model_id, cache_salt)
        if not hashes:
            return FetchResult(FetchOutcome.LOCAL)
        num_local, rate = await self.engine_call(
            lambda e: (e.num_cached_prefix_blocks(hashes), e.load().prefill_tokens_per_s)
        )
        self.policy.observe_prefill_rate(rate)
        if num_local >= len(hashes):
            return FetchResult(FetchOutcome.LOCAL, num_local_blocks=num_local)
        if peer_known:
            matches = [] if peer is None or peer.node_id == self.node_id else [
                PrefixMatch(peer.node_id, min(peer.num_blocks, len(hashes)), peer.transfer_address)]
        else:
            matches = await self.lookup(hashes)
        if self.mirror is not None:
            for m in matches:
                if m.node_id != self.node_id:
                    self.mirror.mark_replicated(hashes[: m.num_blocks])
        by_node = {m.node_id: m for m in matches if m.transfer_address}
        best = best_peer({m.node_id: m.num_blocks for m in by_node.values()}, exclude=self.node_id,
                         more_than=num_local)
        if best is None:
            return FetchResult(FetchOutcome.NO_PEER, num_local_blocks=num_local)
        source = by_node[best[0]]
        num_missing = source.num_blocks - num_local
        decision = self.policy.decide(num_missing * self.block_size, num_missing * self.block_nbytes)
        result = FetchResult(
            FetchOutcome.RECOMPUTE, num_local_blocks=num_local, num_peer_blocks=source.num_blocks, peer=source.node_id,
            predicted_transfer_s=decision.predicted_transfer_s, predicted_recompute_s=decision.predicted_recompute_s,
        )
        if not (decision.transfer or self.config.always_transfer):
            return result
        await self._fetch(result, source, hashes, num_local, cache_salt)
        result.seconds = time.perf_counter() - started
        if self.on_transfer is not None:
            self.on_transfer(result)
        return result

    async def _fetch(self, result: FetchResult, peer: PrefixMatch, hashes: list[BlockHash], num_local: int,
                     cache_salt: str) -> None:
        cfg = self.config
        timeout = min(cfg.max_deadline_s, max(cfg.min_deadline_s, cfg.deadline_factor * result.predicted_recompute_s))
        wanted = hashes[num_local : peer.num_blocks]
        t0 = time.perf_counter()
        try:
            blocks, num_bytes = await self.transfer.fetch_blocks(
                peer.transfer_address, wanted, model_id=self.model_id, timeout_s=timeout
            )
        except TransferError as exc:
            result.outcome, result.error = FetchOutcome.FAILED, str(exc)
            log.info("fetch failed, recomputing", extra={"peer": peer.node_id, "error": str(exc)})
            return
        elapsed = time.perf_counter() - t0
        result.num_bytes = num_bytes
        if not blocks:
            result.outcome = FetchOutcome.FAILED
            result.error = f"peer {peer.node_id} no longer holds block {num_local} (stale index entry)"
            return
        parent = hashes[num_local - 1] if num_local else None

        def do_import(engine: EnginePort) -> tuple[int, str | None]:
            try:
                engine.import_blocks(blocks, parent_hash=parent, cache_salt=cache_salt)
                error = None
            except BlockImportError as exc:
                error = f"import rejected a block from {peer.node_id}: {exc}"
            # Count what is held now (the good leading blocks survive a bad one).
            return engine.num_cached_prefix_blocks(hashes) - num_local, error

        num_imported, error = await self.engine_call(do_import)
        num_imported = max(0, min(num_imported, len(blocks)))
        result.num_blocks = num_imported
        result.num_tokens = num_imported * self.block_size
        if error is None and num_imported == len(wanted):
            result.outcome = FetchOutcome.TRANSFERRED
            self.policy.observe_transfer(num_bytes, elapsed)
        else:
            result.outcome = FetchOutcome.PARTIAL if num_imported else FetchOutcome.FAILED
            result.error = error or (f"peer {peer.node_id} sent {len(blocks)} of {len(wanted)} blocks "
                                     f"(stale index entry)")
            log.info("partial fetch", extra={"peer": peer.node_id, "error": result.error})
        if self.mirror is not None and num_imported:
            self.mirror.mark_replicated(hashes[num_local : num_local + num_imported])
