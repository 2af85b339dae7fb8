"""The cache service a stack runs inside its own process: a Valkey child (unless a Redis URL is given) and the
CacheService gRPC server on a thread of its own.

    cache = EmbeddedCacheService(redis_url=None, host="127.0.0.1", port=50052)
    cache.start()          # -> the address workers dial, e.g. "127.0.0.1:50052"
    cache.stop()           # the server, then the Valkey we started (a given Redis is left alone)

The embedded Valkey is supervised and durable (``cache_service/embedded_redis.py``): if its process dies, it
is started again on the same port from its own append-only file, so the index, the nodes' registrations and
the pins are back as they were; the service's health goes NOT_SERVING meanwhile, the workers keep serving
from their own caches and republish what failed to reach it. It listens on 127.0.0.1 whatever ``host`` is:
only this process talks to it.

``stop`` undoes whatever part of ``start`` ran, so a start that failed half way leaves nothing behind.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cache_service.embedded_redis import EmbeddedRedis
    from cache_service.server import CacheServiceThread
    from common.cluster_auth import Member

__all__ = ["EmbeddedCacheService", "reachable"]


class EmbeddedCacheService:
    def __init__(self, redis_url: str | None, host: str, port: int, advertise_host: str | None = None,
                 member: Member | None = None) -> None:
        self.member = member  # the service's cluster identity (cache-service): members only
        self.redis_url = redis_url  # None until start(): then the embedded Valkey's
        self.host = host  # where the CacheService binds
        self.port = port
        self.advertise_host = advertise_host  # what workers dial (None: host, or our IP for a wildcard)
        self.redis: EmbeddedRedis | None = None  # ours to stop; None with a given Redis
        self.server: CacheServiceThread | None = None
        self.address: str | None = None  # what workers dial (never a wildcard)

    def start(self) -> str:
        from cache_service.embedded_redis import EmbeddedRedis
        from cache_service.server import CacheServiceConfig, CacheServiceThread

        if self.redis_url is None:
            self.redis = EmbeddedRedis(supervise=True, durable=True)
            self.redis_url = self.redis.start()
        self.server = CacheServiceThread(CacheServiceConfig(redis_url=self.redis_url, host=self.host,
                                                            port=self.port, member=self.member))
        self.server.start()
        bound = self.server.address
        self.address = (f"{self.advertise_host}:{bound.rpartition(':')[2]}" if self.advertise_host
                        else reachable(bound))
        return self.address

    def stop(self) -> None:
        """Safe to call twice and after a failed start; every step runs even if an earlier one failed."""
        if self.server is not None:
            with contextlib.suppress(Exception):
                self.server.stop()
            self.server = None
        if self.redis is not None:
            with contextlib.suppress(Exception):
                self.redis.stop()
            self.redis = None


def reachable(address: str) -> str:
    """A wildcard bind address is not something a worker on another machine can dial: use our IP."""
    from workers.ray_env import advertise_host

    host, _, port = address.rpartition(":")
    return f"{advertise_host(host)}:{port}"
