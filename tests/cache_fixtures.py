"""Shared pieces for the tests that run real engines as cache nodes (two or more in one process).

Every engine shares one loaded demo model (``Engine(cfg, loaded=...)``) and
has a small pool; each node has its own BlockTransfer server on loopback.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator

import pytest

from cache_service.cache_node import CacheNodeConfig
from cache_service.client import CacheClientConfig
from cache_service.local_node import LocalCacheNode
from cache_service.prefix_fetcher import FetcherConfig
from cache_service.server import CacheServiceConfig, CacheServiceThread
from common.cluster_auth import ClusterCredential, Member
from workers.engine import Engine, EngineConfig
from cache_service.records import SamplingParams

PARAMS = SamplingParams(max_tokens=6, temperature=0.0)


@pytest.fixture(scope="module")
def demo_model():
    from workers.model import load_model

    return load_model("demo")


@pytest.fixture(scope="module")
def cache_service(valkey_module) -> Iterator[CacheServiceThread]:
    svc = CacheServiceThread(CacheServiceConfig(redis_url=valkey_module.url, port=0, sweep_interval_s=0.2))
    svc.start()
    yield svc
    svc.stop()


def node_config(raw_stream: bool = True, member: Member | None = None, **fetcher: object) -> CacheNodeConfig:
    return CacheNodeConfig(
        raw_stream=raw_stream, member=member,
        client=CacheClientConfig(ttl_s=1, heartbeat_interval_s=0.2, publish_interval_s=0.02,
                                 backoff_initial_s=0.05, backoff_max_s=0.3, rpc_timeout_s=1.0),
        # Generous deadlines: this machine is shared; the slow-peer test sets its own.
        fetcher=FetcherConfig(**{"always_transfer": True, "min_deadline_s": 10.0, "max_deadline_s": 20.0,
                                 **fetcher}),
    )


@pytest.fixture
def make_node(demo_model, cache_service, valkey_module) -> Iterator[Callable[..., LocalCacheNode]]:
    """``make_node("A", num_blocks=64, kv_cache_dtype="auto", **fetcher_config)``; all are stopped at the end
    of the test. ``credential``: the node joins as the member ``node_id`` of a cluster with that credential."""
    from cache_service.embedded_redis import connect_sync

    connect_sync(valkey_module.url).flushall()
    nodes: list[LocalCacheNode] = []

    def make(node_id: str, num_blocks: int = 64, cache_address: str | None = "default",
             wait_registered_s: float = 10.0, raw_stream: bool = True, kv_cache_dtype: str = "auto",
             credential: ClusterCredential | None = None, **fetcher: object):
        engine = Engine(EngineConfig(model="demo", num_blocks=num_blocks, kv_cache_dtype=kv_cache_dtype),
                        loaded=demo_model)
        address = cache_service.address if cache_address == "default" else cache_address
        member = Member(node_id, credential) if credential is not None else None
        node = LocalCacheNode(engine, node_id, cache_address=address,
                              config=node_config(raw_stream, member, **fetcher))
        nodes.append(node)
        return node.start(wait_registered_s)

    yield make
    for node in nodes:
        node.stop()


def cold_output(demo_model, prompt: list[int], params: SamplingParams = PARAMS, kv_cache_dtype: str = "auto") -> list[int]:
    """What an engine with an empty cache generates for ``prompt`` (the oracle)."""
    engine = Engine(EngineConfig(model="demo", num_blocks=64, kv_cache_dtype=kv_cache_dtype), loaded=demo_model)
    return engine.generate([prompt], params)[0].new_token_ids


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def prompt_of(n: int, seed: int = 0) -> list[int]:
    """``n`` deterministic byte-range token ids (the demo vocabulary holds them all)."""
    return [(seed * 37 + i * 11) % 250 + 3 for i in range(n)]


class MemberStub:
    """A CacheService stub whose every call carries ``member``'s cluster credential: for tests that call a
    members-only service (a whole stack's: ``Stack.credential``) as an operator, the router or a node."""

    def __init__(self, address: str, member: Member) -> None:
        from protos.prefixcache.v1 import cache_pb2_grpc

        self.member = member
        self.channel = member.sync_channel(address, "cache-service")
        self._stub = cache_pb2_grpc.CacheServiceStub(self.channel)

    def __getattr__(self, name: str) -> Callable[..., object]:
        call = getattr(self._stub, name)
        path = f"/prefixcache.v1.CacheService/{name}"

        def signed_call(request: object, metadata: tuple = (), **kwargs: object) -> object:
            # A token per call: a stub kept for minutes must not send one past the clock skew.
            return call(request, metadata=(*metadata, *self.member.call_metadata(path)), **kwargs)

        return signed_call

    def close(self) -> None:
        self.channel.close()


def member_stub(address: str, credential: ClusterCredential, identity: str = "operator") -> MemberStub:
    return MemberStub(address, Member(identity, credential))
