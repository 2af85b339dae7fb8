"""The cache service's plain data: what the index stores and answers.

Proto messages stop at the servicer / client edges; everything in between
(index, policy, fetcher) speaks these types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from cache_service.block_hash import BlockHash
from cache_service.records import WorkerLoad

NodeId = str
PinId = str
# The owner of a pin when the caller names none (the router's tenant when auth is off).
DEFAULT_TENANT = "default"
# The tenant that may unpin any tenant's pin (an operator credential, until the cluster has real ones):
# always this one, plus those a deployment names (CacheServiceConfig.operator_tenants).
OPERATOR_TENANT = "operator"
# A tenant's pins may hold this fraction of the smallest live node's pool (unless a quota is configured).
DEFAULT_PIN_QUOTA_FRACTION = 0.25


@dataclass(slots=True)
class NodeInfo:
    node_id: NodeId
    transfer_address: str = ""
    model_id: str = ""
    block_size: int = 16
    capacity_blocks: int = 0
    block_nbytes: int = 0
    prefill_tokens_per_s: float = 0.0
    transfer_bytes_per_s: float = 0.0
    ray_node_id: str = ""


@dataclass(slots=True)
class TransferCounts:
    """Transfers a node made since its last heartbeat (deltas)."""

    num_transfers: int = 0
    num_failed: int = 0
    num_blocks: int = 0
    num_bytes: int = 0


class Registration(NamedTuple):
    node_id: NodeId
    epoch: int


class TierCounts(NamedTuple):
    """How the blocks of one holder's matched prefix split over its tiers (``records.Tier``).

    ``device + host + disk`` is the prefix length. A hit on device costs nothing, one on host a copy back,
    one on disk a read and a copy back: the router prices them apart (``CostWeights.host_hit_cost``).
    """

    device: int = 0
    host: int = 0
    disk: int = 0

    @property
    def num_blocks(self) -> int:
        return self.device + self.host + self.disk


class PrefixMatch(NamedTuple):
    """A live node and the length (in blocks) of the prompt prefix it holds, at whichever tiers.

    ``tiers`` splits that prefix over the node's tiers; None where the answer did not say (a peer hint, a
    service that predates tiers): read it as all on device.
    """

    node_id: NodeId
    num_blocks: int
    transfer_address: str
    tiers: TierCounts | None = None


class PinAssignment(NamedTuple):
    """A prefix the service wants one node to keep warm."""

    pin_id: PinId
    token_ids: tuple[int, ...]
    cache_salt: str
    num_blocks: int


@dataclass(slots=True)
class HeartbeatResult:
    known: bool
    pins: list[PinAssignment] = field(default_factory=list)


@dataclass(slots=True)
class PinSpec:
    pin_id: PinId
    model_id: str
    block_hashes: list[BlockHash]
    token_ids: list[int]
    cache_salt: str = ""
    replicas: int = 1
    ttl_seconds: int = 0  # 0: until unpinned
    tenant: str = DEFAULT_TENANT  # the owner: only it (or an operator) unpins it; counted in its quota


@dataclass(slots=True)
class PinStatus:
    """A pin as the stats show it: never its salt or its tokens (those go only to its holders)."""

    pin_id: PinId
    replicas: int
    num_blocks: int
    num_tokens: int
    tenant: str
    node_ids: list[NodeId]


@dataclass(slots=True)
class NodeStatus:
    info: NodeInfo
    load: WorkerLoad
    num_indexed_blocks: int
    alive: bool
    epoch: int


@dataclass(slots=True)
class IndexStats:
    nodes: list[NodeStatus]
    num_blocks: int  # distinct block hashes indexed
    num_entries: int  # (block, holder) pairs
    counters: dict[str, int]
    pins: list[PinStatus]
    redis_used_memory_bytes: int
