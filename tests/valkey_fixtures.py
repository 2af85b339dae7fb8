"""Embedded Valkey fixtures shared by the test modules that need a real Redis.

Use in a test module with::

    from valkey_fixtures import valkey, valkey_module  # noqa: F401  (pytest fixtures)

Each fixture yields a started ``EmbeddedRedis`` on an explicit free port; the
test may ``stop()`` and ``start()`` it again (same port, empty data: a Redis
restart that lost its dataset). The fixture stops it at the end.
"""

from __future__ import annotations

from typing import Iterator

import pytest

from cache_service.embedded_redis import EmbeddedRedis, connect_sync
from cache_service.index import DEFAULT_PREFIX, heartbeat_key, node_ids_key


def _start() -> EmbeddedRedis:
    server = EmbeddedRedis()
    server.start()
    return server


@pytest.fixture
def valkey() -> Iterator[EmbeddedRedis]:
    """A fresh Valkey for one test."""
    server = _start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def valkey_module() -> Iterator[EmbeddedRedis]:
    """One Valkey shared by a module's tests (flush it yourself if a test needs it empty)."""
    server = _start()
    try:
        yield server
    finally:
        server.stop()


def redis_dump(server: EmbeddedRedis) -> dict[bytes, object]:
    """Every key with its value (by type), to assert that a request changed nothing."""
    r = connect_sync(server.url)
    try:
        out: dict[bytes, object] = {}
        for key in r.scan_iter(count=1000):
            kind = r.type(key)
            if kind == b"string":
                out[key] = r.get(key)
            elif kind == b"hash":
                out[key] = r.hgetall(key)
            elif kind == b"set":
                out[key] = r.smembers(key)
            elif kind == b"list":
                out[key] = r.lrange(key, 0, -1)
            else:
                out[key] = kind
        return out
    finally:
        r.close()


def expire_node(server: EmbeddedRedis, node_id: str) -> int:
    """What a node's heartbeat TTL running out does, now: its heartbeat key is gone (no sleeping past a TTL).

    Returns the TTL the key had left (ms), to show it was going to expire on its own."""
    r = connect_sync(server.url)
    try:
        key = heartbeat_key(DEFAULT_PREFIX, r.hget(node_ids_key(DEFAULT_PREFIX), node_id).decode())
        ttl_left_ms = r.pttl(key)
        assert r.delete(key) == 1
        return ttl_left_ms
    finally:
        r.close()
