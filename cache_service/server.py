"""The CacheService gRPC server: servicer + health + reflection + the dead-node sweeper.

``CacheServiceServer`` lives on an asyncio loop (the CLI's). ``CacheServiceThread``
runs one on a private loop in a background thread, for the ``serve``
launcher and tests: ``start()`` returns once the port is bound, ``stop()``
shuts down gracefully and joins.

The service keeps no state Redis does not have: several replicas can share
one Redis (their sweepers are idempotent scripts).

With a ``member`` (``CacheServiceConfig.member``: the ``cache-service`` identity and the cluster
credential) only cluster members get past the first interceptor (UNAUTHENTICATED; under mutual TLS not
even past the handshake), and each RPC checks what the caller's identity may do (``access.py``). Without
one the service is open, as a library default for tests; ``prefixcache serve`` and ``prefixcache
cache-service`` always give one.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from cache_service.embedded_redis import connect
from cache_service.index import DEFAULT_PREFIX, ClusterIndex, IndexUnavailable
from cache_service.loop_thread import LoopThread
from cache_service.servicer import CacheServicer
from cache_service.validation import MAX_MESSAGE_BYTES
from common.cluster_auth import Member
from common.grpc_edge import EdgeInterceptor
from common.logs import RequestIdInterceptor, get_logger
from common.member_interceptor import MemberInterceptor
from protos.prefixcache.v1 import cache_pb2, cache_pb2_grpc

log = get_logger("cache_service")
# Lookups and heartbeats fail within ~1 s when Redis is unreachable; a large
# publication (a node's snapshot) may legitimately run longer on a busy Redis.
BULK_SOCKET_TIMEOUT_S = 10.0
# Request headers (a request id, a credential) are small: gRPC's own default (8 KiB), made explicit.
MAX_METADATA_BYTES = 8 * 1024
SERVICE_NAME = cache_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name


@dataclass(slots=True)
class CacheServiceConfig:
    redis_url: str
    host: str = "127.0.0.1"
    port: int = 50052  # 0: any free port
    key_prefix: str = DEFAULT_PREFIX
    # How often dead nodes' entries are removed (Lookup ignores them already).
    sweep_interval_s: float = 1.0
    grace_s: float = 2.0
    # Calls in flight; beyond it gRPC answers RESOURCE_EXHAUSTED at once (each may hold a 16 MiB message).
    max_concurrent_rpcs: int = 1024
    # Blocks one tenant's pins may hold; None: a quarter of the smallest live node's pool.
    pin_quota_blocks: int | None = None
    # Tenants that may unpin any tenant's pin, besides the literal "operator" (types.OPERATOR_TENANT).
    operator_tenants: frozenset[str] = frozenset()
    # This service's cluster identity (common/cluster_auth.py); None: open to anyone (tests, one process).
    member: Member | None = None


class CacheServiceServer:
    def __init__(self, config: CacheServiceConfig) -> None:
        self.config = config
        self.index = ClusterIndex(
            connect(config.redis_url), prefix=config.key_prefix,
            bulk_client=connect(config.redis_url, socket_timeout_s=BULK_SOCKET_TIMEOUT_S),
        )
        self.health = health_aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task] = []
        self.port: int | None = None

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def start(self) -> int:
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_metadata_size", MAX_METADATA_BYTES),
            ],
            maximum_concurrent_rpcs=self.config.max_concurrent_rpcs,
            # Request ids; members only (before anything is parsed); status codes at the edge.
            interceptors=[RequestIdInterceptor(), *self._member_interceptors(), EdgeInterceptor(log)],
        )
        servicer = CacheServicer(self.index, pin_quota_blocks=self.config.pin_quota_blocks,
                                 operator_tenants=self.config.operator_tenants)
        cache_pb2_grpc.add_CacheServiceServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
        )
        address = f"{self.config.host}:{self.config.port}"
        member = self.config.member
        port = member.add_port(server, address) if member is not None else server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot bind the cache service to {self.config.host}:{self.config.port}")
        await server.start()
        self._server, self.port = server, port
        await self._set_health(await self.index.ping())
        self._tasks.append(asyncio.create_task(self._sweep_loop(), name="cache-sweeper"))
        log.info("cache service listening", extra={"address": self.address, "redis_url": self.config.redis_url,
                                                   "members_only": repr(member) if member else "no (open)"})
        return port

    def _member_interceptors(self) -> list[MemberInterceptor]:
        return [MemberInterceptor(self.config.member)] if self.config.member is not None else []

    async def _set_health(self, ok: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def _sweep_loop(self) -> None:
        """Remove dead nodes' entries; health follows Redis reachability."""
        healthy = True
        while True:
            await asyncio.sleep(self.config.sweep_interval_s)
            try:
                result = await self.index.sweep()
                if result.num_removed_entries:
                    log.info("swept dead nodes", extra={"num_removed_entries": result.num_removed_entries,
                                                        "num_dead_nodes": result.num_dead_nodes})
                ok = True
            except IndexUnavailable as exc:
                if healthy:
                    log.warning("Redis unavailable", extra={"error": str(exc)})
                ok = False
            except Exception:  # noqa: BLE001 - the sweeper must survive anything
                log.exception("sweep failed")
                ok = False
            if ok != healthy:
                healthy = ok
                await self._set_health(ok)

    async def stop(self, grace_s: float | None = None) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self._server is not None:
            await self.health.enter_graceful_shutdown()
            await self._server.stop(self.config.grace_s if grace_s is None else grace_s)
            self._server = None
        await self.index.close()

    async def wait_for_termination(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()


class CacheServiceThread:
    """A CacheServiceServer on its own event loop in a daemon thread."""

    def __init__(self, config: CacheServiceConfig) -> None:
        self.config = config
        self.server: CacheServiceServer | None = None
        self._loop: LoopThread | None = None

    @property
    def address(self) -> str:
        assert self.server is not None, "not started"
        return self.server.address

    def start(self, timeout_s: float = 30.0) -> str:
        loop = LoopThread("cache-service").start()

        async def make() -> CacheServiceServer:
            server = CacheServiceServer(self.config)
            await server.start()
            return server

        try:
            self.server = loop.run(make(), timeout_s)
        except BaseException:
            loop.stop()
            raise
        self._loop = loop
        return self.address

    def stop(self, grace_s: float = 1.0) -> None:
        loop, server = self._loop, self.server
        self._loop = None
        if loop is None or server is None:
            return
        with contextlib.suppress(Exception):
            loop.run(server.stop(grace_s), grace_s + 10)
        loop.stop()
