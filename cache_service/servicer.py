"""CacheService over grpc.aio: validate, convert protos at the edge, delegate to the index.

Status codes:
    INVALID_ARGUMENT     malformed or oversize request (nothing is written to Redis)
    NOT_FOUND            PublishEvents from a node that is not registered / expired
    FAILED_PRECONDITION  PublishEvents with a stale epoch (an earlier incarnation)
    UNAVAILABLE          Redis is down (fails fast: short socket timeouts)
    PERMISSION_DENIED    Unpin (or Pin again) of another tenant's pin; a member calling what its identity may
                         not (cache_service/access.py: a node for another node, a worker pinning, ...)
    UNAUTHENTICATED      no cluster credential, or one that does not verify (common/member_interceptor.py)
    RESOURCE_EXHAUSTED   a Pin over its tenant's quota of pinned blocks
    INTERNAL             anything else (logged with its traceback; the caller gets a generic message)
Heartbeat from an unknown node is not an error: it answers ``known=false``,
which tells the node to register again and republish.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, TypeVar

import grpc

from cache_service import access
from cache_service import validation as v
from cache_service.block_hash import BlockHash
from cache_service.index import (
    ClusterIndex,
    IndexUnavailable,
    NodeExpired,
    NodeNotFound,
    PinNotYours,
    PinQuotaExceeded,
    StaleEpoch,
)
from cache_service.records import AllBlocksCleared, BlockEvent, BlockRemoved, BlockStored, Tier, WorkerLoad
from cache_service.types import (DEFAULT_TENANT, OPERATOR_TENANT, NodeInfo, PinSpec, PrefixMatch, TierCounts,
                                 TransferCounts)
from common.cluster_auth import Caller, PermissionDenied
from common.grpc_edge import abort_internal
from common.logs import get_logger
from common.member_interceptor import current_caller
from protos.prefixcache.v1 import cache_pb2 as pb
from protos.prefixcache.v1 import cache_pb2_grpc

log = get_logger("cache_service")
T = TypeVar("T")


def node_info_from_proto(m: pb.NodeInfo) -> NodeInfo:
    return NodeInfo(
        node_id=m.node_id,
        transfer_address=m.transfer_address,
        model_id=m.model_id,
        block_size=m.block_size,
        capacity_blocks=m.capacity_blocks,
        block_nbytes=m.block_nbytes,
        prefill_tokens_per_s=m.prefill_tokens_per_s,
        transfer_bytes_per_s=m.transfer_bytes_per_s,
        ray_node_id=m.ray_node_id,
    )


def node_info_to_proto(i: NodeInfo) -> pb.NodeInfo:
    return pb.NodeInfo(
        node_id=i.node_id, transfer_address=i.transfer_address, model_id=i.model_id, block_size=i.block_size,
        capacity_blocks=i.capacity_blocks, block_nbytes=i.block_nbytes,
        prefill_tokens_per_s=i.prefill_tokens_per_s, transfer_bytes_per_s=i.transfer_bytes_per_s,
        ray_node_id=i.ray_node_id,
    )


_TIERS = frozenset(int(t) for t in Tier)


def match_to_proto(m: PrefixMatch) -> pb.NodeMatch:
    tiers = m.tiers if m.tiers is not None else TierCounts(m.num_blocks)
    return pb.NodeMatch(node_id=m.node_id, num_blocks=m.num_blocks, transfer_address=m.transfer_address,
                        num_device_blocks=tiers.device, num_host_blocks=tiers.host, num_disk_blocks=tiers.disk)


def _events_from_proto(events: Any) -> list[BlockEvent]:
    out: list[BlockEvent] = []
    for i, e in enumerate(events):
        kind = e.WhichOneof("kind")
        if kind == "stored":
            v.check_hashes([e.stored.block_hash], f"events[{i}].stored.block_hash", 1)
            if e.stored.parent_hash:
                v.check_hashes([e.stored.parent_hash], f"events[{i}].stored.parent_hash", 1)
            if e.stored.tier not in _TIERS:  # an enum field carries any int32 on the wire
                raise v.InvalidRequest(f"events[{i}].stored.tier is {e.stored.tier}; it must be 0 (device), "
                                       "1 (host) or 2 (disk)")
            out.append(BlockStored(BlockHash(e.stored.block_hash), BlockHash(e.stored.parent_hash) or None,
                                   tier=Tier(e.stored.tier)))
        elif kind == "removed":
            v.check_hashes([e.removed.block_hash], f"events[{i}].removed.block_hash", 1)
            out.append(BlockRemoved(BlockHash(e.removed.block_hash)))
        elif kind == "cleared":
            out.append(AllBlocksCleared())
        else:
            raise v.InvalidRequest(f"events[{i}] has no kind (stored, removed or cleared)")
    return out


class CacheServicer(cache_pb2_grpc.CacheServiceServicer):
    def __init__(self, index: ClusterIndex, *, pin_quota_blocks: int | None = None,
                 operator_tenants: frozenset[str] = frozenset()) -> None:
        self.index = index
        # None: a quarter of the smallest live node's pool, per tenant (types.DEFAULT_PIN_QUOTA_FRACTION).
        self.pin_quota_blocks = pin_quota_blocks
        self.operator_tenants = frozenset(operator_tenants) | {OPERATOR_TENANT}

    def _operator(self, tenant: str, caller: Caller | None) -> bool:
        """May act on any tenant's pin: an operator tenant named by the router, or the operator identity itself."""
        return tenant in self.operator_tenants or access.is_operator(caller)

    async def _call(self, context: grpc.aio.ServicerContext, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn`` mapping the core's errors to status codes (abort raises)."""
        try:
            return await fn()
        except PermissionDenied as exc:  # checked first in every handler: nothing was read or written
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except v.InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except (NodeNotFound, NodeExpired) as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except StaleEpoch as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except IndexUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except grpc.aio.AbortError:
            raise  # already answered with its code
        except Exception as exc:  # noqa: BLE001 - a bug, or Redis answering what we did not expect
            await abort_internal(context, log, exc, "CacheService")
        raise AssertionError("unreachable")  # abort always raises

    async def RegisterNode(self, request: pb.RegisterNodeRequest, context: grpc.aio.ServicerContext):
        async def go() -> pb.RegisterNodeResponse:
            n = request.node
            access.check_node(current_caller(), n.node_id, "RegisterNode")
            v.check_id(n.node_id, "node.node_id")
            v.check_address(n.transfer_address, "node.transfer_address")
            v.check_text(n.model_id, "node.model_id", v.MAX_MODEL_ID_LEN, required=True)
            v.check_range(n.block_size, "node.block_size", 1, v.MAX_BLOCK_SIZE)
            v.check_text(n.ray_node_id, "node.ray_node_id", v.MAX_ID_LEN)
            ttl = request.ttl_seconds or v.DEFAULT_HEARTBEAT_TTL_S
            v.check_range(ttl, "ttl_seconds", 1, v.MAX_HEARTBEAT_TTL_S)
            reg = await self.index.register(node_info_from_proto(n), ttl)
            log.info("registered node", extra={"node_id": reg.node_id, "epoch": reg.epoch})
            return pb.RegisterNodeResponse(epoch=reg.epoch)

        return await self._call(context, go)

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext):
        async def go() -> pb.HeartbeatResponse:
            access.check_node(current_caller(), request.node_id, "Heartbeat")  # its answer holds pinned tokens
            v.check_id(request.node_id, "node_id")
            ld, t = request.load, request.transfers
            res = await self.index.heartbeat(
                request.node_id, request.epoch,
                WorkerLoad(request.node_id, num_running=ld.num_running, num_waiting=ld.num_waiting,
                           num_free_blocks=ld.num_free_blocks, num_cached_blocks=ld.num_cached_blocks),
                TransferCounts(t.num_transfers, t.num_failed, t.num_blocks, t.num_bytes),
            )
            return pb.HeartbeatResponse(
                known=res.known,
                pins=[pb.PinAssignment(pin_id=p.pin_id, token_ids=p.token_ids, cache_salt=p.cache_salt,
                                       num_blocks=p.num_blocks) for p in res.pins],
            )

        return await self._call(context, go)

    async def PublishEvents(self, request: pb.PublishEventsRequest, context: grpc.aio.ServicerContext):
        async def go() -> pb.PublishEventsResponse:
            access.check_node(current_caller(), request.node_id, "PublishEvents")
            v.check_id(request.node_id, "node_id")
            if len(request.events) > v.MAX_EVENTS_PER_PUBLISH:
                raise v.InvalidRequest(
                    f"events has {len(request.events)} entries; the limit is {v.MAX_EVENTS_PER_PUBLISH} per request"
                )
            events = _events_from_proto(request.events)
            n = await self.index.publish(request.node_id, request.epoch, events, full_snapshot=request.full_snapshot)
            return pb.PublishEventsResponse(num_applied=n)

        return await self._call(context, go)

    async def Lookup(self, request: pb.LookupRequest, context: grpc.aio.ServicerContext):
        async def go() -> pb.LookupResponse:
            access.check_lookup(current_caller())
            hashes = v.check_hashes(request.block_hashes, "block_hashes", v.MAX_LOOKUP_BLOCKS)
            v.check_text(request.model_id, "model_id", v.MAX_MODEL_ID_LEN)
            if not hashes:
                return pb.LookupResponse()  # a prompt shorter than one block: nothing to share
            matches = await self.index.lookup([BlockHash(h) for h in hashes], request.model_id)
            return pb.LookupResponse(matches=[match_to_proto(m) for m in matches])

        return await self._call(context, go)

    async def Pin(self, request: pb.PinBlocksRequest, context: grpc.aio.ServicerContext):
        async def go() -> pb.PinBlocksResponse:
            caller = current_caller()
            access.check_router_or_operator(caller, "Pin")
            v.check_id(request.pin_id, "pin_id")
            v.check_text(request.model_id, "model_id", v.MAX_MODEL_ID_LEN, required=True)
            v.check_text(request.cache_salt, "cache_salt", v.MAX_SALT_LEN)
            tokens = v.check_tokens(request.token_ids, "token_ids", v.MAX_PIN_TOKENS)
            hashes = v.check_hashes(request.block_hashes, "block_hashes", v.MAX_PIN_BLOCKS)
            if not hashes:
                raise v.InvalidRequest("block_hashes is required (the prefix's full blocks, in chain order)")
            if len(hashes) > len(tokens):
                raise v.InvalidRequest(f"{len(hashes)} block_hashes cannot come from {len(tokens)} token_ids")
            replicas = v.check_range(request.replicas or 1, "replicas", 1, v.MAX_REPLICAS)
            ttl = v.check_range(request.ttl_seconds, "ttl_seconds", 0, v.MAX_PIN_TTL_S)
            tenant = v.check_tenant(request.tenant) or DEFAULT_TENANT
            spec = PinSpec(request.pin_id, request.model_id, [BlockHash(h) for h in hashes], tokens,
                           request.cache_salt, replicas, ttl, tenant)
            try:
                holders = await self.index.pin(spec, operator=self._operator(tenant, caller),
                                               quota_blocks=self.pin_quota_blocks)
            except PinNotYours as exc:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
            except PinQuotaExceeded as exc:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            return pb.PinBlocksResponse(pin_id=request.pin_id, node_ids=holders, found=True)

        return await self._call(context, go)

    async def Unpin(self, request: pb.PinBlocksRequest, context: grpc.aio.ServicerContext):
        async def go() -> pb.PinBlocksResponse:
            caller = current_caller()
            access.check_router_or_operator(caller, "Unpin")
            v.check_id(request.pin_id, "pin_id")
            tenant = v.check_tenant(request.tenant) or DEFAULT_TENANT
            try:
                found, holders = await self.index.unpin(request.pin_id, tenant,
                                                        operator=self._operator(tenant, caller))
            except PinNotYours as exc:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
            return pb.PinBlocksResponse(pin_id=request.pin_id, node_ids=holders, found=found)

        return await self._call(context, go)

    async def GetStats(self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext):
        async def go() -> pb.GetStatsResponse:
            access.check_router_or_operator(current_caller(), "GetStats")
            s = await self.index.stats()
            return pb.GetStatsResponse(
                nodes=[
                    pb.NodeStats(
                        node=node_info_to_proto(n.info),
                        load=pb.NodeLoad(num_running=n.load.num_running, num_waiting=n.load.num_waiting,
                                         num_free_blocks=n.load.num_free_blocks,
                                         num_cached_blocks=n.load.num_cached_blocks),
                        num_indexed_blocks=n.num_indexed_blocks, alive=n.alive, epoch=n.epoch,
                    )
                    for n in s.nodes
                ],
                num_blocks=s.num_blocks,
                num_entries=s.num_entries,
                counters=s.counters,
                # No salt and no tokens (trust model): the holders get those with their heartbeats.
                pins=[pb.PinInfo(pin_id=p.pin_id, replicas=p.replicas, num_blocks=p.num_blocks,
                                 node_ids=p.node_ids, num_tokens=p.num_tokens)
                      for p in s.pins],
                redis_used_memory_bytes=s.redis_used_memory_bytes,
            )

        return await self._call(context, go)
