from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_DEVICE: _ClassVar[Tier]
    TIER_HOST: _ClassVar[Tier]
    TIER_DISK: _ClassVar[Tier]
TIER_DEVICE: Tier
TIER_HOST: Tier
TIER_DISK: Tier

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "transfer_address", "model_id", "block_size", "capacity_blocks", "block_nbytes", "prefill_tokens_per_s", "transfer_bytes_per_s", "ray_node_id")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_NBYTES_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    RAY_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    transfer_address: str
    model_id: str
    block_size: int
    capacity_blocks: int
    block_nbytes: int
    prefill_tokens_per_s: float
    transfer_bytes_per_s: float
    ray_node_id: str
    def __init__(self, node_id: _Optional[str] = ..., transfer_address: _Optional[str] = ..., model_id: _Optional[str] = ..., block_size: _Optional[int] = ..., capacity_blocks: _Optional[int] = ..., block_nbytes: _Optional[int] = ..., prefill_tokens_per_s: _Optional[float] = ..., transfer_bytes_per_s: _Optional[float] = ..., ray_node_id: _Optional[str] = ...) -> None: ...

class RegisterNodeRequest(_message.Message):
    __slots__ = ("node", "ttl_seconds")
    NODE_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    node: NodeInfo
    ttl_seconds: int
    def __init__(self, node: _Optional[_Union[NodeInfo, _Mapping]] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class RegisterNodeResponse(_message.Message):
    __slots__ = ("epoch",)
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    def __init__(self, epoch: _Optional[int] = ...) -> None: ...

class NodeLoad(_message.Message):
    __slots__ = ("num_running", "num_waiting", "num_free_blocks", "num_cached_blocks")
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    NUM_FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_cached_blocks: int
    def __init__(self, num_running: _Optional[int] = ..., num_waiting: _Optional[int] = ..., num_free_blocks: _Optional[int] = ..., num_cached_blocks: _Optional[int] = ...) -> None: ...

class TransferCounters(_message.Message):
    __slots__ = ("num_transfers", "num_failed", "num_blocks", "num_bytes")
    NUM_TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    NUM_FAILED_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    num_transfers: int
    num_failed: int
    num_blocks: int
    num_bytes: int
    def __init__(self, num_transfers: _Optional[int] = ..., num_failed: _Optional[int] = ..., num_blocks: _Optional[int] = ..., num_bytes: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "epoch", "load", "transfers")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    epoch: int
    load: NodeLoad
    transfers: TransferCounters
    def __init__(self, node_id: _Optional[str] = ..., epoch: _Optional[int] = ..., load: _Optional[_Union[NodeLoad, _Mapping]] = ..., transfers: _Optional[_Union[TransferCounters, _Mapping]] = ...) -> None: ...

class PinAssignment(_message.Message):
    __slots__ = ("pin_id", "token_ids", "cache_salt", "num_blocks")
    PIN_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    pin_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    cache_salt: str
    num_blocks: int
    def __init__(self, pin_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., cache_salt: _Optional[str] = ..., num_blocks: _Optional[int] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("known", "pins")
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    PINS_FIELD_NUMBER: _ClassVar[int]
    known: bool
    pins: _containers.RepeatedCompositeFieldContainer[PinAssignment]
    def __init__(self, known: _Optional[bool] = ..., pins: _Optional[_Iterable[_Union[PinAssignment, _Mapping]]] = ...) -> None: ...

class BlockStoredEvent(_message.Message):
    __slots__ = ("block_hash", "parent_hash", "tier")
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    PARENT_HASH_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    block_hash: bytes
    parent_hash: bytes
    tier: Tier
    def __init__(self, block_hash: _Optional[bytes] = ..., parent_hash: _Optional[bytes] = ..., tier: _Optional[_Union[Tier, str]] = ...) -> None: ...

class BlockRemovedEvent(_message.Message):
    __slots__ = ("block_hash",)
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    block_hash: bytes
    def __init__(self, block_hash: _Optional[bytes] = ...) -> None: ...

class AllBlocksClearedEvent(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BlockEvent(_message.Message):
    __slots__ = ("stored", "removed", "cleared")
    STORED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    CLEARED_FIELD_NUMBER: _ClassVar[int]
    stored: BlockStoredEvent
    removed: BlockRemovedEvent
    cleared: AllBlocksClearedEvent
    def __init__(self, stored: _Optional[_Union[BlockStoredEvent, _Mapping]] = ..., removed: _Optional[_Union[BlockRemovedEvent, _Mapping]] = ..., cleared: _Optional[_Union[AllBlocksClearedEvent, _Mapping]] = ...) -> None: ...

class PublishEventsRequest(_message.Message):
    __slots__ = ("node_id", "epoch", "events", "full_snapshot")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    FULL_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    epoch: int
    events: _containers.RepeatedCompositeFieldContainer[BlockEvent]
    full_snapshot: bool
    def __init__(self, node_id: _Optional[str] = ..., epoch: _Optional[int] = ..., events: _Optional[_Iterable[_Union[BlockEvent, _Mapping]]] = ..., full_snapshot: _Optional[bool] = ...) -> None: ...

class PublishEventsResponse(_message.Message):
    __slots__ = ("num_applied",)
    NUM_APPLIED_FIELD_NUMBER: _ClassVar[int]
    num_applied: int
    def __init__(self, num_applied: _Optional[int] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("block_hashes", "model_id")
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    model_id: str
    def __init__(self, block_hashes: _Optional[_Iterable[bytes]] = ..., model_id: _Optional[str] = ...) -> None: ...

class NodeMatch(_message.Message):
    __slots__ = ("node_id", "num_blocks", "transfer_address", "num_device_blocks", "num_host_blocks", "num_disk_blocks")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NUM_DEVICE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_HOST_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_DISK_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    num_blocks: int
    transfer_address: str
    num_device_blocks: int
    num_host_blocks: int
    num_disk_blocks: int
    def __init__(self, node_id: _Optional[str] = ..., num_blocks: _Optional[int] = ..., transfer_address: _Optional[str] = ..., num_device_blocks: _Optional[int] = ..., num_host_blocks: _Optional[int] = ..., num_disk_blocks: _Optional[int] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("matches",)
    MATCHES_FIELD_NUMBER: _ClassVar[int]
    matches: _containers.RepeatedCompositeFieldContainer[NodeMatch]
    def __init__(self, matches: _Optional[_Iterable[_Union[NodeMatch, _Mapping]]] = ...) -> None: ...

class PinBlocksRequest(_message.Message):
    __slots__ = ("pin_id", "block_hashes", "replicas", "ttl_seconds", "token_ids", "cache_salt", "model_id", "tenant")
    PIN_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    pin_id: str
    block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    replicas: int
    ttl_seconds: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    cache_salt: str
    model_id: str
    tenant: str
    def __init__(self, pin_id: _Optional[str] = ..., block_hashes: _Optional[_Iterable[bytes]] = ..., replicas: _Optional[int] = ..., ttl_seconds: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., cache_salt: _Optional[str] = ..., model_id: _Optional[str] = ..., tenant: _Optional[str] = ...) -> None: ...

class PinBlocksResponse(_message.Message):
    __slots__ = ("pin_id", "node_ids", "found")
    PIN_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_IDS_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    pin_id: str
    node_ids: _containers.RepeatedScalarFieldContainer[str]
    found: bool
    def __init__(self, pin_id: _Optional[str] = ..., node_ids: _Optional[_Iterable[str]] = ..., found: _Optional[bool] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeStats(_message.Message):
    __slots__ = ("node", "load", "num_indexed_blocks", "alive", "epoch")
    NODE_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    NUM_INDEXED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    node: NodeInfo
    load: NodeLoad
    num_indexed_blocks: int
    alive: bool
    epoch: int
    def __init__(self, node: _Optional[_Union[NodeInfo, _Mapping]] = ..., load: _Optional[_Union[NodeLoad, _Mapping]] = ..., num_indexed_blocks: _Optional[int] = ..., alive: _Optional[bool] = ..., epoch: _Optional[int] = ...) -> None: ...

class PinInfo(_message.Message):
    __slots__ = ("pin_id", "replicas", "num_blocks", "node_ids", "num_tokens")
    PIN_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NODE_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    pin_id: str
    replicas: int
    num_blocks: int
    node_ids: _containers.RepeatedScalarFieldContainer[str]
    num_tokens: int
    def __init__(self, pin_id: _Optional[str] = ..., replicas: _Optional[int] = ..., num_blocks: _Optional[int] = ..., node_ids: _Optional[_Iterable[str]] = ..., num_tokens: _Optional[int] = ...) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("nodes", "num_blocks", "num_entries", "counters", "pins", "redis_used_memory_bytes")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NODES_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    PINS_FIELD_NUMBER: _ClassVar[int]
    REDIS_USED_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStats]
    num_blocks: int
    num_entries: int
    counters: _containers.ScalarMap[str, int]
    pins: _containers.RepeatedCompositeFieldContainer[PinInfo]
    redis_used_memory_bytes: int
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeStats, _Mapping]]] = ..., num_blocks: _Optional[int] = ..., num_entries: _Optional[int] = ..., counters: _Optional[_Mapping[str, int]] = ..., pins: _Optional[_Iterable[_Union[PinInfo, _Mapping]]] = ..., redis_used_memory_bytes: _Optional[int] = ...) -> None: ...

class FetchBlocksRequest(_message.Message):
    __slots__ = ("block_hashes", "model_id", "max_chunk_bytes", "requester", "accept_bundles", "accept_raw_stream")
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_BUNDLES_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_RAW_STREAM_FIELD_NUMBER: _ClassVar[int]
    block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    model_id: str
    max_chunk_bytes: int
    requester: str
    accept_bundles: bool
    accept_raw_stream: bool
    def __init__(self, block_hashes: _Optional[_Iterable[bytes]] = ..., model_id: _Optional[str] = ..., max_chunk_bytes: _Optional[int] = ..., requester: _Optional[str] = ..., accept_bundles: _Optional[bool] = ..., accept_raw_stream: _Optional[bool] = ...) -> None: ...

class BlockChunk(_message.Message):
    __slots__ = ("block_index", "block_hash", "chunk_index", "num_chunks", "data", "token_ids", "bundled", "raw_stream_address")
    BLOCK_INDEX_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    BUNDLED_FIELD_NUMBER: _ClassVar[int]
    RAW_STREAM_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    block_index: int
    block_hash: bytes
    chunk_index: int
    num_chunks: int
    data: bytes
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    bundled: _containers.RepeatedCompositeFieldContainer[BlockChunk]
    raw_stream_address: str
    def __init__(self, block_index: _Optional[int] = ..., block_hash: _Optional[bytes] = ..., chunk_index: _Optional[int] = ..., num_chunks: _Optional[int] = ..., data: _Optional[bytes] = ..., token_ids: _Optional[_Iterable[int]] = ..., bundled: _Optional[_Iterable[_Union[BlockChunk, _Mapping]]] = ..., raw_stream_address: _Optional[str] = ...) -> None: ...
