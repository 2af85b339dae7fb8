"""Admission with transfer: pull a longer cached prefix from a peer when that beats recomputing.

For a prompt arriving on this node:

    hashes  = the prompt's full blocks, capped like the engine's hit: num_reusable_blocks(len)
    local   = leading blocks this engine holds
    peer    = the live node with the longest prefix (the router's answer when it gave one, else Lookup),
              quarantined peers left out (peer_trust.py)
    missing = hashes[local:peer.num_blocks]
    if predicted transfer(missing bytes) beats recompute(missing tokens):
        fetch missing from the peer (deadline), then in ONE engine call:
            import them
            if trust.should_verify(peer): recompute the last imported block over the imported prefix
                                          (EnginePort.verify_block); a mismatch drops the run (evict)
        report; a failed verification quarantines the peer

Any failure (stale index entry, dead or slow peer, a corrupted chunk caught by
the import's checksum) ends in ``FetchResult`` with ``error`` set; the caller
then simply adds the request and the engine recomputes whatever is not
cached. A bad block stops the import but keeps the good leading ones, so a
partial fetch still saves its part. Imported blocks are hash-chain- and
checksum-verified and every hit is token-checked by the block pool; those
checks are the sender's word, though (a buggy peer sends well-formed blocks
of wrong values), so some runs are also recomputed and compared before
anyone can hit them: import, verification and eviction share one engine call,
so no step runs between them and no request ever reads a run that fails.

A mismatch cannot say which block of the chain 0..k is wrong: the local
prefix may be at fault (it came from an earlier, unverified import). When it
is not empty, its last block is verified too on that path: if it fails as
well, the whole chain is dropped and the peer is not blamed.

With a cluster credential the transfer client first makes the peer prove it is the node the index (or the
router's hint) named, before a single block counts: checksums prove a block arrived as it was sent, not
that a member sent it (a stranger computes hashes, tokens and checksum of garbage as easily); a peer that
cannot prove it is a failed fetch, and the engine recomputes.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Sequence

from cache_service.block_hash import BlockHash, hash_prompt_blocks, num_reusable_blocks
from cache_service.block_wire import BlockImportError
from cache_service.engine_port import EngineCall, EnginePort
from cache_service.peer_trust import PeerTrust, TrustConfig, VerifyResult
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
    DROPPED = "dropped"  # imported, then dropped: it failed verification (or could not be verified)


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
    # The recomputation check of this fetch's run (None: not verified); ``verification.ok`` False means
    # the run was dropped.
    verification: VerifyResult | None = None
    quarantined_until: float | None = None  # set when this fetch's failed verification quarantined the peer
    quarantined_peers: tuple[str, ...] = ()  # peers holding more that were skipped: quarantined

    @property
    def attempted(self) -> bool:
        return self.outcome in (FetchOutcome.TRANSFERRED, FetchOutcome.PARTIAL, FetchOutcome.FAILED,
                                FetchOutcome.DROPPED)

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
    trust: TrustConfig = field(default_factory=TrustConfig)  # which runs to verify, how long to quarantine


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
        trust: PeerTrust | None = None,
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
        self.trust = trust or PeerTrust(self.config.trust)

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
        # A router's hint naming a quarantined peer is no answer: the index may know another holder.
        if peer_known and (peer is None or peer.node_id == self.node_id or self.trust.may_fetch(peer.node_id)):
            matches = [] if peer is None or peer.node_id == self.node_id else [
                PrefixMatch(peer.node_id, min(peer.num_blocks, len(hashes)), peer.transfer_address)]
        else:
            matches = await self.lookup(hashes)
        if self.mirror is not None:
            for m in matches:
                if m.node_id != self.node_id:
                    self.mirror.mark_replicated(hashes[: m.num_blocks])
        now = self.trust.clock()
        quarantined = tuple(sorted(m.node_id for m in matches if m.node_id != self.node_id
                                   and m.num_blocks > num_local and not self.trust.may_fetch(m.node_id, now)))
        by_node = {m.node_id: m for m in matches if m.transfer_address and m.node_id not in quarantined}
        best = best_peer({m.node_id: m.num_blocks for m in by_node.values()}, exclude=self.node_id,
                         more_than=num_local)
        if best is None:
            return FetchResult(FetchOutcome.NO_PEER, num_local_blocks=num_local, quarantined_peers=quarantined)
        source = by_node[best[0]]
        num_missing = source.num_blocks - num_local
        decision = self.policy.decide(num_missing * self.block_size, num_missing * self.block_nbytes)
        result = FetchResult(
            FetchOutcome.RECOMPUTE, num_local_blocks=num_local, num_peer_blocks=source.num_blocks, peer=source.node_id,
            predicted_transfer_s=decision.predicted_transfer_s, predicted_recompute_s=decision.predicted_recompute_s,
            quarantined_peers=quarantined,
        )
        if not (decision.transfer or self.config.always_transfer):
            return result
        await self._fetch(result, source, prompt_ids, hashes, num_local, cache_salt)
        result.seconds = time.perf_counter() - started
        if self.on_transfer is not None:
            self.on_transfer(result)
        return result

    async def _fetch(self, result: FetchResult, peer: PrefixMatch, prompt_ids: Sequence[int],
                     hashes: list[BlockHash], num_local: int, cache_salt: str) -> None:
        cfg = self.config
        timeout = min(cfg.max_deadline_s, max(cfg.min_deadline_s, cfg.deadline_factor * result.predicted_recompute_s))
        wanted = hashes[num_local : peer.num_blocks]
        t0 = time.perf_counter()
        try:
            blocks, num_bytes = await self.transfer.fetch_blocks(
                peer.transfer_address, wanted, peer=peer.node_id, model_id=self.model_id, timeout_s=timeout
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
        verify = self.trust.should_verify(peer.node_id)
        tokens = list(prompt_ids)

        def do_import(engine: EnginePort) -> _Imported:
            try:
                engine.import_blocks(blocks, parent_hash=parent, cache_salt=cache_salt)
                error = None
            except BlockImportError as exc:
                error = f"import rejected a block from {peer.node_id}: {exc}"
            # Count what is held now (the good leading blocks survive a bad one).
            num_imported = max(0, min(engine.num_cached_prefix_blocks(hashes) - num_local, len(blocks)))
            out = _Imported(num_imported, error)
            if not (verify and num_imported):
                return out
            dropped = hashes[num_local : num_local + num_imported]
            try:
                # The last imported block: every other block of the chain is in its context.
                out.check = engine.verify_block(tokens, cache_salt, num_local + num_imported - 1)
                if out.check is not None and out.check.ok:
                    return out
                if out.check is not None and num_local:
                    out.local_check = engine.verify_block(tokens, cache_salt, num_local - 1)
                    if out.local_check is not None and not out.local_check.ok:
                        dropped = hashes[: num_local + num_imported]  # the local prefix is wrong already
            except Exception as exc:  # noqa: BLE001 - a run that had to be verified and was not is not kept
                out.check = out.local_check = None
                out.verify_error = f"{type(exc).__name__}: {exc}"
            engine.evict(dropped)
            return out

        imported = await self.engine_call(do_import)
        num_imported, error, check = imported.num_blocks, imported.error, imported.check
        result.verification = check
        if verify and num_imported and (check is None or not check.ok):
            self._drop(result, peer.node_id, imported)
            return
        if num_imported:
            self.trust.record(peer.node_id, True if check is not None else None)
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

    def _drop(self, result: FetchResult, peer: str, imported: _Imported) -> None:
        """The run was evicted: it failed verification, or it had to be verified and could not be."""
        check, local = imported.check, imported.local_check
        result.outcome = FetchOutcome.DROPPED
        # In the first two cases nothing is learnt of the peer (nothing is recorded): its next fetch is
        # drawn, and verified, the same way again.
        if check is None:
            why = imported.verify_error or "no block free for the recomputation"
            result.error = f"the run from {peer} could not be verified now ({why}); dropped"
        elif local is not None and not local.ok:
            result.error = (f"this node's own prefix (blocks 0..{local.block_index}) failed verification: an "
                            f"earlier import was wrong; the chain was dropped, {peer} is not blamed")
        else:
            result.quarantined_until = self.trust.record(peer, False)
            result.error = (f"block {check.block_index} from {peer} failed verification (max diff "
                            f"{check.max_abs_diff:.3g} > {check.tolerance:.3g}); the run was dropped and {peer} "
                            f"is quarantined")
        log.warning("imported run dropped", extra={"peer": peer, "error": result.error})


@dataclass(slots=True)
class _Imported:
    """What the import's engine call found (the import, then the verification when asked)."""

    num_blocks: int
    error: str | None
    check: VerifyResult | None = None
    local_check: VerifyResult | None = None
    verify_error: str | None = None  # the verification raised: the run is dropped all the same
