"""One worker's whole cache side: BlockTransfer server, cache client, prefix fetcher, pins, replica mirror.

The node never touches the engine itself: everything goes through
``engine_call(fn) -> awaitable fn(port)``, which the owner runs on the
engine's thread (a Ray worker's engine loop, or ``LocalCacheNode``'s lock),
and uses only the engine port (``cache_service/engine_port.py``). The owner
also hands over the events it drains after each step (``push_events``,
never blocks) and installs ``advisor`` with ``set_eviction_advisor``.

All coroutines run on the owner's event loop::

    CacheNode
      TransferServer (BlockTransferServicer: export = engine_call(export_blocks))
      CacheClient    register / heartbeat (load, transfer counts; pins -> PinKeeper) / publish / lookup
      PrefixFetcher  lookup -> policy -> TransferClient.fetch_blocks -> engine_call(import_blocks, verify_block)
      PeerTrust      which imported runs to verify, which peers are quarantined (the fetcher's)
      ReplicaMirror  fed by lookups, fetches and exports; read by the pool when it evicts

``CacheNodeConfig.member`` (the node's identity, its node id, and the cluster credential) goes to all
three that talk to others: the client's calls carry it, the BlockTransfer server serves members only, and
the transfer client takes blocks only from peers that prove they are the node the index named.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

from cache_service.block_hash import BlockHash
from cache_service.client import CacheClient, CacheClientConfig, PinsFn
from cache_service.peer_trust import PeerTrust
from cache_service.pin_keeper import PinKeeper
from cache_service.engine_port import EngineCall, EnginePort
from cache_service.prefix_fetcher import FetcherConfig, FetchOutcome, FetchResult, PrefixFetcher
from cache_service.replica_mirror import ReplicaMirror
from cache_service.transfer_client import TransferClient
from cache_service.transfer_policy import TransferPolicy
from cache_service.transfer_server import (
    DEFAULT_CHUNK_BYTES,
    BlockTransferServicer,
    TransferFaults,
    TransferServer,
)
from cache_service.records import BlockEvent, HeldBlock, PeerHint, WorkerLoad
from cache_service.types import NodeInfo, PrefixMatch
from common.cluster_auth import Member
from common.logs import get_logger

log = get_logger("cache_service")


@dataclass(slots=True)
class CacheNodeConfig:
    client: CacheClientConfig = field(default_factory=CacheClientConfig)
    fetcher: FetcherConfig = field(default_factory=FetcherConfig)
    transfer_host: str = "127.0.0.1"  # bind address of BlockTransfer
    transfer_port: int = 0
    advertise_host: str | None = None  # what peers dial (default: transfer_host)
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES
    # Serve and use the raw block stream beside gRPC (cache_service/raw_listener.py, raw_client.py): one more port
    # per worker, on the same host; off, every transfer streams through gRPC.
    raw_stream: bool = True
    mirror_ttl_s: float = 60.0
    # The node's cluster identity (its node id) and credential; None: an open node (tests, one process).
    member: Member | None = None


class CacheNode:
    def __init__(
        self,
        node_id: str,
        *,
        engine_call: EngineCall,
        model_id: str,
        block_size: int,
        num_blocks: int,
        block_nbytes: int,
        cache_address: str | None,
        config: CacheNodeConfig | None = None,
        on_pins: PinsFn | None = None,
        ray_node_id: str = "",
        faults: TransferFaults | None = None,
    ) -> None:
        self.node_id = node_id
        self.engine_call = engine_call
        self.model_id = model_id
        self.block_size = block_size
        self.config = cfg = config or CacheNodeConfig()
        if cfg.member is not None and cfg.member.identity != node_id:
            raise ValueError(f"node {node_id!r} holds the credential of {cfg.member.identity!r}")
        self.cache_address = cache_address
        self.mirror = ReplicaMirror(ttl_s=cfg.mirror_ttl_s)
        self.policy = TransferPolicy()
        self.transfer_client = TransferClient(requester=node_id, max_chunk_bytes=cfg.max_chunk_bytes,
                                              raw_stream=cfg.raw_stream, member=cfg.member)
        self.servicer = BlockTransferServicer(self._export, model_id, on_export=self._on_export, faults=faults)
        self.transfer_server = TransferServer(self.servicer, cfg.transfer_host, cfg.transfer_port,
                                              advertise_host=cfg.advertise_host, raw_stream=cfg.raw_stream,
                                              member=cfg.member)
        self.info = NodeInfo(node_id=node_id, model_id=model_id, block_size=block_size,
                             capacity_blocks=num_blocks, block_nbytes=block_nbytes, ray_node_id=ray_node_id)
        self.client: CacheClient | None = None
        self.trust = PeerTrust(cfg.fetcher.trust)  # its clock may be replaced (tests)
        self.fetcher = PrefixFetcher(
            node_id, model_id, block_size, block_nbytes, engine_call=engine_call, lookup=self.lookup,
            transfer=self.transfer_client, policy=self.policy, mirror=self.mirror, config=cfg.fetcher,
            on_transfer=self._on_transfer, trust=self.trust,
        )
        self.pins = PinKeeper(engine_call, self.fetch_pinned_prefix)
        self._on_pins = on_pins or self.pins.apply

    @classmethod
    def for_engine(cls, engine: EnginePort, node_id: str, *, engine_call: EngineCall, cache_address: str | None,
                   **kwargs) -> CacheNode:
        """Read the engine's static facts (safe from any thread: they never change)."""
        return cls(node_id, engine_call=engine_call, model_id=engine.model_id, block_size=engine.block_size,
                   num_blocks=engine.num_blocks, block_nbytes=engine.block_nbytes,
                   cache_address=cache_address, **kwargs)

    @property
    def advisor(self) -> ReplicaMirror:
        """Install with the engine's ``set_eviction_advisor``."""
        return self.mirror

    @property
    def transfer_address(self) -> str:
        return self.transfer_server.address

    # ---- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        self.info.transfer_address = await self.transfer_server.start()
        if self.cache_address:
            self.client = CacheClient(
                self.cache_address, self.info, snapshot=self._snapshot, load=self._load,
                on_pins=self._on_pins, config=self._client_config(),
            )
            await self.client.start()

    def _client_config(self) -> CacheClientConfig:
        client = self.config.client
        return dataclasses.replace(client, member=self.config.member) if client.member is None else client

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.stop()
        await self.transfer_server.stop()
        await self.transfer_client.close()

    # ---- engine thread -------------------------------------------------------------
    def push_events(self, events: Sequence[BlockEvent]) -> None:
        """Events drained from the engine after a step (any thread; never blocks)."""
        if self.client is not None and events:
            self.client.offer_events(events)

    # ---- requests --------------------------------------------------------------------
    async def fetch_prefix(self, prompt_ids: Sequence[int], cache_salt: str = "", peer: PeerHint | None = None,
                           *, peer_known: bool = False) -> FetchResult:
        """Before adding a request: import a longer prefix from a peer when that is cheaper.

        ``peer_known``: ``peer`` is the router's answer (None: no peer holds more); else ask the index.
        """
        try:
            return await self.fetcher.fetch_prefix(prompt_ids, cache_salt, peer, peer_known=peer_known)
        except Exception as exc:  # noqa: BLE001 - admission must never fail because of the cache
            log.warning("prefix fetch failed unexpectedly; recomputing", extra={"error": repr(exc)})
            return FetchResult(FetchOutcome.FAILED, error=f"{type(exc).__name__}: {exc}")

    async def fetch_pinned_prefix(self, token_ids: Sequence[int], cache_salt: str = "") -> FetchResult:
        """Before pinning ``token_ids``: pull its full blocks from a peer when cheaper. The fetcher leaves a
        prompt's last token to prefill, so one extra token makes every full block of the prefix eligible."""
        return await self.fetch_prefix([*token_ids, 0], cache_salt)

    async def lookup(self, block_hashes: Sequence[BlockHash]) -> list[PrefixMatch]:
        if self.client is None:
            return []
        return await self.client.lookup(block_hashes)

    # ---- callbacks ---------------------------------------------------------------------
    async def _export(self, hashes: Sequence[BlockHash]) -> list:
        return await self.engine_call(lambda e: e.export_blocks(hashes))

    def _on_export(self, requester: str, hashes: Sequence[BlockHash]) -> None:
        self.mirror.mark_replicated(hashes)  # the requester now holds copies of these

    def _on_transfer(self, result: FetchResult) -> None:
        if self.client is not None and result.attempted:
            self.client.record_transfer(result.ok, result.num_blocks, result.num_bytes)

    async def _snapshot(self) -> list[HeldBlock]:
        return await self.engine_call(lambda e: e.cached_blocks())  # (hash, fastest tier) per block held

    async def _load(self) -> WorkerLoad:
        return await self.engine_call(lambda e: e.load())

