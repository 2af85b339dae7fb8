"""The router's channel to the CacheService: Lookup (the index's answer, as a fallback and for the
mirror-vs-service benchmark) and Pin/Unpin (which workers keep a shared prefix warm).

Short deadlines everywhere: the cache service is a control plane the request path can live without.

A failed call raises ``CacheServiceError`` with the code the router's caller should get:

    the service's code                        the router's caller gets
    INVALID_ARGUMENT, NOT_FOUND,              the same code and the service's details: they say what is
      FAILED_PRECONDITION, RESOURCE_EXHAUSTED wrong with the request (a refused pin stays INVALID_ARGUMENT)
    UNAVAILABLE, DEADLINE_EXCEEDED            the same code in our words: the service's (or the channel's)
                                              name hosts, ports and Redis, which outsiders must not learn
    anything else (UNKNOWN, INTERNAL, ...)    UNAVAILABLE: a fault between router and service, not the caller's

The words not relayed stay on the error (``cause``) for the router's log.

With the router's cluster identity (``member``: ``router`` and the cluster credential) every call carries
the router's token (shared secret) or rides a mutual-TLS channel that checks the service's certificate;
the service lets the router Lookup, Pin, Unpin and GetStats, nothing a node does.
"""

from __future__ import annotations

from typing import Awaitable, Sequence, TypeVar

import grpc

from cache_service.block_hash import BlockHash
from cache_service.types import TierCounts
from common.cluster_auth import CACHE_SERVICE_IDENTITY, Member
from common.grpc_edge import short_detail
from common.logs import request_id_metadata
from protos.prefixcache.v1 import cache_pb2, cache_pb2_grpc

T = TypeVar("T")

LOOKUP_TIMEOUT_S = 0.5
PIN_TIMEOUT_S = 5.0
# Codes whose details describe the request: the router's caller gets them as they are.
RELAYED_WITH_DETAILS = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.PERMISSION_DENIED,
})
# Codes that describe the service's state: relayed, in our words.
RELAYED_STATE = {
    grpc.StatusCode.UNAVAILABLE: "the cache service is unavailable",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the cache service did not answer in time",
}


class CacheServiceError(Exception):
    """A cache service call failed: ``code`` and ``details`` are what the router answers its own caller,
    ``cause`` what the service (or the channel) said, for the log."""

    def __init__(self, code: grpc.StatusCode, details: str, cause: str = "") -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.cause = cause

    @classmethod
    def of(cls, what: str, exc: grpc.aio.AioRpcError) -> CacheServiceError:
        code, said = exc.code(), exc.details() or ""
        if code in RELAYED_WITH_DETAILS:
            return cls(code, f"cache service {what}: {short_detail(said or code.name)}")
        cause = f"{code.name}: {said}"
        if code in RELAYED_STATE:
            return cls(code, f"{RELAYED_STATE[code]} ({what})", cause)
        return cls(grpc.StatusCode.UNAVAILABLE, f"the cache service failed ({what}: {code.name})", cause)


SERVICE_NAME = cache_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name


class CacheLink:
    def __init__(self, address: str, model_id: str, member: Member | None = None) -> None:
        self.address = address
        self.model_id = model_id
        self.member = member  # None: a service that runs open (tests)
        self._channel = (member.channel(address, CACHE_SERVICE_IDENTITY) if member is not None
                         else grpc.aio.insecure_channel(address))
        self._stub = cache_pb2_grpc.CacheServiceStub(self._channel)

    def _metadata(self, method: str) -> tuple[tuple[str, str], ...]:
        auth = self.member.call_metadata(f"/{SERVICE_NAME}/{method}") if self.member is not None else ()
        return (*request_id_metadata(), *auth)

    async def lookup(self, hashes: Sequence[BlockHash]) -> dict[str, int]:
        if not hashes:
            return {}
        resp = await self._call("Lookup", self._stub.Lookup(
            cache_pb2.LookupRequest(block_hashes=[bytes(h) for h in hashes], model_id=self.model_id),
            timeout=LOOKUP_TIMEOUT_S, metadata=self._metadata("Lookup"),
        ))
        return {m.node_id: m.num_blocks for m in resp.matches}

    async def lookup_tiers(self, hashes: Sequence[BlockHash]) -> tuple[dict[str, int], dict[str, TierCounts]]:
        """``lookup``, and the tier split of the matches that are partly on host or disk (routing.py)."""
        if not hashes:
            return {}, {}
        resp = await self._call("Lookup", self._stub.Lookup(
            cache_pb2.LookupRequest(block_hashes=[bytes(h) for h in hashes], model_id=self.model_id),
            timeout=LOOKUP_TIMEOUT_S, metadata=self._metadata("Lookup"),
        ))
        tiers = {m.node_id: TierCounts(m.num_device_blocks, m.num_host_blocks, m.num_disk_blocks)
                 for m in resp.matches if m.num_host_blocks or m.num_disk_blocks}
        return {m.node_id: m.num_blocks for m in resp.matches}, tiers

    async def pin(self, pin_id: str, hashes: Sequence[BlockHash], token_ids: Sequence[int], cache_salt: str,
                  replicas: int, ttl_seconds: int, tenant: str = "") -> list[str]:
        resp = await self._call("Pin", self._stub.Pin(
            cache_pb2.PinBlocksRequest(
                pin_id=pin_id, block_hashes=[bytes(h) for h in hashes], replicas=replicas, ttl_seconds=ttl_seconds,
                token_ids=list(token_ids), cache_salt=cache_salt, model_id=self.model_id, tenant=tenant,
            ),
            timeout=PIN_TIMEOUT_S, metadata=self._metadata("Pin"),
        ))
        return list(resp.node_ids)

    async def unpin(self, pin_id: str, tenant: str = "") -> tuple[bool, list[str]]:
        resp = await self._call("Unpin", self._stub.Unpin(
            cache_pb2.PinBlocksRequest(pin_id=pin_id, model_id=self.model_id, tenant=tenant),
            timeout=PIN_TIMEOUT_S, metadata=self._metadata("Unpin"),
        ))
        return resp.found, list(resp.node_ids)

    @staticmethod
    async def _call(what: str, call: Awaitable[T]) -> T:
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            raise CacheServiceError.of(what, exc) from None

    async def close(self) -> None:
        await self._channel.close()
