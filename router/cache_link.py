"""The router's channel to the CacheService: Lookup (the index's answer, as a fallback and for the
mirror-vs-service benchmark) and Pin/Unpin (which workers keep a shared prefix warm).

Short deadlines everywhere: the cache service is a control plane the request path can live without.
"""

from __future__ import annotations

from typing import Sequence

import grpc

from cache_service.block_hash import BlockHash
from common.logs import request_id_metadata
from protos.prefixcache.v1 import cache_pb2, cache_pb2_grpc

LOOKUP_TIMEOUT_S = 0.5
PIN_TIMEOUT_S = 5.0


class CacheLink:
    def __init__(self, address: str, model_id: str) -> None:
        self.address = address
        self.model_id = model_id
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = cache_pb2_grpc.CacheServiceStub(self._channel)

    async def lookup(self, hashes: Sequence[BlockHash]) -> dict[str, int]:
        if not hashes:
            return {}
        resp = await self._stub.Lookup(
            cache_pb2.LookupRequest(block_hashes=[bytes(h) for h in hashes], model_id=self.model_id),
            timeout=LOOKUP_TIMEOUT_S, metadata=request_id_metadata(),
        )
        return {m.node_id: m.num_blocks for m in resp.matches}

    async def pin(self, pin_id: str, hashes: Sequence[BlockHash], token_ids: Sequence[int], cache_salt: str,
                  replicas: int, ttl_seconds: int, tenant: str = "") -> list[str]:
        resp = await self._stub.Pin(
            cache_pb2.PinBlocksRequest(
                pin_id=pin_id, block_hashes=[bytes(h) for h in hashes], replicas=replicas, ttl_seconds=ttl_seconds,
                token_ids=list(token_ids), cache_salt=cache_salt, model_id=self.model_id, tenant=tenant,
            ),
            timeout=PIN_TIMEOUT_S, metadata=request_id_metadata(),
        )
        return list(resp.node_ids)

    async def unpin(self, pin_id: str, tenant: str = "") -> tuple[bool, list[str]]:
        resp = await self._stub.Unpin(cache_pb2.PinBlocksRequest(pin_id=pin_id, model_id=self.model_id, tenant=tenant),
                                      timeout=PIN_TIMEOUT_S, metadata=request_id_metadata())
        return resp.found, list(resp.node_ids)

    async def close(self) -> None:
        await self._channel.close()
